"""The model zoo: one table of architecture configs, one row per published size.

Huge and Giant use overlapped 3x3 stride-2 downsampling: only that reproduces the paper's 362M / 1437M parameters
(timm's 2x2 versions have 348.9M / 1406.5M). Large is the official ``DaViT_large_window12_384`` (window 12 at 384;
timm's ``davit_large`` is the same weights layout at window 7: pass ``window_size=7``). Huge and Giant default to
512 input with window 16 (one window on the last 16x16 map): the only setting found that reproduces the GFLOPs the
paper lists for them (334 / 1038 G, counted without LayerNorms; see ``flops.py`` and the README). The ``_fl`` rows
are the Florence-2 vision towers (window 12, 3x3 downsampling, channel attention v2), equal to timm's models of the
same names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from .davit import DaViTConfig

__all__ = ["MODEL_CONFIGS", "ModelInfo", "get_config", "list_models"]


@dataclass(frozen=True)
class ModelInfo:
    """A zoo entry: the config, its default input size, and the paper's (or README's) reported ImageNet top-1."""

    cfg: DaViTConfig
    img_size: int = 224
    reported_top1: float | None = None
    note: str = ""


_T = dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
_B = dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
_H = dict(embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64))
_FL = dict(window_size=12, downsample_kernel=3, channel_attn_v2=True)

MODEL_CONFIGS: dict[str, ModelInfo] = {
    "davit_tiny": ModelInfo(DaViTConfig(depths=(1, 1, 3, 1), **_T), 224, 82.8),
    "davit_small": ModelInfo(DaViTConfig(depths=(1, 1, 9, 1), **_T), 224, 84.2),
    "davit_base": ModelInfo(DaViTConfig(depths=(1, 1, 9, 1), **_B), 224, 84.6),
    "davit_large": ModelInfo(
        DaViTConfig(depths=(1, 1, 9, 1), embed_dims=(192, 384, 768, 1536), num_heads=(6, 12, 24, 48), window_size=12),
        384,
        None,
        "ImageNet-22k pretrained in the paper; official entry point DaViT_large_window12_384",
    ),
    "davit_huge": ModelInfo(
        DaViTConfig(depths=(1, 1, 9, 1), downsample_kernel=3, window_size=16, **_H),
        512,
        90.2,
        "1.5B image-text pretraining",
    ),
    "davit_giant": ModelInfo(
        DaViTConfig(
            depths=(1, 1, 12, 3),
            embed_dims=(384, 768, 1536, 3072),
            num_heads=(12, 24, 48, 96),
            downsample_kernel=3,
            window_size=16,
        ),
        512,
        90.4,
        "1.5B image-text pretraining",
    ),
    "davit_base_fl": ModelInfo(DaViTConfig(depths=(1, 1, 9, 1), **_B, **_FL), 768, None, "Florence-2-base tower"),
    "davit_huge_fl": ModelInfo(DaViTConfig(depths=(1, 1, 9, 1), **_H, **_FL), 768, None, "Florence-2-large tower"),
}


def list_models(pattern: str | Sequence[str] = "", exclude: str | Sequence[str] = "") -> list[str]:
    """Names of the zoo's models, optionally filtered by shell-style wildcards (timm's convention).

    Args:
        pattern: keep names matching this pattern (or any of these patterns), e.g. ``"*tiny*"``; empty keeps all.
        exclude: drop names matching this pattern (or any of these).
    """
    pats = [pattern] if isinstance(pattern, str) else list(pattern)
    excl = [exclude] if isinstance(exclude, str) else list(exclude)
    names = list(MODEL_CONFIGS)
    if any(pats):
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats if p)]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in excl if p)]


def get_config(name: str) -> DaViTConfig:
    """The architecture of zoo model ``name``; an unknown name raises a KeyError listing the valid ones."""
    try:
        return MODEL_CONFIGS[name].cfg
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}") from None
