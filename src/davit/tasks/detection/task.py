"""The detection task for the shared engine: ``DetConfig`` (the run) and ``DetTask`` (model, data, loss, metrics).

``davit.engine.fit(cfg, DetTask(cfg))`` trains a Mask R-CNN or RetinaNet on a COCO-format dataset; the summary holds
``bbox_ap`` (and ``segm_ap`` for Mask R-CNN) in percent, from pycocotools.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from davit.config import (
    ConfigError,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
)
from davit.data.coco import CocoDetection, build_det_transforms, detection_collate
from davit.weights import CheckpointError, read_checkpoint, read_safetensors_metadata
from davit.weights.load import check_weights

from .evaluate import coco_evaluate, run_detector
from .models import ARCHS, build_detector

__all__ = [
    "DetConfig",
    "DetDataConfig",
    "DetTask",
    "DetectorConfig",
    "evaluate_checkpoint",
    "load_det_config",
    "load_detector",
]

log = logging.getLogger(__name__)

# COCO train2017 has 117,266 images with annotations: 7,330 iterations per epoch at the official batch of 16.
_COCO_ITERS_PER_EPOCH = 7330


@dataclasses.dataclass(frozen=True)
class DetDataConfig:
    """A COCO-format dataset and the recipe's augmentation.

    Attributes:
        train_images: folder of the training images (``train2017``).
        train_ann: the training json (``annotations/instances_train2017.json``).
        val_images: folder of the validation images (``""``: no evaluation during training).
        val_ann: the validation json.
        aug: ``detr`` (the official multi-scale + crop AutoAugment), ``flip`` or ``none``.
        train_sizes: short sides sampled per training batch by the detector (480..800 step 32 officially).
        test_size: short side at test time (800).
        max_size: long-side cap in training and test (1333).
        crop_scales: short sides of the resize before the random crop (400, 500, 600).
        crop_range: the crop's min and max height/width (384, 600).
        flip: horizontal flip probability.
        crop_allow_empty: keep random crops that contain no box (official ``allow_negative_crop=True``).
        verify_images: open every image header at start and skip unreadable files.
    """

    train_images: str = ""
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    aug: str = "detr"
    train_sizes: tuple[int, ...] = tuple(range(480, 801, 32))
    test_size: int = 800
    max_size: int = 1333
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_range: tuple[int, int] = (384, 600)
    flip: float = 0.5
    crop_allow_empty: bool = True
    verify_images: bool = True

    def __post_init__(self) -> None:
        if self.aug not in ("detr", "flip", "none"):
            raise ValueError(f"data.aug must be detr, flip or none; got {self.aug!r}")
        if not self.train_sizes or min(self.train_sizes) < 32 or self.test_size < 32:
            raise ValueError("data.train_sizes and data.test_size must be sizes >= 32 pixels")
        if self.crop_range[0] > self.crop_range[1] or self.crop_range[0] < 1:
            raise ValueError(f"data.crop_range must be (min, max) with 1 <= min <= max, got {self.crop_range}")


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """The detector on top of the DaViT backbone (torchvision's heads; defaults are the official values).

    Attributes:
        arch: ``mask_rcnn``, ``faster_rcnn`` (boxes only: data without masks) or ``retinanet``.
        fpn_channels: FPN width.
        representation_size: R-CNN box-head FC width.
        mask_channels: Mask R-CNN mask-head width.
        box_batch_size_per_image: RoIs sampled per image for the R-CNN losses.
        rpn_batch_size_per_image: anchors sampled per image for the RPN losses.
        detections_per_img: detections kept per image.
        score_thresh: minimum score of a kept detection.
    """

    arch: str = "mask_rcnn"
    fpn_channels: int = 256
    representation_size: int = 1024
    mask_channels: int = 256
    box_batch_size_per_image: int = 512
    rpn_batch_size_per_image: int = 256
    detections_per_img: int = 100
    score_thresh: float = 0.05

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"detector.arch must be one of {ARCHS}, got {self.arch!r}")


@dataclasses.dataclass(frozen=True)
class DetConfig:
    """A detection run. Defaults are the official Mask R-CNN DaViT-Tiny 1x COCO recipe (``configs/det/``).

    The schedule is iteration-based so that the recipe's 500-iteration warmup is exact: 12 epochs of 7,330 iterations
    at batch 16, lr steps after epochs 8 and 11. ``optim.lr`` is per 16 images and scales with the global batch.
    """

    model: ModelConfig = ModelConfig(overrides={"drop_path_rate": 0.1})
    detector: DetectorConfig = DetectorConfig()
    data: DetDataConfig = DetDataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-4, lr_base_batch=16, weight_decay=0.05, no_decay_norm_bias=False)
    sched: SchedConfig = SchedConfig(
        name="step",
        warmup=500,
        warmup_lr=1e-7,
        milestones=(8 * _COCO_ITERS_PER_EPOCH, 11 * _COCO_ITERS_PER_EPOCH),
        min_lr=0.0,
    )
    train: LoopConfig = LoopConfig(
        iters=12 * _COCO_ITERS_PER_EPOCH, batch_size=2, eval_every=_COCO_ITERS_PER_EPOCH, log_every=50
    )
    out: str = "runs/det"
    resume: str = ""


class DetTask:
    """Mask R-CNN / RetinaNet training on a COCO-format dataset, for :func:`davit.engine.fit`.

    Args:
        cfg: the run configuration.
    """

    primary_metric = "bbox_ap"

    def __init__(self, cfg: DetConfig) -> None:
        self.cfg = cfg
        self._datasets: tuple[CocoDetection, CocoDetection | None] | None = None
        self.class_names: list[str] | None = None

    @property
    def with_masks(self) -> bool:
        """Whether the detector predicts masks (Mask R-CNN)."""
        return self.cfg.detector.arch == "mask_rcnn"

    def _num_classes(self) -> int:
        if self.cfg.model.num_classes is not None:
            return int(self.cfg.model.num_classes)
        train, val = self.build_datasets()
        return len(train.cat_ids)

    def build_model(self) -> nn.Module:
        """The detector with the DaViT backbone, initialised from ``model.pretrained`` if set."""
        m, d, det = self.cfg.model, self.cfg.data, self.cfg.detector
        return build_detector(
            det.arch,
            self._num_classes(),
            backbone=m.name,
            pretrained=m.pretrained,
            backbone_overrides=dict(m.overrides),
            fpn_channels=det.fpn_channels,
            train_sizes=d.train_sizes,
            test_size=d.test_size,
            max_size=d.max_size,
            representation_size=det.representation_size,
            mask_channels=det.mask_channels,
            box_batch_size_per_image=det.box_batch_size_per_image,
            rpn_batch_size_per_image=det.rpn_batch_size_per_image,
            detections_per_img=det.detections_per_img,
            score_thresh=det.score_thresh,
        )

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """The COCO-format train and val sets (built once; bad entries are skipped with a warning)."""
        if self._datasets is None:
            d = self.cfg.data
            if not d.train_ann or not d.train_images:
                raise ConfigError("set data.train_ann and data.train_images (a COCO json and its image folder)")
            tf = build_det_transforms(True, d.aug, d.crop_scales, d.crop_range, d.max_size, d.flip, d.crop_allow_empty)
            train = CocoDetection(
                d.train_images, d.train_ann, train=True, with_masks=self.with_masks, transforms=tf,
                verify_images=d.verify_images,
            )  # fmt: skip
            if self.with_masks and not any("segmentation" in a for r in train.records for a in r.anns):
                log.warning(
                    "%s has no segmentation in any annotation: Mask R-CNN would learn box-shaped masks. For box-only "
                    "data use detector.arch=faster_rcnn (or retinanet)", d.train_ann,
                )  # fmt: skip
            val = None
            if d.val_ann and not d.val_images:
                raise ConfigError("data.val_ann is set but data.val_images is not: give the validation image folder")
            if d.val_ann:
                val = CocoDetection(
                    d.val_images, d.val_ann, train=False, with_masks=False, verify_images=d.verify_images
                )
                if val.cat_ids != train.cat_ids:
                    raise ConfigError(
                        f"{d.val_ann} and {d.train_ann} list different categories; both must use the same ids"
                    )
            n = self.cfg.model.num_classes
            if n is not None and n != len(train.cat_ids):
                raise ConfigError(
                    f"model.num_classes={n} but {d.train_ann} has {len(train.cat_ids)} categories; leave "
                    "model.num_classes unset (null) to take the dataset's"
                )
            if self.with_masks and not train.has_masks:
                log.warning(
                    "%s has boxes but no 'segmentation' masks: Mask R-CNN would learn box-shaped stand-in masks and "
                    "its mask AP would mean nothing. Train a box-only detector instead (detector.arch=retinanet; a "
                    "box-only Faster R-CNN where available)",
                    d.train_ann,
                )
            self._datasets = (train, val)
            self.class_names = list(train.classes)
        return self._datasets

    def collate_fn(self) -> Callable | None:
        """Lists of images and targets (the detector batches and pads them itself)."""
        return detection_collate

    def loss_fn(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        """torchvision's loss dict plus its sum as ``loss``."""
        images, targets = batch
        losses = model(images, targets)
        return {"loss": sum(losses.values()), **losses}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """pycocotools box AP (and mask AP for Mask R-CNN) on the validation set, in percent."""
        _, val = self.build_datasets()
        if val is None:
            return {}
        results = run_detector(model, loader, val.cat_ids)
        iou_types = ("bbox", "segm") if self.with_masks else ("bbox",)
        return coco_evaluate(val.coco_gt(), results, iou_types, img_ids=val.image_ids)

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict] | None:
        """The engine default (the official recipe decays every parameter: ``optim.no_decay_norm_bias: false``)."""
        return None


