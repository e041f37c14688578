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

__all__ = [
    "MAX_IMG_SIDE",
    "build_eval_transform",
    "check_img_size",
    "build_train_transform",
    "create_transform",
    "eval_transform_from_config",
    "pretrained_cfg",
    "resolve_data_config",
]

# The published weights' evaluation preprocessing (timm's davit_*.msft_in1k): the default when nothing is recorded.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "img_size": 224, "crop_pct": 0.95, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
}  # fmt: skip

Transform = Callable[[Any], Tensor]

# The largest input side accepted from a user (eval, predict, export, explain). DaViT's attention memory grows with the
# square of the pixel count: 8192 px already needs tens of GB per image, and a typo (100000) would try to allocate
# terabytes and die in a traceback, so anything larger is a mistake to refuse in one line.
MAX_IMG_SIDE = 8192


def check_img_size(img_size: Any, *, name: str = "img_size") -> int | None:
    """``img_size`` as an int side, or ``None`` (the weights' own); refuse anything outside ``1..MAX_IMG_SIDE``.

    Args:
        img_size: the requested input side in pixels, or ``None``.
        name: what the user called it (``--img-size`` on the command line), for the message.

    Raises:
        UserError: not a whole number of pixels in ``1..MAX_IMG_SIDE``.
    """
    from ..errors import UserError

    if img_size is None:
        return None
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 1 <= img_size <= MAX_IMG_SIDE:
        raise UserError(
            f"{name + ' ' if name else ''}must be a positive number of pixels up to {MAX_IMG_SIDE}, not {img_size!r} "
            "(omit it to use the weights' own)"
        )
    return img_size


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
    crop_pct: float = 0.95,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Transform:
    """Resize the short side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, scale to [0, 1], normalise.

    Images smaller than ``img_size`` are upsampled by the resize, so any image size works. The defaults are the
    published weights' (224, crop 0.95, bicubic, ImageNet mean/std); a model's own come from
    :func:`resolve_data_config`.
    """
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
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


def pretrained_cfg(
    preprocessing: dict[str, Any] | None = None,
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``model.pretrained_cfg`` in timm's key names (``input_size``, ``crop_pct``, ``interpolation``, ``mean``,
    ``std``, ``num_classes``, ``label_names``), so ``timm.data.resolve_data_config(model=m)`` reads it as timm's own.

    ``preprocessing`` holds our names (``img_size``, ``crop_pct``, ...); missing keys take the published weights'.
    ``extra`` entries (``tag``, ``file``, ``task`` ...) are kept, and ``img_size`` stays for older readers.
    """
    pp = {**DEFAULT_PREPROCESSING, **{k: v for k, v in (preprocessing or {}).items() if k in DEFAULT_PREPROCESSING}}
    side = int(pp["img_size"])
    out: dict[str, Any] = dict(extra)
    out.update(
        input_size=(3, side, side),
        img_size=side,
        crop_pct=float(pp["crop_pct"]),
        crop_mode="center",
        interpolation=str(pp["interpolation"]),
        mean=tuple(float(v) for v in pp["mean"]),
        std=tuple(float(v) for v in pp["std"]),
    )
    if num_classes is not None:
        out["num_classes"] = int(num_classes)
    if label_names is not None:
        out["label_names"] = [str(n) for n in label_names]
    return out


def resolve_data_config(model: Any = None, **overrides: Any) -> dict[str, Any]:
    """The evaluation preprocessing of ``model`` (from its ``pretrained_cfg``), timm's way.

    Args:
        model: a module with ``pretrained_cfg`` (what :func:`davit.create_model` builds), a ``pretrained_cfg`` dict,
            or None for the published weights' defaults.
        **overrides: any returned key (``input_size=(3, 384, 384)``, ``crop_pct=1.0`` ...).

    Returns:
        ``{"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}``, the dict timm's
        ``resolve_data_config`` returns; pass it on as ``create_transform(**cfg)``.
    """
    cfg = model if isinstance(model, dict) else dict(getattr(model, "pretrained_cfg", None) or {})
    base = pretrained_cfg({k: cfg[k] for k in DEFAULT_PREPROCESSING if k in cfg})
    if "input_size" in cfg:
        base["input_size"] = tuple(int(v) for v in cfg["input_size"])
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    out = {k: base[k] for k in keys}
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out


def create_transform(
    input_size: int | Sequence[int] = 224,
    *,
    is_training: bool = False,
    crop_pct: float = DEFAULT_PREPROCESSING["crop_pct"],
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_mode: str = "center",
    **train_kwargs: Any,
) -> Transform:
    """A PIL -> tensor transform from :func:`resolve_data_config`'s dict (``create_transform(**data_cfg)``).

    Evaluation (the default) is torchvision only: resize to ``side / crop_pct``, centre-crop, normalise. With
    ``is_training`` it is timm's augmenting transform (``train_kwargs`` go to ``timm.data.create_transform``).
    """
    side = input_size if isinstance(input_size, int) else int(input_size[-1])
    if crop_mode != "center":
        raise ValueError(f"crop_mode {crop_mode!r} is not supported; DaViT's weights are evaluated with 'center'")
    if not is_training:
        return build_eval_transform(side, crop_pct, interpolation, mean, std)
    from timm.data import create_transform as timm_create_transform

    return timm_create_transform(
        side, is_training=True, interpolation=interpolation, mean=tuple(mean), std=tuple(std), **train_kwargs
    )
