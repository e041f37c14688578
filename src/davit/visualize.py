"""Drawing helpers shared by the pictures the tasks write: a colour palette, fonts, legends, non-overlapping labels.

Pure PIL/numpy; every function returns a new image and never shows anything.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["distinct_colours", "draw_legend", "font", "place_labels", "text_colour", "text_size"]

Box = tuple[float, float, float, float]

# Sasha Trubetskoy's 20 distinct colours (in his recommended order): neighbours in the list differ most.
_DISTINCT = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip


def distinct_colours(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours: the 20 most distinct first, then hues spaced by the golden ratio (any ``n``).

    The same ``n`` always gives the same table, and the first colours do not depend on ``n``.
    """
    out = list(_DISTINCT[: max(n, 0)])
    i = 0
    while len(out) < n:
        # golden-ratio hue steps never repeat; saturation/value cycle so that near hues still differ
        h = (0.13 + i * 0.618033988749895) % 1.0
        s, v = (0.85, 0.95, 0.6)[i % 3], (0.95, 0.7, 0.9)[(i // 3) % 3]
        out.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)))
        i += 1
    return np.asarray(out, dtype=np.uint8).reshape(-1, 3)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled scalable font at ``size`` pixels (its fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=max(int(size), 6))
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def text_size(text: str, fnt: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[int, int]:
    """Width and height in pixels that ``text`` takes in ``fnt`` (from the origin, descenders included)."""
    left, top, right, bottom = fnt.getbbox(text)
    return int(right), int(bottom)


def text_colour(colour: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``colour`` (ITU-R BT.601 luma)."""
    r, g, b = colour[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_legend(
    image: Image.Image,
    entries: Sequence[tuple[str, Sequence[int]]],
    *,
    font_size: int | None = None,
    title: str | None = None,
) -> Image.Image:
    """The image with a legend panel on its right: one colour swatch and name per entry.

    Args:
        image: an RGB image.
        entries: ``(text, rgb colour)`` per line, in the order to list them.
        font_size: text height in pixels (default: from the image height, at least 12).
        title: an optional first line.

    Returns:
        A new RGB image, as tall as the image or the legend (whichever is taller), the image at the top left.
    """
    size = font_size or max(12, min(24, image.height // 28))
    fnt = font(size)
    pad, gap = size // 2, max(2, size // 4)
    line = size + gap
    lines = ([title] if title else []) + [text for text, _ in entries]
    text_w = max((text_size(t, fnt)[0] for t in lines), default=0)
    panel_w = pad + size + pad + text_w + pad
    panel_h = pad + line * len(lines) + pad
    out = Image.new("RGB", (image.width + panel_w, max(image.height, panel_h)), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    x0, y = image.width + pad, pad
    if title:
        draw.text((x0, y), title, fill=(0, 0, 0), font=fnt)
        y += line
    for text, colour in entries:
        rgb = tuple(int(c) for c in colour[:3])
        draw.rectangle([x0, y, x0 + size - 1, y + size - 1], fill=rgb, outline=(0, 0, 0))
        draw.text((x0 + size + pad, y), text, fill=(0, 0, 0), font=fnt)
        y += line
    return out


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def place_labels(boxes: Sequence[Box], sizes: Sequence[tuple[int, int]], width: int, height: int) -> list[Box]:
    """Positions for one text label per box such that labels do not overlap each other where avoidable.

    Boxes are placed in the given order (pass them best score first: the first ones get their preferred spot). Each
    label tries, in order: above the box's top-left corner, inside it below that corner, below its bottom-left
    corner, inside above the bottom-left corner, the same four on the right edge, then further rows stacked above
    and below the box (for clusters of boxes); the first free spot is taken, or, when none is, the one with the
    least overlap. Labels are kept inside the image.

    Args:
        boxes: ``(x1, y1, x2, y2)`` per object.
        sizes: ``(w, h)`` of each label.
        width, height: the image size.

    Returns:
        ``(x1, y1, x2, y2)`` of each label, in the order of ``boxes``.
    """
    placed: list[Box] = []
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        spots = [(x, y) for x in (x1, x2 - w) for y in (y1 - h, y1, y2, y2 - h)]
        spots += [(x1, y) for k in range(2, len(placed) + 2) for y in (y1 - k * h, y2 + (k - 1) * h)]
        best, best_cost = None, float("inf")
        for x, y in spots:
            cx = min(max(x, 0.0), max(width - w, 0.0))
            cy = min(max(y, 0.0), max(height - h, 0.0))
            spot = (cx, cy, cx + w, cy + h)
            cost = sum(_overlap(spot, p) for p in placed)
            if cost < best_cost:
                best, best_cost = spot, cost
                if cost == 0:
                    break
        placed.append(best)  # type: ignore[arg-type]
    return placed
