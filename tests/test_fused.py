"""Training kernels (davit.models.fused): the memory-saving levels give autograd's gradients and store less; the CPU
training path of window attention computes what SDPA computes."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from davit.models import DaViT, DaViTConfig
from davit.models.davit import WindowAttention


def _perturbed(cfg: DaViTConfig) -> DaViT:
    model = DaViT(cfg.replace(drop_path_rate=0.0)).train()
    with torch.no_grad():  # away from init: non-trivial norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _run(model: DaViT, x: torch.Tensor, level: str, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    model.set_memory_saving(level)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        out = model(x)
    out.float().square().sum().backward()
    return out.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("size", [(32, 32), (37, 26)])  # windows fit / padding in every stage
@pytest.mark.parametrize(
    "variant",
    [{}, {"channel_attn_v2": True}, {"channel_attn_v2": True, "dynamic_scale": False}, {"qkv_bias": False}],
    ids=["official", "v2", "v2-static", "no-qkv-bias"],
)
def test_levels_give_autograds_gradients(tiny_cfg: DaViTConfig, size: tuple[int, int], variant: dict) -> None:
    model = _perturbed(tiny_cfg.replace(**variant))
    x = torch.randn(2, 3, *size)
    ref_out, ref_grad = _run(model, x, "none")
    for level in ("mlp", "all"):
        out, grad = _run(model, x, level)
        assert _rel(out, ref_out) < 1e-6, level
        assert _rel(grad, ref_grad) < 1e-5, level
        # per parameter as well: a wrong small gradient could hide in the global norm
        n = 0
        for name, p in model.named_parameters():
            k = p.numel()
            g, r = grad[n : n + k], ref_grad[n : n + k]
            assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-7, (level, name)
            n += k


def test_levels_with_grad_checkpointing_and_drop_path(tiny_cfg: DaViTConfig) -> None:
    model = _perturbed(tiny_cfg)
    x = torch.randn(2, 3, 40, 36)
    ref_out, ref_grad = _run(model, x, "none")
    model.set_grad_checkpointing(True)
    out, grad = _run(model, x, "all")
    assert _rel(out, ref_out) < 1e-6 and _rel(grad, ref_grad) < 1e-5
    # stochastic depth: the residual is added outside the fused branch; same masks from the same seed
    model.set_grad_checkpointing(False)
    for blk in model.modules():
        if hasattr(blk, "drop_path"):
            blk.drop_path.prob = 0.3
    torch.manual_seed(1)
    ref_out, ref_grad = _run(model, x, "none")
    torch.manual_seed(1)
    out, grad = _run(model, x, "all")
    assert _rel(out, ref_out) < 1e-6 and _rel(grad, ref_grad) < 1e-5


def test_bf16_autocast_as_accurate_as_autocast_through_the_ops(tiny_cfg: DaViTConfig) -> None:
    model = _perturbed(tiny_cfg)
    x = torch.randn(2, 3, 37, 26)
    _, ref = _run(model, x, "none")  # fp32 reference
    _, plain = _run(model, x, "none", bf16=True)
    plain_err = _rel(plain, ref)
    for level in ("mlp", "all"):
        _, grad = _run(model, x, level, bf16=True)
        assert _rel(grad, ref) < max(1.5 * plain_err, 1e-3), (level, _rel(grad, ref), plain_err)


def _saved_bytes(model: DaViT, x: torch.Tensor, level: str) -> int:
    """Bytes autograd keeps for the backward pass (unique storages, parameters excluded)."""
    model.set_memory_saving(level)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def test_levels_store_less(tiny_cfg: DaViTConfig) -> None:
    model = _perturbed(tiny_cfg.replace(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), window_size=7))
    x = torch.randn(2, 3, 112, 112)
    none, mlp, all_ = (_saved_bytes(model, x, level) for level in ("none", "mlp", "all"))
    # Token-width accounting per block (fused.py): the MLP stores 5 instead of 10, the attention branch 4 instead
    # of ~8.5 (fp32); measured on davit_tiny at 224: 0.87 and 0.70 of "none".
    assert mlp < 0.92 * none, (mlp, none)
    assert all_ < 0.80 * none, (all_, none)


def test_bad_level_is_a_clear_error(tiny_model: DaViT) -> None:
    with pytest.raises(ValueError, match="none.*mlp.*all"):
        tiny_model.set_memory_saving("lots")


def test_window_attention_training_path_equals_sdpa() -> None:
    attn = WindowAttention(64, 4)
    x = torch.randn(6, 49, 64)
    with torch.no_grad():
        ref = attn(x)  # fused SDPA
    out = attn(x.requires_grad_())  # explicit attention (CPU training path)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("drop", ["none", "k"])
def test_split_heads_gradients(drop: str) -> None:
    from davit.models.fused import split_heads

    qkv = torch.randn(3, 10, 3 * 12, dtype=torch.float64, requires_grad=True)
    coeffs = [torch.randn(3, 4, 10, 3, dtype=torch.float64) for _ in range(3)]

    def loss(parts: tuple) -> torch.Tensor:
        return sum((p * c).sum() for i, (p, c) in enumerate(zip(parts, coeffs)) if not (drop == "k" and i == 1))

    fused = split_heads(qkv, 4)
    ref = qkv.view(3, 10, 3, 4, 3).permute(2, 0, 3, 1, 4).unbind(0)
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)
    (g_fused,) = torch.autograd.grad(loss(fused), qkv)
    (g_ref,) = torch.autograd.grad(loss(ref), qkv)
    assert torch.equal(g_fused, g_ref)
    assert torch.autograd.gradcheck(lambda t: split_heads(t, 4), (qkv,))


@pytest.mark.parametrize("onednn_fp32", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_bias_fused_training_linear_matches_f_linear(
    autocast: bool, onednn_fp32: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import davit.models.fused as fused
    from davit.models.fused import _bias_fused_training, linear_t

    # Both CPU policies on any machine: the plain fp32 backward (Intel) and every fp32 GEMM through oneDNN (others).
    monkeypatch.setattr(fused, "ONEDNN_FP32", onednn_fp32)
    torch.manual_seed(0)
    x = torch.randn(2, 64, 80, 96, requires_grad=True)  # 10240 rows of 96: the oneDNN-forward case
    w = (torch.randn(288, 96) * 0.1).requires_grad_()
    b = torch.randn(288, requires_grad=True)
    dy = torch.randn(2, 64, 80, 288)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        assert _bias_fused_training(x, w, b)
        y = linear_t(x, w, b)
        y_ref = F.linear(x, w, b)
    assert y.dtype == y_ref.dtype
    grads = torch.autograd.grad(y, (x, w, b), dy.to(y.dtype))
    refs = torch.autograd.grad(y_ref, (x, w, b), dy.to(y.dtype))
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    for g, r in zip(grads, refs):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tol)
    # Few rows (fp32, outside autocast): plain F.linear, unless fp32 GEMMs all go through oneDNN.
    assert _bias_fused_training(x[:1, :8], w, b) == onednn_fp32


@pytest.mark.parametrize("rows", [300, 4000])
def test_onednn_fp32_gradients_match_autograd(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN fp32 training Linear (forward, input gradient, and the weight gradient: oneDNN over few rows, MKL
    over many), with and without bias, on a non-contiguous incoming gradient, against autograd through F.linear."""
    import davit.models.fused as fused
    from davit.models.fused import _bias_fused_training, linear_t

    monkeypatch.setattr(fused, "ONEDNN_FP32", True)
    torch.manual_seed(0)
    for bias in (True, False):
        x = torch.randn(rows, 192, requires_grad=True)
        w = (torch.randn(576, 192) * 0.1).requires_grad_()
        b = torch.randn(576, requires_grad=True) if bias else None
        dy = torch.randn(576, rows).t()  # a transposed (non-contiguous) gradient
        assert _bias_fused_training(x, w, b)
        y = linear_t(x, w, b)
        y_ref = F.linear(x, w, b)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
        inputs = (x, w) + ((b,) if bias else ())
        for g, r in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_ref, inputs, dy)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-3)


