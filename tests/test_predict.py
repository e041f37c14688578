"""Prediction on a real photo shipped by scikit-learn, with weights saved the way ``davit train`` saves them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import davit
from davit.cli import main
from davit.data import ClsDataConfig, ImageReadError, imagenet_class_names
from davit.engine.checkpoint import save_weights, weights_metadata
from davit.engine.predict import predict

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2)
NAMES = ["pagoda", "flower", "lake", "tree"]
DATA = ClsDataConfig(kind="imagefolder", img_size=48, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from sklearn.datasets import load_sample_image

    d = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("china.jpg", "flower.jpg"):
        p = d / name
        Image.fromarray(load_sample_image(name)).save(p, quality=95)
        paths.append(p)
    return paths


def _trained_checkpoint(path: Path, num_classes: int = 4, names: list[str] | None = NAMES) -> davit.DaViT:
    """A model whose head strongly separates its classes, saved with the engine's own writer and metadata."""
    torch.manual_seed(3)
    model = davit.create_model("davit_tiny", num_classes=num_classes, **TINY).eval()
    with torch.no_grad():
        model.head.fc.weight.mul_(40)  # spread the logits so the probabilities are far from uniform
    meta = weights_metadata(model, names, preprocessing=DATA.preprocessing(), model_name="davit_tiny")
    save_weights(path, model.state_dict(), meta)
    return model


