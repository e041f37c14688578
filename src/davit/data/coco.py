"""COCO-format detection / instance segmentation data: a json + an image folder -> torchvision detection targets.

Samples are ``(image, target)``: ``image`` a float ``(3, H, W)`` tensor in [0, 1] (the detector normalises and
resizes it itself), ``target`` a dict with ``boxes`` (``(N, 4)`` xyxy pixels), ``labels`` (``(N,)`` int64, 1..K; 0 is
torchvision's background), ``masks`` (``(N, H, W)`` uint8, with masks) and ``image_id``.

Training augmentation follows the official DaViT COCO recipe (mmdet's DETR-style AutoAugment): flip 0.5, then with
probability 0.5 either nothing, or resize the short side to one of ``crop_scales`` (400/500/600) and crop a random
``crop_range`` (384..600) patch. The final resize of the short side to one of 480..800 (long side <= 1333) is the
detector's own transform (``min_size``/``max_size``, see ``davit.tasks.detection.models``), which picks a random
``min_size`` per batch in training and the last one at test time: together they are exactly the two recipe branches.

Bad files are dealt with up front, as the field does: images whose file is missing or unreadable, and boxes of zero or
negative size, are skipped with a counted warning; images left without annotations are skipped for training (kept for
evaluation, where they count as true negatives).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .image import ImageReadError, load_rgb

__all__ = ["CocoDetection", "DetrCrop", "build_det_transforms", "detection_collate"]

log = logging.getLogger(__name__)

Target = dict[str, Tensor]
Transform = Callable[[Any, Any], tuple[Any, Any]]


@dataclass
class _Record:
    image_id: int
    path: Path
    height: int
    width: int
    anns: list[dict[str, Any]] = field(default_factory=list)


class CocoDetection(Dataset):
    """A COCO-format dataset: ``ann_file`` (instances json) + ``image_dir`` (the images its ``file_name``s name).

    Args:
        image_dir: folder holding the images.
        ann_file: COCO instances json (``images``, ``annotations`` with ``bbox`` xywh and ``segmentation``,
            ``categories``).
        train: training split: drop crowd annotations and images left without annotations.
        with_masks: decode instance masks (Mask R-CNN); boxes only otherwise (RetinaNet), which is much cheaper.
        transforms: ``(image, target) -> (image, target)`` on tv_tensors (see :func:`build_det_transforms`); None
            only converts the image to float.
        verify_images: open every image header once at start, so an unreadable file is skipped with a warning instead
            of stopping a run hours later.

    Attributes:
        classes: category names in label order (label ``i + 1`` is ``classes[i]``).
        cat_ids: the json category id of each label (``cat_ids[label - 1]``), to write results back in COCO ids.
        skipped: counts of what was skipped and why.

    Raises:
        FileNotFoundError: ``ann_file`` or ``image_dir`` does not exist.
        ValueError: the json is not COCO instances, or no usable image is left.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        train: bool = False,
        with_masks: bool = True,
        transforms: Transform | None = None,
        verify_images: bool = True,
    ) -> None:
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}")
        self.train, self.with_masks, self.transforms = train, with_masks, transforms
        self.coco = _load_coco(self.ann_file)
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"{self.ann_file} has no categories; a COCO instances json lists them under 'categories'")
        self.cat_ids: list[int] = [int(c["id"]) for c in cats]
        self.classes: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self._label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.skipped: dict[str, int] = {}
        self.records = self._build_records(verify_images)
        if not self.records:
            raise ValueError(
                f"no usable image in {self.ann_file} (images in {self.image_dir}); skipped: {self.skipped or 'none'}. "
                "Check that image_dir is the folder the json's file_name entries are relative to"
            )

    # ------------------------------------------------------------------------------------------------ indexing
    def _count(self, reason: str, example: str) -> None:
        if reason not in self.skipped:
            self.skipped[reason] = 0
            self._examples[reason] = example
        self.skipped[reason] += 1

    def _build_records(self, verify: bool) -> list[_Record]:
        self._examples: dict[str, str] = {}
        records = []
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            path = self.image_dir / str(info.get("file_name", ""))
            if not path.is_file():
                self._count("missing image files", str(path))
                continue
            if verify and not _readable(path):
                self._count("unreadable images", str(path))
                continue
            h, w = _int_or_zero(info.get("height")), _int_or_zero(info.get("width"))
            if h <= 0 or w <= 0:
                size = _header_size(path)
                if size is None:
                    self._count("unreadable images", str(path))
                    continue
                w, h = size
            rec = _Record(int(img_id), path, h, w)
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann.get("category_id") not in self._label:
                    self._count("annotations of unknown categories", f"annotation {ann.get('id')}")
                    continue
                bbox = ann.get("bbox")
                if isinstance(bbox, str):
                    _bbox_numbers(None, ann, self.ann_file)  # raises: a string is a malformed file, not a gap
                if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                    self._count("annotations without a bbox", f"annotation {ann.get('id')}")
                    continue
                x, y, bw, bh = _bbox_numbers(bbox, ann, self.ann_file)
                if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                    self._count("boxes with NaN or infinite coordinates", f"annotation {ann.get('id')} in {path.name}")
                    continue
                # Clip to the image first: a box that only lies outside it is as degenerate as one of zero size.
                x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
                if x2 - x1 <= 0 or y2 - y1 <= 0:
                    self._count("boxes of zero or negative size", f"annotation {ann.get('id')} in {path.name}")
                    continue
                if self.train and ann.get("iscrowd", 0):
                    # torchvision's detectors have no notion of crowd regions; COCOeval ignores them at test time.
                    continue
                rec.anns.append({**ann, "_xyxy": (x1, y1, x2, y2)})
            if self.train and not any(not a.get("iscrowd", 0) for a in rec.anns):
                self._count("training images without annotations", path.name)
                continue
            records.append(rec)
        if self.skipped:
            parts = [f"{n} {reason} (e.g. {self._examples[reason]})" for reason, n in self.skipped.items()]
            log.warning("%s: skipped %s", self.ann_file.name, "; ".join(parts))
        return records

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_masks(self) -> bool:
        """Whether any kept annotation carries a ``segmentation`` (else Mask R-CNN would learn box masks)."""
        return any(a.get("segmentation") for r in self.records for a in r.anns)

    @property
    def image_ids(self) -> list[int]:
        """COCO ids of the images kept, in dataset order."""
        return [r.image_id for r in self.records]

    # ------------------------------------------------------------------------------------------------ samples
    def load_image(self, index: int) -> Image.Image:
        """The RGB image of sample ``index``; a decoding failure names the file."""
        rec = self.records[index]
        try:
            return load_rgb(rec.path)
        except ImageReadError as e:
            raise ImageReadError(f"{e}; remove it from {self.ann_file.name}") from None

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        rec = self.records[index]
        pil = self.load_image(index)
        w, h = pil.size
        if (h, w) != (rec.height, rec.width):
            # A json whose width/height disagree with the file: trust the file, rescale nothing (COCO boxes are pixels
            # of the actual image) but clip to it.
            log.debug("%s is %dx%d, json says %dx%d", rec.path.name, w, h, rec.width, rec.height)
        anns = [a for a in rec.anns if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["_xyxy"] for a in anns], dtype=torch.float32).reshape(-1, 4)  # (N, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        image = tv_tensors.Image(v2.functional.pil_to_tensor(pil))  # (3, H, W) uint8
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(rec.image_id, dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.stack([_ann_mask(a, h, w) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))  # (N, H, W) uint8
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image = v2.functional.to_dtype(image, torch.float32, scale=True)
        # Plain tensors from here on: the detectors and the engine's device moves need nothing of tv_tensors.
        return image.as_subclass(Tensor), {k: v.as_subclass(Tensor) for k, v in target.items()}

    # ------------------------------------------------------------------------------------------------ evaluation
    def coco_gt(self) -> COCO:
        """Ground truth restricted to the kept images and valid annotations, for ``COCOeval``."""
        images = [self.coco.imgs[r.image_id] for r in self.records]
        anns = []
        for r in self.records:
            for a in r.anns:
                ann = {k: v for k, v in a.items() if k != "_xyxy"}
                x1, y1, x2, y2 = a["_xyxy"]
                ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                ann.setdefault("area", (x2 - x1) * (y2 - y1))
                ann.setdefault("iscrowd", 0)
                if "segmentation" not in ann:
                    ann["segmentation"] = [[x1, y1, x2, y1, x2, y2, x1, y2]]
                anns.append(ann)
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": list(self.coco.cats.values())}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt


def _load_coco(path: Path) -> COCO:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path} is not a COCO instances file: it needs 'images', 'annotations' and 'categories'")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    _check_coco(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_coco(data: dict[str, Any], path: Path) -> None:
    """The structure pycocotools indexes without checking: lists of objects with ids. Annotations without an id get
    one (a warning says how many): COCOeval needs them, the user rarely cares."""
    for key, needs_id in (("images", True), ("annotations", False), ("categories", True)):
        items = data[key]
        if not isinstance(items, list):
            raise ValueError(
                f"{path}: '{key}' is a {type(items).__name__}, it must be a list of objects "
                f'(e.g. "{key}": [{{"id": 1, ...}}])'
            )
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"{path}: {key}[{i}] is a {type(item).__name__}, not an object")
            if needs_id and not isinstance(item.get("id"), (int, str)):
                raise ValueError(f"{path}: {key}[{i}] has no 'id'; every entry of '{key}' needs a unique id")
    anns = data["annotations"]
    for i, ann in enumerate(anns):
        if not isinstance(ann.get("image_id"), (int, str)):
            raise ValueError(f"{path}: annotations[{i}] has no 'image_id' (the id of the image it belongs to)")
    missing = [a for a in anns if not isinstance(a.get("id"), (int, str))]
    if missing:
        taken = {a["id"] for a in anns if isinstance(a.get("id"), int)}
        next_id = max(taken, default=0) + 1
        for a in missing:
            a["id"] = next_id
            next_id += 1
        log.warning(
            "%s: %d annotations have no 'id'; numbered them from %d", path.name, len(missing), max(taken, default=0) + 1
        )


