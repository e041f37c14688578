"""Semantic segmentation on the shared engine: ``SegConfig`` (the run), ``SegTask`` (model, data, loss, metrics) and
the three user-facing calls behind ``davit seg train|eval|predict``.

The defaults are the official DaViT ADE20K recipe (mmseg 0.11, ``upernet_davit_512x512_160k_ade20k.py``): UperNet
512 channels, PPM (1, 2, 3, 6), FCN auxiliary head on stage 2 with weight 0.4, BN heads (SyncBN under DDP), AdamW 6e-5
with weight decay 0.01 on every parameter, poly decay (power 1, min 0) after 1500 linear warmup iterations from ratio
1e-6, 160k iterations of a global batch of 16 512x512 crops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ...config import ConfigError, LoopConfig, ModelConfig, OptimConfig, SchedConfig
from ...data.config import MAX_IMG_SIZE
from ...data.segmentation import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    MEAN,
    STD,
    SegEvalTransform,
    SegmentationDataset,
    SegTrainTransform,
    load_image,
    read_class_names,
    seg_collate,
)
from ...factory import create_model
from .heads import FCNHead, UPerHead
from .inference import infer_probs, palette, write_prediction
from .metrics import ConfusionMatrix
from .model import UperNetDaViT, load_segmentation_checkpoint

__all__ = [
    "SegConfig",
    "SegDataConfig",
    "SegEvalConfig",
    "SegHeadConfig",
    "SegTask",
    "evaluate_segmentation",
    "load_seg_config",
    "predict_segmentation",
    "train_segmentation",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SegDataConfig:
    """Where the images and masks are, and the train augmentation.

    Attributes:
        root: dataset folder.
        img_dir: image folder under ``root``; ``{split}`` is replaced by the split name.
        ann_dir: mask folder under ``root`` (masks are matched by file stem + ``seg_suffix``).
        train_split: split name of the training set.
        val_split: split name of the validation set ("" = no evaluation).
        seg_suffix: mask file suffix.
        num_classes: classes after ``reduce_zero_label`` (ADE20K: 150); a class list overrides it.
        classes: class names; else ``classes_file``; else ``root/classes.txt``; else ADE20K's for 150 classes.
        classes_file: a text file with one class name per line.
        reduce_zero_label: ADE20K convention (0 = "other" -> ignore, k -> k-1).
        check: skip (with a warning and a count) unreadable files and masks whose size differs from the image.
        bad_labels: a mask label outside the class range: "error" (names the file) or "ignore" (pixels ignored).
        scale: train resize target ``(long, short)`` before the random ratio.
        ratio_range: random factor range on ``scale``.
        crop_size: train crop ``(h, w)``.
        cat_max_ratio: crop retry threshold on the largest class's share.
        flip: horizontal flip probability.
        photometric: PhotoMetricDistortion on/off.
        mean: normalisation mean (0..255).
        std: normalisation std (0..255).
    """

    root: str = ""
    img_dir: str = "images/{split}"
    ann_dir: str = "annotations/{split}"
    train_split: str = "training"
    val_split: str = "validation"
    seg_suffix: str = ".png"
    num_classes: int = 150
    classes: tuple[str, ...] = ()
    classes_file: str = ""
    reduce_zero_label: bool = True
    check: bool = True
    bad_labels: str = "error"
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    def __post_init__(self) -> None:
        if self.bad_labels not in ("error", "ignore"):
            raise ValueError(f"data.bad_labels must be error or ignore, got {self.bad_labels!r}")
        if self.num_classes < 1 or min(self.crop_size) < 1 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError("data.num_classes and crop_size must be >= 1 and ratio_range an increasing positive pair")
        if max(self.crop_size) > MAX_IMG_SIZE:  # a huge crop would hang allocating, not fail
            raise ValueError(f"data.crop_size must be at most {MAX_IMG_SIZE} pixels a side, not {list(self.crop_size)}")


@dataclasses.dataclass(frozen=True)
class SegHeadConfig:
    """UperNet and auxiliary head.

    Attributes:
        channels: UperNet width.
        pool_scales: PPM pool sizes.
        dropout: Dropout2d before both classifiers.
        aux: build the auxiliary FCN head.
        aux_index: the backbone stage it reads.
        aux_channels: its conv width.
        aux_num_convs: its number of 3x3 convs.
        aux_weight: its loss weight.
        sync_bn: SyncBatchNorm in the heads under multi-GPU DDP.
        align_corners: bilinear resize convention.
        avg_non_ignore: average the cross-entropy over labelled pixels only; mmseg 0.11 (the official code) averages
            over all pixels, ignored ones counting as zero.
    """

    channels: int = 512
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    aux: bool = True
    aux_index: int = 2
    aux_channels: int = 256
    aux_num_convs: int = 1
    aux_weight: float = 0.4
    sync_bn: bool = True
    align_corners: bool = False
    avg_non_ignore: bool = False


@dataclasses.dataclass(frozen=True)
class SegEvalConfig:
    """Evaluation / inference.

    Attributes:
        mode: "whole" (one forward per image) or "slide" (windows of ``crop_size`` every ``stride``).
        scale: test scale ``(long, short)``, aspect ratio kept; None keeps each image's size.
        crop_size: sliding-window size.
        stride: sliding-window stride.
        aug: multi-scale + flip test (``davit seg eval --aug-test``).
        aug_ratios: scale factors of the augmented test.
        aug_flip: add flipped predictions in the augmented test.
    """

    mode: str = "whole"
    scale: tuple[int, int] | None = (2048, 512)
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    aug: bool = False
    aug_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    aug_flip: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"eval.mode must be whole or slide, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class SegConfig:
    """A segmentation run (defaults: the official DaViT-Tiny ADE20K recipe)."""

    model: ModelConfig = ModelConfig(name="davit_tiny", overrides={"drop_path_rate": 0.3})
    data: SegDataConfig = SegDataConfig()
    head: SegHeadConfig = SegHeadConfig()
    eval: SegEvalConfig = SegEvalConfig()
    optim: OptimConfig = OptimConfig(lr=6e-5, lr_base_batch=16, weight_decay=0.01, no_decay_norm_bias=False)
    sched: SchedConfig = SchedConfig(name="poly", warmup=1500, warmup_lr=6e-11, min_lr=0.0, power=1.0)
    train: LoopConfig = LoopConfig(iters=160_000, batch_size=2, eval_every=16_000)
    out: str = "runs/seg"
    resume: str = ""


def load_seg_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> SegConfig:
    """:func:`davit.engine.run.load_run_config` for a segmentation recipe (name or path; None: the defaults)."""
    from ...engine.run import load_run_config

    return load_run_config(path, overrides, task="seg")[1]


def class_names(data: SegDataConfig) -> tuple[str, ...]:
    """The class names of a data config (see :class:`SegDataConfig` ``classes``)."""
    if data.classes:
        names = tuple(data.classes)
    elif data.classes_file:
        names = read_class_names(data.classes_file)
    elif data.root and (Path(data.root) / "classes.txt").is_file():
        names = read_class_names(Path(data.root) / "classes.txt")
    elif data.num_classes == len(ADE20K_CLASSES):
        names = ADE20K_CLASSES
    else:
        names = tuple(f"class_{i}" for i in range(data.num_classes))
    if len(names) != data.num_classes:
        log.warning("the class list has %d names; it overrides data.num_classes=%d", len(names), data.num_classes)
    return names


class SegTask:
    """The segmentation task for :func:`davit.engine.fit` (see :class:`davit.engine.task.Task`)."""

    primary_metric = "miou"

    def __init__(self, cfg: SegConfig) -> None:
        self.cfg = cfg
        self.class_names = class_names(cfg.data)
        self.num_classes = len(self.class_names)
        if cfg.model.num_classes is not None and cfg.model.num_classes != self.num_classes:
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} but the data has {self.num_classes} classes; segmentation "
                "takes its class count from data.num_classes or the class list: drop model.num_classes"
            )

    # ---------------------------------------------------------------- model
    def build_model(self) -> UperNetDaViT:
        """Backbone (optionally pretrained) + heads; SyncBatchNorm in the heads under multi-GPU DDP."""
        model = build_seg_model(self.cfg, self.num_classes)
        if self.cfg.head.sync_bn and _world_size() > 1 and torch.cuda.is_available():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    # ---------------------------------------------------------------- data
    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """Training and validation sets."""
        d = self.cfg.data
        train_tf = SegTrainTransform(
            scale=d.scale,
            ratio_range=d.ratio_range,
            crop_size=d.crop_size,
            cat_max_ratio=d.cat_max_ratio,
            flip=d.flip,
            photometric=d.photometric,
            mean=d.mean,
            std=d.std,
        )
        train = self._dataset(d.train_split, train_tf)
        val = self._dataset(d.val_split, SegEvalTransform(d.mean, d.std)) if d.val_split else None
        return train, val

    def _dataset(self, split: str, transform: Any) -> SegmentationDataset:
        d = self.cfg.data
        if not d.root:
            raise ConfigError("data.root is empty: set it to the dataset folder (data.root=data/ADEChallengeData2016)")
        root = Path(d.root)
        return SegmentationDataset(
            root / d.img_dir.format(split=split),
            root / d.ann_dir.format(split=split),
            self.num_classes,
            reduce_zero_label=d.reduce_zero_label,
            transform=transform,
            seg_suffix=d.seg_suffix,
            check=d.check,
            bad_labels=d.bad_labels,
        )

    def collate_fn(self) -> Callable | None:
        """Stacks fixed-size training crops; keeps variable-size evaluation images as lists."""
        return seg_collate

    # ---------------------------------------------------------------- loss
    def loss_fn(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Cross-entropy (ignore 255) on the UperNet output plus ``aux_weight`` x that of the auxiliary head."""
        img, mask = batch["img"], batch["mask"]
        if isinstance(img, list):
            raise ValueError("training batches must hold crops of one size; set data.crop_size")
        check_labels(mask, self.num_classes)
        if img.shape[0] < 2 and model.training and _world_size() == 1:
            # BatchNorm after the PPM's 1x1 pooling sees one value per channel: torch refuses, deep in the head.
            raise ValueError("train.batch_size must be >= 2: the heads' BatchNorm needs more than one image per step")
        out = model(img)
        loss_seg = seg_loss(out["out"], mask, self.cfg.head.avg_non_ignore)
        losses = {"loss_seg": loss_seg}
        loss = loss_seg
        if "aux" in out:
            loss_aux = seg_loss(out["aux"], mask, self.cfg.head.avg_non_ignore)
            losses["loss_aux"] = loss_aux
            loss = loss + self.cfg.head.aux_weight * loss_aux
        with torch.no_grad():
            valid = mask != IGNORE_INDEX
            hits = (out["out"].argmax(1) == mask) & valid
            losses["acc_seg"] = 100 * hits.sum() / valid.sum().clamp(min=1)
        return {"loss": loss, **losses}

    # ---------------------------------------------------------------- metrics
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """mIoU, mAcc, aAcc, per-class IoU (percent) over the loader, summed over DDP ranks."""
        return evaluate_loader(model, loader, self.cfg.eval, self.class_names)

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict] | None:
        """The engine default (the official recipe decays every parameter: set ``optim.no_decay_norm_bias=false``)."""
        return None


