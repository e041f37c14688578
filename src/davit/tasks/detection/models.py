"""Mask R-CNN and RetinaNet on DaViT + FPN, built from torchvision's detection models.

Heads, anchors, samplers, RoIAlign (7x7 boxes, 14x14 masks) and the focal loss (gamma 2, alpha 0.25) are
torchvision's, which match the mmdet 2.11 configs of the official code in every structural respect. Known small
differences: the R-CNN box regression loss is smooth-L1 (beta 1/9) where mmdet 2.11 uses L1, and the RPN keeps 2000
proposals per image in training (mmdet 1000; we set 1000 to match).

Labels are 1..K with 0 as background for both detectors (torchvision's convention), so ``num_classes`` passed to
torchvision is K + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from .backbone import build_davit_backbone

__all__ = ["ARCHS", "DaViTFasterRCNN", "DaViTMaskRCNN", "DaViTRetinaNet", "MultiScaleTransform", "build_detector"]

# faster_rcnn is Mask R-CNN without the mask branch: the two-stage detector for box-only data (no segmentation).
ARCHS = ("mask_rcnn", "faster_rcnn", "retinanet")

# ImageNet statistics of the DaViT classification weights (the detector normalises inside, on [0, 1] images).
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class MultiScaleTransform(GeneralizedRCNNTransform):
    """torchvision's resize/normalise/batch transform with separate train and test scales.

    In training the short side is resized to a random one of ``train_sizes`` per batch (the recipe's
    480..800 multi-scale), at test time to ``test_size``; the long side never exceeds ``max_size``. Batches are padded
    to a multiple of 32 (mmdet's ``Pad(size_divisor=32)``).
    """

    def __init__(self, train_sizes: Sequence[int], test_size: int, max_size: int) -> None:
        self.test_size = int(test_size)
        super().__init__(tuple(int(s) for s in train_sizes), max_size, list(_MEAN), list(_STD), size_divisible=32)

    # GeneralizedRCNNTransform reads ``self.min_size`` in ``resize``: a random choice in training, the last entry at
    # test time. A property keeps its code path and makes the test entry our own.
    @property
    def min_size(self) -> tuple[int, ...]:
        return self._train_sizes if self.training else (self.test_size,)

    @min_size.setter
    def min_size(self, sizes: Sequence[int]) -> None:
        self._train_sizes = tuple(sizes)


class _DaViTDetector:
    """What the engine expects of a model on top of torchvision's detectors.

    - ``set_grad_checkpointing`` (``train.grad_checkpointing``) recomputes the DaViT blocks.
    - Under autocast (``train.amp``) only the DaViT body runs in reduced precision; the FPN, the heads, the box coding
      and the losses stay in float32, as mmdet's ``force_fp32`` heads: bf16 keeps 8 bits of mantissa, which would
      round box coordinates of a 1333-pixel image to 4-8 pixels.
    """

    backbone: nn.Module

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's blocks in the backward pass (the heads are cheap in memory)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """torchvision's forward: the loss dict in training, one detection dict per image in eval mode."""
        device = images[0].device.type if len(images) else "cpu"
        enabled = torch.is_autocast_enabled(device)
        self.backbone.amp_dtype = torch.get_autocast_dtype(device) if enabled else None
        with torch.autocast(device, enabled=False):
            return super().forward(images, targets)  # type: ignore[misc]


class DaViTMaskRCNN(_DaViTDetector, MaskRCNN):
    """torchvision's ``MaskRCNN`` on DaViT + FPN (see ``_DaViTDetector`` for checkpointing and mixed precision)."""


class DaViTFasterRCNN(_DaViTDetector, FasterRCNN):
    """torchvision's ``FasterRCNN`` on DaViT + FPN: Mask R-CNN's detector without the mask branch (box-only data)."""


class DaViTRetinaNet(_DaViTDetector, RetinaNet):
    """torchvision's ``RetinaNet`` on DaViT + FPN (see ``_DaViTDetector`` for checkpointing and mixed precision)."""


def build_detector(
    arch: str,
    num_classes: int,
    *,
    backbone: str = "davit_tiny",
    pretrained: str = "",
    backbone_overrides: dict[str, Any] | None = None,
    fpn_channels: int = 256,
    train_sizes: Sequence[int] = tuple(range(480, 801, 32)),
    test_size: int = 800,
    max_size: int = 1333,
    representation_size: int = 1024,
    mask_channels: int = 256,
    box_batch_size_per_image: int = 512,
    rpn_batch_size_per_image: int = 256,
    detections_per_img: int = 100,
    score_thresh: float = 0.05,
) -> nn.Module:
    """A torchvision Mask R-CNN, Faster R-CNN or RetinaNet on DaViT + FPN.

    Args:
        arch: ``"mask_rcnn"``, ``"faster_rcnn"`` (Mask R-CNN's boxes only, for data without masks) or
            ``"retinanet"``.
        num_classes: object classes K (background excluded).
        backbone: DaViT zoo name.
        pretrained: backbone weights: ``""``, ``"true"``/a tag, or a local file (classification or official mmdet).
        backbone_overrides: :class:`davit.DaViTConfig` fields, e.g. ``{"drop_path_rate": 0.2}``.
        fpn_channels: FPN width (256 officially).
        train_sizes: short sides sampled per training batch.
        test_size: short side at test time.
        max_size: long-side cap (1333 officially).
        representation_size: width of the R-CNN box head's two FCs (1024 officially; smaller for quick tests).
        mask_channels: width of the mask head's four convs and its deconv (256 officially).
        box_batch_size_per_image: RoIs sampled per image for the R-CNN losses (512 officially).
        rpn_batch_size_per_image: anchors sampled per image for the RPN losses (256 officially).
        detections_per_img: detections kept per image (100 officially).
        score_thresh: minimum score of a kept detection (0.05 officially).

    Returns:
        The detector: in train mode ``model(images, targets)`` returns torchvision's loss dict; in eval mode
        ``model(images)`` returns one ``{"boxes", "labels", "scores"[, "masks"]}`` dict per image.
    """
    if arch not in ARCHS:
        raise ValueError(f"detector arch must be one of {ARCHS}, got {arch!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 object class, got {num_classes}")
    overrides = dict(backbone_overrides or {})
    if arch in ("mask_rcnn", "faster_rcnn"):
        body = build_davit_backbone(
            backbone,
            pretrained=pretrained,
            out_indices=(0, 1, 2, 3),
            fpn_channels=fpn_channels,
            extra="pool",
            **overrides,
        )
        levels = ["0", "1", "2", "3"]  # RoIs pool from P2..P5, not from the max-pooled P6
        two_stage: dict[str, Any] = dict(
            # sampling_ratio 0 = adaptive, as the official RoIAlign (torchvision's default is 2 points per bin)
            box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=0),
            box_head=TwoMLPHead(fpn_channels * 7**2, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            box_batch_size_per_image=box_batch_size_per_image,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            rpn_post_nms_top_n_train=1000,
            box_detections_per_img=detections_per_img,
            box_score_thresh=score_thresh,
        )
        if arch == "faster_rcnn":
            model: nn.Module = DaViTFasterRCNN(body, **two_stage)
        else:
            model = DaViTMaskRCNN(
                body,
                mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=0),
                mask_head=MaskRCNNHeads(fpn_channels, (mask_channels,) * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
                **two_stage,
            )
    else:
        body = build_davit_backbone(
            backbone, pretrained=pretrained, out_indices=(1, 2, 3), fpn_channels=fpn_channels, extra="p6p7", **overrides
        )
        model = DaViTRetinaNet(
            body, num_classes=num_classes + 1, detections_per_img=detections_per_img, score_thresh=score_thresh
        )
    model.transform = MultiScaleTransform(train_sizes, test_size, max_size)
    return model