def _read_run_config(config: str | Path | None, checkpoint: Path, overrides: list[str]) -> DetConfig:
    from ...engine.run import config_for_checkpoint

    return config_for_checkpoint(checkpoint, config, overrides, task="det")[1]


def load_det_config(path: str | Path | None, overrides: list[str] | None = None) -> DetConfig:
    """:func:`davit.engine.run.load_run_config` for a detection recipe (name or path; None: the defaults)."""
    from ...engine.run import load_run_config

    return load_run_config(path, list(overrides or []), task="det")[1]


def load_detector(
    checkpoint: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    device: str | torch.device = "auto",
    accelerate: bool = True,
) -> tuple[nn.Module, DetConfig, list[str]]:
    """A trained detector from ``checkpoint`` (``best.safetensors`` / ``last.safetensors`` / ``last.pt`` of a run).

    Args:
        checkpoint: the weights file.
        config: the run's config (default: ``config.yaml`` beside the checkpoint, which every run writes).
        overrides: ``key=value`` config overrides (e.g. ``data.test_size=1000``).
        device: where to put the model.
        accelerate: install :mod:`davit.accelerate`'s inference kernels on the backbone (same weights and outputs as
            the reference; False or ``DAVIT_ACCELERATE=0`` keeps the reference modules).

    Returns:
        ``(model in eval mode, config, class names)``.
    """
    checkpoint = Path(checkpoint).expanduser()
    cfg = _read_run_config(config, checkpoint, list(overrides or []))
    state = read_checkpoint(checkpoint)
    if "model" in state and isinstance(state["model"], dict):  # a last.pt training state
        state = state["model"]
    meta = read_safetensors_metadata(checkpoint)
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    num_classes = len(names) if names else _classes_in_state(state, cfg.detector.arch)
    # The backbone weights come from the checkpoint: never fetch the pretrained ones again.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="", num_classes=num_classes))
    model = DetTask(cfg).build_model()
    check_weights(state, str(checkpoint), model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint} does not fit a {cfg.detector.arch} on {cfg.model.name}: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); pass the config it was trained with"
        )
    from ...accelerate import install
    from ...engine.evaluate import resolve_device

    model = model.to(resolve_device(device)).eval()
    install(model, mode="infer", enabled=accelerate)
    return model, cfg, list(names or [f"class {i + 1}" for i in range(num_classes)])


