"""Export: ONNX with dynamic batch/height/width, checked here against onnxruntime at sizes other than the traced one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import davit
from davit.export import export_model, export_onnx, export_program

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4)

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_onnx_round_trip_dynamic_batch_and_size(tiny_model: davit.DaViT, tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    info = export_onnx(tiny_model, path, img_size=64, check_sizes=((1, 64, 64), (2, 57, 71)))
    assert path.is_file() and set(info["max_abs_err"]) == {"1x64x64", "2x57x71"}
    # Independently of the built-in check: other batches and sizes, including one smaller than a window.
    for shape in [(3, 3, 96, 128), (2, 3, 250, 90), (1, 3, 12, 12)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = tiny_model(x).numpy()
        got = _run(path, x)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4


def test_onnx_check_catches_a_wrong_model(tiny_model: davit.DaViT, tmp_path: Path) -> None:
    from davit.export import check_onnx

    path = tmp_path / "tiny.onnx"
    export_onnx(tiny_model, path, img_size=32, check_sizes=None)
    other = davit.DaViT(tiny_model.cfg).eval()  # different random weights
    with pytest.raises(ValueError, match="onnxruntime differs"):
        check_onnx(path, other, sizes=((1, 32, 32),))


def test_export_errors_are_clear(tmp_path: Path) -> None:
    dense = davit.create_model("davit_tiny", features_only=True, **TINY)
    with pytest.raises(ValueError, match="features_only=False"):
        export_onnx(dense, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="format"):
        export_model("davit_tiny", tmp_path / "x.bin", fmt="tflite")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        export_model("davit_tiny", tmp_path / "x.onnx", checkpoint=str(tmp_path / "nope.safetensors"))


@pytest.mark.slow
def test_torch_export_dynamic_batch(tiny_model: davit.DaViT) -> None:
    program = export_program(tiny_model, img_size=(64, 96))
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 64, 96)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), tiny_model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_davit_tiny_onnx(tmp_path: Path) -> None:
    model = davit.create_model("davit_tiny").eval()
    info = export_onnx(model, tmp_path / "tiny.onnx", check_sizes=((1, 224, 224), (2, 250, 333)))
    assert max(info["max_abs_err"].values()) < 1e-4
