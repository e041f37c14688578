"""``davit.optimize``: same numbers as the eager model (fp32), bf16 where the CPU has it, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

import davit
from davit.optimize import OptimizedModel, bf16_supported, optimize

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fp32_matches_eager_at_several_sizes(tiny_model: davit.DaViT) -> None:
    fast = optimize(tiny_model, example_input=torch.randn(2, 3, 64, 64))
    assert isinstance(fast, OptimizedModel) and fast.dtype == torch.float32 and not fast.compiled
    for shape in [(2, 3, 64, 64), (1, 3, 57, 71), (3, 3, 20, 20)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = tiny_model(x)
        out = fast(x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert _rel(out, ref) < 1e-5
        assert not out.requires_grad


def test_cpu_fast_path_runs_a_prepacked_snapshot_and_leaves_the_model_alone(tiny_model: davit.DaViT) -> None:
    x = torch.randn(2, 3, 64, 64)
    same_kernels = copy.deepcopy(tiny_model)
    davit.accelerate.install(same_kernels)  # the same oneDNN kernels, weights re-laid-out on every call
    with torch.inference_mode():
        ref = same_kernels(x)
    fast = optimize(tiny_model)
    linears = [m for m in fast._runner.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(getattr(m, "packed_weight", None) is not None for m in linears)
    assert not any(hasattr(m, "packed_weight") for m in tiny_model.modules())  # the caller's model is untouched
    # pre-packing changes the layout, not the arithmetic: bit-identical on torch 2.14; torch 2.6's oneDNN may pick
    # another kernel for the packed layout (differences ~1e-7)
    torch.testing.assert_close(fast(x), ref, rtol=1e-5, atol=1e-6)


def test_inference_fast_path_matches_the_reference(tiny_model: davit.DaViT) -> None:
    # The caller's model runs the reference; optimize's copy runs davit.accelerate's fused kernels. Same numbers.
    x = torch.randn(2, 3, 96, 80)
    with_grad = tiny_model(x)
    assert with_grad.requires_grad
    fast = optimize(tiny_model)
    assert davit.accelerate.installed(fast._runner) is not None
    assert davit.accelerate.installed(tiny_model) is None
    assert _rel(fast(x), with_grad.detach()) < 1e-5


@pytest.mark.skipif(not bf16_supported("cpu"), reason="CPU without native bfloat16")
def test_bf16_close_to_fp32_and_returns_fp32(tiny_model: davit.DaViT) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tiny_model(x)
    fast = optimize(tiny_model, dtype="bf16", example_input=x)
    assert fast.dtype == torch.bfloat16
    out = fast(x)
    assert out.dtype == torch.float32
    assert 0 < _rel(out, ref) < 5e-2  # bf16 really ran (not bit-identical) and stayed close


def test_features_only_model() -> None:
    model = davit.create_model("davit_tiny", features_only=True, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    out = optimize(model)(x)
    assert len(out) == 4
    for a, b in zip(out, ref):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


def test_reoptimizing_unwraps_and_bad_dtype_is_clear(tiny_model: davit.DaViT) -> None:
    fast = optimize(tiny_model)
    assert optimize(fast).model is tiny_model
    with pytest.raises(ValueError, match="dtype"):
        optimize(tiny_model, dtype="fp16")
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        optimize(tiny_model, dtype=torch.float16)


def test_eval_mode_is_set() -> None:
    model = davit.create_model("davit_tiny", **TINY, num_classes=5, drop_path_rate=0.5)
    assert model.training
    fast = optimize(model)
    x = torch.randn(2, 3, 32, 32)
    assert not model.training
    torch.testing.assert_close(fast(x), fast(x))  # drop path off: deterministic


@pytest.mark.slow
def test_compiled_matches_eager(tiny_model: davit.DaViT) -> None:
    x = torch.randn(2, 3, 64, 64)
    fast = optimize(tiny_model, compile=True, example_input=x)
    assert fast.compiled
    with torch.no_grad():
        assert _rel(fast(x), tiny_model(x)) < 1e-4
