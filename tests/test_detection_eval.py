"""COCO metrics through pycocotools, checked against cases whose AP is known independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from davit.data.coco import CocoDetection
from davit.data.synthetic_det import make_synthetic_det
from davit.tasks.detection.evaluate import coco_evaluate, detections_to_coco


@pytest.fixture(scope="module")
def val(tmp_path_factory: pytest.TempPathFactory) -> CocoDetection:
    paths = make_synthetic_det(tmp_path_factory.mktemp("evalshapes"), n_train=1, n_val=24, img_size=96, seed=11)
    return CocoDetection(paths["val_images"], paths["val_ann"])


def _ground_truth_as_detections(val: CocoDetection) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    outs, ids = [], []
    for i in range(len(val)):
        _, t = val[i]
        n = len(t["boxes"])
        outs.append(
            {
                "boxes": t["boxes"].clone(),
                "labels": t["labels"].clone(),
                "scores": torch.linspace(0.9, 0.5, n) if n else torch.zeros(0),
                "masks": t["masks"][:, None].float(),  # (N, 1, H, W) probabilities
            }
        )
        ids.append(int(t["image_id"]))
    return outs, ids


def test_perfect_predictions_give_ap_100(val: CocoDetection) -> None:
    outs, ids = _ground_truth_as_detections(val)
    m = coco_evaluate(val.coco_gt(), detections_to_coco(outs, ids, val.cat_ids), ("bbox", "segm"), val.image_ids)
    for k in ("bbox_ap", "bbox_ap50", "bbox_ap75", "segm_ap", "segm_ap50", "segm_ap75"):
        assert m[k] == pytest.approx(100.0), k
    assert "bbox_apl" not in m  # no large objects in 96-px images: pycocotools says -1, we leave it out


def test_perturbed_predictions_score_less(val: CocoDetection) -> None:
    outs, ids = _ground_truth_as_detections(val)
    g = torch.Generator().manual_seed(0)
    shaken = [{**o, "boxes": o["boxes"] + torch.randn(o["boxes"].shape, generator=g) * 3} for o in outs]
    shifted = [{**o, "masks": o["masks"].roll(4, dims=-1)} for o in outs]
    gt = val.coco_gt()
    box = coco_evaluate(gt, detections_to_coco(shaken, ids, val.cat_ids), ("bbox",))
    seg = coco_evaluate(gt, detections_to_coco(shifted, ids, val.cat_ids), ("segm",))
    assert 0 < box["bbox_ap"] < 90 and box["bbox_ap50"] > box["bbox_ap75"]
    assert 0 < seg["segm_ap"] < 90
    wrong = [{**o, "labels": o["labels"] % 3 + 1} for o in outs]  # every class wrong
    assert coco_evaluate(gt, detections_to_coco(wrong, ids, val.cat_ids), ("bbox",))["bbox_ap"] == 0.0


def test_missing_detections_match_hand_computed_ap(val: CocoDetection) -> None:
    """Keep only the first detection of each image: AP = mean over classes of the share of COCO's 101 recall
    thresholds at or below that class's recall (precision is 1 wherever a recall is reached)."""
    outs, ids = _ground_truth_as_detections(val)
    kept = [{k: v[:1] for k, v in o.items()} for o in outs]
    per_class_gt = {c: 0 for c in (1, 2, 3)}
    per_class_found = {c: 0 for c in (1, 2, 3)}
    for o, k in zip(outs, kept):
        for label in o["labels"].tolist():
            per_class_gt[label] += 1
        for label in k["labels"].tolist():
            per_class_found[label] += 1
    thresholds = np.linspace(0, 1, 101)
    expected = np.mean(
        [(thresholds <= per_class_found[c] / per_class_gt[c] + 1e-12).mean() for c in per_class_gt if per_class_gt[c]]
    )
    got = coco_evaluate(val.coco_gt(), detections_to_coco(kept, ids, val.cat_ids), ("bbox",))
    assert got["bbox_ap"] == pytest.approx(100 * expected, abs=1e-6)
    assert got["bbox_ap"] < 100


def test_no_detections_gives_zero(val: CocoDetection) -> None:
    m = coco_evaluate(val.coco_gt(), [], ("bbox", "segm"))
    assert m["bbox_ap"] == 0.0 and m["segm_ap50"] == 0.0
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(val.coco_gt(), [], ("keypoints",))


def test_detections_to_coco_records() -> None:
    mask = torch.zeros(1, 1, 20, 30)
    mask[0, 0, 5:10, 3:12] = 0.9
    out = {
        "boxes": torch.tensor([[3.0, 5.0, 12.0, 10.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.75]),
        "masks": mask,
    }
    (rec,) = detections_to_coco([out], [42], cat_ids=[7, 30, 90])
    assert rec["image_id"] == 42 and rec["category_id"] == 30 and rec["bbox"] == [3.0, 5.0, 9.0, 5.0]
    assert rec["score"] == pytest.approx(0.75)
    decoded = mask_utils.decode({"size": rec["segmentation"]["size"], "counts": rec["segmentation"]["counts"]})
    assert decoded.shape == (20, 30) and np.array_equal(decoded, (mask[0, 0] > 0.5).numpy().astype(np.uint8))
    assert detections_to_coco([{**out, "boxes": torch.zeros(0, 4)}], [1], [1]) == []


def test_ground_truth_excludes_skipped_images(tmp_path: Path, val: CocoDetection) -> None:
    gt = val.coco_gt()
    assert sorted(gt.getImgIds()) == sorted(val.image_ids)
    assert len(gt.getAnnIds()) == sum(len(r.anns) for r in val.records)
