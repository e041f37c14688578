"""Fused operations: oneDNN epilogues for CPU inference, and hand-written backward passes for training.

Inference (:func:`linear`): bias, exact GELU and a residual addition run inside the oneDNN GEMM on CPU, bit-identical
to the separate ops, with no bias-broadcast copy and no extra passes over the widest activations.

Training, opt-in through ``DaViT.set_memory_saving`` (:func:`ln_mlp`, :func:`attn_branch`): custom autograd
functions for a block's two residual branches. Autograd through the separate ops keeps the normalised tokens, the
GELU input *and* output, qkv, the scaled queries and the attention probabilities alive until the backward pass;
these functions keep only the branch input (with the norm's two statistics per token), the GELU input and qkv, and
recompute the rest in the backward pass: the MLP stores 5 instead of 10 token-widths, a window-attention branch 4
instead of about 8.5 (fp32). The price is the recomputation (2-10% of a CPU training step), which is why it is not
the default. The forward passes no longer need autograd, so they take the fused inference kernels.

Mixed precision: under autocast the functions do what autocast does to the separate ops (LayerNorm in fp32, the
GEMMs, GELU and attention in the autocast dtype, the residual stream in fp32) with explicit casts, and the backward
pass uses the same dtypes. Gradients match autograd through the separate ops to rounding (``tests/test_fused.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .windows import _tracing, pad_to_multiple, window_partition, window_reverse

__all__ = [
    "ChannelCore",
    "WindowCore",
    "attn_branch",
    "channel_attend",
    "linear",
    "linear_t",
    "ln_mlp",
    "prepack_linears",
    "split_heads",
    "use_fused_training",
]

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


if _HAS_ONEDNN:
    # torch.compile can trace the fused Linear + residual op only with a fake-tensor rule, which torch does not ship
    # (it emits the op itself, after tracing); the rule is its output shape. See _compiled_onednn.
    try:

        @torch.library.register_fake("mkldnn::_linear_pointwise.binary")
        def _linear_binary_fake(x: Tensor, other: Tensor, w: Tensor, b: Tensor | None, attr: str) -> Tensor:
            return x.new_empty((*x.shape[:-1], w.shape[0]))

    except RuntimeError:  # a later torch registers its own
        pass


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# MKL runs its AVX2 SGEMM kernels on non-Intel CPUs, while oneDNN uses AVX-512 wherever the CPU has it: on a 2-core
# AMD EPYC (Zen 4) fp32 GEMMs measured MKL 156-169 vs oneDNN 206-210 GFLOP/s. There fp32 GEMMs that oneDNN runs
# faster go through it: in training the forward (bias in its epilogue), the input gradient and the weight gradient
# over few rows; under torch.compile every inference Linear, not only those over many rows. On Intel CPUs MKL and
# oneDNN run fp32 at the same rate, and the plain ops (MKL) are kept where they were measured faster.
ONEDNN_FP32 = _HAS_ONEDNN and _cpu_vendor() not in ("", "GenuineIntel")


def _cpu_inference(x: Tensor, weight: Tensor) -> bool:
    """CPU tensors, oneDNN present, no autograd recording (oneDNN's fused ops have no backward), no ONNX export."""
    if not _HAS_ONEDNN or not x.is_cpu or torch.onnx.is_in_onnx_export():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def _onednn_ok(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` may call oneDNN directly: CPU inference in eager mode, float32 or bfloat16."""
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or not _cpu_inference(x, weight):
        return False
    return weight.dtype in (torch.float32, torch.bfloat16)


def linear(x: Tensor, fc: nn.Linear, gelu: bool = False, residual: Tensor | None = None) -> Tensor:
    """``fc(x)``, optionally followed by exact (erf) GELU or preceded by ``residual +``, in one oneDNN call on CPU.

    Uses ``fc.packed_weight`` (set by :func:`prepack_linears` on ``davit.optimize``'s own copy) when present.
    """
    if _compiled_onednn(x, fc.weight):
        return _onednn_linear_2d(x, fc.weight, fc.bias, gelu, residual)
    packed = getattr(fc, "packed_weight", None)
    if (
        packed is not None
        and x.dtype == packed.dtype
        and _onednn_ok(x, fc.weight)
        and not torch.is_autocast_enabled("cpu")
    ):
        return _onednn_linear(x, packed, fc.bias, gelu, residual)
    return linear_t(x, fc.weight, fc.bias, gelu, residual)


def prepack_linears(model: nn.Module, rows_hint: int = 49) -> int:
    """Give every ``nn.Linear`` of ``model`` a copy of its weight in oneDNN's blocked layout (``packed_weight``).

    Without it oneDNN re-lays-out the weight on every call: packed, the Linears of a batch-1 forward are 20-30%
    faster in bf16 and 10-18% in fp32, with bit-identical results. The packed copy is a snapshot: only for a model
    that will not be trained or changed afterwards (``davit.optimize`` packs its own copy). Returns how many.
    """
    n = 0
    if not _HAS_ONEDNN or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return n
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.is_cpu and m.weight.dtype in (torch.float32, torch.bfloat16):
            m.packed_weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows_hint)
            n += 1
    return n


def linear_t(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool = False, residual: Tensor | None = None) -> Tensor:
    """:func:`linear` on raw tensors.

    Why: ``F.linear`` first copies the broadcast bias into a fresh output and then accumulates the GEMM onto it, and
    GELU is one more full pass over the widest activation; oneDNN adds the bias and applies GELU inside the GEMM, which
    makes the stage-1/2 Linears (small K, huge M) up to 2x faster with identical results; a residual added in the
    GEMM's epilogue saves one more pass (float addition commutes, so ``residual + y`` is bit-identical). Autograd,
    ``torch.compile``, ``torch.export`` and ONNX export take the plain path.
    """
    if _onednn_ok(x, w):
        if torch.is_autocast_enabled("cpu"):
            dt = torch.get_autocast_dtype("cpu")
            if dt != torch.bfloat16:
                return _plain_linear(x, w, b, gelu, residual)
            # What autocast would do for F.linear: compute in bf16 (the residual stream stays fp32, added outside).
            x, w, b = x.to(dt), w.to(dt), (None if b is None else b.to(dt))
        elif x.dtype != w.dtype:
            return _plain_linear(x, w, b, gelu, residual)
        return _onednn_linear(x, w, b, gelu, residual)
    return _plain_linear(x, w, b, gelu, residual)


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool, residual: Tensor | None) -> Tensor:
    if residual is not None and not gelu and residual.dtype == x.dtype and residual.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
    y = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [], "none" if gelu else "")
    return y if residual is None else residual + y


# Under torch.compile with frozen weights, Inductor sends fp32 Linears to MKL's packed SGEMM, with the bias, GELU and
# residual as separate passes; oneDNN with those in its epilogue is faster wherever the rows amortise its per-call
# weight re-layout (fp32, davit_tiny 224, same-process A/B: batch 32 -8.5% per batch with every Linear on oneDNN;
# batch 1 -5.6% with the >= 784-row stage-1/2 Linears, +5% with all). Where MKL's fp32 GEMM is the slower one (see
# ONEDNN_FP32) every Linear goes to oneDNN: batch 1 69.2 -> 59.0 ms on the AMD EPYC, batch 32 unchanged (all its
# Linears have >= 512 rows). bf16 already takes Inductor's oneDNN path.
_COMPILED_ONEDNN_MIN_ROWS = 512


def _compiled_onednn(x: Tensor, w: Tensor) -> bool:
    """Whether an fp32 CPU inference Linear being compiled (not exported) should be traced as oneDNN's fused op."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting() or not _cpu_inference(x, w):
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    # Read at trace time, so the one ONEDNN_FP32 switch governs training and compile alike.
    return ONEDNN_FP32 or x.numel() >= _COMPILED_ONEDNN_MIN_ROWS * x.shape[-1]


def _onednn_linear_2d(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool, residual: Tensor | None) -> Tensor:
    """:func:`_onednn_linear` on the rows of ``x`` (Inductor lowers the oneDNN op only for 2-D inputs)."""
    r = None if residual is None else residual.reshape(-1, residual.shape[-1])
    y = _onednn_linear(x.reshape(-1, x.shape[-1]), w, b, gelu, r)
    return y.view(*x.shape[:-1], y.shape[-1])


# Narrow inputs over many rows (the stage-1 Linears, K = 96): there F.linear's bias-broadcast copy into the output
# costs as much as the GEMM itself (fp32 (50176 x 96) @ (96 x 384): 21 ms vs 14 ms through oneDNN with the bias in its
# epilogue). Wider inputs gain nothing on Intel CPUs (oneDNN is slower than MKL there without pre-packed weights).
_BIAS_FUSED_MAX_K = 128
_BIAS_FUSED_MIN_ROWS = 8192


# Weight gradients over at most this many rows (stage 4 at batch 16: 784) are as fast or faster through oneDNN on
# the AMD EPYC (170-189 vs MKL's 133-186 GFLOP/s over two runs); over more rows MKL's reduction is faster (3136
# rows: 179-190 vs 147-194, 12544 and 50176 rows: MKL by 1.1-3x).
_ONEDNN_DW_MAX_ROWS = 2048


def _onednn_fp32(t: Tensor, w: Tensor) -> bool:
    return ONEDNN_FP32 and t.dtype == torch.float32 and w.dtype == torch.float32 and t.is_cpu


def _bias_fused_training(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Whether a training-mode Linear should run its forward as one oneDNN call (CPU, autograd recording, eager)."""
    if not x.is_cpu or not _HAS_ONEDNN:
        return False
    # Tracing first: comparing a symbolic size would add a guard to an exported program.
    if _tracing() or not torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    cdt = _compute_dtype(x)
    if cdt == torch.float32 and _onednn_fp32(x, w):
        return True
    if b is None or w.shape[1] > _BIAS_FUSED_MAX_K or x.numel() < _BIAS_FUSED_MIN_ROWS * w.shape[1]:
        return False
    return cdt in (torch.float32, torch.bfloat16) and w.dtype in (torch.float32, torch.bfloat16)


def _input_grad(dy: Tensor, w: Tensor) -> Tensor:
    """``dy @ w`` on the rows of ``dy`` (a Linear's input gradient), through oneDNN where it is faster (see above)."""
    dy2 = _rows(dy)
    if _onednn_fp32(dy2, w):
        # The transposed weight as a strided view: oneDNN re-lays the weight out anyway (a copy first cost 5-15%).
        dx = torch.ops.mkldnn._linear_pointwise(dy2.contiguous(), w.t(), None, "none", [], "")
    else:
        dx = dy2 @ w
    return dx.view(*dy.shape[:-1], w.shape[1])


class _BiasFusedLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` with the bias added in oneDNN's epilogue; the backward is autograd's (two GEMMs and a
    row sum), in the dtype autocast would use."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        cdt = _compute_dtype(x)
        with torch.autocast("cpu", enabled=False):
            xc, wc = x.to(cdt), w.to(cdt)
            y = torch.ops.mkldnn._linear_pointwise(xc, wc, _cast(b, cdt), "none", [], "")
        ctx.save_for_backward(xc, wc, w, b)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:  # type: ignore[override]
        xc, wc, w, b = ctx.saved_tensors
        dy = dy.to(wc.dtype)
        dx = _input_grad(dy, wc).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw, db = _weight_grads(dy, xc, w, b, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return dx, dw, db


def _plain_linear(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool, residual: Tensor | None) -> Tensor:
    y = _BiasFusedLinear.apply(x, w, b) if _bias_fused_training(x, w, b) else F.linear(x, w, b)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y


# ------------------------------------------------------------------------------------------------------- training
def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, N, 3*C)`` -> q, k, v, each ``(B, heads, N, C/heads)`` (views).

    Under autograd the backward writes the three gradients straight into one ``(B, N, 3*C)`` buffer; autograd's own
    backward of ``view/permute/unbind`` stacks them and then copies the stack into that layout (two passes over the
    widest gradient of the attention instead of one: ~25 ms of a 2 s fp32 training step at batch 16).
    """
    B, N, C3 = qkv.shape
    if use_fused_training(qkv):
        return _SplitHeads.apply(qkv, heads)
    return qkv.view(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


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


def use_fused_training(x: Tensor, *params: Tensor) -> bool:
    """Whether a block should take the custom-autograd path: autograd is recording and nothing is being traced."""
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return not _tracing()


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


def _weight_grads(dy: Tensor, inp: Tensor, w: Tensor, b: Tensor | None, need_w: bool, need_b: bool) -> tuple:
    """``dW = dy^T inp`` and ``db = sum(dy)`` in the parameters' dtype (None where not needed).

    For a Linear that widens (in < out) MKL is faster on ``(inp^T dy)^T``, autograd's own orientation (fp32
    (50176 x 96) inputs, 384 outputs: 12.8 vs 17.0 ms); for one that narrows, on ``dy^T inp`` (13.3 vs 14.6 ms).
    """
    dy2, inp2 = _rows(dy), _rows(inp)
    if need_w:
        if _onednn_fp32(dy2, inp2) and dy2.shape[0] <= _ONEDNN_DW_MAX_ROWS:
            dw = torch.ops.mkldnn._linear_pointwise(dy2.t(), inp2.t(), None, "none", [], "")
        elif inp2.shape[1] < dy2.shape[1]:
            dw = (inp2.t() @ dy2).t()
        else:
            dw = dy2.t() @ inp2
        dw = dw.to(w.dtype).contiguous()
    else:
        dw = None
    db = dy2.sum(0).to(b.dtype) if (need_b and b is not None) else None
    return dw, db


def _norm_backward(
    dxn: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    need: tuple[bool, ...],
    residual_grad: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """LayerNorm's backward from the saved input and statistics (``need[:3]``: x, weight, bias), plus the gradient
    that reaches ``x`` directly through the residual when the branch added its input."""
    mask = [need[0], need[1] and w is not None, need[2] and b is not None]
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(dxn.contiguous(), x, [x.shape[-1]], mean, rstd, w, b, mask)
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
    ) -> Tensor:
        C = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            xn, mean, rstd = torch.native_layer_norm(x, (C,), ln_w, ln_b, eps)
            h = linear_t(xn.to(cdt), w1.to(cdt), _cast(b1, cdt))  # (..., hidden)
            g = F.gelu(h)
            res = x if add_input else None
            y = linear_t(g, w2.to(cdt), _cast(b2, cdt), residual=res if (res is not None and cdt == x.dtype) else None)
            if res is not None and cdt != x.dtype:
                y = res + y  # fp32 residual stream + low-precision branch, as under autocast
        ctx.save_for_backward(x, mean, rstd, h, ln_w, ln_b, w1, b1, w2, b2)
        ctx.eps, ctx.add_input, ctx.cdt = eps, add_input, cdt
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple:  # type: ignore[override]
        x, mean, rstd, h, ln_w, ln_b, w1, b1, w2, b2 = ctx.saved_tensors
        cdt, C = ctx.cdt, x.shape[-1]
        need = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            # 2-D rows throughout: the incoming gradient may be an expanded view (e.g. from the head's mean), which a
            # batched matmul against a weight would turn into one weight copy per batch row.
            dy = _rows(dout.to(cdt))
            g = F.gelu(h)  # recomputed
            dw2, db2 = _weight_grads(dy, g, w2, b2, need[6], need[7])
            del g
            dh = _input_grad(dy, w2.to(cdt))
            torch.ops.aten.gelu_backward.grad_input(dh, _rows(h), grad_input=dh)  # in place: one hidden-wide buffer
            xn = torch.native_layer_norm(x, (C,), ln_w, ln_b, ctx.eps)[0].to(cdt)  # recomputed
            dw1, db1 = _weight_grads(dh, xn, w1, b1, need[4], need[5])
            del xn
            dxn = _input_grad(dh, w1.to(cdt)).to(x.dtype).view(x.shape)
            del dh
            dx, dlnw, dlnb = _norm_backward(dxn, x, mean, rstd, ln_w, ln_b, need, dout if ctx.add_input else None)
        return dx, dlnw, dlnb, None, dw1, db1, dw2, db2, None, None


def ln_mlp(x: Tensor, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear, add_input: bool) -> Tensor:
    """Training form of ``[x +] fc2(gelu(fc1(norm(x))))`` with the memory-saving backward of :class:`_LnMlp`."""
    return _LnMlp.apply(
        x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, add_input, _compute_dtype(x)
    )


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
        x = window_reverse(t, self.ws, B, Hp, Wp)
        return x[:, :H, :W, :] if (Hp, Wp) != (H, W) else x

    def _qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        Bw, N, C3 = qkv.shape
        return qkv.view(Bw, N, 3, self.heads, C3 // (3 * self.heads)).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, qkv: Tensor) -> Tensor:
        """``(Bw, N, 3C) -> (Bw, N, C)``."""
        q, k, v = self._qkv(qkv)
        Bw, h, N, d = q.shape
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(Bw, N, h * d)

    def recompute(self, qkv: Tensor) -> tuple[Tensor, Tensor]:
        """The attention probabilities ``(Bw, h, N, N)`` and the output ``(Bw, N, C)`` again, for the backward pass."""
        q, k, v = self._qkv(qkv)
        Bw, h, N, d = q.shape
        p = (torch.matmul(q, k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1)
        return p, torch.matmul(p, v).transpose(1, 2).reshape(Bw, N, h * d)

    def attend_backward(self, qkv: Tensor, p: Tensor, dout: Tensor) -> Tensor:
        """Gradient of :meth:`attend` w.r.t. ``qkv`` given the probabilities ``p`` and the output gradient."""
        q, k, v = self._qkv(qkv)
        Bw, h, N, d = q.shape
        s = d**-0.5
        do = dout.view(Bw, N, h, d).transpose(1, 2)  # (Bw, h, N, d)
        dqkv = qkv.new_empty(Bw, N, 3, h, d)
        dqkv[:, :, 2] = torch.matmul(p.transpose(-2, -1), do).transpose(1, 2)  # dV = P^T dO
        ds = torch._softmax_backward_data(torch.matmul(do, v.transpose(-2, -1)), p, -1, p.dtype).mul_(s)
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
# batched form's N columns (batch 1 at 896x896: 790 vs 559 ms per image).
_CA_PER_IMAGE_MIN_TOKENS = 196
_CA_PER_IMAGE_MAX_TOKENS = 3136  # 56x56, stage 1 at 224x224: the largest map measured to gain
_CA_PER_IMAGE_MIN_ROWS = 1568  # batch x tokens: two 784-token images, eight 196-token ones


class ChannelCore:
    """Channel group attention on ``(B, H, W, C)`` maps; tokens are the ``H*W`` positions of each image.

    With ``(a, b, c)`` = ``(k, v, q)`` (official) or ``(q, k, v)`` (Florence-2 v2): ``A = softmax(s a^T b)`` per group
    and ``out = c A^T``.
    """

    def __init__(self, num_groups: int, v2: bool, dynamic_scale: bool) -> None:
        self.groups, self.v2, self.dynamic_scale = num_groups, v2, dynamic_scale

    def tokens(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C)

    def untokens(self, t: Tensor, shape: torch.Size) -> Tensor:
        return t.view(shape)

    def _roles(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor, float, tuple[int, int, int]]:
        B, N, C3 = qkv.shape
        cg = C3 // (3 * self.groups)
        q, k, v = qkv.view(B, N, 3, self.groups, cg).permute(2, 0, 3, 1, 4).unbind(0)  # (B, G, N, Cg)
        if self.v2:
            return q, k, v, (N**-0.5 if self.dynamic_scale else cg**-0.5), (0, 1, 2)
        return k, v, q, cg**-0.5, (1, 2, 0)

    def per_image(self, qkv: Tensor) -> bool:
        """Whether :meth:`recompute` and :meth:`attend_backward` loop over the images (see the notes above)."""
        # Tracing first: a size comparison on a symbolic batch would turn into a guard that pins it.
        if _tracing() or qkv.dtype != torch.float32 or not qkv.is_cpu:
            return False
        B, N, _ = qkv.shape
        if B < 2 or not _CA_PER_IMAGE_MIN_TOKENS <= N <= _CA_PER_IMAGE_MAX_TOKENS:
            return False
        return B * N >= _CA_PER_IMAGE_MIN_ROWS

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
                ds = torch._softmax_backward_data(dp, pi, -1, pi.dtype).mul_(s)
                torch.bmm(b[i], ds.transpose(1, 2), out=dqkv[i, :, slots[0]].transpose(0, 1))  # da = s b dS^T
                torch.bmm(a[i], ds, out=dqkv[i, :, slots[1]].transpose(0, 1))  # db = s a dS
            return dqkv.view(B, N, 3 * G * cg)
        do = dout.view(B, N, G, cg).transpose(1, 2)  # (B, G, N, Cg)
        dqkv[:, :, slots[2]] = torch.matmul(do, p).transpose(1, 2)  # dc = dOut A
        ds = torch._softmax_backward_data(torch.matmul(do.transpose(-2, -1), c), p, -1, p.dtype).mul_(s)
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
        if use_fused_training(qkv):
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
    ) -> Tensor:
        C = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            xn, mean, rstd = torch.native_layer_norm(x, (C,), ln_w, ln_b, eps)
            qkv = linear_t(core.tokens(xn.to(cdt)), wqkv.to(cdt), _cast(bqkv, cdt))
            del xn
            y = linear_t(core.attend(qkv), wp.to(cdt), _cast(bp, cdt))
            y = core.untokens(y, x.shape)
            if add_input:
                y = x + y
        ctx.save_for_backward(x, mean, rstd, qkv, ln_w, ln_b, wqkv, bqkv, wp, bp)
        ctx.eps, ctx.add_input, ctx.cdt, ctx.core = eps, add_input, cdt, core
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple:  # type: ignore[override]
        x, mean, rstd, qkv, ln_w, ln_b, wqkv, bqkv, wp, bp = ctx.saved_tensors
        cdt, core, C = ctx.cdt, ctx.core, x.shape[-1]
        need = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            dy = core.tokens(dout.to(cdt))  # (T, n, C): zero gradient on padded tokens
            p, o = core.recompute(qkv)  # attention probabilities and output, recomputed once
            dwp, dbp = _weight_grads(dy, o, wp, bp, need[6], need[7])
            del o
            do = _input_grad(dy, wp.to(cdt))
            del dy
            dqkv = core.attend_backward(qkv, p, do)
            del do, p
            xn = core.tokens(torch.native_layer_norm(x, (C,), ln_w, ln_b, ctx.eps)[0].to(cdt))  # recomputed
            dwqkv, dbqkv = _weight_grads(dqkv, xn, wqkv, bqkv, need[4], need[5])
            del xn
            dxn = core.untokens(_input_grad(dqkv, wqkv.to(cdt)), x.shape).to(x.dtype)
            del dqkv
            dx, dlnw, dlnb = _norm_backward(dxn, x, mean, rstd, ln_w, ln_b, need, dout if ctx.add_input else None)
        return dx, dlnw, dlnb, None, dwqkv, dbqkv, dwp, dbp, None, None, None


def attn_branch(x: Tensor, norm: nn.LayerNorm, qkv: nn.Linear, proj: nn.Linear, core: Any, add_input: bool) -> Tensor:
    """Training form of ``[x +] proj(attn(qkv(norm(x))))`` (window or channel attention, per ``core``)."""
    return _AttnBranch.apply(
        x,
        norm.weight,
        norm.bias,
        norm.eps,
        qkv.weight,
        qkv.bias,
        proj.weight,
        proj.bias,
        add_input,
        _compute_dtype(x),
        core,
    )