# -------------------------------------------------------------------------------------------------------- pieces
def build_seg_model(cfg: SegConfig, num_classes: int) -> UperNetDaViT:
    """``UperNetDaViT`` from a config; ``model.pretrained`` initialises the backbone (and mmseg heads if present)."""
    m, h = cfg.model, cfg.head
    pretrained = m.pretrained.strip()
    flag = pretrained.lower() in ("", "true", "false")
    is_file = not flag and Path(pretrained).expanduser().exists()
    use_zoo = bool(pretrained) and not is_file and pretrained.lower() != "false"
    backbone = create_model(
        m.name,
        pretrained=(True if pretrained.lower() == "true" else pretrained) if use_zoo else False,
        features_only=True,
        **dict(m.overrides),
    )
    chans = [info["num_chs"] for info in backbone.feature_info]
    if not 0 <= h.aux_index < len(chans):
        raise ConfigError(f"head.aux_index={h.aux_index} is not a backbone stage (0..{len(chans) - 1})")
    decode = UPerHead(chans, num_classes, h.channels, h.pool_scales, h.dropout, align_corners=h.align_corners)
    aux = None
    if h.aux:
        aux = FCNHead(chans[h.aux_index], num_classes, h.aux_channels, h.aux_num_convs, dropout=h.dropout)
    model = UperNetDaViT(backbone, decode, aux, aux_index=h.aux_index, align_corners=h.align_corners)
    if is_file:
        report = load_segmentation_checkpoint(model, Path(pretrained).expanduser())
        log.info("pretrained %s: %s", pretrained, report.summary())
    return model


