"""A synthetic COCO-format detection set: coloured squares, discs and triangles on textured backgrounds.

Small enough to train on a CPU in seconds, yet it exercises the whole path a real COCO run takes: a json with
categories, images and annotations (boxes ``[x, y, w, h]``, polygon masks for squares and triangles, RLE masks for
discs, as pycocotools writes them), and an image folder. Objects do not overlap, so every mask is exact.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

__all__ = ["CLASSES", "make_synthetic_coco", "make_synthetic_det"]

log = logging.getLogger(__name__)

CLASSES = ("square", "disc", "triangle")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency noise plus faint stripes, so the detector cannot find objects by "anything not flat"."""
    coarse = rng.uniform(60, 190, size=(3, 6, 6)).astype(np.float32)
    # Bilinear upsampling of a 6x6 grid per channel gives smooth colour blotches.
    img = np.stack(
        [np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR), dtype=np.float32) for c in coarse], -1
    )  # (size, size, 3)
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 16)
    stripes = 12 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    img += stripes[..., None] + rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a square or triangle of circumradius ``r`` rotated by ``rot`` radians."""
    n = 4 if kind == "square" else 3
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)
    ]


def _draw_image(
    rng: np.random.Generator, size: int, max_objects: int, min_radius: float, max_radius: float
) -> tuple[Image.Image, list[dict[str, Any]]]:
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            r = float(rng.uniform(min_radius, max_radius))
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, size=2))
            if all(math.hypot(cx - x, cy - y) > r + pr + 2 for x, y, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        cat = int(rng.integers(len(CLASSES)))
        kind = CLASSES[cat]
        # Saturated colours far from the background's mid-grey range keep the task learnable but not trivial.
        colour = tuple(int(c) for c in rng.choice([rng.integers(0, 50), rng.integers(205, 256)], size=3))
        mask_img = Image.new("L", (size, size), 0)
        mdraw = ImageDraw.Draw(mask_img)
        if kind == "disc":
            bbox = [cx - r, cy - r, cx + r, cy + r]
            draw.ellipse(bbox, fill=colour)
            mdraw.ellipse(bbox, fill=1)
            poly = None
        else:
            poly = _shape_polygon(kind, cx, cy, r, float(rng.uniform(0, math.pi)))
            draw.polygon(poly, fill=colour)
            mdraw.polygon(poly, fill=1)
        mask = np.asarray(mask_img, dtype=np.uint8)
        if mask.sum() == 0:
            continue
        objects.append({"category": cat, "mask": mask, "polygon": poly})
    return img, objects


def _annotation(obj: dict[str, Any], ann_id: int, image_id: int) -> dict[str, Any]:
    h_img, w_img = obj["mask"].shape
    if obj["polygon"] is not None:
        segmentation: Any = [[round(c, 2) for xy in obj["polygon"] for c in xy]]
        # Box and area from the polygon as pycocotools rasterises it (PIL's drawing is up to a pixel larger), so the
        # json is self-consistent for anyone decoding it.
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h_img, w_img))
    else:
        rle = mask_utils.encode(np.asfortranarray(obj["mask"]))
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["category"] + 1,
        "bbox": [x, y, w, h],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
        "segmentation": segmentation,
    }


def make_synthetic_coco(
    image_dir: str | Path,
    ann_file: str | Path,
    n: int = 64,
    img_size: int = 160,
    max_objects: int = 3,
    seed: int = 0,
) -> Path:
    """Draw ``n`` images into ``image_dir`` and write their COCO annotations to ``ann_file``.

    Args:
        image_dir: folder for the PNGs (created).
        ann_file: the COCO json to write.
        n: number of images.
        img_size: side of the square images.
        max_objects: 1..max_objects non-overlapping shapes per image.
        seed: RNG seed; the same seed gives the same files.

    Returns:
        The path of the json.
    """
    if n < 1 or img_size < 32 or max_objects < 1:
        raise ValueError(f"need n >= 1, img_size >= 32 and max_objects >= 1; got {n}, {img_size}, {max_objects}")
    image_dir, ann_file = Path(image_dir), Path(ann_file)
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(n):
        img, objects = _draw_image(rng, img_size, max_objects, img_size * 0.08, img_size * 0.2)
        name = f"{i:06d}.png"
        img.save(image_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": img_size, "height": img_size})
        for obj in objects:
            annotations.append(_annotation(obj, len(annotations) + 1, i + 1))
    data = {
        "info": {"description": "davit synthetic shapes", "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES)],
    }
    ann_file.write_text(json.dumps(data))
    return ann_file


def make_synthetic_det(
    root: str | Path, n_train: int = 64, n_val: int = 16, img_size: int = 160, max_objects: int = 3, seed: int = 0
) -> dict[str, Path]:
    """A train/val pair in the COCO layout: ``root/{train,val}/*.png`` and ``root/annotations/{train,val}.json``.

    Returns:
        ``{"train_images", "train_ann", "val_images", "val_ann"}`` paths.
    """
    root = Path(root)
    out: dict[str, Path] = {}
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
        out[f"{split}_images"] = root / split
        out[f"{split}_ann"] = make_synthetic_coco(
            root / split, root / "annotations" / f"{split}.json", n, img_size, max_objects, s
        )
    log.info("wrote %d train and %d val images to %s", n_train, n_val, root)
    return out
