"""Window helpers shared by the model (``davit.py``) and its training kernels (``fused.py``): right/bottom zero
padding to the window size, and the partition of a ``(B, H, W, C)`` map into ``ws x ws`` windows and back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pad_to_multiple", "window_partition", "window_reverse"]


def _tracing() -> bool:
    """True under ``torch.compile``/``torch.export``/ONNX export/TorchScript, where sizes may be symbolic.

    Shape-dependent Python branches would then either specialise the graph to one input size or fail to export, so
    the model takes its branch-free path (same values, a few more no-op pads and slices).
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad a ``(B, H, W, C)`` map on the right and bottom so H and W are multiples of ``multiple``."""
    _, H, W, _ = x.shape
    pad_b = (multiple - H % multiple) % multiple
    pad_r = (multiple - W % multiple) % multiple
    if _tracing() or pad_b or pad_r:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    return x


def window_partition(x: Tensor, ws: int) -> Tensor:
    """``(B, Hp, Wp, C) -> (B*nW, ws*ws, C)`` with Hp, Wp multiples of ``ws``."""
    B, Hp, Wp, C = x.shape
    x = x.reshape(B, Hp // ws, ws, Wp // ws, ws, C)  # (B, nH, ws, nW, ws, C); a view when x is contiguous
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)  # (B*nH*nW, ws*ws, C)


def window_reverse(windows: Tensor, ws: int, B: int, Hp: int, Wp: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, ws*ws, C) -> (B, Hp, Wp, C)``."""
    C = windows.shape[-1]
    x = windows.view(B, Hp // ws, Wp // ws, ws, ws, C)  # (B, nH, nW, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)  # (B, Hp, Wp, C)
