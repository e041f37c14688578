"""``davit eval --report``: the per-class table and the confusion-matrix PNG, against hand-counted answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from davit.cli import main
from davit.engine.evaluate import (
    evaluate_imagefolder,
    format_per_class_table,
    per_class_report,
    plot_confusion_matrix,
)

NAMES = ["red", "green", "blue"]


def test_per_class_report_hand_counted() -> None:
    # truth:  red red red green green blue ; predicted: red green red green blue blue
    rows, cm, labels = per_class_report([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 2, 2], NAMES)
    assert labels == [0, 1, 2]
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    by = {r["class"]: r for r in rows}
    assert by["red"]["images"] == 3 and by["red"]["correct"] == 2 and by["red"]["accuracy"] == pytest.approx(200 / 3)
    assert by["red"]["precision"] == 100.0 and by["red"]["top_confusion"] == "green"
    assert by["green"]["precision"] == 50.0 and by["green"]["top_confusion"] == "blue"
    assert by["blue"]["accuracy"] == 100.0 and by["blue"]["precision"] == 50.0 and by["blue"]["top_confusion"] is None


def test_classes_never_seen_as_truth_get_a_column_but_no_row() -> None:
    rows, cm, labels = per_class_report([4, 4], [4, 7], [f"c{i}" for i in range(10)])
    assert labels == [4, 7] and cm.tolist() == [[1, 1], [0, 0]]
    assert [r["class"] for r in rows] == ["c4"] and rows[0]["top_confusion"] == "c7"


def test_table_shows_the_worst_classes_when_there_are_many() -> None:
    t = np.repeat(np.arange(40), 2)
    p = t.copy()
    p[::2][:5] = 39  # classes 0..4 get one of their two images wrong
    rows, _, _ = per_class_report(t, p, [f"k{i:02d}" for i in range(40)])
    text = format_per_class_table(rows, limit=5)
    assert "lowest accuracy of 40" in text
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["k00", "k01", "k02", "k03", "k04"]


@pytest.mark.parametrize("k", [3, 45, 200])
def test_confusion_png_is_written_for_small_and_large_class_counts(tmp_path: Path, k: int) -> None:
    cm = np.eye(k, dtype=np.int64) * 5
    cm[0, 1] = 2
    path = plot_confusion_matrix(cm, [f"class {i}" for i in range(k)], tmp_path / "cm.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 300 and im.height >= 300


class ColourNet(nn.Module):
    """Logits = 10 x the mean of each RGB channel: a red image is class 0, green 1, blue 2."""

    num_classes = 3
    class_names = NAMES
    pretrained_cfg = {"img_size": 8, "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0, 0, 0), "std": (1, 1, 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * x.mean(dim=(2, 3))  # (B, 3)


def test_evaluate_imagefolder_report_matches_the_folder(tmp_path: Path) -> None:
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    layout = {"red": ["red", "red", "blue"], "green": ["green", "green"], "blue": ["blue"]}  # one blue filed as red
    for folder, content in layout.items():
        (tmp_path / "val" / folder).mkdir(parents=True)
        for i, c in enumerate(content):
            Image.new("RGB", (12, 12), colours[c]).save(tmp_path / "val" / folder / f"{i}.png")
    m = evaluate_imagefolder(
        ColourNet(), tmp_path / "val", batch_size=2, workers=0, device="cpu", optimize=False, report_dir=tmp_path / "r"
    )
    assert m["top1"] == pytest.approx(500 / 6)  # the per-class pass is the same single pass
    by = {r["class"]: r for r in m["per_class"]}
    assert (by["red"]["images"], by["red"]["correct"], by["red"]["top_confusion"]) == (3, 2, "blue")
    assert by["blue"]["precision"] == 50.0 and by["green"]["accuracy"] == 100.0
    with open(m["report"]["per_class"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["red", "green", "blue"] and rows[0]["correct"] == "2"
    assert Path(m["report"]["confusion_matrix"]).stat().st_size > 1000


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import davit
    from davit.weights import save_safetensors

    model = davit.create_model(
        "davit_tiny", embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2,
        num_classes=3,
    )  # fmt: skip
    pp = {"img_size": 16, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    meta = {"davit_config": model.cfg.to_dict(), "model_name": "davit_tiny", "class_names": NAMES, "preprocessing": pp}
    save_safetensors(model.state_dict(), tmp_path / "w.safetensors", meta)
    for name in NAMES:
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), (30, 90, 200)).save(tmp_path / "val" / name / "0.png")
    argv = ["eval", "--checkpoint", str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "val"), "--workers", "0"]
    assert main([*argv, "--device", "cpu", "--no-optimize", "--report", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "most confused with" in out and "confusion_matrix.png" in out
    assert (tmp_path / "rep" / "confusion_matrix.png").is_file() and (tmp_path / "rep" / "per_class.csv").is_file()
    assert main([*argv, "--device", "cpu", "--no-optimize", "--report", str(tmp_path / "rep2"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    # three identical images: one class predicted for all, so exactly one class is right on its one image
    assert sum(r["correct"] for r in m["per_class"]) == 1 and len(m["per_class"]) == 3
