"""The data section of a classification run: which images, and how they are augmented and normalised.

Defaults are the official DaViT ImageNet-1K recipe (the authors' timm 0.4.13 fork, ``train.py`` defaults plus the
README command): RandAugment ``rand-m9-mstd0.5-inc1``, mixup 0.8, cutmix 1.0, label smoothing 0.1 inside the mixup
targets, random erasing 0.25 in pixel mode, RandomResizedCrop scale (0.08, 1) ratio (3/4, 4/3), bicubic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ClsDataConfig"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_KINDS = ("digits", "imagefolder", "hf", "wds")
MAX_IMG_SIZE = 8192  # far above any real training size (DaViT-Large fine-tunes at 384-512)
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class ClsDataConfig:
    """Classification data.

    Attributes:
        kind: ``"imagefolder"`` (``root/train_dir/<class>/*.jpg`` and ``root/val_dir/<class>/*.jpg``, e.g. ImageNet)
            or ``"digits"`` (the 8x8 handwritten digits scikit-learn ships, upscaled to ``img_size``; no download),
            ``"hf"`` (Hugging Face ``datasets``: a ``save_to_disk`` folder, a parquet folder or a hub name) or
            ``"wds"`` (webdataset tar shards); see :mod:`davit.data.sources`.
        root: the dataset folder (or, for ``hf``, a hub dataset name).
        train_dir, val_dir: sub-folders of ``root`` (``hf``: split names, ``wds``: shard folders or globs);
            ``val_dir=""`` trains without a validation set.
        image_key, label_key: ``hf`` only: the image column (``""``: ``image`` or ``img``) and the label column.
        streaming: ``hf`` only: stream the training split instead of downloading / memory-mapping it first.
        img_size: square input side the model sees.
        crop_pct: evaluation centre-crop fraction (resize the short side to ``img_size / crop_pct``, then crop).
        interpolation: resize interpolation for training and evaluation.
        mean, std: input normalisation (per RGB channel, images in [0, 1]).
        auto_augment: a timm auto-augment spec (``rand-m9-mstd0.5-inc1``); ``""`` turns it off.
        color_jitter: colour-jitter strength (timm ignores it while auto-augment is on, as the official recipe did).
        reprob: random-erasing probability; ``remode``: its fill mode (``pixel``, ``rand`` or ``const``).
        mixup, cutmix: Beta-distribution alphas (0 turns each off).
        mixup_prob: probability of mixing a batch at all; ``mixup_switch_prob``: of cutmix instead of mixup.
        label_smoothing: smoothing of the targets (inside mixup's soft targets when mixing is on).
        val_split, split_seed: digits only: the held-out fraction and the seed of the deterministic split.
        hflip: horizontal-flip probability (0 for digits: a flipped 2 is not a 2).
        scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
    """

    kind: str = "imagefolder"
    root: str = ""
    train_dir: str = "train"
    val_dir: str = "val"
    image_key: str = ""
    label_key: str = "label"
    streaming: bool = False
    img_size: int = 224
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    val_split: float = 0.2
    split_seed: int = 0
    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.333)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"data.kind must be one of {', '.join(_KINDS)}, not {self.kind!r}")
        if self.streaming and self.kind != "hf":
            raise ValueError("data.streaming=true needs data.kind=hf (webdataset shards are read in place already)")
        if self.img_size < 1:
            raise ValueError(f"data.img_size must be a positive number of pixels, not {self.img_size}")
        if self.img_size > MAX_IMG_SIZE:
            # One 100000-pixel square float image alone is 120 GB: refuse it here rather than hang allocating it.
            raise ValueError(
                f"data.img_size must be at most {MAX_IMG_SIZE} pixels (one {self.img_size}x{self.img_size} RGB image "
                f"is {3 * 4 * self.img_size**2 / 1e9:.1f} GB as float32), not {self.img_size}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"data.crop_pct must be in (0, 1], not {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"data.interpolation must be one of {', '.join(_INTERPOLATIONS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("data.mean and data.std need 3 values each (RGB), std > 0")
        for name in ("reprob", "mixup_prob", "mixup_switch_prob", "hflip", "label_smoothing"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], not {v}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("data.mixup and data.cutmix are Beta alphas: >= 0 (0 turns them off)")
        if self.kind == "digits" and not 0.0 < self.val_split < 1.0:
            raise ValueError(f"data.val_split must be in (0, 1) for the digits set, not {self.val_split}")
        if not (0.0 < self.scale[0] <= self.scale[1] <= 1.0) or not (0.0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"data.scale must satisfy 0 < lo <= hi <= 1 and data.ratio 0 < lo <= hi: {self}")

    @property
    def mixing(self) -> bool:
        """Whether batches are mixed (then targets are soft and carry the label smoothing)."""
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def preprocessing(self) -> dict[str, Any]:
        """The evaluation preprocessing a model trained on this data needs (stored in checkpoint metadata)."""
        d = asdict(self)
        return {k: d[k] for k in ("img_size", "crop_pct", "interpolation", "mean", "std")}
