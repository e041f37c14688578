"""Inference for segmentation: whole image, sliding window, multi-scale + flip; and mask / overlay PNG writing.

As mmseg's ``EncoderDecoder``: the image is rescaled to the test scale (keeping its aspect ratio), the logits are
resized back to the original size with bilinear interpolation, turned into probabilities and, for test-time
augmentation, averaged over scales and flips before the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ...data.segmentation import IGNORE_INDEX, rescale_size
from ...visualize import distinct_colours, draw_legend

__all__ = [
    "BACKGROUND_NAMES",
    "background_classes",
    "colorize",
    "infer_probs",
    "legend_entries",
    "mask_image",
    "overlay",
    "palette",
    "slide_logits",
    "whole_logits",
    "write_prediction",
]


def whole_logits(model: nn.Module, img: Tensor) -> Tensor:
    """``(B, 3, H, W)`` -> logits ``(B, K, H, W)`` in one forward pass."""
    return model(img)["out"]


def slide_logits(model: nn.Module, img: Tensor, crop: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Sliding-window logits ``(B, K, H, W)``: windows of ``crop`` every ``stride``, overlaps averaged.

    The last window of each row/column is shifted back inside the image (mmseg's rule), and an image smaller than
    ``crop`` is one window of its own size, so the result equals :func:`whole_logits` then.
    """
    (ch, cw), (sh, sw) = crop, stride
    b, _, h, w = img.shape
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out: Tensor | None = None
    count = img.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * sh, c * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = whole_logits(model, img[:, :, y1:y2, x1:x2])  # (B, K, y2-y1, x2-x1)
            if out is None:
                out = img.new_zeros(b, logits.shape[1], h, w)
            out[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    assert out is not None
    return out / count


@torch.no_grad()
def infer_probs(
    model: nn.Module,
    img: Tensor,
    *,
    out_size: Sequence[int] | None = None,
    scale: Sequence[int] | None = None,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    crop: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
) -> Tensor:
    """Class probabilities ``(B, K, *out_size)`` for normalised images ``(B, 3, H, W)``.

    Args:
        model: a segmentation model whose forward returns ``{"out": logits}`` at the input size (in eval mode).
        img: normalised images at their original size.
        out_size: size of the returned maps (default: the input size).
        scale: test scale ``(long, short)``: the image is rescaled keeping its ratio so that it fits (ADE20K:
            2048 x 512); None keeps the input size.
        ratios: multi-scale factors on ``scale`` (official aug-test: 0.5, 0.75, 1.0, 1.25, 1.5, 1.75).
        flip: also average the horizontally flipped prediction.
        mode: "whole" or "slide".
        crop: sliding-window size.
        stride: sliding-window stride.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    h, w = img.shape[2:]
    out_size = tuple(out_size) if out_size is not None else (h, w)
    total: Tensor | None = None
    for r in ratios:
        base = (scale[0] * r, scale[1] * r) if scale is not None else (max(h, w) * r, min(h, w) * r)
        size = rescale_size((h, w), base)
        x = img if size == (h, w) else F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            logits = slide_logits(model, xi, crop, stride) if mode == "slide" else whole_logits(model, xi)
            if flipped:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            probs = logits.float().softmax(dim=1)
            total = probs if total is None else total + probs
    assert total is not None
    return total / (len(ratios) * (2 if flip else 1))


# Class names that mean "nothing here": left untinted on overlays and black in the mask PNG.
BACKGROUND_NAMES = frozenset({"background", "bg", "_background_", "__background__", "void", "unlabeled", "unlabelled"})
# The ignore index (255) is white in the mask PNG (black is background).
_IGNORE_RGB = (255, 255, 255)


def palette(num_classes: int) -> np.ndarray:
    """A fixed ``(num_classes, 3)`` uint8 colour table: distinct colours, the same in every run."""
    return distinct_colours(max(num_classes, 1))


def background_classes(names: Sequence[str]) -> tuple[int, ...]:
    """Indices of the classes named like a background (``background``, ``bg``, ``void``, ...; any case)."""
    return tuple(i for i, n in enumerate(names) if str(n).strip().lower() in BACKGROUND_NAMES)


def colorize(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Class-index mask ``(H, W)`` -> RGB ``(H, W, 3)``; the ignore index is black."""
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    valid = mask != IGNORE_INDEX
    rgb[valid] = colours[mask[valid] % len(colours)]
    return rgb


def overlay(
    image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.5, background: Sequence[int] = ()
) -> np.ndarray:
    """Blend the colourised mask over an RGB uint8 image ``(H, W, 3)``.

    Pixels of the ``background`` classes and of the ignore index keep the image's own colours.
    """
    tinted = (1 - alpha) * image.astype(np.float32) + alpha * colorize(mask, colours).astype(np.float32)
    out = tinted.clip(0, 255).astype(np.uint8)
    untinted = (mask == IGNORE_INDEX) | np.isin(mask, np.asarray(background, dtype=np.int64))
    out[untinted] = image[untinted]
    return out


def mask_image(mask: np.ndarray, colours: np.ndarray, background: Sequence[int] = ()) -> Image.Image:
    """A palette ("P" mode) PNG image of a class-index mask: the pixel values stay the class indices (what tools
    read back with ``np.asarray(Image.open(...))``) and viewers show the colours (background black, ignore white).
    """
    if mask.size and (mask.min() < 0 or (mask.max() > 255)):
        raise ValueError("a mask PNG holds class indices 0..255 (255 = ignore): more than 255 classes do not fit")
    table = np.zeros((256, 3), np.uint8)
    n = min(len(colours), 255)
    table[:n] = colours[:n]
    for b in background:
        if 0 <= b < 256:
            table[b] = 0
    table[IGNORE_INDEX] = _IGNORE_RGB
    img = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
    img.putpalette(table.reshape(-1).tolist())
    return img


def legend_entries(
    mask: np.ndarray, names: Sequence[str], colours: np.ndarray, background: Sequence[int] = ()
) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name and pixel share, colour)`` of each class present in ``mask``, largest share first."""
    ids, counts = np.unique(mask[mask != IGNORE_INDEX], return_counts=True)
    entries = []
    for i, c in sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: -t[1]):
        name = names[i] if i < len(names) else f"class {i}"
        colour = (0, 0, 0) if i in background else tuple(int(v) for v in colours[i % len(colours)])
        suffix = " (not tinted)" if i in background else ""
        entries.append((f"{name} {100 * c / mask.size:.1f}%{suffix}", colour))
    return entries


def write_prediction(
    image: np.ndarray,
    mask: np.ndarray,
    out_dir: str | Path,
    stem: str,
    colours: np.ndarray,
    names: Sequence[str] | None = None,
    background: Sequence[int] | None = None,
) -> tuple[Path, Path]:
    """Write ``<stem>_mask.png`` and ``<stem>_overlay.png``; returns both paths.

    Args:
        image: the RGB uint8 image ``(H, W, 3)``.
        mask: class indices ``(H, W)`` (255 = ignore).
        out_dir: the output folder.
        stem: file name stem.
        colours: the palette (:func:`palette`).
        names: class names; with them the overlay gets a legend of the classes present and their pixel shares.
        background: classes left untinted (default: those named like a background, see :func:`background_classes`).

    The mask PNG holds the class indices with a colour palette; the overlay tints every non-background class.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else None
    if background is None:
        background = background_classes(names or [])
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    mask_image(mask, colours, background).save(mask_path)
    picture = Image.fromarray(overlay(image, mask, colours, background=background))
    if names is not None:
        picture = draw_legend(picture, legend_entries(mask, names, colours, background))
    picture.save(overlay_path)
    return mask_path, overlay_path
