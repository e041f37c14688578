"""Detect objects in image files with a trained detector and draw boxes, labels and masks on PNGs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .task import load_detector

__all__ = ["draw_detections", "predict_files"]

# Distinct colours for up to 10 classes, then they repeat.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def draw_detections(
    image: Tensor, output: dict[str, Tensor], classes: Sequence[str], score_thr: float = 0.5, mask_thr: float = 0.5
) -> Tensor:
    """Draw the detections of one image.

    Args:
        image: ``(3, H, W)`` uint8.
        output: a torchvision detector output (``boxes``, ``labels``, ``scores``, optional ``masks`` ``(N, 1, H, W)``).
        classes: names of labels 1..K.
        score_thr: draw only detections scoring at least this.
        mask_thr: mask probability threshold.

    Returns:
        The ``(3, H, W)`` uint8 drawing.
    """
    keep = output["scores"] >= score_thr
    if not bool(keep.any()):
        return image
    labels = output["labels"][keep].tolist()
    colours = [_PALETTE[(k - 1) % len(_PALETTE)] for k in labels]
    if "masks" in output:
        masks = output["masks"][keep][:, 0] > mask_thr  # (N, H, W) bool
        image = draw_segmentation_masks(image, masks, alpha=0.45, colors=colours)
    names = [
        f"{classes[k - 1] if 0 < k <= len(classes) else k} {s:.2f}"
        for k, s in zip(labels, output["scores"][keep].tolist())
    ]
    return draw_bounding_boxes(image, output["boxes"][keep], labels=names, colors=colours, width=2)


def _read(path: Path) -> Tensor:
    try:
        with Image.open(path) as im:
            return TF.pil_to_tensor(im.convert("RGB"))  # (3, H, W) uint8
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


@torch.no_grad()
def predict_files(
    images: Sequence[str | os.PathLike[str]],
    checkpoint: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = "predictions",
    score_thr: float = 0.5,
    device: str = "auto",
    model: nn.Module | None = None,
    classes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run a trained detector on image files and write ``<out_dir>/<name>_det.png`` drawings.

    Args:
        images: image files (any format PIL reads).
        checkpoint: the run's weights (``best.safetensors``); its ``config.yaml`` is read from the same folder unless
            ``config`` is given.
        config: the run's config.
        out_dir: where to write the drawings (None: beside each image).
        score_thr: keep detections scoring at least this.
        device: where to run.
        model: an already loaded detector (skips loading ``checkpoint``); then pass ``classes`` too.
        classes: class names for ``model``.

    Returns:
        One dict per image: ``image``, ``out`` (the PNG), ``detections`` (``label``, ``class``, ``score``, ``box``
        xyxy pixels).
    """
    if model is None:
        model, _, classes = load_detector(checkpoint, config, device=device)
    classes = list(classes or [])
    model.eval()
    dev = next(model.parameters()).device
    results = []
    for path in map(Path, images):
        img = _read(path)
        out = {k: v.cpu() for k, v in model([TF.to_dtype(img, torch.float32, scale=True).to(dev)])[0].items()}
        folder = Path(out_dir) if out_dir is not None else path.parent
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{path.stem}_det.png"
        TF.to_pil_image(draw_detections(img, out, classes, score_thr)).save(dst)
        keep = out["scores"] >= score_thr
        dets = [
            {
                "label": int(k),
                "class": classes[int(k) - 1] if 0 < int(k) <= len(classes) else str(int(k)),
                "score": round(float(s), 4),
                "box": [round(float(v), 1) for v in b],
            }
            for k, s, b in zip(out["labels"][keep], out["scores"][keep], out["boxes"][keep])
        ]
        results.append({"image": str(path), "out": str(dst), "detections": dets})
    return results
