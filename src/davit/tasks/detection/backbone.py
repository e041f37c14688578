"""DaViT + FPN as a torchvision detection backbone (``out_channels`` and an ``OrderedDict`` of maps).

Two layouts, as the official mmdet configs:

- Mask R-CNN: FPN over all four stages (strides 4..32) plus a max-pooled P6 (torchvision's ``LastLevelMaxPool``,
  mmdet's ``num_outs=5`` without extra convs), keys ``"0".."3", "pool"``.
- RetinaNet: FPN from stage 2 up (``start_level=1``, strides 8..32) plus P6/P7 convolved from the backbone's last map
  (``add_extra_convs='on_input'``), keys ``"1".."3", "p6", "p7"``. Stage 1's map is never used, so its per-stage
  norm is not built (the official config's comment says to remove it).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

import davit
from davit.models import DaViT
from davit.weights import CheckpointError, LoadReport, load_checkpoint

__all__ = ["DaViTFPN", "LastLevelP6P7OnInput", "build_davit_backbone", "load_backbone_weights"]

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt")


class LastLevelP6P7OnInput(LastLevelP6P7):
    """P6 = conv3x3/2(C5), P7 = conv3x3/2(relu(P6)): always from the backbone map (mmdet ``'on_input'``).

    torchvision's ``LastLevelP6P7`` switches to P5 when C5 happens to have as many channels as the FPN, which would
    silently change the architecture for small backbones.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


class DaViTFPN(nn.Module):
    """A ``features_only`` DaViT followed by torchvision's ``FeaturePyramidNetwork``.

    Args:
        body: a ``features_only`` :class:`davit.DaViT`; its ``out_indices`` are the FPN inputs.
        out_channels: FPN width (256 in every official config).
        extra: ``"pool"`` (Mask R-CNN) or ``"p6p7"`` (RetinaNet, from the last backbone map).
    """

    def __init__(self, body: DaViT, out_channels: int = 256, extra: str = "pool") -> None:
        super().__init__()
        if not getattr(body, "features_only", False):
            raise ValueError("DaViTFPN needs a features_only DaViT (davit.create_model(..., features_only=True))")
        self.body = body
        in_channels = [int(f["num_chs"]) for f in body.feature_info]
        if extra == "pool":
            extra_block: nn.Module = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7OnInput(in_channels[-1], out_channels)
        else:
            raise ValueError(f"extra must be 'pool' or 'p6p7', got {extra!r}")
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        self.names = [str(i) for i in body.out_indices]
        self.amp_dtype: torch.dtype | None = None  # set per call by the detector (see models._DaViTDetector)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if self.amp_dtype is not None:
            # The detector switched autocast off for its float32 heads; the DaViT body gets it back.
            with torch.autocast(x.device.type, dtype=self.amp_dtype):
                feats = [f.float() for f in self.body(x)]
        else:
            feats = self.body(x)  # list of (B, C_i, H/s_i, W/s_i)
        return self.fpn(OrderedDict(zip(self.names, feats)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the DaViT blocks in the backward pass."""
        self.body.set_grad_checkpointing(enable)


def load_backbone_weights(body: DaViT, path: str) -> LoadReport:
    """Load any DaViT checkpoint into a ``features_only`` body: classification (head and final norm dropped, stage
    norms fresh) or an official mmdet/mmseg file (its ``backbone.`` part incl. ``norm0..3``; detector heads are left
    aside because mmdet's head layouts do not map onto torchvision's).

    A dense checkpoint's norm of a stage this body does not return (RetinaNet's stage 1) is the only key allowed to
    be unused; anything else that does not match raises :class:`davit.CheckpointError`.
    """
    report = load_checkpoint(body, path, strict=False)
    bad_missing = [k for k in report["missing"] if not k.startswith(("out_norms.", "head."))]
    bad_unexpected = [k for k in report["unexpected"] if not k.startswith(("out_norms.", "head.", "norms."))]
    if bad_missing or bad_unexpected:
        raise CheckpointError(
            f"{path} does not fit {type(body).__name__} {body.cfg.embed_dims}: missing {bad_missing[:4]}, unexpected "
            f"{bad_unexpected[:4]}. Check model.name against the checkpoint (`davit info FILE`)"
        )
    if report.get("extra"):
        log.info(
            "%s: %d non-backbone tensors (the mmdet/mmseg heads) are not loaded: their layout differs from "
            "torchvision's heads",
            path,
            len(report["extra"]),
        )
    return report


def build_davit_backbone(
    name: str = "davit_tiny",
    *,
    pretrained: str = "",
    out_indices: Sequence[int] = (0, 1, 2, 3),
    fpn_channels: int = 256,
    extra: str = "pool",
    **overrides: object,
) -> DaViTFPN:
    """Build DaViT (``features_only``) + FPN, optionally initialised from a checkpoint.

    Args:
        name: zoo name, e.g. ``davit_tiny``.
        pretrained: ``""`` (random), ``"true"`` / a weight tag (published classification weights), or a local
            checkpoint of any supported layout (classification, or an official mmdet/mmseg detector).
        out_indices: the stages fed to the FPN.
        fpn_channels: FPN width.
        extra: ``"pool"`` or ``"p6p7"``, see :class:`DaViTFPN`.
        **overrides: :class:`davit.DaViTConfig` fields (``drop_path_rate=0.1``, ...).
    """
    local = bool(pretrained) and (Path(pretrained).expanduser().exists() or pretrained.endswith(_WEIGHT_SUFFIXES))
    if local:
        body = davit.create_model(name, features_only=True, out_indices=out_indices, **overrides)
        log.info("backbone weights: %s", load_backbone_weights(body, str(Path(pretrained).expanduser())).summary())
    elif pretrained:
        tag: bool | str = True if pretrained.lower() in ("true", "1", "yes") else pretrained
        # create_model loads the published classification weights into the dense body and logs the report line.
        body = davit.create_model(name, pretrained=tag, features_only=True, out_indices=out_indices, **overrides)
    else:
        body = davit.create_model(name, features_only=True, out_indices=out_indices, **overrides)
    return DaViTFPN(body, fpn_channels, extra)
