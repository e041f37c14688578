"""``davit predict`` / ``eval`` on the runtime backends (``--backend``), and the cached AOTInductor package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import davit
import davit.aoti
import davit.runtime
from davit.cli import main
from davit.data import ClsDataConfig
from davit.engine.checkpoint import save_weights, weights_metadata
from davit.engine.predict import predict

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2)
NAMES = ["a", "b", "c"]
DATA = ClsDataConfig(kind="imagefolder", img_size=32, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(5)
    model = davit.create_model("davit_tiny", num_classes=3, **TINY).eval()
    with torch.no_grad():
        model.head.fc.weight.mul_(20)  # probabilities far from uniform, so a wrong backend shows
    meta = weights_metadata(model, NAMES, preprocessing=DATA.preprocessing(), model_name="davit_tiny")
    path = tmp_path / "best.safetensors"
    save_weights(path, model.state_dict(), meta)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 36, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    for c in NAMES:
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "val" / c / f"{i}.png")
    return tmp_path / "val"


def _probs(results: list[dict]) -> list[list[tuple[int, float]]]:
    return [[(q["index"], q["probability"]) for q in r["predictions"]] for r in results]


def _same_predictions(got: list[dict], want: list[dict], tol: float) -> None:
    for g, w in zip(_probs(got), _probs(want)):
        assert [i for i, _ in g] == [i for i, _ in w]
        assert [p for _, p in g] == pytest.approx([p for _, p in w], abs=tol)


def test_predict_on_onnxruntime_equals_torch(checkpoint: Path, images: list[Path]) -> None:
    pytest.importorskip("onnxruntime")
    kw = dict(checkpoint=checkpoint, topk=3, device="cpu", batch_size=2)
    ref = predict(images, optimize=False, **kw)
    torch_path = predict(images, backend="torch", **kw)
    ort = predict(images, backend="onnxruntime", **kw)
    _same_predictions(torch_path, ref, 1e-5)
    _same_predictions(ort, ref, 1e-5)


def test_eval_cli_on_onnxruntime_equals_torch(checkpoint: Path, folder: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(folder), "--workers", "0", "--device", "cpu"]
    assert main([*argv, "--json", "--no-optimize"]) == 0
    ref = json.loads(capsys.readouterr().out)
    for backend in ("torch", "onnxruntime"):
        assert main([*argv, "--json", "--backend", backend]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["images"] == ref["images"] == 6
        assert got["top1"] == ref["top1"] and got["loss"] == pytest.approx(ref["loss"], rel=1e-4)


def test_missing_runtime_is_one_clear_line(
    checkpoint: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert davit.runtime.missing_runtime("torch") is None
    argv = ["predict", str(images[0]), "--checkpoint", str(checkpoint), "--device", "cpu"]
    code = main([*argv, "--backend", "openvino"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "openvino" in err and "pip install 'davit[openvino]'" in err


def test_auto_is_torch_unless_a_package_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DAVIT_CACHE", str(tmp_path))
    model = davit.create_model("davit_tiny", num_classes=3, **TINY).eval()
    x = torch.zeros(1, 3, 32, 32)
    assert davit.runtime.default_backend(model, x) == "torch"  # no cached package: nothing is compiled implicitly
    from davit.accelerate import Policy
    from davit.aoti import aoti_package_path

    path = aoti_package_path(model, (1, 3, 32, 32), torch.float32, Policy.detect("cpu", mode="compile"))
    assert path.parent == tmp_path / "aoti"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # (not a real package: only its presence is read here)
    assert davit.runtime.default_backend(model, x) == "aoti"
    assert davit.runtime.default_backend(model, torch.zeros(2, 3, 32, 32)) == "torch"  # another shape
    assert davit.runtime.default_backend(model, x, "bf16") == "torch"  # another dtype
    with monkeypatch.context() as m:
        m.setattr(davit.aoti, "_code_hash", lambda: "another davit")
        assert davit.runtime.default_backend(model, x) == "torch"  # another davit's code: another key
    assert davit.runtime.default_backend(model, x) == "aoti"
    with torch.no_grad():
        model.head.fc.bias.add_(1)
    assert davit.runtime.default_backend(model, x) == "torch"  # other weights: another key


@pytest.mark.slow  # one AOTInductor compile (~40 s on 2 cores)
def test_aoti_package_is_built_once_and_equals_the_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DAVIT_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = davit.create_model("davit_tiny", num_classes=10, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = davit.optimize(model, example_input=x, backend="aoti")
    assert fast.built and fast.package.exists() and fast.package.parent == tmp_path / "aoti"
    with torch.no_grad():
        for xx in (x, torch.randn(2, 3, 32, 32), torch.randn(1, 3, 40, 24)):  # the last: another shape, eager path
            torch.testing.assert_close(fast(xx), model(xx), rtol=1e-4, atol=1e-5)
    assert davit.runtime.default_backend(model, x) == "aoti"

    # optimize(backend="auto") times the cached package beside torch (OpenVINO left out here: see test_runtime.py).
    timed: dict = {}

    def spy(candidates: dict, example: torch.Tensor, **kw: object) -> tuple:
        timed.update(candidates)
        return "aoti", {}

    def no_openvino(*a: object, **kw: object) -> None:
        raise ImportError("openvino")

    monkeypatch.setattr(davit.runtime, "fastest", spy)
    monkeypatch.setattr(davit.runtime, "to_runtime", no_openvino)
    auto = davit.optimize(model, example_input=x, backend="auto")
    assert sorted(timed) == ["aoti", "torch"] and auto is timed["aoti"] and not auto.built
    with torch.no_grad():
        torch.testing.assert_close(auto(x), model(x), rtol=1e-4, atol=1e-5)

    # A second process finds the package and only loads it.
    torch.save({"sd": model.state_dict(), "x": x}, tmp_path / "m.pt")
    code = f"""
import torch, davit
d = torch.load({str(tmp_path / "m.pt")!r})
m = davit.create_model("davit_tiny", num_classes=10, **{TINY!r}).eval()
m.load_state_dict(d["sd"])
f = davit.optimize(m, example_input=d["x"], backend="aoti")
assert not f.built, "rebuilt"
with torch.no_grad():
    torch.testing.assert_close(f(d["x"]), m(d["x"]), rtol=1e-4, atol=1e-5)
print("loaded in", f.load_seconds)
"""
    env = {**os.environ, "DAVIT_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded in" in out.stdout


@pytest.mark.slow  # one AOTInductor compile
def test_predict_on_aoti_equals_torch(
    checkpoint: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DAVIT_CACHE", str(tmp_path / "cache"))
    kw = dict(checkpoint=checkpoint, topk=3, device="cpu", batch_size=2)
    ref = predict(images, optimize=False, **kw)
    _same_predictions(predict(images, backend="aoti", **kw), ref, 1e-5)  # batches of 2, then 1 (eager path)
    assert len(list((tmp_path / "cache" / "aoti").glob("*.pt2"))) == 1
    _same_predictions(predict(images, **kw), ref, 1e-5)  # auto: finds the package


@pytest.mark.slow  # OpenVINO compiled in the pytest process (see tests/test_runtime.py)
def test_predict_on_openvino_equals_torch(checkpoint: Path, images: list[Path]) -> None:
    pytest.importorskip("openvino")
    kw = dict(checkpoint=checkpoint, topk=3, device="cpu", batch_size=2)
    ref = predict(images, optimize=False, **kw)
    _same_predictions(predict(images, backend="openvino", **kw), ref, 1e-5)