def _classes_in_state(state: dict[str, Tensor], arch: str) -> int:
    if arch in ("mask_rcnn", "faster_rcnn"):
        key = "roi_heads.box_predictor.cls_score.bias"
        if key in state:
            return int(state[key].shape[0]) - 1
    else:
        key = "head.classification_head.cls_logits.bias"
        if key in state:
            # torchvision's RetinaNet has 9 anchors per location (3 scales x 3 ratios), K + 1 scores each.
            return int(state[key].shape[0]) // 9 - 1
    raise CheckpointError(f"the checkpoint holds no {arch} classifier; is it a detector checkpoint?")


def evaluate_checkpoint(
    config: str | Path | None, checkpoint: str | Path, overrides: list[str] | None = None, device: str = "auto"
) -> dict[str, float]:
    """COCO metrics of a trained detector on ``data.val_ann`` of ``config``."""
    model, cfg, _ = load_detector(checkpoint, config, overrides, device)
    task = DetTask(cfg)
    d = cfg.data
    if not d.val_ann:
        raise ConfigError("set data.val_ann and data.val_images to evaluate")
    val = CocoDetection(d.val_images, d.val_ann, train=False, with_masks=False, verify_images=d.verify_images)
    task._datasets = (val, val)  # evaluation needs only the val set
    loader = DataLoader(val, batch_size=max(1, cfg.train.batch_size), collate_fn=detection_collate)
    return task.evaluate(model, loader)