def check_labels(mask: Tensor, num_classes: int) -> None:
    """Raise a ValueError naming the offending values if ``mask`` holds labels outside ``0..K-1`` and 255."""
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"labels {mask[bad].unique()[:8].tolist()} are outside 0..{num_classes - 1} (255 = ignore); "
            "check data.num_classes and data.reduce_zero_label"
        )


def seg_loss(logits: Tensor, mask: Tensor, avg_non_ignore: bool = False) -> Tensor:
    """Pixel cross-entropy with ignore index 255, in float32 (also under AMP).

    mmseg 0.11 (the official code) divides the summed loss by all pixels, ignored ones included; ``avg_non_ignore``
    divides by the labelled pixels only (mmseg >= 0.23's option). Labels must be valid (see :func:`check_labels`).
    """
    loss = F.cross_entropy(logits.float(), mask.long(), ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    if avg_non_ignore:
        return loss.sum() / (mask != IGNORE_INDEX).sum().clamp(min=1)
    return loss.mean()


def _world_size() -> int:
    from ...engine.distributed import get_world_size

    return get_world_size()


def _infer_kwargs(ev: SegEvalConfig) -> dict[str, Any]:
    return {
        "scale": ev.scale,
        "ratios": ev.aug_ratios if ev.aug else (1.0,),
        "flip": ev.aug and ev.aug_flip,
        "mode": ev.mode,
        "crop": ev.crop_size,
        "stride": ev.stride,
    }


@torch.no_grad()
def evaluate_loader(
    model: nn.Module, loader: Any, ev: SegEvalConfig, names: tuple[str, ...] | list[str]
) -> dict[str, float]:
    """Confusion-matrix metrics of ``model`` over batches ``{"img", "mask"}`` (tensors or lists of tensors)."""
    from ...engine.distributed import unwrap

    model = unwrap(model)
    _sync_buffers(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cm = ConfusionMatrix(len(names), IGNORE_INDEX, device=device)
    kwargs = _infer_kwargs(ev)
    try:
        for batch in loader:
            for img, mask in zip(batch["img"], batch["mask"]):
                mask = mask.to(device)
                probs = infer_probs(model, img.to(device)[None], out_size=mask.shape, **kwargs)  # (1, K, H, W)
                cm.update(probs[0].argmax(0), mask)
    finally:
        model.train(was_training)
    cm.all_reduce()
    return cm.compute(names)


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics (what is saved) before evaluating.

    DDP broadcasts buffers at the start of each training forward, but each rank then updates its own copy with its
    own batch, and evaluation runs on the unwrapped module: without this, ranks would score different models.
    """
    if _world_size() > 1:
        import torch.distributed as dist

        for buf in model.buffers():
            dist.broadcast(buf, src=0)


# -------------------------------------------------------------------------------------------------- user calls
def train_segmentation(cfg: SegConfig) -> dict[str, Any]:
    """Train with the shared engine; returns its summary (with ``miou``)."""
    from ...engine.fit import fit

    return fit(cfg, SegTask(cfg))


def _config_for_checkpoint(
    checkpoint: str | os.PathLike[str], config: str | os.PathLike[str] | None, overrides: Sequence[str] = ()
) -> SegConfig:
    from ...engine.run import config_for_checkpoint

    return config_for_checkpoint(checkpoint, config, overrides, task="seg")[1]


def load_seg_model(
    checkpoint: str | os.PathLike[str],
    cfg: SegConfig,
    device: str | torch.device = "auto",
    accelerate: bool = True,
) -> tuple[UperNetDaViT, tuple[str, ...]]:
    """A trained (or official mmseg) checkpoint -> an eval-mode model on ``device`` and its class names.

    ``accelerate`` installs :mod:`davit.accelerate`'s inference kernels on the backbone (same weights and outputs as
    the reference; ``accelerate=False`` or ``DAVIT_ACCELERATE=0`` keeps the reference modules).
    """
    from ...accelerate import install
    from ...engine.evaluate import resolve_device

    if not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if cfg.train.threads > 0:  # the run's CPU thread count serves its evaluation and prediction too
        torch.set_num_threads(cfg.train.threads)
    names = class_names(cfg.data)
    model = build_seg_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="")), len(names))
    load_segmentation_checkpoint(model, Path(checkpoint).expanduser(), strict=True)
    model = model.to(resolve_device(device)).eval()
    install(model, mode="infer", enabled=accelerate)
    return model, names


def evaluate_segmentation(
    cfg: SegConfig,
    checkpoint: str | os.PathLike[str],
    *,
    aug: bool | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 1,
) -> dict[str, float]:
    """Evaluate a checkpoint on ``cfg``'s validation split (``aug=True``: multi-scale + flip)."""
    if aug is not None:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, aug=aug))
    if not cfg.data.val_split:
        raise ConfigError("data.val_split is empty; set it to the split to evaluate (e.g. data.val_split=validation)")
    model, names = load_seg_model(checkpoint, cfg, device)
    task = SegTask(cfg)
    val = task._dataset(cfg.data.val_split, SegEvalTransform(cfg.data.mean, cfg.data.std))
    loader = DataLoader(val, batch_size=batch_size, collate_fn=seg_collate, num_workers=cfg.train.workers)
    return evaluate_loader(model, loader, cfg.eval, names)


