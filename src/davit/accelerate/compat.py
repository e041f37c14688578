"""Every private or version-bound torch API davit calls, in one place, each with a plain fallback.

The reference model (``davit.models``) uses none of these. The accelerated modules and kernels call them through
this module only, so a torch release that renames or drops one of them degrades to the plain ops instead of
breaking (timm's ``layers/fast_norm.py`` follows the same rule). :func:`onednn_available` says whether the oneDNN
fused CPU ops exist in this build; callers that get False never call the ``onednn_*`` wrappers.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bf16_supported",
    "conv_add",
    "cpu_vendor",
    "gelu_backward_",
    "is_compiling",
    "layer_norm_backward",
    "layer_norm_with_stats",
    "linear_add",
    "linear_pointwise",
    "onednn_available",
    "register_compile_rules",
    "reorder_linear_weight",
    "softmax_backward",
]


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its fused Linear/conv ops (``torch.ops.mkldnn._linear_pointwise``)."""
    try:
        mkldnn = torch.ops.mkldnn
        return bool(
            torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_convolution_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


def cpu_vendor() -> str:
    """The CPU vendor string (``GenuineIntel``, ``AuthenticAMD``, ...) from /proc/cpuinfo; empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX512-BF16 or AMX through oneDNN; CUDA: compute >= 8.0)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        with contextlib.suppress(AttributeError, RuntimeError):
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


# ------------------------------------------------------------------------------------------------------ oneDNN ops
def linear_pointwise(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool = False) -> Tensor:
    """``F.linear(x, w, b)`` (then exact GELU) in one oneDNN call: bias and GELU in the GEMM's epilogue."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [], "none" if gelu else "")


def linear_add(x: Tensor, other: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``other + F.linear(x, w, b)`` in one oneDNN call (``other`` contiguous, same dtype)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "add")


def conv_add(x: Tensor, w: Tensor, b: Tensor | None, padding: int, groups: int) -> Tensor:
    """``x + conv2d(x, w, b, stride 1, padding)`` in one oneDNN call (NCHW view of channels-last memory)."""
    p = [padding, padding]
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, x, w, b, p, [1, 1], [1, 1], groups, "add", None, None, [], None
    )


def reorder_linear_weight(w: Tensor, rows_hint: int) -> Tensor | None:
    """``w`` re-laid out in oneDNN's blocked format for ``rows_hint`` rows, or None where the op is missing."""
    op = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    return None if op is None else op(w, rows_hint)


_RULES_REGISTERED = False


def register_compile_rules() -> bool:
    """Give torch.compile the fake-tensor rule for oneDNN's fused Linear + add, which torch does not ship (its
    output shape). Called when compile-mode acceleration is installed, never at import. True when the rule exists."""
    global _RULES_REGISTERED
    if _RULES_REGISTERED:
        return True
    register = getattr(getattr(torch, "library", None), "register_fake", None)
    if register is None or not onednn_available():
        return False
    try:

        @register("mkldnn::_linear_pointwise.binary")
        def _linear_binary_fake(x: Tensor, other: Tensor, w: Tensor, b: Tensor | None, attr: str) -> Tensor:
            return x.new_empty((*x.shape[:-1], w.shape[0]))

    except RuntimeError:  # this torch registers its own
        pass
    _RULES_REGISTERED = True
    return True


# ----------------------------------------------------------------------------------------- backward building blocks
def softmax_backward(grad: Tensor, out: Tensor, dim: int) -> Tensor:
    """Gradient of ``softmax`` given its output: ``out * (grad - sum(grad * out))``."""
    op = getattr(torch, "_softmax_backward_data", None)
    if op is not None:
        with contextlib.suppress(TypeError, RuntimeError):
            return op(grad, out, dim, out.dtype)
    return out * (grad - (grad * out).sum(dim, keepdim=True))


def gelu_backward_(grad: Tensor, x: Tensor) -> Tensor:
    """Exact-GELU backward written into ``grad`` (one hidden-wide buffer instead of two)."""
    op = getattr(getattr(torch.ops.aten, "gelu_backward", None), "grad_input", None)
    if op is not None:
        with contextlib.suppress(TypeError, RuntimeError):
            op(grad, x, grad_input=grad)
            return grad
    cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
    pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
    return grad.mul_(cdf + x * pdf)


def layer_norm_with_stats(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim and its per-row mean and 1/std (what its backward needs)."""
    op = getattr(torch, "native_layer_norm", None)
    if op is not None:
        return op(x, (x.shape[-1],), w, b, eps)
    mean = x.mean(-1, keepdim=True)
    rstd = (x.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    return F.layer_norm(x, (x.shape[-1],), w, b, eps), mean, rstd


def layer_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    mask: list[bool],
    eps: float,
) -> tuple[Any, Any, Any]:
    """LayerNorm's backward from the saved input and statistics; ``mask`` says which of (dx, dw, db) to compute."""
    op = getattr(torch.ops.aten, "native_layer_norm_backward", None)
    if op is not None:
        return op(dy.contiguous(), x, [x.shape[-1]], mean, rstd, w, b, mask)
    with torch.enable_grad():  # plain fallback: autograd through a recomputed norm
        xr = x.detach().requires_grad_(mask[0])
        wr = None if w is None else w.detach().requires_grad_(mask[1])
        br = None if b is None else b.detach().requires_grad_(mask[2])
        y = F.layer_norm(xr, (x.shape[-1],), wr, br, eps)
        inputs = [t for t in (xr, wr, br) if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, inputs, dy))
    return tuple(next(grads) if (t is not None and t.requires_grad) else None for t in (xr, wr, br))
