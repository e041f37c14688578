"""Multiply-accumulate counts of a DaViT, computed from its config, exactly as the official code counts them.

The official numbers (Tiny 4,540,244,736 at 224, Large 102,966,676,992 at 384) are fvcore counts with the window
attention matmuls included: every conv, Linear and attention matmul as multiply-adds, plus 5 per element of every
LayerNorm (fvcore's norm rule); GELU, softmax, residual adds and pooling are not counted. Counting analytically means
Giant at 512 costs nothing to count; ``tests/test_flops.py`` checks the formula against torch's own FLOP counter on
real forwards.

Window attention runs its qkv and proj Linears on the *padded* token map, as the official code does, so inputs that
are not window multiples cost slightly more than ``H*W`` would suggest.
"""

from __future__ import annotations

from typing import Any

from .davit import DaViTConfig
from .variants import MODEL_CONFIGS, get_config

__all__ = ["count_macs", "zoo_table"]

_LN = 5  # fvcore's cost per element of an affine LayerNorm


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def count_macs(cfg: DaViTConfig, img_size: int | tuple[int, int] = 224) -> int:
    """Multiply-adds of one forward pass of ``cfg`` on a ``(1, in_chans, H, W)`` image."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    c0 = cfg.embed_dims[0]
    h, w = _ceil_to(H, 4) // 4, _ceil_to(W, 4) // 4
    macs = h * w * c0 * cfg.in_chans * 49 + _LN * h * w * c0  # stem conv 7x7/4 then its norm
    c_in = c0
    for i, (c, depth, heads) in enumerate(zip(cfg.embed_dims, cfg.depths, cfg.num_heads)):
        if i > 0:
            macs += _LN * h * w * c_in  # downsample pre-norm
            k = cfg.downsample_kernel
            h, w = -(-h // 2), -(-w // 2)  # 2x2 on the even-padded map, or 3x3/2 pad 1: both ceil(h / 2)
            macs += h * w * c * c_in * k * k
        n = h * w
        per_type = {
            "spatial": _spatial_macs(h, w, c, cfg.window_size),
            "channel": 4 * n * c * c + 2 * n * c * (c // heads),  # qkv + proj, then k^T v and A q^T per group
        }
        common = 2 * n * c * 9 + _LN * n * c  # two depthwise 3x3 CPEs, norm1
        if cfg.ffn:
            hidden = int(c * cfg.mlp_ratio)
            common += _LN * n * c + 2 * n * c * hidden  # norm2, fc1 + fc2
        macs += depth * sum(common + per_type[t] for t in cfg.attention_types)
        c_in = c
    c_last = cfg.embed_dims[-1]
    macs += _LN * c_last + c_last * cfg.num_classes  # head norm after pooling, fc
    return macs


def _spatial_macs(h: int, w: int, c: int, ws: int) -> int:
    hp, wp = _ceil_to(h, ws), _ceil_to(w, ws)
    tokens = hp * wp  # padded map: the Linears see the padding
    return 4 * tokens * c * c + 2 * tokens * ws * ws * c  # qkv + proj, q k^T and A v


def zoo_table(img_size: int | None = None) -> list[dict[str, Any]]:
    """One row per zoo model: ``name``, ``params``, ``gmacs`` (at ``img_size`` or the model's default),
    ``img_size``, ``top1`` (reported ImageNet-1k top-1 or None), ``window_size``."""
    import torch

    from .davit import DaViT, count_params

    rows = []
    for name, info in MODEL_CONFIGS.items():
        size = img_size or info.img_size
        cfg = get_config(name)
        with torch.device("meta"):
            params = count_params(DaViT(cfg))
        rows.append(
            {
                "name": name,
                "params": params,
                "gmacs": round(count_macs(cfg, size) / 1e9, 2),
                "img_size": size,
                "top1": info.reported_top1,
                "window_size": cfg.window_size,
            }
        )
    return rows
