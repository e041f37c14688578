"""davit.runtime: our model in OpenVINO and onnxruntime as inference modules, and the OpenVINO IR export."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import davit
import davit.runtime
from davit.export import export_model
from davit.optimize import OptimizedModel
from davit.runtime import RuntimeModel, check_runtime, export_openvino, to_runtime

pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_runtime_fp32_matches_eager_at_other_batches_and_sizes(
    tiny_model: davit.DaViT, backend: str, one_thread: None
) -> None:
    fast = to_runtime(tiny_model, backend, example_input=torch.randn(2, 3, 64, 64))
    assert isinstance(fast, RuntimeModel) and fast.dtype == torch.float32
    for shape in [(1, 3, 64, 64), (5, 3, 64, 64), (3, 3, 57, 90)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = tiny_model(x)
        got = fast(x)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert _rel(got, ref) < 1e-4, shape


def test_openvino_bf16_hint_is_bf16_where_the_cpu_has_it(tiny_model: davit.DaViT, one_thread: None) -> None:
    fast = to_runtime(tiny_model, "openvino", dtype="bf16")
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert fast.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tiny_model(x)
    got = fast(x)
    assert got.dtype == torch.float32
    err = _rel(got, ref)
    assert err < 5e-2
    if has_bf16:  # bf16 compute really happened: not bit-for-bit fp32
        assert err > 1e-6


def test_onnxruntime_bf16_falls_back_to_fp32_with_a_warning(
    tiny_model: davit.DaViT, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="davit.runtime"):
        fast = to_runtime(tiny_model, "onnxruntime", dtype=torch.bfloat16)
    assert fast.dtype == torch.float32 and "float32 only" in caplog.text


def test_features_only_model_returns_every_map(one_thread: None) -> None:
    dense = davit.create_model("davit_tiny", features_only=True, **TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    fast = to_runtime(dense, "openvino", example_input=x)
    got = fast(x)
    with torch.no_grad():
        ref = dense(x)
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref):
        assert a.shape == b.shape and _rel(a, b) < 1e-4


def test_check_runtime_catches_a_wrong_model(tiny_model: davit.DaViT) -> None:
    fast = to_runtime(tiny_model, "onnxruntime")
    other = davit.DaViT(tiny_model.cfg).eval()  # different random weights
    with pytest.raises(RuntimeError, match="differs from the eager model"):
        check_runtime(fast, other, torch.randn(1, 3, 64, 64))


def test_runtime_errors_are_clear(tiny_model: davit.DaViT, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown runtime backend 'tensorrt'"):
        to_runtime(tiny_model, "tensorrt")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        to_runtime(tiny_model, "openvino", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"NAME\.xml"):
        export_openvino(tiny_model, tmp_path / "m.onnx")
    fast = to_runtime(tiny_model, "onnxruntime")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fast(torch.randn(3, 64, 64))


def test_openvino_ir_export_round_trip(tiny_model: davit.DaViT, tmp_path: Path, one_thread: None) -> None:
    info = export_openvino(tiny_model, tmp_path / "ir" / "tiny.xml", img_size=64, check_sizes=((1, 64, 64),))
    assert (tmp_path / "ir" / "tiny.bin").is_file() and info["max_abs_err"]["1x64x64"] < 1e-4
    # Independently of the built-in check: load the IR in a fresh OpenVINO core at another batch and size.
    compiled = ov.Core().compile_model(str(tmp_path / "ir" / "tiny.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = torch.randn(3, 3, 80, 48)
    with torch.no_grad():
        ref = tiny_model(x)
    assert _rel(torch.from_numpy(compiled(x.numpy())[0]), ref) < 1e-4


def test_cli_export_openvino(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from davit.cli import main

    out = tmp_path / "m.xml"
    args = ["export", "--model", "davit_tiny", "--random-weights", "--format", "openvino", "--img-size", "64"]
    assert main([*args, "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert main([*args, "--out", str(tmp_path / "m.onnx")]) == 2
    assert "NAME.xml" in capsys.readouterr().err
    with pytest.raises(ValueError, match="openvino"):
        export_model("davit_tiny", tmp_path / "x.bin", fmt="tflite")


def test_fastest_picks_the_quicker_module() -> None:
    import time as _time

    class Slow(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _time.sleep(0.02)
            return x

    best, med = davit.runtime.fastest({"slow": Slow(), "fast": torch.nn.Identity()}, torch.zeros(1, 3, 8, 8))
    assert best == "fast" and med["slow"] >= 0.02 > med["fast"]
    with pytest.raises(ValueError, match="at least one"):
        davit.runtime.fastest({}, torch.zeros(1))


def test_optimize_backend_choice(tiny_model: davit.DaViT, one_thread: None) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tiny_model(x)
    ov_fast = davit.optimize(tiny_model, backend="openvino", example_input=x)
    assert isinstance(ov_fast, RuntimeModel) and ov_fast.backend == "openvino"
    auto = davit.optimize(tiny_model, backend="auto", example_input=x)
    got = auto(x)
    assert got.dtype == torch.float32 and _rel(got, ref) < 1e-4
    assert isinstance(davit.optimize(tiny_model, backend="auto"), OptimizedModel)  # nothing to time: torch
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        davit.optimize(tiny_model, backend="tvm")
