"""Detect objects in image files with a trained detector and draw boxes, labels and masks on PNGs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import ImageDraw
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_segmentation_masks

from davit.data.image import ImageReadError
from davit.errors import UserError
from davit.visualize import distinct_colours, font, place_labels, text_colour, text_size

from .task import load_detector

__all__ = ["draw_detections", "predict_files"]

_COLOURS = distinct_colours(20)


def draw_detections(
    image: Tensor, output: dict[str, Tensor], classes: Sequence[str], score_thr: float = 0.5, mask_thr: float = 0.5
) -> Tensor:
    """Draw the detections of one image: masks, boxes and ``class score`` labels.

    Labels never hide one another where the image leaves room: they are placed best score first (each takes the
    first free spot around its box, see :func:`davit.visualize.place_labels`), and drawn best score last, so the top
    detection's box and label are on top of everything else.

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
    order = output["scores"][keep].argsort(descending=True)  # best first
    boxes = output["boxes"][keep][order]
    labels = output["labels"][keep][order].tolist()
    scores = output["scores"][keep][order].tolist()
    colours = [tuple(int(c) for c in _COLOURS[(k - 1) % len(_COLOURS)]) for k in labels]
    if "masks" in output:
        masks = output["masks"][keep][order][:, 0] > mask_thr  # (N, H, W) bool
        # drawn worst first, so the best detection's colour wins where masks overlap
        image = draw_segmentation_masks(image, masks.flip(0), alpha=0.45, colors=colours[::-1])
    h, w = image.shape[1:]
    fnt = font(max(10, min(h, w) // 40))
    names = [f"{classes[k - 1] if 0 < k <= len(classes) else k} {s:.2f}" for k, s in zip(labels, scores)]
    pad = 2
    sizes = [(tw + 2 * pad, th + 2 * pad) for tw, th in (text_size(n, fnt) for n in names)]
    box_list = [tuple(b) for b in boxes.tolist()]
    spots = place_labels(box_list, sizes, w, h)
    pil = TF.to_pil_image(image)
    draw = ImageDraw.Draw(pil)
    line = max(2, min(h, w) // 200)
    for i in reversed(range(len(names))):  # best last: on top
        draw.rectangle(box_list[i], outline=colours[i], width=line)
    for i in reversed(range(len(names))):
        x1, y1, x2, y2 = spots[i]
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colours[i])
        draw.text((x1 + pad, y1 + pad), names[i], fill=text_colour(colours[i]), font=fnt)
    return TF.pil_to_tensor(pil)


def _read(path: Path) -> Tensor:
    from davit.data.image import load_rgb

    return TF.pil_to_tensor(load_rgb(path))  # (3, H, W) uint8; ImageReadError names an unreadable file or a bomb


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
    if not 0.0 <= score_thr <= 1.0:  # NaN fails this too: it would silently keep nothing
        raise UserError(f"score_thr must be a score between 0 and 1, not {score_thr}")
    if model is None:
        model, _, classes = load_detector(checkpoint, config, device=device)
    classes = list(classes or [])
    model.eval()
    dev = next(model.parameters()).device
    results = []
    cap = getattr(getattr(model, "transform", None), "max_size", None)
    for path in map(Path, images):
        img = _read(path)
        h, w = img.shape[-2:]
        if cap and min(h, w) * cap / max(h, w) < 1:
            # The long side is scaled down to max_size: a 4000x3 strip would shrink to 0 rows (a torch traceback).
            raise ImageReadError(
                f"{path} is {w}x{h} pixels: too elongated to detect in (its short side would be under one pixel once "
                f"the long side is scaled to {cap}); crop it into tiles"
            )
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
