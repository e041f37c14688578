"""Semantic segmentation: UperNet on a DaViT backbone (the official ADE20K recipe), on the shared engine."""

from __future__ import annotations

from .heads import FCNHead, UPerHead, mmseg_head_to_ours
from .inference import infer_probs, slide_logits, whole_logits
from .metrics import ConfusionMatrix, metrics_from_confusion
from .model import UperNetDaViT, load_segmentation_checkpoint
from .task import (
    SegConfig,
    SegDataConfig,
    SegEvalConfig,
    SegHeadConfig,
    SegTask,
    build_seg_model,
    evaluate_segmentation,
    load_seg_config,
    load_seg_model,
    predict_segmentation,
    train_segmentation,
)

__all__ = [
    "ConfusionMatrix",
    "FCNHead",
    "SegConfig",
    "SegDataConfig",
    "SegEvalConfig",
    "SegHeadConfig",
    "SegTask",
    "UPerHead",
    "UperNetDaViT",
    "build_seg_model",
    "evaluate_segmentation",
    "infer_probs",
    "load_seg_config",
    "load_seg_model",
    "load_segmentation_checkpoint",
    "metrics_from_confusion",
    "mmseg_head_to_ours",
    "predict_segmentation",
    "slide_logits",
    "train_segmentation",
    "whole_logits",
]
