"""``UperNetDaViT``: a ``features_only`` DaViT + UperNet head + auxiliary FCN head, and its checkpoint loading."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models import DaViT
from ...weights import CheckpointError, LoadReport, load_checkpoint, load_state, read_checkpoint, unwrap_state_dict
from ...weights.load import check_weights
from .heads import FCNHead, UPerHead, mmseg_head_to_ours

__all__ = ["UperNetDaViT", "load_segmentation_checkpoint"]

log = logging.getLogger(__name__)


class UperNetDaViT(nn.Module):
    """Semantic segmentation model (composition: backbone, decode head, optional auxiliary head).

    ``forward(x)`` returns ``{"out": logits}`` with logits ``(B, num_classes, H, W)`` at the input size (bilinear from
    stride 4, as mmseg upsamples before the loss), plus ``"aux"`` (same shape) in training mode when an auxiliary head
    exists. Eval-time rescaling, sliding windows and test-time augmentation live in ``inference.py``.

    Args:
        backbone: a ``features_only`` DaViT returning all four stages.
        decode_head: the UperNet head over all stages.
        aux_head: the FCN head, or None.
        aux_index: which backbone map the auxiliary head reads (official: 2, the third stage).
        align_corners: bilinear convention of the final upsampling.
    """

    def __init__(
        self,
        backbone: DaViT,
        decode_head: UPerHead,
        aux_head: FCNHead | None = None,
        aux_index: int = 2,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if not getattr(backbone, "features_only", False):
            raise ValueError("UperNetDaViT needs a features_only backbone: create_model(name, features_only=True)")
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = aux_head
        self.aux_index = aux_index
        self.align_corners = align_corners
        self.num_classes = decode_head.conv_seg.out_channels

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's dual blocks in the backward pass (``train.grad_checkpointing``)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Images ``(B, 3, H, W)`` -> ``{"out": (B, K, H, W)[, "aux": (B, K, H, W)]}``."""
        feats = self.backbone(x)
        size = x.shape[2:]
        logits = self.decode_head(feats)  # (B, K, H/4, W/4)
        out = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)}
        if self.training and self.auxiliary_head is not None:
            aux = self.auxiliary_head(feats[self.aux_index])
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=self.align_corners)
        return out


def load_segmentation_checkpoint(
    model: UperNetDaViT, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any], strict: bool = False
) -> LoadReport:
    """Initialise a segmentation model from a DaViT checkpoint of any supported format.

    - A classification checkpoint (official, timm, mmpretrain, Florence-2, ours) fills the backbone; the head and final
      norm are dropped and the per-stage norms and the segmentation heads stay freshly initialised.
    - An official mmseg checkpoint (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``) fills the backbone and,
      renamed from mmcv's ``ConvModule`` names, both heads.
    - This package's own segmentation checkpoints (``backbone.stages...``, ``decode_head...``) load as they are.

    Args:
        model: the model to fill.
        path_or_state_dict: a file or a state dict.
        strict: raise if a head tensor in the file has no place in the model (backbone mismatches always raise).

    Returns:
        The backbone's :class:`davit.weights.LoadReport`, with ``heads_loaded`` / ``heads_skipped`` counts added.

    Raises:
        CheckpointError: not a DaViT checkpoint, another model size, or (strict) head tensors that do not fit.
    """
    src = path_or_state_dict
    raw = unwrap_state_dict(read_checkpoint(src) if isinstance(src, (str, os.PathLike)) else src)
    if "backbone.stem.conv.weight" in raw:
        # NaN, infinite or integer weights would load and silently predict garbage.
        check_weights(raw, str(src) if isinstance(src, (str, os.PathLike)) else "the state dict", model.state_dict())
        return _load_own(model, raw)
    sd = load_state(raw)
    report = load_checkpoint(model.backbone, sd, strict=True)
    heads = {k: v for k, v in mmseg_head_to_ours(sd.extra).items() if k.startswith(("decode_head.", "auxiliary_head."))}
    own = model.state_dict()
    fits = {k: v for k, v in heads.items() if k in own and own[k].shape == v.shape}
    bad = sorted(set(heads) - set(fits))
    if bad and strict:
        raise CheckpointError(
            f"{len(bad)} head tensors of the checkpoint do not fit this model (e.g. {', '.join(bad[:3])}); a different "
            "class count or head width? Pass strict=False to load only the backbone and the matching head tensors"
        )
    with torch.no_grad():
        for k, v in fits.items():
            own[k].copy_(v.to(own[k].dtype))
    report["heads_loaded"] = len(fits)
    report["heads_skipped"] = bad
    if heads:
        log.info("segmentation heads: loaded %d tensors, skipped %d (%s)", len(fits), len(bad), ", ".join(bad[:4]))
    return report


def _load_own(model: UperNetDaViT, sd: Mapping[str, Tensor]) -> LoadReport:
    """A checkpoint this package wrote for a segmentation model: every tensor must fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"the segmentation checkpoint does not fit this model: {len(missing)} missing ({', '.join(missing[:3])}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}), {len(shapes)} of another shape "
            f"({', '.join(shapes[:3])}); was it trained with another model name, class count or head width? "
            "Use the config.yaml saved beside it"
        )
    model.load_state_dict(dict(sd), strict=True)
    report = LoadReport(source="davit_seg", loaded=len(sd), missing=[], unexpected=[], reinitialized=[], extra=[])
    report["heads_loaded"] = sum(1 for k in sd if not k.startswith("backbone."))
    report["heads_skipped"] = []
    log.info(report.summary())
    return report
