"""Training and evaluation transforms (PIL RGB image -> normalised ``(3, H, W)`` float tensor).

Training uses timm's ``create_transform`` because it is the exact pipeline the official DaViT recipe ran (the authors
trained with a timm fork): RandomResizedCrop, flip, RandAugment, normalisation, random erasing. Evaluation needs only
torchvision: resize the short side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, normalise, which is
what timm computes for the published weights' ``crop_pct``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from .config import IMAGENET_MEAN, IMAGENET_STD, ClsDataConfig

__all__ = ["build_eval_transform", "build_train_transform", "eval_transform_from_config"]

Transform = Callable[[Any], Tensor]


def build_train_transform(cfg: ClsDataConfig) -> Transform:
    """The augmenting training transform of ``cfg`` (timm's implementation of the recipe).

    Raises:
        ImportError: timm is not installed (it is needed for the training augmentation only).
    """
    try:
        from timm.data import create_transform
    except ImportError as e:  # pragma: no cover - timm is installed wherever training runs
        raise ImportError("training augmentation needs timm: pip install 'timm>=1.0.15'") from e
    return create_transform(
        cfg.img_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        vflip=0.0,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment or None,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=1,
    )


def build_eval_transform(
    img_size: int = 224,
    crop_pct: float = 0.9,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Transform:
    """Resize the short side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, scale to [0, 1], normalise.

    Images smaller than ``img_size`` are upsampled by the resize, so any image size works.
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    resize = math.floor(img_size / crop_pct)
    return T.Compose(
        [
            T.Resize(resize, interpolation=InterpolationMode(interpolation)),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean=tuple(mean), std=tuple(std)),
        ]
    )


def eval_transform_from_config(cfg: ClsDataConfig) -> Transform:
    """The evaluation transform of a run's data section."""
    return build_eval_transform(**cfg.preprocessing())
