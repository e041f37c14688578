"""COCO evaluation with pycocotools: box AP and mask AP (AP, AP50, AP75, APs, APm, APl), in percent.

pycocotools' own numbers, multiplied by 100 so they read like the paper's tables (Mask R-CNN Tiny 1x: 45.0 box AP).
A size bucket with no ground truth (e.g. no small objects) is left out (pycocotools reports -1 for it).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

__all__ = ["METRIC_NAMES", "coco_evaluate", "detections_to_coco", "run_detector"]

log = logging.getLogger(__name__)

# The first six entries of COCOeval.stats, in order.
METRIC_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def detections_to_coco(
    outputs: Sequence[dict[str, Tensor]],
    image_ids: Sequence[int],
    cat_ids: Sequence[int],
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """torchvision detector outputs -> COCO result records.

    Args:
        outputs: one dict per image with ``boxes`` (xyxy, image pixels), ``scores``, ``labels`` (1..K) and optionally
            ``masks`` (``(N, 1, H, W)`` probabilities).
        image_ids: the COCO id of each image.
        cat_ids: the json category id of label ``k`` at ``cat_ids[k - 1]``.
        mask_threshold: probability above which a mask pixel is foreground.

    Returns:
        Records with ``image_id``, ``category_id``, ``bbox`` (xywh), ``score`` and, with masks, ``segmentation``
        (compressed RLE).
    """
    results: list[dict[str, Any]] = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if not len(boxes):
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()  # (N, 4) x, y, w, h
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles: list[Any] = [None] * len(scores)
        if "masks" in out:
            masks = (out["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)  # (N, H, W)
            # encode wants (H, W, N) Fortran order
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for box, score, label, rle in zip(xywh, scores, labels, rles):
            rec: dict[str, Any] = {
                "image_id": int(img_id),
                "category_id": int(cat_ids[int(label) - 1]),
                "bbox": [round(float(v), 2) for v in box],
                "score": float(score),
            }
            if rle is not None:
                rec["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(rec)
    return results


def coco_evaluate(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_types: Iterable[str] = ("bbox",),
    img_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Run ``COCOeval`` for each IoU type.

    Args:
        coco_gt: the ground truth.
        results: COCO result records (see :func:`detections_to_coco`).
        iou_types: ``"bbox"`` and/or ``"segm"``.
        img_ids: restrict to these images (default: all images of ``coco_gt``).

    Returns:
        ``{"bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_aps", "bbox_apm", "bbox_apl", "segm_ap", ...}`` in percent;
        0 for every metric when there are no detections at all.
    """
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        recs = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not recs:
            # loadRes refuses an empty list; no detections means zero precision at every threshold.
            metrics.update({f"{iou_type}_{n}": 0.0 for n in METRIC_NAMES})
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):  # pycocotools prints its progress and the table
            # loadRes takes its bbox branch whenever a record has a bbox, and then replaces the segmentation by the
            # box's polygon: mask AP must see records without bbox. Copies also keep loadRes off the caller's dicts.
            drop = "segmentation" if iou_type == "bbox" else "bbox"
            recs = [{k: v for k, v in r.items() if k != drop} for r in recs]
            dt = coco_gt.loadRes(recs)
            ev = COCOeval(coco_gt, dt, iou_type)
            if img_ids is not None:
                ev.params.imgIds = list(img_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        log.debug("%s\n%s", iou_type, buf.getvalue())
        for name, value in zip(METRIC_NAMES, ev.stats[: len(METRIC_NAMES)]):
            if value >= 0:  # pycocotools' -1 means "no objects of this size here": omitted, not a score
                metrics[f"{iou_type}_{name}"] = float(value) * 100
    return metrics


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


@torch.no_grad()
def run_detector(
    model: nn.Module, loader: Iterable[Any], cat_ids: Sequence[int], mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Detections of ``model`` on every batch of ``loader`` as COCO records, gathered from all ranks under DDP.

    ``loader`` yields ``(images, targets)`` pairs of lists (see :func:`davit.data.coco.detection_collate`); the
    targets only supply ``image_id``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_image: dict[int, list[dict[str, Any]]] = {}
    try:
        for images, targets in loader:
            outputs = model(_to_device(list(images), device))
            ids = [int(t["image_id"]) for t in targets]
            for img_id, out in zip(ids, outputs):
                per_image[img_id] = detections_to_coco([out], [img_id], cat_ids, mask_threshold)
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_image)
        # A DistributedSampler pads the last shard with repeated images: keying by image id drops the repeats.
        per_image = {k: v for part in gathered for k, v in part.items()}
    return [r for recs in per_image.values() for r in recs]
