"""The model a user gets from create_model works with the tools people wrap backbones in: PEFT LoRA, forward hooks,
torch.jit.trace, torch.fx / torchvision's feature extractor, torch.export with a dynamic batch, dynamic quantisation
and OpenVINO's converter. Each is checked against the eager model, not only for running."""

from __future__ import annotations

import pytest
import torch

import davit
from davit.models import DaViT, DaViTConfig


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def model(tiny_cfg: DaViTConfig) -> DaViT:
    m = DaViT(tiny_cfg).eval()
    with torch.no_grad():  # away from init, so that a wrong conversion shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_forward_hooks_fire_on_every_linear_conv_and_norm(model: DaViT) -> None:
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)
    wanted = {n for n, m in model.named_modules() if isinstance(m, kinds)}
    fired: set[str] = set()
    for n, m in model.named_modules():
        if isinstance(m, kinds):
            m.register_forward_hook(lambda mod, i, o, n=n: fired.add(n))
    model(torch.randn(1, 3, 37, 29))
    assert fired == wanted and len(wanted) > 40


def test_peft_lora_changes_the_output_and_trains(tiny_cfg: DaViTConfig) -> None:
    peft = pytest.importorskip("peft")
    base = DaViT(tiny_cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = base(x)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*(qkv|attn\.proj|fc1|fc2)$")
    lora = peft.get_peft_model(base, cfg)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at zero; non-zero B must change the output
        after = lora(x)
    assert _rel(after, before) > 1e-3
    lora(x).square().sum().backward()
    a_grads = [p.grad for n, p in lora.named_parameters() if "lora_A" in n]
    assert a_grads and all(g is not None and g.abs().sum() > 0 for g in a_grads)
    # optimize on a LoRA model runs the wrapped Linears (the adapters), not the raw weights
    fast = davit.optimize(lora.base_model.model)
    with torch.no_grad():
        assert _rel(fast(x), lora(x)) < 1e-5


def test_jit_trace_matches_eager_at_other_sizes(model: DaViT) -> None:
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert _rel(traced(x), model(x)) < 1e-5
        y = torch.randn(3, 3, 37, 29)  # another batch size through the same trace
        assert _rel(traced(y), model(y)) < 1e-5


def test_fx_feature_extractor(model: DaViT) -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    fx = create_feature_extractor(model, {"stages.1": "c3", "stages.3": "c5"})
    x = torch.randn(2, 3, 64, 48)
    out = fx(x)
    _, maps = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC")
    torch.testing.assert_close(out["c3"], maps[0])
    torch.testing.assert_close(out["c5"], maps[1])


def test_torch_export_with_dynamic_batch(model: DaViT) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets)  # portable ops only
    for b in (1, 5):
        x = torch.randn(b, 3, 64, 64)
        with torch.no_grad():
            assert _rel(ep.module()(x), model(x)) < 1e-5


def test_dynamic_quantisation_of_the_linears(model: DaViT) -> None:
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    n_q = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in q.modules())
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert n_q == n_lin
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert 0 < _rel(out, ref) < 0.1  # int8 weights really ran and stayed close


@pytest.mark.slow  # OpenVINO in the pytest process: the default suite then segfaulted in the DDP tests
def test_openvino_converts_and_matches(model: DaViT) -> None:
    ov = pytest.importorskip("openvino")
    x = torch.randn(2, 3, 64, 64)
    ovm = ov.convert_model(model, example_input=x, input=[-1, 3, 64, 64])
    compiled = ov.Core().compile_model(ovm, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for b in (1, 3):
        y = torch.randn(b, 3, 64, 64)
        out = torch.from_numpy(compiled(y.numpy())[0])
        with torch.no_grad():
            assert _rel(out, model(y)) < 1e-4


@pytest.mark.slow
def test_openvino_converts_davit_tiny() -> None:
    ov = pytest.importorskip("openvino")
    model = davit.create_model("davit_tiny").eval()
    x = torch.randn(1, 3, 224, 224)
    compiled = ov.Core().compile_model(
        ov.convert_model(model, example_input=x), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    with torch.no_grad():
        assert _rel(torch.from_numpy(compiled(x.numpy())[0]), model(x)) < 1e-4