def _int_or_zero(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _bbox_numbers(bbox: Sequence[Any] | None, ann: dict[str, Any], ann_file: Path) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"{ann_file}: annotation {ann.get('id')} (image {ann.get('image_id')}) has bbox {ann.get('bbox')!r}; "
            "a COCO bbox is [x, y, width, height] as numbers"
        ) from None
    return x, y, w, h


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # PIL raises many types for broken files; any of them means "skip this one"
        return None


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many types for broken files; any of them means "skip this one"
        return False


def _ann_mask(ann: dict[str, Any], h: int, w: int) -> np.ndarray:
    """``(h, w)`` uint8 mask of a polygon / RLE / uncompressed-RLE segmentation; the box when there is none."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        seg = [p for p in seg if len(p) >= 6]  # a polygon needs 3 points; shorter ones crash pycocotools
        if seg:
            return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))
    elif isinstance(seg, dict) and "counts" in seg:
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        m = mask_utils.decode(rle)
        if m.shape == (h, w):
            return m
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = (round(v) for v in ann["_xyxy"])
    m[y1:y2, x1:x2] = 1
    return m


class DetrCrop:
    """Resize the short side to one of ``scales`` (long side <= ``max_size``), then crop a random patch whose height
    and width are drawn from ``crop_range`` (mmdet's ``RandomCrop(crop_type='absolute_range')``).

    The official DaViT configs keep a crop that leaves no box (``allow_negative_crop=True``: the image then trains
    the detectors' background terms only). With ``allow_empty=False`` such a crop is redrawn instead, and after
    ``tries`` failures the resized image is kept whole.
    """

    def __init__(
        self,
        scales: Sequence[int],
        crop_range: tuple[int, int],
        max_size: int,
        allow_empty: bool = True,
        tries: int = 10,
    ) -> None:
        self.resize = v2.RandomShortestSize(list(scales), max_size=max_size)
        self.crop_range, self.allow_empty, self.tries = crop_range, allow_empty, tries
        self.sanitize = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()])

    def __call__(self, image: Any, target: Any) -> tuple[Any, Any]:
        image, target = self.resize(image, target)
        h, w = image.shape[-2:]
        lo, hi = self.crop_range
        for _ in range(self.tries):
            ch = int(torch.randint(min(h, lo), min(h, hi) + 1, ()))
            cw = int(torch.randint(min(w, lo), min(w, hi) + 1, ()))
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            crop = {
                k: v2.functional.crop(v, top, left, ch, cw) if k in ("boxes", "masks") else v for k, v in target.items()
            }
            img_c, crop = self.sanitize(v2.functional.crop(image, top, left, ch, cw), crop)
            if len(crop["boxes"]) or self.allow_empty:
                return img_c, crop
        return image, target


class _RandomChoice:
    """Pick one of ``fns`` uniformly per sample (v2.RandomChoice wants v2 transforms; these are plain callables)."""

    def __init__(self, fns: Sequence[Transform | None]) -> None:
        self.fns = list(fns)

    def __call__(self, image: Any, target: Any) -> tuple[Any, Any]:
        fn = self.fns[int(torch.randint(len(self.fns), ()))]
        return fn(image, target) if fn is not None else (image, target)


class _Chain:
    def __init__(self, fns: Sequence[Transform]) -> None:
        self.fns = list(fns)

    def __call__(self, image: Any, target: Any) -> tuple[Any, Any]:
        for fn in self.fns:
            image, target = fn(image, target)
        return image, target


def build_det_transforms(
    train: bool,
    aug: str = "detr",
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_range: tuple[int, int] = (384, 600),
    max_size: int = 1333,
    flip: float = 0.5,
    crop_allow_empty: bool = True,
) -> Transform | None:
    """The dataset side of the recipe's augmentation (the detector resizes to ``min_size``/``max_size`` itself).

    Args:
        train: training transforms; evaluation gets none (the detector resizes to the test scale).
        aug: ``"detr"`` (flip + the recipe's resize-and-crop branch with probability 0.5), ``"flip"``, or ``"none"``.
        crop_scales: short sides of the resize before the crop.
        crop_range: the crop's (min, max) height and width.
        max_size: long-side cap of that resize.
        flip: horizontal flip probability.
        crop_allow_empty: keep crops that contain no box (the official setting), see :class:`DetrCrop`.
    """
    if aug not in ("detr", "flip", "none"):
        raise ValueError(f"data.aug must be 'detr', 'flip' or 'none', got {aug!r}")
    if not train or aug == "none":
        return None
    steps: list[Transform] = [v2.RandomHorizontalFlip(flip)]
    if aug == "detr":
        steps.append(_RandomChoice([None, DetrCrop(crop_scales, crop_range, max_size, crop_allow_empty)]))
    return _Chain(steps)


def detection_collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Images differ in size, so a batch stays a pair of lists (torchvision's detectors batch and pad them)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
