"""``davit predict``: class names and probabilities for image files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from .evaluate import LoadedClassifier, load_classifier, maybe_optimize, resolve_device

__all__ = ["predict", "predict_loaded"]


def predict(
    images: Sequence[str | os.PathLike[str] | Image.Image],
    model: str | nn.Module | None = None,
    *,
    weights: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    topk: int = 5,
    img_size: int | None = None,
    device: torch.device | str | None = "auto",
    batch_size: int = 16,
    optimize: bool = True,
    backend: str = "auto",
    dtype: torch.dtype | str | None = None,
) -> list[dict[str, Any]]:
    """Classify images with a zoo model, published weights or a trained checkpoint.

    Args:
        images: file paths (any format PIL reads: grayscale, RGBA, palette, CMYK and 16-bit are converted) or PIL
            images.
        model, weights, checkpoint: see :func:`davit.engine.evaluate.load_classifier`; names come from the checkpoint
            (the training folder's classes) or are ImageNet-1K's for 1000-class weights.
        topk: how many classes per image (at most the number of classes).
        img_size: predict at this side instead of the weights' own.
        device: where to run (``"auto"``: CUDA when available).
        batch_size: images per forward pass.
        optimize: run through ``davit.optimize`` when available.
        backend: the inference runtime, ``"auto"``, ``"torch"``, ``"aoti"``, ``"openvino"`` or ``"onnxruntime"``
            (see :func:`davit.engine.evaluate.maybe_optimize`).
        dtype: None (fp32) or ``"bf16"`` compute where the hardware has it.

    Returns:
        One dict per image, in input order: ``{"image": name, "predictions": [{"rank", "index", "label",
        "probability"}, ...]}`` with probabilities (softmax over all classes) in decreasing order.

    Raises:
        ImageReadError: an image cannot be read (the message names the file); nothing is predicted then.
    """
    loaded = load_classifier(model, weights=weights, checkpoint=checkpoint, device=device)
    return predict_loaded(
        loaded, images, topk=topk, img_size=img_size, batch_size=batch_size, optimize=optimize, backend=backend,
        dtype=dtype,
    )  # fmt: skip


def predict_loaded(
    loaded: LoadedClassifier,
    images: Sequence[str | os.PathLike[str] | Image.Image],
    *,
    topk: int = 5,
    img_size: int | None = None,
    batch_size: int = 16,
    optimize: bool = True,
    backend: str = "auto",
    dtype: torch.dtype | str | None = None,
) -> list[dict[str, Any]]:
    """:func:`predict` with an already loaded classifier (reuse it across calls).

    Images are decoded one batch at a time, so memory stays bounded by ``batch_size`` whatever the number of files;
    every file's header is checked first, so a missing or non-image file still fails before any work is done.
    """
    from ..data.image import check_image_header, load_rgb, to_rgb
    from ..data.transforms import check_img_size
    from ..errors import UserError

    if topk < 1:
        raise UserError(f"topk must be at least 1, not {topk}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    check_img_size(img_size)
    for im in images:
        if not isinstance(im, Image.Image):
            check_image_header(im)
    names = [f"<image {i}>" if isinstance(im, Image.Image) else str(im) for i, im in enumerate(images)]
    if not images:
        return []
    tf = loaded.transform(img_size)
    dev = resolve_device(None, loaded.model)
    side = img_size or int(loaded.preprocessing["img_size"])
    net = maybe_optimize(
        loaded.model, torch.zeros(1, 3, side, side, device=dev), enabled=optimize, backend=backend, dtype=dtype,
        batch=min(batch_size, len(images)),
    )  # fmt: skip
    k = min(topk, len(loaded.class_names))
    out: list[dict[str, Any]] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            rgb = [to_rgb(im) if isinstance(im, Image.Image) else load_rgb(im) for im in chunk]
            batch = torch.stack([tf(im) for im in rgb]).to(dev)  # (B, 3, side, side)
            del rgb
            probs = net(batch).float().softmax(dim=1)  # (B, num_classes)
            p, idx = probs.topk(k, dim=1)  # (B, k) each, decreasing
            for row, (pr, ix) in enumerate(zip(p.tolist(), idx.tolist())):
                preds = [
                    {"rank": r + 1, "index": i, "label": loaded.class_names[i], "probability": q}
                    for r, (q, i) in enumerate(zip(pr, ix))
                ]
                out.append({"image": names[start + row], "predictions": preds})
    return out
