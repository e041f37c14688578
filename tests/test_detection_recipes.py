"""The COCO recipes for T/S/B (Mask R-CNN and RetinaNet, 1x and 3x): what they build and what they say.

Parameter counts are those of the detector each recipe builds (80 COCO classes), on the meta device (no memory, no
weights), against the official README's figures (``davit-facts.md`` 2.3), which are truncated to 0.1M.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from davit.tasks.detection.task import DetTask, load_det_config

ROOT = Path(__file__).resolve().parents[1]
DET = ROOT / "configs" / "det"

# (arch, size, schedule) -> (drop path, official?, reported params in M, reported box AP, reported mask AP)
RECIPES = {
    ("maskrcnn", "tiny", "1x"): (0.1, True, 47.8, 45.0, 41.1),
    ("maskrcnn", "tiny", "3x"): (0.2, True, 47.8, 47.4, 42.9),
    ("maskrcnn", "small", "1x"): (0.2, False, 69.2, 47.7, 42.9),
    ("maskrcnn", "small", "3x"): (0.3, False, 69.2, 49.5, 44.3),
    ("maskrcnn", "base", "1x"): (0.2, False, 107.3, 48.2, 43.3),
    ("maskrcnn", "base", "3x"): (0.3, False, 107.3, 49.9, 44.6),
    ("retinanet", "tiny", "1x"): (0.1, True, 38.5, 44.0, None),
    ("retinanet", "tiny", "3x"): (0.2, True, 38.5, 46.5, None),
    ("retinanet", "small", "1x"): (0.2, False, 59.9, 46.0, None),
    ("retinanet", "small", "3x"): (0.3, False, 59.9, 48.2, None),
    ("retinanet", "base", "1x"): (0.2, False, 98.5, 46.7, None),
    ("retinanet", "base", "3x"): (0.3, False, 98.5, 48.7, None),
}


def _path(arch: str, size: str, sched: str) -> Path:
    return DET / f"{arch}_davit_{size}_{sched}_coco.yaml"


def test_every_coco_recipe_is_listed() -> None:
    found = {p.name for p in DET.glob("*_coco.yaml")}
    assert found == {_path(*key).name for key in RECIPES}


@pytest.mark.parametrize("key", list(RECIPES), ids=["_".join(k) for k in RECIPES])
def test_recipe_builds_the_reported_detector(key: tuple[str, str, str]) -> None:
    arch, size, sched = key
    drop_path, _, params_m, _, _ = RECIPES[key]
    cfg = load_det_config(_path(*key), ["model.pretrained=", "model.num_classes=80"])
    assert cfg.model.name == f"davit_{size}"
    assert cfg.detector.arch == {"maskrcnn": "mask_rcnn", "retinanet": "retinanet"}[arch]
    assert cfg.model.overrides["drop_path_rate"] == pytest.approx(drop_path)
    epochs = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}[sched]
    assert cfg.train.iters == epochs[0] * 7330 and tuple(cfg.sched.milestones) == tuple(e * 7330 for e in epochs[1])
    # the official optimisation, identical for every size
    assert (cfg.optim.lr, cfg.optim.lr_base_batch, cfg.optim.weight_decay) == (1e-4, 16, 0.05)
    assert cfg.train.batch_size == 2 and cfg.sched.warmup == 500 and cfg.data.aug == "detr"
    with torch.device("meta"):
        model = DetTask(cfg).build_model()
    assert next(model.parameters()).device.type == "meta"
    n = sum(p.numel() for p in model.parameters())
    # The README's figures are truncated to 0.1M (T: 47,870,773 -> 47.8); torchvision's K + 1 class columns add
    # < 0.03M over mmdet's heads, which does not cross a 0.1M boundary for any of the six detectors.
    assert math.floor(n / 1e5) / 10 == pytest.approx(params_m), n


@pytest.mark.parametrize("key", list(RECIPES), ids=["_".join(k) for k in RECIPES])
def test_recipe_says_what_is_official_and_what_is_derived(key: tuple[str, str, str]) -> None:
    _, official, _, _, _ = RECIPES[key]
    text = _path(*key).read_text()
    if official:
        assert "DERIVED" not in text
    else:
        # the drop path is the one value not in the official code; the recipe says so and why
        assert "DERIVED" in text and "UNVERIFIED" in text and "drop_path_rate" in text and "OFFICIAL" in text


def test_docs_table_has_paper_ap_beside_each_recipe() -> None:
    readme = (ROOT / "docs" / "dense.md").read_text()  # the dense-task guide (moved out of the README)
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in readme.splitlines()
        if line.startswith("| `") and "_coco.yaml" in line
    }
    for key, (_, _, params_m, box, mask) in RECIPES.items():
        row = rows.get(_path(*key).name)
        assert row is not None, f"docs/dense.md has no row for {_path(*key).name}"
        ap = f"{box} / {mask}" if mask is not None else f"{box}"
        assert f"| {ap} |" in row and f"{params_m}M" in row, row
