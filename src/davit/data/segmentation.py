"""Semantic segmentation data: image/mask folders (ADE20K layout or any pair of folders) and the mmseg train pipeline.

Layout (ADE20K, the default templates)::

    root/images/{training,validation}/*.jpg
    root/annotations/{training,validation}/*.png     # single-channel label PNGs, 0 = "other" (ignored)

Any other folder of image/mask pairs works through ``img_dir`` / ``ann_dir`` templates (``{split}`` is replaced), a
class list (``classes`` or a ``classes.txt`` beside the data, one name per line) and ``reduce_zero_label=False``.

Samples are dicts: ``img`` float ``(3, H, W)`` normalised, ``mask`` int64 ``(H, W)`` with 255 = ignore, ``path``.
The train transform is the official recipe (mmseg 0.11): resize to ``scale`` x ratio in ``ratio_range`` keeping the
aspect ratio, random crop with ``cat_max_ratio``, horizontal flip, photometric distortion, normalise, pad.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from .image import ImageReadError, load_rgb

__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "IMG_SUFFIXES",
    "SegEvalTransform",
    "SegmentationDataset",
    "SegTrainTransform",
    "find_pairs",
    "load_image",
    "read_class_names",
    "rescale_size",
    "seg_collate",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMG_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# mmseg's ImageNet normalisation, in 0..255 units, RGB order.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- reading
def load_image(path: str | Path) -> Tensor:
    """Read an image as uint8 RGB ``(3, H, W)``; an unreadable file (or a decompression bomb) raises an
    :class:`ImageReadError` naming it."""
    try:
        arr = np.asarray(load_rgb(path))
    except ImageReadError as e:
        raise ImageReadError(f"{e}. Remove or replace the file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _load_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(
                    f"mask {path} is a {im.mode} image; masks must be single-channel label PNGs (one class index per "
                    "pixel), not colour visualisations"
                )
            arr = np.asarray(im)
    except ValueError:
        raise
    except Exception as e:  # OSError, SyntaxError, DecompressionBombError, ...: PIL has many
        raise ImageReadError(f"cannot read mask {path}: {e}. Remove or replace the file") from e
    return arr.astype(np.int64)


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """One class name per line (blank lines ignored)."""
    names = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    if not names:
        raise ValueError(f"class list {path} is empty; write one class name per line")
    return names


def find_pairs(
    img_dir: str | Path, ann_dir: str | Path, seg_suffix: str = ".png"
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Pair every image in ``img_dir`` with ``ann_dir/<stem><seg_suffix>``.

    Returns:
        ``(pairs, images_without_mask)``, both sorted by file name.

    Raises:
        FileNotFoundError: a folder is missing (the message shows the expected layout).
    """
    img_dir, ann_dir = Path(img_dir), Path(ann_dir)
    for d, what in ((img_dir, "images"), (ann_dir, "masks")):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{what} folder {d} does not exist; expected the ADE20K layout root/images/<split>/*.jpg + "
                "root/annotations/<split>/*.png, or set data.img_dir / data.ann_dir (they may contain {split})"
            )
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMG_SUFFIXES and p.is_file())
    pairs, orphans = [], []
    for p in images:
        m = ann_dir / (p.stem + seg_suffix)
        (pairs.append((p, m)) if m.is_file() else orphans.append(p))
    return pairs, orphans


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # OSError, SyntaxError, DecompressionBombError, ...: the caller skips the file
        return None


class SegmentationDataset(Dataset):
    """Image/mask pairs with label checking.

    Args:
        img_dir: folder of images.
        ann_dir: folder of label PNGs named like the images (``<stem><seg_suffix>``).
        num_classes: number of classes after ``reduce_zero_label``.
        reduce_zero_label: ADE20K convention: label 0 ("other") becomes ignore (255) and the rest shift down by one.
        transform: ``(img uint8 (3,H,W), mask int64 (H,W)) -> (img, mask)``; None keeps uint8 images.
        seg_suffix: mask name suffix.
        check: read every pair's header once and skip (with a count and a warning) images without a mask, files
            that cannot be opened, and masks whose size differs from their image.
        bad_labels: "error" (default) raises a ValueError naming the file when a mask holds a label outside
            ``0..num_classes-1`` other than 255; "ignore" maps such pixels to 255 and warns once per file.
    """

    def __init__(
        self,
        img_dir: str | Path,
        ann_dir: str | Path,
        num_classes: int,
        *,
        reduce_zero_label: bool = False,
        transform: Any = None,
        seg_suffix: str = ".png",
        check: bool = True,
        bad_labels: str = "error",
    ) -> None:
        if bad_labels not in ("error", "ignore"):
            raise ValueError(f"bad_labels must be 'error' or 'ignore', got {bad_labels!r}")
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        self.bad_labels = bad_labels
        pairs, orphans = find_pairs(img_dir, ann_dir, seg_suffix)
        self.skipped: dict[str, list[str]] = {"no_mask": [str(p) for p in orphans], "unreadable": [], "size": []}
        if check:
            pairs = self._check(pairs)
        for reason, files in self.skipped.items():
            if files:
                log.warning(
                    "%s: skipped %d of %d images (%s), e.g. %s",
                    img_dir,
                    len(files),
                    len(pairs) + sum(len(f) for f in self.skipped.values()),
                    _REASONS[reason],
                    ", ".join(files[:3]),
                )
        if not pairs:
            raise ValueError(
                f"no usable image/mask pairs in {img_dir} + {ann_dir} (masks are matched by file stem + "
                f"{seg_suffix!r}); skipped: " + ", ".join(f"{len(v)} {_REASONS[k]}" for k, v in self.skipped.items())
            )
        self.pairs = pairs

    def _check(self, pairs: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
        keep = []
        for img, mask in pairs:
            si, sm = _header_size(img), _header_size(mask)
            if si is None or sm is None:
                self.skipped["unreadable"].append(str(img if si is None else mask))
            elif si != sm:
                self.skipped["size"].append(f"{img.name} {si[0]}x{si[1]} vs mask {sm[0]}x{sm[1]}")
            else:
                keep.append((img, mask))
        return keep

    def __len__(self) -> int:
        return len(self.pairs)

    def load_mask(self, path: Path) -> Tensor:
        """Read a label PNG, apply ``reduce_zero_label`` and check the label range."""
        m = _load_mask(path)
        if self.reduce_zero_label:
            # 0 -> 255 and k -> k-1; the wrap-around value 254 (from 255) stays ignore.
            m = np.where(m == 0, IGNORE_INDEX, m - 1)
            m[m == IGNORE_INDEX - 1] = IGNORE_INDEX
        bad = ((m >= self.num_classes) & (m != IGNORE_INDEX)) | (m < 0)
        if bad.any():
            values = np.unique(m[bad])[:8].tolist()
            if self.bad_labels == "error":
                raise ValueError(
                    f"mask {path} holds labels {values} outside 0..{self.num_classes - 1} (255 = ignore)"
                    f"{' after reduce_zero_label' if self.reduce_zero_label else ''}. Check data.num_classes / "
                    "data.reduce_zero_label, or set data.bad_labels=ignore to ignore those pixels"
                )
            log.warning("mask %s: labels %s outside 0..%d set to ignore", path, values, self.num_classes - 1)
            m = np.where(bad, IGNORE_INDEX, m)
        return torch.from_numpy(m)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        img_path, mask_path = self.pairs[idx]
        img, mask = load_image(img_path), self.load_mask(mask_path)
        if img.shape[1:] != mask.shape:
            raise ValueError(
                f"{img_path} is {tuple(img.shape[1:])} but its mask {mask_path} is {tuple(mask.shape)}; "
                "fix or remove the pair"
            )
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return {"img": img, "mask": mask, "path": str(img_path)}


_REASONS = {"no_mask": "no mask file", "unreadable": "unreadable", "size": "mask size differs from image"}


# ---------------------------------------------------------------------------------------------------- transforms
def rescale_size(hw: Sequence[int], scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size whose long edge <= max(scale) and short edge <= min(scale)."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _normalize(img: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return TF.normalize(img.float(), list(mean), list(std))


@dataclass(frozen=True)
class SegTrainTransform:
    """The official ADE20K train pipeline on tensors (uint8 image ``(3,H,W)``, int64 mask ``(H,W)``).

    Args:
        scale: base resize target ``(long, short)`` (official: 2048, 512).
        ratio_range: random factor on ``scale`` (official: 0.5 to 2.0).
        crop_size: ``(h, w)`` of the random crop (official: 512 x 512); images smaller than it are padded.
        cat_max_ratio: retry the crop (up to 10 times) while one class covers more than this share of its labelled
            pixels (official: 0.75).
        flip: horizontal flip probability.
        photometric: mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue, each with probability 0.5).
        mean: normalisation mean (0..255 units).
        std: normalisation std.
    """

    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    def __call__(self, img: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(img float (3, ch, cw), mask int64 (ch, cw))``; padding is 0 in the image and 255 in the mask."""
        lo, hi = self.ratio_range
        r = lo + float(torch.rand(())) * (hi - lo)
        size = rescale_size(img.shape[1:], (self.scale[0] * r, self.scale[1] * r))
        img = TF.resize(img, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
        mask = TF.resize(mask[None], list(size), interpolation=InterpolationMode.NEAREST)[0]
        img, mask = self._crop(img, mask)
        if float(torch.rand(())) < self.flip:
            img, mask = img.flip(-1), mask.flip(-1)
        x = img.float() / 255.0
        if self.photometric:
            x = photometric_distortion(x)
        x = _normalize(x * 255.0, self.mean, self.std)
        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - x.shape[1], 0), max(cw - x.shape[2], 0)
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return x, mask

    def _crop(self, img: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        ch, cw = self.crop_size
        h, w = mask.shape

        def window() -> tuple[int, int]:
            y = int(torch.randint(0, max(h - ch, 0) + 1, ()))
            x = int(torch.randint(0, max(w - cw, 0) + 1, ()))
            return y, x

        y, x = window()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                labels = mask[y : y + ch, x : x + cw]
                counts = torch.bincount(labels[labels != IGNORE_INDEX].flatten())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y, x = window()
        return img[:, y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]


def photometric_distortion(x: Tensor) -> Tensor:
    """mmseg's PhotoMetricDistortion on a float RGB image in ``[0, 1]``.

    Brightness adds a delta in [-32, 32]/255; contrast multiplies by [0.5, 1.5] (before or after the colour steps);
    saturation and hue use torchvision's ``adjust_saturation`` (a blend with grey, where mmseg scales HSV's S) and
    ``adjust_hue`` (shift by up to 18/180 of the hue circle, as mmseg). Every step clips to the valid range.
    """

    def coin() -> bool:
        return bool(torch.randint(0, 2, ()))

    def uniform(lo: float, hi: float) -> float:
        return lo + float(torch.rand(())) * (hi - lo)

    if coin():
        x = (x + uniform(-32, 32) / 255.0).clamp(0, 1)
    contrast_first = coin()
    if contrast_first and coin():
        x = (x * uniform(0.5, 1.5)).clamp(0, 1)
    if coin():
        x = TF.adjust_saturation(x, uniform(0.5, 1.5)).clamp(0, 1)
    if coin():
        x = TF.adjust_hue(x, int(torch.randint(-18, 19, ())) / 180.0).clamp(0, 1)
    if not contrast_first and coin():
        x = (x * uniform(0.5, 1.5)).clamp(0, 1)
    return x


@dataclass(frozen=True)
class SegEvalTransform:
    """Evaluation: normalise only. The image keeps its size; ``inference.py`` rescales it to the test scale and
    resizes the prediction back, so metrics are computed on the original annotation as mmseg does."""

    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    def __call__(self, img: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(img float (3, H, W), mask int64 (H, W))``."""
        return _normalize(img, self.mean, self.std), mask


def seg_collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of one size into ``img (B,3,H,W)`` / ``mask (B,H,W)``; keep lists when sizes differ (eval)."""
    imgs = [b["img"] for b in batch]
    masks = [b["mask"] for b in batch]
    paths = [b["path"] for b in batch]
    if all(i.shape == imgs[0].shape for i in imgs) and all(m.shape == masks[0].shape for m in masks):
        return {"img": torch.stack(imgs), "mask": torch.stack(masks), "path": paths}
    return {"img": imgs, "mask": masks, "path": paths}
