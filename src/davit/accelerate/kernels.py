"""Fused kernels behind :mod:`davit.accelerate`: oneDNN epilogues for CPU inference, custom backward passes for
training.

Inference (:func:`linear`): bias, exact GELU and a residual addition run inside the oneDNN GEMM on CPU, bit-identical
to the separate ops, with no bias-broadcast copy and no extra passes over the widest activations.

Training, opt-in through ``Policy(memory_saving=...)`` (:func:`ln_mlp`, :func:`attn_branch`): custom autograd
functions for a block's two residual branches. Autograd through the separate ops keeps the normalised tokens, the
GELU input *and* output, qkv, the scaled queries and the attention probabilities alive until the backward pass;
these functions keep only the branch input (with the norm's two statistics per token), the GELU input and qkv, and
recompute the rest in the backward pass: the MLP stores 5 instead of 10 token-widths, a window-attention branch 4
instead of about 8.5 (fp32). The price is the recomputation (2-10% of a CPU training step), which is why it is not
the default. The forward passes no longer need autograd, so they take the fused inference kernels.

Mixed precision: under autocast the functions do what autocast does to the separate ops (LayerNorm in fp32, the
GEMMs, GELU and attention in the autocast dtype, the residual stream in fp32) with explicit casts, and the backward
pass uses the same dtypes. Gradients match autograd through the separate ops to rounding (``tests/test_accelerate.py``).

Every function here takes the :class:`~davit.accelerate.policy.Policy` (or the flags of it it needs) as an argument:
nothing is read from global state, and every private torch op goes through :mod:`davit.accelerate.compat`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.davit import channel_roles, pad_to_multiple, window_attention, window_partition, window_reverse
from ..models.davit import split_heads as split_heads_ref
from . import compat
from .policy import Policy

__all__ = [
    "ChannelCore",
    "WindowCore",
    "attn_branch",
    "channel_attend",
    "dwconv_residual",
    "linear",
    "linear_t",
    "ln_mlp",
    "packed_weight",
    "patch_weight",
    "prepack_linears",
    "split_heads",
    "window_attend",
]

_FLOATS = (torch.float32, torch.bfloat16)


def _infer_onednn(x: Tensor, w: Tensor, p: Policy) -> bool:
    """Whether an inference Linear may call oneDNN directly (the policy allows it, CPU, float32 or bfloat16)."""
    return p.onednn and p.mode == "infer" and x.is_cpu and w.dtype in _FLOATS


def linear(x: Tensor, fc: nn.Linear, p: Policy, gelu: bool = False, residual: Tensor | None = None) -> Tensor:
    """``[residual +] [gelu](fc(x))`` with bias, GELU and residual in one oneDNN call where the policy allows.

    Uses ``fc.packed_weight`` (set by :func:`prepack_linears` on ``davit.optimize``'s own copy) when present.
    """
    if p.mode == "compile":
        if _compiled_onednn(x, fc.weight, p):
            return _onednn_linear_2d(x, fc.weight, fc.bias, gelu, residual)
        return _plain(F.linear(x, fc.weight, fc.bias), gelu, residual)
    packed = packed_weight(fc, x, p)
    if packed is not None:
        return _onednn_linear(x, packed, fc.bias, gelu, residual)
    return linear_t(x, fc.weight, fc.bias, p, gelu, residual)


def packed_weight(m: nn.Module, x: Tensor, p: Policy) -> Tensor | None:
    """``m.packed_weight`` (set by :func:`prepack_linears`) where this call may use it: inference policy with oneDNN,
    CPU, ``x`` in the packed dtype, no autocast; else None."""
    packed = getattr(m, "packed_weight", None)
    if packed is None or x.dtype != packed.dtype or not _infer_onednn(x, packed, p):
        return None
    return None if torch.is_autocast_enabled("cpu") else packed


def prepack_linears(model: nn.Module, rows_hint: int = 49) -> int:
    """Give every ``nn.Linear`` of ``model`` a copy of its weight in oneDNN's blocked layout (``packed_weight``), and
    every 2x2 stride-2 ``nn.Conv2d`` (DaViT's downsamples) its weight as a packed Linear over 2x2 patches.

    Without it oneDNN re-lays-out the weight on every call: packed, the Linears of a batch-1 forward are 20-30%
    faster in bf16 and 10-18% in fp32, with bit-identical results. The packed copy is a snapshot: only for a model
    that will not be trained or changed afterwards (``davit.optimize`` packs its own copy). Returns how many.
    """
    n = 0
    if not compat.onednn_available():
        return n
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.is_cpu and m.weight.dtype in _FLOATS:
            w = m.weight.detach()
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (2, 2) and m.stride == (2, 2) and m.padding == (0, 0):
            # A Downsample's 2x2 stride-2 conv, run by FastDownsample as a Linear over 2x2 patches.
            if m.groups != 1 or m.dilation != (1, 1) or not m.weight.is_cpu or m.weight.dtype not in _FLOATS:
                continue
            w = patch_weight(m).detach()
        else:
            continue
        packed = compat.reorder_linear_weight(w, rows_hint)
        if packed is None:
            return n
        m.packed_weight = packed
        n += 1
    return n


def patch_weight(conv: nn.Conv2d) -> Tensor:
    """A 2x2 conv's weight as the ``(Cout, 2*2*Cin)`` matrix of a Linear over ``(kh, kw, Cin)``-ordered patches."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)


def linear_t(
    x: Tensor, w: Tensor, b: Tensor | None, p: Policy, gelu: bool = False, residual: Tensor | None = None
) -> Tensor:
    """:func:`linear` on raw tensors.

    Why: ``F.linear`` first copies the broadcast bias into a fresh output and then accumulates the GEMM onto it, and
    GELU is one more full pass over the widest activation; oneDNN adds the bias and applies GELU inside the GEMM, which
    makes the stage-1/2 Linears (small K, huge M) up to 2x faster with identical results; a residual added in the
    GEMM's epilogue saves one more pass (float addition commutes, so ``residual + y`` is bit-identical).
    """
    if _infer_onednn(x, w, p):
        if torch.is_autocast_enabled("cpu"):
            dt = torch.get_autocast_dtype("cpu")
            if dt != torch.bfloat16:
                return _plain_linear(x, w, b, p, gelu, residual)
            # What autocast would do for F.linear: compute in bf16 (the residual stream stays fp32, added outside).
            x, w, b = x.to(dt), w.to(dt), (None if b is None else b.to(dt))
        elif x.dtype != w.dtype:
            return _plain_linear(x, w, b, p, gelu, residual)
        return _onednn_linear(x, w, b, gelu, residual)
    return _plain_linear(x, w, b, p, gelu, residual)


def _plain(y: Tensor, gelu: bool, residual: Tensor | None) -> Tensor:
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool, residual: Tensor | None) -> Tensor:
    if residual is not None and not gelu and residual.dtype == x.dtype and residual.is_contiguous():
        return compat.linear_add(x, residual, w, b)
    y = compat.linear_pointwise(x, w, b, gelu)
    return y if residual is None else residual + y


# Under torch.compile with frozen weights, Inductor sends fp32 Linears to MKL's packed SGEMM, with the bias, GELU and
# residual as separate passes; oneDNN with those in its epilogue is faster wherever the rows amortise its per-call
# weight re-layout (fp32, davit_tiny 224, same-process A/B: batch 32 -8.5% per batch with every Linear on oneDNN;
# batch 1 -5.6% with the >= 784-row stage-1/2 Linears, +5% with all). Where MKL's fp32 GEMM is the slower one (see
# Policy.onednn_fp32) every Linear goes to oneDNN: batch 1 69.2 -> 59.0 ms on the AMD EPYC, batch 32 unchanged (all its
# Linears have >= 512 rows). bf16 already takes Inductor's oneDNN path.
def _compiled_onednn(x: Tensor, w: Tensor, p: Policy) -> bool:
    """Whether an fp32 CPU Linear being compiled should be traced as oneDNN's fused op."""
    if not p.onednn or not x.is_cpu or x.dtype != torch.float32 or w.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return p.onednn_fp32 or x.numel() >= p.compiled_onednn_min_rows * x.shape[-1]


def _onednn_linear_2d(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool, residual: Tensor | None) -> Tensor:
    """:func:`_onednn_linear` on the rows of ``x`` (Inductor lowers the oneDNN op only for 2-D inputs)."""
    r = None if residual is None else residual.reshape(-1, residual.shape[-1])
    y = _onednn_linear(x.reshape(-1, x.shape[-1]), w, b, gelu, r)
    return y.view(*x.shape[:-1], y.shape[-1])


def _onednn_fp32(t: Tensor, w: Tensor, p: Policy) -> bool:
    return p.onednn_fp32 and t.dtype == torch.float32 and w.dtype == torch.float32 and t.is_cpu


def _bias_fused_training(x: Tensor, w: Tensor, b: Tensor | None, p: Policy) -> bool:
    """Whether a training Linear should run its forward as one oneDNN call.

    Narrow inputs over many rows (the stage-1 Linears, K = 96): there F.linear's bias-broadcast copy into the output
    costs as much as the GEMM itself (fp32 (50176 x 96) @ (96 x 384): 21 ms vs 14 ms through oneDNN with the bias in
    its epilogue); with ``onednn_fp32`` every fp32 Linear.
    """
    if not p.onednn or not x.is_cpu:
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    cdt = _compute_dtype(x)
    if cdt == torch.float32 and _onednn_fp32(x, w, p):
        return True
    if b is None or w.shape[1] > p.bias_fused_max_k or x.numel() < p.bias_fused_min_rows * w.shape[1]:
        return False
    return cdt in _FLOATS and w.dtype in _FLOATS


def _input_grad(dy: Tensor, w: Tensor, p: Policy) -> Tensor:
    """``dy @ w`` on the rows of ``dy`` (a Linear's input gradient), through oneDNN where it is faster (see above)."""
    dy2 = _rows(dy)
    if _onednn_fp32(dy2, w, p):
        # The transposed weight as a strided view: oneDNN re-lays the weight out anyway (a copy first cost 5-15%).
        dx = compat.linear_pointwise(dy2.contiguous(), w.t(), None)
    else:
        dx = dy2 @ w
    return dx.view(*dy.shape[:-1], w.shape[1])


class _BiasFusedLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` with the bias added in oneDNN's epilogue; the backward is autograd's two GEMMs and the
    bias gradient (see :func:`_weight_grads`), in the dtype autocast would use."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, p: Policy) -> Tensor:  # type: ignore[override]
        cdt = _compute_dtype(x)
        with torch.autocast("cpu", enabled=False):
            xc, wc = x.to(cdt), w.to(cdt)
            y = compat.linear_pointwise(xc, wc, _cast(b, cdt))
        ctx.save_for_backward(xc, wc, w, b)
        ctx.x_dtype, ctx.policy = x.dtype, p
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:  # type: ignore[override]
        xc, wc, w, b = ctx.saved_tensors
        dy = dy.to(wc.dtype)
        p = ctx.policy
        dx = _input_grad(dy, wc, p).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw, db = _weight_grads(dy, xc, w, b, ctx.needs_input_grad[1], ctx.needs_input_grad[2], p)
        return dx, dw, db, None


def _plain_linear(x: Tensor, w: Tensor, b: Tensor | None, p: Policy, gelu: bool, residual: Tensor | None) -> Tensor:
    if p.mode != "train":
        return _plain(F.linear(x, w, b), gelu, residual)
    # Only the oneDNN-forward cases: routing every other bf16 Linear through this function (for its faster bias
    # gradient) made the davit_tiny bf16 step 7.5% slower (same-process A/B, 1 thread, 7 rounds).
    y = _BiasFusedLinear.apply(x, w, b, p) if _bias_fused_training(x, w, b, p) else F.linear(x, w, b)
    return _plain(y, gelu, residual)


# ------------------------------------------------------------------------------------------------------- training
def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, N, 3*C)`` -> q, k, v, each ``(B, heads, N, C/heads)`` (views).

    Under autograd the backward writes the three gradients straight into one ``(B, N, 3*C)`` buffer; autograd's own
    backward of ``view/permute/unbind`` stacks them and then copies the stack into that layout (two passes over the
    widest gradient of the attention instead of one: ~25 ms of a 2 s fp32 training step at batch 16).
    """
    if qkv.requires_grad:
        return _SplitHeads.apply(qkv, heads)
    B, N, C3 = qkv.shape
    return qkv.view(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def window_attend(q: Tensor, k: Tensor, v: Tensor, chunk_bytes: int) -> Tensor:
    """Inference window attention ``softmax(q k^T / sqrt(d)) v`` as the reference computes it (same ops, same
    values), over chunks of windows whose attention maps fit in ``chunk_bytes`` (cache-sized), each chunk's result
    written straight into one ``(Bw, h, N, d)`` output.

    On the CPU this beats the fused SDPA kernel on DaViT's 49-token windows in fp32 and bf16 (its per-window tiling
    has little to tile; ``python benchmarks/attention.py --infer --batch 1 --size 768``: 1.4-1.7x per stage), and
    chunking keeps the probabilities in cache on large maps (fp32, 2048 windows x 3 heads: 118 ms unchunked, 37 ms
    in 1 MiB chunks).
    """
    Bw, h, N, d = q.shape
    step = max(1, chunk_bytes // max(1, h * N * N * q.element_size()))
    if step >= Bw:
        return window_attention(q, k) @ v
    out = q.new_empty(Bw, h, N, d)
    for i in range(0, Bw, step):
        j = min(Bw, i + step)
        torch.matmul(window_attention(q[i:j], k[i:j]), v[i:j], out=out[i:j])
    return out


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        B, N, C3 = qkv.shape
        ctx.shape = (B, N, 3, heads, C3 // (3 * heads))
        q, k, v = qkv.view(ctx.shape).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    @staticmethod
    def backward(ctx: Any, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None) -> tuple:  # type: ignore[override]
        grads = (dq, dk, dv)
        like = next(g for g in grads if g is not None)
        out = like.new_empty(ctx.shape)  # (B, N, 3, h, d)
        for i, g in enumerate(grads):
            if g is None:
                out[:, :, i].zero_()
            else:
                out[:, :, i].copy_(g.transpose(1, 2))  # (B, h, N, d) -> (B, N, h, d) slot
        return out.view(ctx.shape[0], ctx.shape[1], -1), None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a Linear in for ``x`` (``x.dtype`` without autocast)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _cast(t: Tensor | None, dt: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dt)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _weight_grads(dy: Tensor, inp: Tensor, w: Tensor, b: Tensor | None, need_w: bool, need_b: bool, p: Policy) -> tuple:
    """``dW = dy^T inp`` and ``db = sum(dy)`` in the parameters' dtype (None where not needed).

    For a Linear that widens (in < out) MKL is faster on ``(inp^T dy)^T``, autograd's own orientation (fp32
    (50176 x 96) inputs, 384 outputs: 12.8 vs 17.0 ms); for one that narrows, on ``dy^T inp`` (13.3 vs 14.6 ms).
    With ``onednn_fp32`` (non-Intel CPUs), oneDNN on the transposed views where it measured faster: every Linear
    that narrows (AMD EPYC, 2 threads, 50176 rows 384 -> 96: 16.6 vs 23.6 ms; 12544 rows 768 -> 192: 13.6 vs 21.0)
    and every Linear over at most ``onednn_dw_max_rows`` rows (3136 rows 384 -> 1152: 16.4 vs 25.3 ms); MKL for
    the rest (50176 rows 96 -> 384: 23.0 vs 68.1 ms).
    """
    dy2, inp2 = _rows(dy), _rows(inp)
    if need_w:
        narrows = inp2.shape[1] > dy2.shape[1]
        if _onednn_fp32(dy2, inp2, p) and (narrows or dy2.shape[0] <= p.onednn_dw_max_rows):
            dw = compat.linear_pointwise(dy2.t(), inp2.t(), None)
        elif inp2.shape[1] < dy2.shape[1]:
            dw = (inp2.t() @ dy2).t()
        else:
            dw = dy2.t() @ inp2
        dw = dw.to(w.dtype).contiguous()
    else:
        dw = None
    db = _bias_grad(dy2).to(b.dtype) if (need_b and b is not None) else None
    return dw, db


def _bias_grad(dy2: Tensor) -> Tensor:
    """Column sums of the ``(rows, out)`` gradient: in bf16 on the CPU as a GEMM against a row of ones (fp32
    accumulation, one rounding, as ``sum(0)``; 50176 x 384: 14.3 -> 7.5 ms, x 288: 9.4 -> 4.5 ms, 1 thread), else
    ``sum(0)``."""
    if dy2.dtype == torch.bfloat16 and dy2.is_cpu:
        return (dy2.new_ones(1, dy2.shape[0]) @ dy2).view(dy2.shape[1])
    return dy2.sum(0)


def _norm_backward(
    dxn: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    need: tuple[bool, ...],
    residual_grad: Tensor | None,
    eps: float,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """LayerNorm's backward from the saved input and statistics (``need[:3]``: x, weight, bias), plus the gradient
    that reaches ``x`` directly through the residual when the branch added its input."""
    mask = [need[0], need[1] and w is not None, need[2] and b is not None]
    dx, dw, db = compat.layer_norm_backward(dxn, x, mean, rstd, w, b, mask, eps)
    if residual_grad is not None and dx is not None:
        dx = dx + residual_grad.to(dx.dtype)
    return dx, dw, db


class _LnMlp(torch.autograd.Function):
    """``[x +] fc2(gelu(fc1(layer_norm(x))))``; saves x, the norm's statistics and the GELU input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        ln_w: Tensor | None,
        ln_b: Tensor | None,
        eps: float,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        add_input: bool,
        cdt: torch.dtype,
        p: Policy,
    ) -> Tensor:
        fast = _as_infer(p)  # no autograd inside: the inference kernels
        with torch.autocast(x.device.type, enabled=False):
            xn, mean, rstd = compat.layer_norm_with_stats(x, ln_w, ln_b, eps)
            h = linear_t(xn.to(cdt), w1.to(cdt), _cast(b1, cdt), fast)  # (..., hidden)
            g = F.gelu(h)
            res = x if add_input else None
            y = linear_t(
                g, w2.to(cdt), _cast(b2, cdt), fast, residual=res if res is not None and cdt == x.dtype else None
            )
            if res is not None and cdt != x.dtype:
                y = res + y  # fp32 residual stream + low-precision branch, as under autocast
        ctx.save_for_backward(x, mean, rstd, h, ln_w, ln_b, w1, b1, w2, b2)
        ctx.eps, ctx.add_input, ctx.cdt, ctx.policy = eps, add_input, cdt, p
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple:  # type: ignore[override]
        x, mean, rstd, h, ln_w, ln_b, w1, b1, w2, b2 = ctx.saved_tensors
        cdt, p = ctx.cdt, ctx.policy
        need = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            # 2-D rows throughout: the incoming gradient may be an expanded view (e.g. from the head's mean), which a
            # batched matmul against a weight would turn into one weight copy per batch row.
            dy = _rows(dout.to(cdt))
            g = F.gelu(h)  # recomputed
            dw2, db2 = _weight_grads(dy, g, w2, b2, need[6], need[7], p)
            del g
            dh = _input_grad(dy, w2.to(cdt), p)
            compat.gelu_backward_(dh, _rows(h))  # in place: one hidden-wide buffer
            xn = compat.layer_norm_with_stats(x, ln_w, ln_b, ctx.eps)[0].to(cdt)  # recomputed
            dw1, db1 = _weight_grads(dh, xn, w1, b1, need[4], need[5], p)
            del xn
            dxn = _input_grad(dh, w1.to(cdt), p).to(x.dtype).view(x.shape)
            del dh
            res = dout if ctx.add_input else None
            dx, dlnw, dlnb = _norm_backward(dxn, x, mean, rstd, ln_w, ln_b, need, res, ctx.eps)
        return dx, dlnw, dlnb, None, dw1, db1, dw2, db2, None, None, None


def ln_mlp(x: Tensor, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear, add_input: bool, p: Policy) -> Tensor:
    """Training form of ``[x +] fc2(gelu(fc1(norm(x))))`` with the memory-saving backward of :class:`_LnMlp`."""
    w = (norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    return _LnMlp.apply(x, *w, add_input, _compute_dtype(x), p)


class _DwConvResidual(torch.autograd.Function):
    """``x + dwconv(x)`` on ``(B, H, W, C)`` tokens (the position encoding), in the dtype autocast would use.

    The backward takes the input gradient as a forward depthwise conv with the flipped kernel (the same sums; 2-3x
    faster than ``convolution_backward``'s input gradient on the stage-1 map, bf16, 1 thread) and adds it to the
    residual's gradient in one promoting pass (autograd: a cast to fp32, then an add).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, padding: int) -> Tensor:  # type: ignore[override]
        cdt = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(cdt).permute(0, 3, 1, 2), w.to(cdt)  # (B, C, H, W) view of channels-last memory
            y = F.conv2d(xc, wc, _cast(b, cdt), padding=padding, groups=w.shape[0]).permute(0, 2, 3, 1)
            out = x + y  # the fp32 residual stream + the low-precision branch, as under autocast
        ctx.save_for_backward(xc, wc, w, b)
        ctx.padding = padding
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple:  # type: ignore[override]
        xc, wc, w, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        pad, groups = ctx.padding, w.shape[0]
        with torch.autocast(dout.device.type, enabled=False):
            dy = dout.to(wc.dtype).permute(0, 3, 1, 2)
            dx = None
            if need[0]:
                dxc = F.conv2d(dy, wc.flip(2, 3), None, padding=pad, groups=groups)
                dx = dout + dxc.permute(0, 2, 3, 1)
            mask = [False, need[1], need[2] and b is not None]
            dw = db = None
            if mask[1] or mask[2]:
                _, dw, db = torch.ops.aten.convolution_backward(
                    dy, xc, wc, [groups], [1, 1], [pad, pad], [1, 1], False, [0, 0], groups, mask
                )
        return dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype), None


def dwconv_residual(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Training form of ``x + conv(x)`` for a depthwise, stride-1, 'same'-padded ``conv`` on ``(B, H, W, C)`` tokens
    (:class:`_DwConvResidual`)."""
    return _DwConvResidual.apply(x, conv.weight, conv.bias, conv.padding[0])


# ------------------------------------------------------------------------------------------ attention branches
class WindowCore:
    """Window attention on ``(B, H, W, C)`` maps: pad to the window, partition, multi-head attention per window."""

    def __init__(self, window_size: int, num_heads: int) -> None:
        self.ws, self.heads = window_size, num_heads

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, H, W, C) -> (B*nW, ws*ws, C)``: zero-pad right/bottom (after the norm, as official), partition."""
        return window_partition(pad_to_multiple(x, self.ws), self.ws)

    def untokens(self, t: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`tokens` (cropping the padding): ``(B*nW, ws*ws, C) -> (B, H, W, C)``."""
        B, H, W, _ = shape
        Hp, Wp = -(-H // self.ws) * self.ws, -(-W // self.ws) * self.ws
        x = window_reverse(t, self.ws, Hp, Wp)
        return x[:, :H, :W, :] if (Hp, Wp) != (H, W) else x

    def _qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_heads_ref(qkv, self.heads)

    def attend(self, qkv: Tensor) -> Tensor:
        """``(Bw, N, 3C) -> (Bw, N, C)``."""
        q, k, v = self._qkv(qkv)
        Bw, h, N, d = q.shape
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(Bw, N, h * d)

    def recompute(self, qkv: Tensor) -> tuple[Tensor, Tensor]:
        """The attention probabilities ``(Bw, h, N, N)`` and the output ``(Bw, N, C)`` again, for the backward pass."""
        q, k, v = self._qkv(qkv)
        Bw, h, N, d = q.shape
        p = window_attention(q, k)
        return p, torch.matmul(p, v).transpose(1, 2).reshape(Bw, N, h * d)

    def attend_backward(self, qkv: Tensor, p: Tensor, dout: Tensor) -> Tensor:
        """Gradient of :meth:`attend` w.r.t. ``qkv`` given the probabilities ``p`` and the output gradient."""
        q, k, v = self._qkv(qkv)
        Bw, h, N, d = q.shape
        s = d**-0.5
        do = dout.view(Bw, N, h, d).transpose(1, 2)  # (Bw, h, N, d)
        dqkv = qkv.new_empty(Bw, N, 3, h, d)
        dqkv[:, :, 2] = torch.matmul(p.transpose(-2, -1), do).transpose(1, 2)  # dV = P^T dO
        ds = compat.softmax_backward(torch.matmul(do, v.transpose(-2, -1)), p, -1).mul_(s)
        dqkv[:, :, 0] = torch.matmul(ds, k).transpose(1, 2)  # dQ = s dS K
        dqkv[:, :, 1] = torch.matmul(ds.transpose(-2, -1), q).transpose(1, 2)  # dK = s dS^T Q
        return dqkv.view(Bw, N, 3 * h * d)


# Channel attention one image at a time (float32, CPU, eager), when the maps are large enough: per image, each
# group's q, k, v are plain strided matrices (row stride 3C) that MKL's batched GEMM reads as they lie, and the
# output GEMM writes straight into the (N, C) token layout. The batched 4-D matmuls instead copy k^T, v and q^T out
# of the qkv buffer for every image at once and then re-lay the output, which at batch 16 also spills the caches.
# Measured here (davit_tiny shapes, fp32, 2 threads): forward at batch 16, 3136 tokens x 96 channels 28.7 -> 5.9 ms,
# 784 x 192 5.2 -> 2.2 ms, 196 x 384 2.8 -> 2.0 ms; forward + backward 63 -> 35, 24 -> 9, 10.7 -> 5.8 ms; at 49
# tokens and in bf16 (oneDNN's batched GEMM copies strided operands itself) the batched form is faster, and so it
# is for a single image and on high-resolution maps, where the output GEMM's N rows of 32 columns lose to the
# batched form's N columns (batch 1 at 896x896: 790 vs 559 ms per image). The limits are Policy.channel_per_image:
# (196, 3136, 1568): maps of 14x14 to 56x56 (stage 1 at 224x224 is the largest measured to gain), and at least two
# 784-token images or eight 196-token ones.


class ChannelCore:
    """Channel group attention on ``(B, H, W, C)`` maps; tokens are the ``H*W`` positions of each image.

    With ``(a, b, c)`` = ``(k, v, q)`` (official) or ``(q, k, v)`` (Florence-2 v2): ``A = softmax(s a^T b)`` per group
    and ``out = c A^T``.
    """

    def __init__(
        self,
        num_groups: int,
        v2: bool,
        dynamic_scale: bool,
        per_image_limits: tuple[int, int, int] | None = None,
        infer_min_tokens: int | None = None,
    ) -> None:
        self.groups, self.v2, self.dynamic_scale = num_groups, v2, dynamic_scale
        self.limits = per_image_limits  # None: always the batched form (compile mode, CUDA)
        self.infer_min_tokens = infer_min_tokens  # without autograd: per image from this many tokens, fp32 and bf16

    def tokens(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C)

    def untokens(self, t: Tensor, shape: torch.Size) -> Tensor:
        return t.view(shape)

    def _roles(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor, float, tuple[int, int, int]]:
        """``(query, key, value, scale)`` as :func:`davit.models.davit.channel_roles` assigns them, and which qkv slot
        each one came from (where the backward writes its gradient)."""
        qkv3 = split_heads_ref(qkv, self.groups)  # q, k, v, each (B, G, N, Cg)
        a, b, c, s = channel_roles(*qkv3, self.v2, self.dynamic_scale)
        slots = tuple(next(i for i, t in enumerate(qkv3) if t is r) for r in (a, b, c))
        return a, b, c, s, slots  # type: ignore[return-value]

    def per_image(self, qkv: Tensor) -> bool:
        """Whether :meth:`recompute` and :meth:`attend_backward` loop over the images (see the notes above)."""
        if self.limits is None or not qkv.is_cpu or qkv.dtype not in _FLOATS:
            return False
        B, N, _ = qkv.shape
        if self.infer_min_tokens is not None and not (qkv.requires_grad and torch.is_grad_enabled()):
            return N >= self.infer_min_tokens
        lo, hi, rows = self.limits
        return qkv.dtype == torch.float32 and B >= 2 and lo <= N <= hi and B * N >= rows

    def attend(self, qkv: Tensor) -> Tensor:
        return self.recompute(qkv)[1]

    def recompute(self, qkv: Tensor) -> tuple[Tensor, Tensor]:
        """The group attention matrices ``(B, G, Cg, Cg)`` and the output ``(B, N, C)``."""
        a, b, c, s, _ = self._roles(qkv)
        B, G, N, cg = a.shape
        if self.per_image(qkv):
            p = qkv.new_empty(B, G, cg, cg)
            for i in range(B):
                torch.bmm(a[i].transpose(1, 2), b[i], out=p[i])
            p = p.mul_(s).softmax(dim=-1)
            out = qkv.new_empty(B, N, G, cg)
            for i in range(B):
                torch.bmm(c[i], p[i].transpose(1, 2), out=out[i].transpose(0, 1))  # c A^T, in token layout
            return p, out.view(B, N, G * cg)
        p = (torch.matmul(a.transpose(-2, -1), b) * s).softmax(dim=-1)  # (B, G, Cg, Cg)
        out = torch.matmul(p, c.transpose(-2, -1))  # (B, G, Cg, N): the long axis as GEMM columns
        return p, out.permute(0, 3, 1, 2).reshape(B, N, G * cg)

    def attend_backward(self, qkv: Tensor, p: Tensor, dout: Tensor) -> Tensor:
        a, b, c, s, slots = self._roles(qkv)
        B, G, N, cg = a.shape
        dqkv = qkv.new_empty(B, N, 3, G, cg)
        if self.per_image(qkv):
            do = dout.reshape(B, N, G, cg)
            for i in range(B):
                doi, pi = do[i].transpose(0, 1), p[i]  # (G, N, Cg), (G, Cg, Cg)
                torch.bmm(doi, pi, out=dqkv[i, :, slots[2]].transpose(0, 1))  # dc = dOut A
                dp = torch.bmm(doi.transpose(1, 2), c[i])
                ds = compat.softmax_backward(dp, pi, -1).mul_(s)
                torch.bmm(b[i], ds.transpose(1, 2), out=dqkv[i, :, slots[0]].transpose(0, 1))  # da = s b dS^T
                torch.bmm(a[i], ds, out=dqkv[i, :, slots[1]].transpose(0, 1))  # db = s a dS
            return dqkv.view(B, N, 3 * G * cg)
        do = dout.view(B, N, G, cg).transpose(1, 2)  # (B, G, N, Cg)
        dqkv[:, :, slots[2]] = torch.matmul(do, p).transpose(1, 2)  # dc = dOut A
        ds = compat.softmax_backward(torch.matmul(do.transpose(-2, -1), c), p, -1).mul_(s)
        dqkv[:, :, slots[0]] = torch.matmul(b, ds.transpose(-2, -1)).transpose(1, 2)  # da = s b dS^T
        dqkv[:, :, slots[1]] = torch.matmul(a, ds).transpose(1, 2)  # db = s a dS
        return dqkv.view(B, N, 3 * G * cg)


class _ChannelAttend(torch.autograd.Function):
    """``(B, N, 3C) qkv -> (B, N, C)`` channel attention through :class:`ChannelCore`'s per-image path; saves qkv and
    the small ``(B, G, Cg, Cg)`` attention matrices (autograd through the batched matmuls keeps copies of k, v, q)."""

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, core: ChannelCore) -> Tensor:  # type: ignore[override]
        p, out = core.recompute(qkv)
        ctx.save_for_backward(qkv, p)
        ctx.core = core
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple:  # type: ignore[override]
        qkv, p = ctx.saved_tensors
        return ctx.core.attend_backward(qkv, p, dout), None


def channel_attend(qkv: Tensor, core: ChannelCore) -> Tensor | None:
    """Channel attention of ``(B, N, 3C)`` qkv through the per-image path, or None where the batched ops are faster
    (then the caller runs those)."""
    if not core.per_image(qkv):
        return None
    with torch.autocast("cpu", enabled=False):
        if qkv.requires_grad:
            return _ChannelAttend.apply(qkv, core)
        return core.recompute(qkv)[1]


class _AttnBranch(torch.autograd.Function):
    """``[x +] proj(attention(qkv(layer_norm(x))))``; saves x, the norm's statistics and qkv (3 token-widths)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        ln_w: Tensor | None,
        ln_b: Tensor | None,
        eps: float,
        wqkv: Tensor,
        bqkv: Tensor | None,
        wp: Tensor,
        bp: Tensor | None,
        add_input: bool,
        cdt: torch.dtype,
        core: Any,
        p: Policy,
    ) -> Tensor:
        fast = _as_infer(p)  # no autograd inside: the inference kernels
        with torch.autocast(x.device.type, enabled=False):
            xn, mean, rstd = compat.layer_norm_with_stats(x, ln_w, ln_b, eps)
            qkv = linear_t(core.tokens(xn.to(cdt)), wqkv.to(cdt), _cast(bqkv, cdt), fast)
            del xn
            y = linear_t(core.attend(qkv), wp.to(cdt), _cast(bp, cdt), fast)
            y = core.untokens(y, x.shape)
            if add_input:
                y = x + y
        ctx.save_for_backward(x, mean, rstd, qkv, ln_w, ln_b, wqkv, bqkv, wp, bp)
        ctx.eps, ctx.add_input, ctx.cdt, ctx.core, ctx.policy = eps, add_input, cdt, core, p
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple:  # type: ignore[override]
        x, mean, rstd, qkv, ln_w, ln_b, wqkv, bqkv, wp, bp = ctx.saved_tensors
        cdt, core, pol = ctx.cdt, ctx.core, ctx.policy
        need = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            dy = core.tokens(dout.to(cdt))  # (T, n, C): zero gradient on padded tokens
            probs, o = core.recompute(qkv)  # attention probabilities and output, recomputed once
            dwp, dbp = _weight_grads(dy, o, wp, bp, need[6], need[7], pol)
            del o
            do = _input_grad(dy, wp.to(cdt), pol)
            del dy
            dqkv = core.attend_backward(qkv, probs, do)
            del do, probs
            xn = core.tokens(compat.layer_norm_with_stats(x, ln_w, ln_b, ctx.eps)[0].to(cdt))  # recomputed
            dwqkv, dbqkv = _weight_grads(dqkv, xn, wqkv, bqkv, need[4], need[5], pol)
            del xn
            dxn = core.untokens(_input_grad(dqkv, wqkv.to(cdt), pol), x.shape).to(x.dtype)
            del dqkv
            res = dout if ctx.add_input else None
            dx, dlnw, dlnb = _norm_backward(dxn, x, mean, rstd, ln_w, ln_b, need, res, ctx.eps)
        return dx, dlnw, dlnb, None, dwqkv, dbqkv, dwp, dbp, None, None, None, None


def attn_branch(
    x: Tensor, norm: nn.LayerNorm, qkv: nn.Linear, proj: nn.Linear, core: Any, add_input: bool, p: Policy
) -> Tensor:
    """Training form of ``[x +] proj(attn(qkv(norm(x))))`` (window or channel attention, per ``core``)."""
    w = (norm.weight, norm.bias, norm.eps, qkv.weight, qkv.bias, proj.weight, proj.bias)
    return _AttnBranch.apply(x, *w, add_input, _compute_dtype(x), core, p)


@functools.lru_cache(maxsize=16)
def _as_infer(p: Policy) -> Policy:
    """The inference form of a training policy, for the forward passes of the custom functions (no autograd)."""
    return p.replace(mode="infer", memory_saving="none")
