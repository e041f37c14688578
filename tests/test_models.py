"""The architecture: exact sizes, official numerics (against timm, which reproduces the official checkpoints), the
backbone API, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import davit
from davit.models import ChannelAttention, DaViT, DaViTConfig, count_params, drop_path_rates, get_config

timm = pytest.importorskip("timm")

# Official parameter counts with a 1000-class head (official code comments; H/G with 3x3 overlapped downsampling
# reproduce the paper's 362M / 1437M). Not produced by this code.
OFFICIAL_PARAMS = {
    "davit_tiny": 28_360_168,
    "davit_small": 49_745_896,
    "davit_base": 87_954_408,
    "davit_large": 196_811_752,
    "davit_huge": 362_685_416,
    "davit_giant": 1_437_435_880,
}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_param_counts_match_official_on_meta(name: str) -> None:
    model = davit.create_model(name, device="meta")
    assert count_params(model) == OFFICIAL_PARAMS[name]
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", ["davit_base_fl", "davit_huge_fl", "davit_huge", "davit_giant"])
def test_param_counts_match_timm_structure(name: str) -> None:
    # Florence towers equal timm's; timm's huge/giant use 2x2 downsampling, ours 3x3: compare with the kernel matched.
    kernel = {"davit_huge": 3, "davit_giant": 3}.get(name)
    extra = {"down_kernel_size": kernel} if kernel else {}
    with torch.device("meta"):
        ref = timm.create_model(name, num_classes=1000, **extra)
    ours = davit.create_model(name, num_classes=1000, device="meta")
    assert count_params(ours) == sum(p.numel() for p in ref.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k.replace("spatial_block", "0").replace("channel_block", "1"): v.shape for k, v in ref.state_dict().items()
    }


def _perturbed_timm(name: str) -> nn.Module:
    ref = timm.create_model(name, num_classes=1000).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


SIZES = [(2, 224, 224), (1, 250, 333), (1, 57, 71), (1, 20, 20)]


@pytest.mark.parametrize(
    "name",
    [
        "davit_tiny",
        "davit_base_fl",
        pytest.param("davit_small", marks=pytest.mark.slow),
        pytest.param("davit_base", marks=pytest.mark.slow),
        pytest.param("davit_huge_fl", marks=pytest.mark.slow),
    ],
)
def test_logits_match_timm(name: str) -> None:
    ref = _perturbed_timm(name)
    ours = davit.create_model(name, num_classes=1000).eval()
    davit.load_checkpoint(ours, ref.state_dict())
    sizes = SIZES if name == "davit_tiny" else SIZES[:2]
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            expected, got = ref(x), ours(x)
        assert got.shape == (b, 1000)
        assert _rel_err(expected, got) < 1e-5, (name, h, w)


def test_features_match_timm_intermediates() -> None:
    ref = _perturbed_timm("davit_tiny")
    ours = davit.create_model("davit_tiny").eval()
    davit.load_checkpoint(ours, ref.state_dict())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        exp = ref.forward_intermediates(x, intermediates_only=True)
        got = ours.forward_intermediates(x, intermediates_only=True)
        feats = ours.forward_features(x)
    for e, g in zip(exp, got):
        assert e.shape == g.shape and _rel_err(e, g) < 1e-5
    assert torch.allclose(feats, got[-1])


def test_channel_attention_is_the_official_formula() -> None:
    # Independent computation of the official form: A = softmax((k * Cg^-0.5)^T v), out = (A q^T)^T, per group.
    torch.manual_seed(1)
    dim, groups, n = 64, 2, 10
    attn = ChannelAttention(dim, groups).eval()
    x = torch.randn(3, n, dim)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    cg = dim // groups
    outs = []
    for g in range(groups):
        sl = slice(g * cg, (g + 1) * cg)
        a = torch.softmax((k[..., sl] * cg**-0.5).transpose(1, 2) @ v[..., sl], dim=-1)  # (B, Cg, Cg)
        outs.append((a @ q[..., sl].transpose(1, 2)).transpose(1, 2))  # (B, N, Cg)
    expected = torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_head_pools_before_norm(tiny_model: DaViT) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = tiny_model.forward_features(x)
        pooled = torch.nn.functional.layer_norm(
            feats.mean((2, 3)), (feats.shape[1],), tiny_model.head.norm.weight, tiny_model.head.norm.bias
        )
        assert torch.allclose(tiny_model.forward_head(feats, pre_logits=True), pooled, atol=1e-6)
        assert torch.allclose(tiny_model(x), tiny_model.head.fc(pooled), atol=1e-5)


def test_drop_path_schedules() -> None:
    cfg = get_config("davit_tiny")  # 6 dual blocks = 12 single blocks at rate 0.1
    official = torch.linspace(0, 0.1, 12).tolist()
    flat = [r for stage in drop_path_rates(cfg) for r in stage]
    assert flat == pytest.approx(official, abs=1e-7)
    pair = [r for stage in drop_path_rates(cfg.replace(drop_path_schedule="pair")) for r in stage]
    timm_rates = torch.linspace(0, 0.1, 6).tolist()
    assert pair == pytest.approx([r for r in timm_rates for _ in range(2)], abs=1e-7)
    model = DaViT(cfg)
    got = [blk.drop_path.prob for s in model.stages for pair_ in s.blocks for blk in pair_]
    assert got == pytest.approx(official, abs=1e-7)


@pytest.mark.parametrize("types", [("spatial",), ("channel",), ("spatial", "channel"), ("channel", "spatial")])
def test_attention_arrangements_for_ablations(types: tuple[str, ...]) -> None:
    model = DaViT(
        DaViTConfig(
            embed_dims=(16, 32, 64, 128),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 4, 8),
            attention_types=types,
            num_classes=5,
        )
    ).eval()
    kinds = [type(b).__name__ for b in model.stages[0].blocks[0]]
    assert kinds == [{"spatial": "SpatialBlock", "channel": "ChannelBlock"}[t] for t in types]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_attention_only_variant_runs() -> None:
    # timm fails at forward for ffn=False; ours keeps the second CPE and drops the MLPs.
    model = DaViT(DaViTConfig(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), ffn=False))
    assert not any("mlp" in k for k in model.state_dict())
    assert any("cpe2" in k for k in model.state_dict())
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()


def test_features_only_strides_channels_and_norms() -> None:
    model = davit.create_model("davit_tiny", features_only=True, out_indices=(1, 2, 3)).eval()
    assert [f["num_chs"] for f in model.feature_info] == [192, 384, 768]
    assert [f["reduction"] for f in model.feature_info] == [8, 16, 32]
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        maps = model(x)
        raw = model.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    for m, r, info in zip(maps, raw, model.feature_info):
        assert m.shape == (1, info["num_chs"], 256 // info["reduction"], 320 // info["reduction"])
        # each map is its raw stage output after its own LayerNorm over channels
        normed = nn.functional.layer_norm(r.permute(0, 2, 3, 1), (r.shape[1],), eps=1e-5).permute(0, 3, 1, 2)
        assert torch.allclose(m, normed, atol=1e-5)
    assert sorted(k for k in model.state_dict() if k.startswith("out_norms")) == [
        f"out_norms.{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")
    ]
    assert not any(k.startswith("head") for k in model.state_dict())


def test_grad_checkpointing_same_outputs_and_grads(tiny_cfg: DaViTConfig) -> None:
    torch.manual_seed(0)
    a = DaViT(tiny_cfg.replace(drop_path_rate=0.0))
    b = DaViT(tiny_cfg.replace(drop_path_rate=0.0))
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 48, 40)
    ya, yb = a(x), b(x)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.allclose(ya, yb, atol=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-5), n


def test_input_size_agnostic_including_smaller_than_a_window(tiny_model: DaViT) -> None:
    for h, w in [(7, 9), (33, 17), (64, 64)]:
        assert tiny_model(torch.randn(1, 3, h, w)).shape == (1, 10)


def test_bad_input_shapes_give_clear_errors(tiny_model: DaViT) -> None:
    with pytest.raises(ValueError, match="grayscale"):
        tiny_model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="batch dimension"):
        tiny_model(torch.randn(3, 32, 32))


def test_config_validation_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        DaViTConfig(embed_dims=(96, 192, 384, 760))
    with pytest.raises(ValueError, match="attention_types"):
        DaViTConfig(attention_types=("spatial", "global"))
    with pytest.raises(KeyError, match="davit_tiny"):
        davit.create_model("davit_teeny")
    with pytest.raises(ValueError, match="unknown DaViTConfig fields"):
        DaViTConfig.from_dict({"embed_dim": 3})


def test_reset_classifier_and_dtype(tiny_model: DaViT) -> None:
    tiny_model.reset_classifier(3)
    assert tiny_model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert tiny_model.cfg.num_classes == 3
    tiny_model.reset_classifier(0)
    assert tiny_model(torch.randn(1, 3, 32, 32)).shape == (1, 128)
    m = davit.create_model("davit_tiny", dtype=torch.bfloat16, embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
    assert m.dtype == torch.bfloat16
    assert m(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_drop_path_active_only_in_training(tiny_cfg: DaViTConfig) -> None:
    model = DaViT(tiny_cfg.replace(drop_path_rate=0.5))
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