def test_downsample_patch_linear_matches_conv() -> None:
    from davit.models.davit import Downsample

    torch.manual_seed(0)
    ds = Downsample(8, 16, 2, 1e-5).double()
    x = torch.randn(2, 7, 9, 8, dtype=torch.float64, requires_grad=True)  # odd H and W: padded to 8x10
    y = ds(x)  # autograd recording: the patch Linear
    assert "Permute" not in type(y.grad_fn).__name__  # the conv path ends in a permute
    with torch.no_grad():
        y_conv = ds(x)  # no autograd: the conv
    torch.testing.assert_close(y, y_conv)
    assert y.shape == (2, 4, 5, 16)
    assert torch.autograd.gradcheck(ds, (x,))


def _traced_targets(fn, *args) -> tuple[torch.Tensor, set]:
    """Run ``fn`` under torch.compile with a backend that records the traced graph's ops (no code generation)."""
    seen: set = set()

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, seen


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN only")
@pytest.mark.parametrize("onednn_fp32", [False, True], ids=["mkl-fast-cpu", "onednn-fp32-cpu"])
def test_compiled_fp32_linear_takes_onednn_with_many_rows(onednn_fp32: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from davit.models import fused
    from davit.models.fused import _COMPILED_ONEDNN_MIN_ROWS, linear

    # Both machine policies: Intel keeps Inductor's Linear below 512 rows, other CPUs send every Linear to oneDNN.
    monkeypatch.setattr(fused, "ONEDNN_FP32", onednn_fp32)
    min_rows = 0 if onednn_fp32 else _COMPILED_ONEDNN_MIN_ROWS
    fc1, fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def mlp(x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, fc1, gelu=True), fc2, residual=x)

    binary, unary = "mkldnn._linear_pointwise.binary", "mkldnn._linear_pointwise"
    with torch.no_grad():
        x = torch.randn(2, max(min_rows // 2, 4), 16)  # exactly the threshold
        ref = x + fc2(F.gelu(fc1(x)))
        out, seen = _traced_targets(mlp, x)
        assert binary in seen and unary in seen  # bias, GELU and residual inside the oneDNN calls
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if min_rows:
            _, seen = _traced_targets(mlp, x[:, :-1])  # fewer rows: Inductor's own Linear
            assert binary not in seen and unary not in seen
    with torch.enable_grad():  # under autograd: no oneDNN op (it has no backward)
        _, seen = _traced_targets(mlp, x.requires_grad_())
        assert binary not in seen and unary not in seen


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN only")
def test_exported_linear_stays_portable() -> None:
    from davit.models.fused import linear

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return linear(x, self.fc, residual=x)

    x = torch.randn(512, 16)  # rows that take oneDNN under torch.compile on every CPU
    with torch.no_grad():  # inference, the case that takes oneDNN under torch.compile
        ep = torch.export.export(M().eval().requires_grad_(False), (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets), targets


@pytest.mark.parametrize(
    "variant", [{}, {"v2": True}, {"v2": True, "dynamic_scale": False}], ids=["official", "v2", "v2-static"]
)
def test_channel_attention_per_image_path_matches_batched_ops(variant: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from davit.models import fused
    from davit.models.davit import ChannelAttention

    torch.manual_seed(0)
    attn = ChannelAttention(96, 3, **variant)
    x = torch.randn(2, 784, 96)  # 2 images of 28x28 tokens: the per-image path's smallest case at 784 tokens
    res = torch.randn(2, 784, 96)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attn.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = attn(xg, residual=res)
        (out * torch.linspace(-1, 1, 96)).square().sum().backward()
        return out.detach(), [xg.grad, *(p.grad for p in attn.parameters())]

    calls = []
    recompute = fused.ChannelCore.recompute
    monkeypatch.setattr(fused.ChannelCore, "recompute", lambda self, qkv: calls.append(1) or recompute(self, qkv))
    assert attn.core.per_image(torch.empty(2, 784, 288))
    assert not attn.core.per_image(torch.empty(2, 784, 288, dtype=torch.bfloat16))  # oneDNN copies strided bf16
    assert not attn.core.per_image(torch.empty(8, 49, 288))  # small maps: the batched form is faster
    assert not attn.core.per_image(torch.empty(1, 3136, 288))  # one image
    assert not attn.core.per_image(torch.empty(2, 12544, 288))  # high resolution
    out, grads = run(x)
    with torch.no_grad():
        out_nograd = attn(x, residual=res)
    assert len(calls) == 2  # forward under autograd and without it both took the per-image path
    monkeypatch.setattr(fused, "_CA_PER_IMAGE_MIN_TOKENS", 10**9)  # the batched 4-D matmuls
    ref, ref_grads = run(x)
    assert len(calls) == 2
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out_nograd, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max(), "gradient differs from the batched path"