def predict_segmentation(
    images: list[str | os.PathLike[str]],
    checkpoint: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "predictions",
    aug: bool = False,
    device: str | torch.device = "auto",
) -> list[dict[str, Any]]:
    """Segment image files; writes ``<stem>_mask.png`` (palette PNG of class indices) and ``<stem>_overlay.png``.

    Args:
        images: image files.
        checkpoint: a trained model (``best.safetensors``); its ``config.yaml`` is read from the same folder unless
            ``config`` is given.
        config: the training recipe, when the checkpoint is not in its run folder.
        out_dir: output folder.
        aug: multi-scale + flip.
        device: where to run.

    Returns:
        Per image: ``{"image", "mask", "overlay", "classes": {name: pixel share in percent}}``.
    """
    if not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    cfg = _config_for_checkpoint(checkpoint, config)
    model, names = load_seg_model(checkpoint, cfg, device)
    ev = dataclasses.replace(cfg.eval, aug=aug)
    dev = next(model.parameters()).device
    colours = palette(len(names))
    results = []
    for path in images:
        img = load_image(path)  # (3, H, W) uint8
        x = SegEvalTransform(cfg.data.mean, cfg.data.std)(img, torch.zeros(1))[0]
        probs = infer_probs(model, x.to(dev)[None], **_infer_kwargs(ev))  # (1, K, H, W)
        mask = probs[0].argmax(0).cpu().numpy().astype(np.int64)
        stem = Path(path).stem
        mask_path, overlay_path = write_prediction(img.permute(1, 2, 0).numpy(), mask, out_dir, stem, colours, names)
        ids, counts = np.unique(mask, return_counts=True)
        share = {names[i]: round(100 * c / mask.size, 2) for i, c in zip(ids.tolist(), counts.tolist())}
        results.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path), "classes": share})
    return results
