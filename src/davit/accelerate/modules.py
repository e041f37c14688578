"""Fast sub-modules and the installer that swaps them in place.

Each fast class subclasses a reference class of :mod:`davit.models.davit` and adds no parameters or buffers, so
installing is a class swap (``module.__class__ = Fast...``) with the same ``state_dict``, the same module names and
the same checkpoints; :func:`uninstall` swaps back. Which kernels a module runs is decided when it is installed, by
the :class:`~davit.accelerate.policy.Policy` stored on it; within a mode only what the call itself carries is looked at
(autocast dtype, whether autograd records, tensor sizes for the per-image channel attention).

A module is only swapped when it is exactly the reference: its Linears, norms and convs are plain ``nn.Linear`` /
``nn.LayerNorm`` / ``nn.Conv2d`` without hooks or parametrizations. A block wrapped by PEFT LoRA, quantised, hooked
(``davit.explain``'s attention hooks too) or parametrised keeps the reference ``forward``, which calls every
sub-module: the fast kernels read weights directly and would bypass such wrappers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..models.davit import (
    ChannelAttention,
    ChannelBlock,
    ConvPosEnc,
    Downsample,
    Mlp,
    SpatialBlock,
    WindowAttention,
    channel_attention,
    merge_heads,
    pad_to_multiple,
    window_attention,
    window_partition,
    window_reverse,
)
from . import compat
from .kernels import (
    ChannelCore,
    WindowCore,
    attn_branch,
    channel_attend,
    dwconv_residual,
    linear,
    ln_mlp,
    packed_weight,
    patch_weight,
    split_heads,
    window_attend,
)
from .policy import Policy, accelerate_enabled

__all__ = ["install", "installed", "uninstall"]

log = logging.getLogger(__name__)

_FLOATS = (torch.float32, torch.bfloat16)


def _records_grad(x: Tensor, *params: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def _drop_path_add(residual: Tensor, y: Tensor, prob: float, training: bool) -> Tensor:
    """``residual + drop_path(y)`` with the mask applied in the same pass (``addcmul``)."""
    if prob == 0.0 or not training:
        return residual + y
    keep = 1.0 - prob
    mask = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep).div_(keep)
    return torch.addcmul(residual, y, mask)


class FastConvPosEnc(ConvPosEnc):
    """Inference on the CPU: the residual is added in oneDNN's conv epilogue (one pass instead of two, same values).
    CPU training: :func:`~davit.accelerate.kernels.dwconv_residual` (input gradient as a forward conv, fewer casts)."""

    _policy: Policy

    def forward(self, x: Tensor) -> Tensor:
        p, w = self._policy, self.proj.weight
        if p.mode == "train" and x.is_cpu and x.dtype in _FLOATS and w.dtype in _FLOATS and _records_grad(x, w):
            conv = self.proj
            if (
                conv.stride == (1, 1)
                and conv.dilation == (1, 1)
                and conv.padding == (1, 1)
                and conv.groups == w.shape[0]
            ):
                return dwconv_residual(x, conv)
        if (
            p.mode == "infer"
            and p.onednn
            and x.is_cpu
            and x.dtype == w.dtype
            and w.dtype in _FLOATS
            and x.is_contiguous()
            and not torch.is_autocast_enabled("cpu")
        ):
            xc = x.permute(0, 3, 1, 2)  # (B, C, H, W) view, channels_last memory
            return compat.conv_add(xc, w, self.proj.bias, 1, self.proj.groups).permute(0, 2, 3, 1)
        return super().forward(x)


class _FastBlock:
    """The dual-block skeleton with fused kernels: the residual goes into the branch's last GEMM where stochastic
    depth is off, and in training the branches may run as memory-saving custom functions (``policy.memory_saving``)."""

    _policy: Policy
    cpe1: nn.Module
    cpe2: nn.Module
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm | None
    mlp: Any
    attn: Any
    drop_path: Any
    training: bool

    def _core(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def fast_mix(self, x: Tensor, residual: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        p = self._policy
        x = self.cpe1(x)  # (B, H, W, C)
        prob = self.drop_path.prob
        add = prob == 0.0 or not self.training  # the residual can go into the branch
        saving = p.memory_saving if _records_grad(x, self.norm1.weight) else "none"
        if saving == "all":
            y = attn_branch(x, self.norm1, self.attn.qkv, self.attn.proj, self._core(), add, p)
        else:
            y = self.fast_mix(self.norm1(x), x if add else None)
        x = y if add else _drop_path_add(x, y, prob, self.training)
        x = self.cpe2(x)
        if self.mlp is None or self.norm2 is None:
            return x
        if saving != "none":
            y = ln_mlp(x, self.norm2, self.mlp.fc1, self.mlp.fc2, add, p)
        else:
            h = linear(self.norm2(x), self.mlp.fc1, p, gelu=True)
            y = linear(h, self.mlp.fc2, p, residual=x if add else None)
        return y if add else _drop_path_add(x, y, prob, self.training)


class FastSpatialBlock(_FastBlock, SpatialBlock):
    """Window attention on the CPU as the explicit softmax(QK^T)V: for training (on 49-token windows it trains
    1.0-1.25x (fp32) and ~6x (bf16) faster than SDPA: ``benchmarks/attention.py``) and for inference, in cache-sized
    chunks of windows (:func:`~davit.accelerate.kernels.window_attend`); SDPA elsewhere (CUDA)."""

    def _core(self) -> WindowCore:
        return WindowCore(self.window_size, self.attn.num_heads)

    def _attend(self, x: Tensor) -> Tensor:
        a, p = self.attn, self._policy
        q, k, v = split_heads(linear(x, a.qkv, p), a.num_heads)  # each (Bw, h, N, d)
        if p.mode == "train" and x.is_cpu and _records_grad(x, a.qkv.weight):
            out = window_attention(q, k) @ v
        elif x.is_cpu and not _records_grad(x, a.qkv.weight):
            out = window_attend(q, k, v, p.window_chunk_bytes)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # scale d**-0.5, as the official code
        return linear(merge_heads(out), a.proj, p)  # (Bw, N, C)

    def fast_mix(self, x: Tensor, residual: Tensor | None) -> Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        padded = H % ws != 0 or W % ws != 0
        xp = pad_to_multiple(x, ws) if padded else x  # (B, Hp, Wp, C)
        Hp, Wp = xp.shape[1], xp.shape[2]
        if Hp == ws and Wp == ws:
            out = self._attend(xp.reshape(B, ws * ws, C)).view(B, Hp, Wp, C)  # one window: no partition copy
        else:
            out = window_reverse(self._attend(window_partition(xp, ws)), ws, Hp, Wp)  # (B, Hp, Wp, C)
        if padded:
            out = out[:, :H, :W, :]
        return out if residual is None else residual + out


class FastChannelBlock(_FastBlock, ChannelBlock):
    """Channel attention: one image at a time on large CPU maps (strided GEMMs, no copies; in inference from 196
    tokens in fp32 and bf16, in training on fp32 maps within ``Policy.channel_per_image``), the batched form
    otherwise; projection input handed over contiguous (on the transposed view torch.compile lowered the Linear to a
    batched GEMM that copied the weight on every call: bf16 compiled batch 32 -8%)."""

    def _core(self) -> ChannelCore:
        p = self._policy
        limits = p.channel_per_image if (p.device_type == "cpu" and p.mode != "compile") else None
        infer = p.channel_per_image_infer if limits is not None else None
        return ChannelCore(self.attn.num_groups, self.attn.v2, self.attn.dynamic_scale, limits, infer)

    def fast_mix(self, x: Tensor, residual: Tensor | None) -> Tensor:
        a, p = self.attn, self._policy
        B, H, W, C = x.shape
        qkv = linear(x.reshape(B, H * W, C), a.qkv, p)  # (B, N, 3C)
        out = channel_attend(qkv, self._core())  # CPU, large maps: per image; None where batched is faster
        if out is None:
            q, k, v = split_heads(qkv, a.num_groups)  # each (B, G, N, Cg)
            attn, value = channel_attention(q, k, v, a.v2, a.dynamic_scale)  # (B, G, Cg, Cg), (B, G, N, Cg)
            out = merge_heads((attn @ value.transpose(-1, -2)).transpose(-1, -2)).contiguous()  # (B, N, C)
        res = None if residual is None else residual.reshape(B, H * W, C)
        return linear(out, a.proj, p, residual=res).view(B, H, W, C)


class FastDownsample(Downsample):
    """The 2x2 stride-2 conv as one Linear over 2x2 patches (same sums, another order). Training: under autograd its
    forward + backward is 20-40% faster than the conv's from stage 2 on (fp32 and bf16). CPU inference
    (``davit.optimize``): through oneDNN with the patch weight pre-packed (``conv.packed_weight``, set by
    :func:`~davit.accelerate.kernels.prepack_linears`); the conv re-laid its weight out to channels-last on every
    call (davit_tiny 224 batch 1: ~0.7 ms of copying at stage 4 alone in bf16)."""

    _policy: Policy

    def forward(self, x: Tensor) -> Tensor:
        conv, p = self.conv, self._policy
        if conv.kernel_size != (2, 2):
            return super().forward(x)
        if _records_grad(x, conv.weight):
            if p.mode != "train":
                return super().forward(x)
            return F.linear(self._patches(x), patch_weight(conv), conv.bias)  # (B, H/2, W/2, Cout)
        packed = packed_weight(conv, x, p)
        if packed is None:
            return super().forward(x)
        return compat.linear_pointwise(self._patches(x), packed, conv.bias)

    def _patches(self, x: Tensor) -> Tensor:
        """The normalised, padded map as ``(B, H/2, W/2, 2*2*C)`` patches in ``(kh, kw, C)`` order."""
        x = pad_to_multiple(self.norm(x), 2)
        B, H, W, C = x.shape
        return x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H // 2, W // 2, 4 * C)


_FAST: dict[type, type] = {
    ConvPosEnc: FastConvPosEnc,
    SpatialBlock: FastSpatialBlock,
    ChannelBlock: FastChannelBlock,
    Downsample: FastDownsample,
}
_REFERENCE = {fast: ref for ref, fast in _FAST.items()}
# The exact (reference) types the parts of each module must have for its fast forward to be equivalent.
_PARTS: dict[type, dict[str, type]] = {
    ConvPosEnc: {"proj": nn.Conv2d},
    Mlp: {"fc1": nn.Linear, "fc2": nn.Linear},
    WindowAttention: {"qkv": nn.Linear, "proj": nn.Linear},
    ChannelAttention: {"qkv": nn.Linear, "proj": nn.Linear},
    Downsample: {"norm": nn.LayerNorm, "conv": nn.Conv2d},
}
for _blk, _attn in ((SpatialBlock, WindowAttention), (ChannelBlock, ChannelAttention)):
    _PARTS[_blk] = {"cpe1": ConvPosEnc, "cpe2": ConvPosEnc, "norm1": nn.LayerNorm, "attn": _attn}
    _PARTS[_blk].update(norm2=nn.LayerNorm, mlp=Mlp)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or parametrize.is_parametrized(m))


def _plain(m: nn.Module) -> bool:
    """Whether ``m`` and everything under it is the unmodified reference (see the module notes)."""
    for sub in m.modules():
        if _hooked(sub):
            return False
        for name, want in _PARTS.get(_REFERENCE.get(type(sub), type(sub)), {}).items():
            child = getattr(sub, name, None)
            if child is not None and _REFERENCE.get(type(child), type(child)) is not want:
                return False
    return True


def _applies(m: nn.Module) -> bool:
    """Whether a fast form exists for this configuration (the fused conv has no GELU on its branch)."""
    return not isinstance(m, ConvPosEnc) or type(m.act) is nn.Identity


def install(
    model: nn.Module,
    policy: Policy | None = None,
    *,
    mode: str = "infer",
    memory_saving: str = "none",
    enabled: bool = True,
) -> int:
    """Swap the reference DaViT modules of ``model`` for their fast forms, in place (same ``state_dict``).

    Args:
        model: any module containing DaViT blocks (a classifier, a ``features_only`` backbone, a detector...).
        policy: what to install; default :meth:`Policy.detect` for the device of ``model``'s parameters, ``mode``
            and ``memory_saving``.
        mode: ``"infer"``, ``"compile"`` or ``"train"`` (used when ``policy`` is None).
        memory_saving: ``"none"``, ``"mlp"`` or ``"all"`` (train mode; used when ``policy`` is None).
        enabled: False installs nothing (the public off switch, with the environment's ``DAVIT_ACCELERATE=0``).

    Returns:
        How many modules now run a fast forward (0 when switched off or nothing was eligible).
    """
    if not accelerate_enabled(enabled):
        log.info("acceleration off (DAVIT_ACCELERATE=0 or enabled=False): the reference modules run")
        return 0
    if policy is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        policy = Policy.detect(device, mode=mode, memory_saving=memory_saving)
    if policy.device_type not in ("cpu", "cuda"):
        return 0
    if policy.mode == "compile":
        compat.register_compile_rules()
    n = skipped = 0
    for m in model.modules():
        ref = _REFERENCE.get(type(m), type(m))
        fast = _FAST.get(ref)
        if fast is None or not _applies(m):
            continue
        if not _plain(m):
            skipped += 1
            continue
        m.__class__ = fast
        m._policy = policy
        n += 1
    if skipped:
        log.info("%d DaViT modules keep the reference forward (wrapped, hooked or parametrised sub-modules)", skipped)
    return n


def uninstall(model: nn.Module) -> int:
    """Swap every fast module of ``model`` back to its reference class; returns how many."""
    n = 0
    for m in model.modules():
        ref = _REFERENCE.get(type(m))
        if ref is not None:
            m.__class__ = ref
            m.__dict__.pop("_policy", None)
            n += 1
    return n


def installed(model: nn.Module) -> Policy | None:
    """The policy of the first fast module in ``model``, or None when it runs the reference everywhere."""
    for m in model.modules():
        if type(m) in _REFERENCE:
            return m._policy  # type: ignore[return-value]
    return None
