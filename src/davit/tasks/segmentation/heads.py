"""UperNet decode head and the auxiliary FCN head, as the official DaViT ADE20K recipe uses them (mmseg 0.11).

Every conv-norm-act unit is torchvision's ``Conv2dNormActivation`` (``0`` = conv, ``1`` = norm, ``2`` = ReLU); mmseg's
``ConvModule`` names the same tensors ``conv`` / ``bn``, which :func:`mmseg_head_to_ours` renames. The module names
otherwise follow mmseg's UperHead (``psp_modules``, ``bottleneck``, ``lateral_convs``, ``fpn_convs``,
``fpn_bottleneck``, ``conv_seg``) and FCNHead (``convs``, ``conv_cat``, ``conv_seg``) so official checkpoints load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

__all__ = ["FCNHead", "PPM", "UPerHead", "mmseg_head_to_ours"]

NormLayer = Callable[..., nn.Module]


def _cna(in_ch: int, out_ch: int, kernel: int, norm_layer: NormLayer) -> Conv2dNormActivation:
    # mmcv's ConvModule drops the conv bias when a norm follows; torchvision's default (bias=None) does the same.
    return Conv2dNormActivation(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2, norm_layer=norm_layer)


def _resize(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class PPM(nn.ModuleList):
    """Pyramid pooling: adaptive average pools at ``pool_scales``, each followed by a 1x1 conv-BN-ReLU."""

    def __init__(
        self,
        pool_scales: Sequence[int],
        in_channels: int,
        channels: int,
        norm_layer: NormLayer,
        align_corners: bool = False,
    ) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _cna(in_channels, channels, 1, norm_layer)) for s in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        """``(B, C, h, w)`` -> one ``(B, channels, h, w)`` map per pool scale."""
        return [_resize(stage(x), x.shape[2:], self.align_corners) for stage in self]


class UPerHead(nn.Module):
    """UperNet: PPM on the last stage, a top-down FPN over all stages, fused at stride 4, then a 1x1 classifier.

    Args:
        in_channels: channels of each backbone map, finest first (Tiny: 96, 192, 384, 768).
        num_classes: output classes.
        channels: width of every intermediate map (official: 512).
        pool_scales: PPM pool sizes (official: 1, 2, 3, 6).
        dropout: Dropout2d before the classifier (official: 0.1).
        norm_layer: norm after every conv (BatchNorm2d; converted to SyncBatchNorm under DDP).
        align_corners: bilinear resize convention (mmseg default False).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.align_corners = align_corners
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, norm_layer, align_corners)
        self.bottleneck = _cna(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm_layer)
        self.lateral_convs = nn.ModuleList(_cna(c, channels, 1, norm_layer) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_cna(channels, channels, 3, norm_layer) for _ in in_channels[:-1])
        self.fpn_bottleneck = _cna(len(in_channels) * channels, channels, 3, norm_layer)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        _init_head(self)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Backbone maps (finest first) -> logits ``(B, num_classes, H/4, W/4)`` at the finest map's size."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"UPerHead expects {len(self.in_channels)} feature maps, got {len(feats)}")
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        # Top-down pathway: each level receives the upsampled coarser one (out of place, so autograd keeps both).
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size, self.align_corners) for o in outs[1:]]
        x = self.fpn_bottleneck(torch.cat(outs, dim=1))  # (B, channels, H/4, W/4)
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """The auxiliary head: ``num_convs`` 3x3 conv-BN-ReLU on one backbone map, dropout, 1x1 classifier.

    Args:
        in_channels: channels of the map it reads (official: stage 2, 384 for Tiny).
        num_classes: output classes.
        channels: conv width (official: 256).
        num_convs: number of 3x3 convs (official: 1).
        concat_input: concatenate the input to the conv output before the classifier (official: False).
        dropout: Dropout2d before the classifier (official: 0.1).
        norm_layer: norm after every conv.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        concat_input: bool = False,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs num_convs >= 1, got {num_convs}")
        convs = [_cna(in_channels, channels, 3, norm_layer)]
        convs += [_cna(channels, channels, 3, norm_layer) for _ in range(num_convs - 1)]
        self.convs = nn.Sequential(*convs)
        self.conv_cat = _cna(in_channels + channels, channels, 3, norm_layer) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        _init_head(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` -> logits ``(B, num_classes, h, w)``."""
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.conv_seg(self.dropout(y))


def _init_head(head: nn.Module) -> None:
    # mmcv's ConvModule init: Kaiming normal (fan_out, ReLU) convs, unit norms; mmseg's classifier: normal(0, 0.01).
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    conv_seg = head.conv_seg
    nn.init.normal_(conv_seg.weight, std=0.01)
    nn.init.zeros_(conv_seg.bias)


_MMSEG_RULES = [
    (re.compile(r"\.conv\.(weight|bias)$"), r".0.\1"),
    (re.compile(r"\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)$"), r".1.\1"),
]


def mmseg_head_to_ours(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename mmseg ``decode_head.*`` / ``auxiliary_head.*`` tensors to this module's names.

    ``decode_head.psp_modules.0.1.conv.weight`` -> ``decode_head.psp_modules.0.1.0.weight``,
    ``auxiliary_head.convs.0.bn.running_mean`` -> ``auxiliary_head.convs.0.1.running_mean``; ``conv_seg`` is unchanged.
    """
    out = {}
    for k, v in sd.items():
        for rx, rep in _MMSEG_RULES:
            k = rx.sub(rep, k)
        out[k] = v
    return out