def test_predict_a_real_photo_with_checkpoint_class_names(tmp_path: Path, photos: list[Path]) -> None:
    ck = tmp_path / "best.safetensors"
    model = _trained_checkpoint(ck)
    results = predict([photos[0], photos[1]], checkpoint=ck, topk=3, device="cpu", optimize=False)
    assert [r["image"] for r in results] == [str(photos[0]), str(photos[1])]  # input order kept
    for r in results:
        preds = r["predictions"]
        assert [p["rank"] for p in preds] == [1, 2, 3]
        probs = [p["probability"] for p in preds]
        assert probs == sorted(probs, reverse=True) and 0 < probs[-1] and probs[0] < 1
        assert all(p["label"] == NAMES[p["index"]] for p in preds)  # names from the checkpoint metadata
        assert len({p["index"] for p in preds}) == 3

    # the same answer as running the model on the photo with the recorded preprocessing, written out by hand:
    # short side -> floor(48 / 0.875) = 54 (the long side truncated, as torchvision's Resize does: 640x427 -> 80x54),
    # centre 48x48 crop, (x - 0.5) / 0.25
    img = Image.open(photos[0]).convert("RGB")
    w, h = img.size
    img = img.resize((int(w * 54 / h), 54), Image.Resampling.BICUBIC)
    left, top = (img.width - 48) // 2, (54 - 48) // 2
    a = np.asarray(img.crop((left, top, left + 48, top + 48)), dtype=np.float32) / 255.0  # (48, 48, 3)
    x = torch.from_numpy((a - 0.5) / 0.25).permute(2, 0, 1)[None]  # (1, 3, 48, 48)
    with torch.no_grad():
        p = model(x).softmax(1)[0]
    top = p.topk(3)
    assert [q["index"] for q in results[0]["predictions"]] == top.indices.tolist()
    assert [q["probability"] for q in results[0]["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_all_class_probabilities_sum_to_one(tmp_path: Path, photos: list[Path]) -> None:
    ck = tmp_path / "w.safetensors"
    _trained_checkpoint(ck)
    (r,) = predict([photos[1]], checkpoint=ck, topk=10, device="cpu")  # topk above the class count: all classes
    assert len(r["predictions"]) == 4
    assert sum(p["probability"] for p in r["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert sorted(p["label"] for p in r["predictions"]) == sorted(NAMES)


def test_imagenet_names_for_a_1000_class_model_without_names(tmp_path: Path, photos: list[Path]) -> None:
    ck = tmp_path / "in1k.safetensors"
    _trained_checkpoint(ck, num_classes=1000, names=None)
    (r,) = predict([photos[0]], checkpoint=ck, topk=5, device="cpu")
    names = imagenet_class_names()
    assert [p["label"] for p in r["predictions"]] == [names[p["index"]] for p in r["predictions"]]


def test_converted_modes_and_pil_inputs(tmp_path: Path, photos: list[Path]) -> None:
    ck = tmp_path / "w.safetensors"
    _trained_checkpoint(ck)
    photo = Image.open(photos[0])
    rgba = tmp_path / "rgba.png"
    photo.convert("RGBA").save(rgba)
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(grey16)
    results = predict([rgba, grey16, photo.convert("P")], checkpoint=ck, topk=2, device="cpu")
    assert [len(r["predictions"]) for r in results] == [2, 2, 2]
    assert results[2]["image"] == "<image 2>"
    # an opaque RGBA copy of the photo is the photo
    (plain,) = predict([photos[0]], checkpoint=ck, topk=2, device="cpu")
    assert [q["index"] for q in results[0]["predictions"]] == [q["index"] for q in plain["predictions"]]
    got, want = ([q["probability"] for q in r["predictions"]] for r in (results[0], plain))
    assert got == pytest.approx(want, rel=1e-4)  # batched with other images: float rounding only


def test_unreadable_image_is_a_one_line_error(
    tmp_path: Path, photos: list[Path], capsys: pytest.CaptureFixture
) -> None:
    ck = tmp_path / "w.safetensors"
    _trained_checkpoint(ck)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[0].read_bytes()[:2000])  # truncated JPEG
    with pytest.raises(ImageReadError, match="broken.jpg"):
        predict([photos[0], broken], checkpoint=ck)
    assert main(["predict", str(photos[0]), str(broken), "--checkpoint", str(ck)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.jpg" in err and err.startswith("davit predict: error:")
    assert main(["predict", str(tmp_path / "nope.png"), "--checkpoint", str(ck)]) == 2
    assert "image not found" in capsys.readouterr().err


def test_predict_cli_text_and_json(tmp_path: Path, photos: list[Path], capsys: pytest.CaptureFixture) -> None:
    ck = tmp_path / "w.safetensors"
    _trained_checkpoint(ck)
    assert main(["predict", str(photos[0]), "--checkpoint", str(ck), "--topk", "2", "--json", "--device", "cpu"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["image"] == str(photos[0]) and len(r["predictions"]) == 2
    assert main(["predict", *map(str, photos), "--checkpoint", str(ck), "--topk", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(photos[0]) and out[2] == str(photos[1])
    assert out[1].strip().startswith("1.") and out[1].split()[-2] in NAMES


@pytest.mark.slow
def test_train_then_eval_and_predict_the_digits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The user's path end to end: ``davit train`` on digits, then ``davit eval`` on the held-out digits saved as
    8x8 PNG files reproduces the training's own top-1, and ``davit predict`` names digits."""
    from davit.data import DigitsDataset, digits_split

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    argv = ["train", "--config", str(root / "configs/cls/digits.yaml"), "--out", str(run)]
    assert main([*argv, "train.epochs=2", "sched.warmup=0"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()

    _, val_idx = digits_split(0.2, 0)
    val = DigitsDataset(val_idx, img_size=8)  # the source pixels: eval upsamples them exactly as training did
    for i in range(len(val)):
        img, y = val[i]
        (tmp_path / "val" / str(y)).mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "val" / str(y) / f"{i:03d}.png")
    ck = str(run / "best.safetensors")
    assert main(["eval", "--checkpoint", ck, "--data", str(tmp_path / "val"), "--json", "--no-optimize"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["images"] == 360 and m["top1"] == pytest.approx(summary["best_top1"], abs=1e-6)

    files = sorted((tmp_path / "val" / "3").glob("*.png"))[:4]
    assert main(["predict", *map(str, files), "--checkpoint", ck, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {p["label"] for r in results for p in r["predictions"]} <= {str(d) for d in range(10)}
    assert sum(r["predictions"][0]["label"] == "3" for r in results) >= 3
