"""A synthetic segmentation set in the ADE20K layout: coloured shapes on textured backgrounds, with label masks.

Classes: ``background``, ``disk``, ``rectangle``, ``triangle``. Each shape class has its own hue (jittered), so a small
model learns it within a minute, but shapes overlap, vary in size and sit on striped, noisy backgrounds, so the task
is not a colour lookup. Masks follow ADE20K's convention: PNG value = class + 1, and 0 ("unlabelled") marks a thin
ring around every shape, which ``reduce_zero_label`` turns into the ignore index.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import disk, polygon, rectangle
from skimage.segmentation import find_boundaries

__all__ = ["SYNTHETIC_CLASSES", "make_synthetic_seg"]

SYNTHETIC_CLASSES = ("background", "disk", "rectangle", "triangle")
_HUES = {1: 0.0, 2: 0.33, 3: 0.62}  # red-ish disks, green-ish rectangles, blue-ish triangles


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(2, 8)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))  # (H, W)
    c1, c2 = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
    c1 = c1.mean() + 0.3 * (c1 - c1.mean())  # desaturate: backgrounds are greyish
    c2 = c2.mean() + 0.3 * (c2 - c2.mean())
    img = stripes[..., None] * c1 + (1 - stripes[..., None]) * c2  # (H, W, 3)
    return img + rng.normal(0, 0.05, img.shape)


def _shape_pixels(rng: np.random.Generator, cls: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = size // 5, size // 2
    cy, cx = rng.integers(lo, size - lo, 2)
    if cls == 1:
        return disk((cy, cx), rng.integers(lo // 2 + 2, hi // 2 + 3), shape=(size, size))
    if cls == 2:
        h, w = rng.integers(lo, hi, 2)
        rr, cc = rectangle((cy - h // 2, cx - w // 2), extent=(h, w), shape=(size, size))  # (h, w) grids
        return rr.ravel(), cc.ravel()
    r = rng.integers(lo // 2 + 3, hi // 2 + 4)
    t = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    return polygon(cy + r * np.sin(t), cx + r * np.cos(t), shape=(size, size))


def _sample(rng: np.random.Generator, size: int, max_shapes: int) -> tuple[np.ndarray, np.ndarray]:
    img = _background(rng, size)
    label = np.zeros((size, size), np.int64)  # class index, 0 = background
    for _ in range(rng.integers(1, max_shapes + 1)):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        rr, cc = _shape_pixels(rng, cls, size)
        hue = (_HUES[cls] + rng.uniform(-0.06, 0.06)) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
        img[rr, cc] = colour + rng.normal(0, 0.04, (len(rr), 3))
        label[rr, cc] = cls
    png = label + 1  # ADE20K convention: 0 is "unlabelled"
    png[find_boundaries(label, mode="inner") & (label > 0)] = 0
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), png.astype(np.uint8)


def make_synthetic_seg(
    root: str | Path,
    n_train: int = 64,
    n_val: int = 16,
    size: int = 96,
    max_shapes: int = 4,
    seed: int = 0,
) -> Path:
    """Write ``root/images/{training,validation}/*.jpg``, ``root/annotations/...*.png`` and ``root/classes.txt``.

    Args:
        root: output folder (created).
        n_train: training images.
        n_val: validation images.
        size: image side in pixels.
        max_shapes: up to this many shapes per image.
        seed: the set is a pure function of the arguments.

    Returns:
        ``root``. Use it with ``data.root=ROOT data.num_classes=4`` (the class names are read from classes.txt).
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, png = _sample(rng, size, max_shapes)
            name = f"synth_{split}_{i:05d}"
            Image.fromarray(img).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(png, mode="L").save(root / "annotations" / split / f"{name}.png")
    (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    return root
