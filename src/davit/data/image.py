"""Reading any image file as 8-bit RGB, with one clear error for files that cannot be decoded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "check_image_header", "is_image_file", "load_rgb", "to_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class ImageReadError(UserError):
    """An image file that is missing, truncated, corrupt or not an image; the message names the file."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file name has an image extension (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file completely and return it as an 8-bit RGB PIL image.

    Grayscale, bilevel, palette, CMYK, 16-bit and float images are converted; transparent images are composited on
    white. The whole file is decoded here, so a truncated file fails now and not later inside a transform.

    Raises:
        ImageReadError: the file is missing, truncated, corrupt or not an image (the message names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"image not found: {p}" if not p.exists() else f"{p} is not a file")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageReadError(f"cannot read image {p}: {msg}") from e


def check_image_header(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Open ``path``'s header only (cheap: no pixels decoded) and return its ``(width, height)``.

    Raises:
        ImageReadError: the file is missing, not an image, or a decompression bomb (the message names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"image not found: {p}" if not p.exists() else f"{p} is not a file")
    try:
        with Image.open(p) as im:
            return im.size
    except Exception as e:  # see load_rgb
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageReadError(f"cannot read image {p}: {msg}") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (a new image)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im), sixteen_bit=mode.startswith("I;16"))).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _to_uint8(a: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """16-bit / 32-bit integer or float grey levels -> uint8, keeping the full range visible."""
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        # float images are stored either in [0, 1] or in 8-bit units
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(a * scale, 0, 255).round().astype(np.uint8)
    a = a.astype(np.int64)
    # PIL opens 16-bit files as I;16* or as I (then the range is unknown: values above 255 mean 16-bit data)
    if sixteen_bit or a.max(initial=0) > 255:
        a = a // 257
    return np.clip(a, 0, 255).astype(np.uint8)
