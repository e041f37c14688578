"""DaViT: Dual Attention Vision Transformers (Ding et al., ECCV 2022), exact to the official code.

Internally every stage keeps its tokens channels-last, as ``(B, H, W, C)``: LayerNorm, the qkv/proj/MLP Linears and
the channel attention all work on the last dimension, and the depthwise position-encoding convs see a
``permute(0, 3, 1, 2)`` view, which is an NCHW tensor in channels_last memory format, so no layout copy is needed
between the convs and the attentions. Public outputs (``forward_features``, intermediates, ``features_only``) are NCHW
as in timm.

Fidelity notes (see ``shared/reference/davit-facts.md`` sections 1 and 7):
- channel attention scales *k* by ``head_dim**-0.5`` and computes ``softmax(k^T v)`` applied to *q* (official roles);
  the Florence-2 "v2" form (standard roles, ``N**-0.5`` scale) is a config option;
- the stem norm follows its conv, the downsample norms precede theirs; inputs are zero-padded right/bottom to the
  conv stride, and window attention pads after its norm without masking the padded tokens;
- the head pools, then normalises, then classifies;
- depth counts dual blocks; drop path follows the official per-single-block schedule by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .fused import (
    ChannelCore,
    WindowCore,
    _onednn_ok,
    attn_branch,
    channel_attend,
    linear,
    ln_mlp,
    split_heads,
    use_fused_training,
)
from .windows import _tracing, pad_to_multiple, window_partition, window_reverse

__all__ = [
    "ChannelAttention",
    "ChannelBlock",
    "DaViT",
    "DaViTConfig",
    "DaViTStage",
    "SpatialBlock",
    "WindowAttention",
    "drop_path_rates",
]

# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _keep_mask(x: Tensor, prob: float) -> Tensor:
    keep = 1.0 - prob
    return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


def drop_path(x: Tensor, prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``prob``, rescaling the rest."""
    if prob == 0.0 or not training:
        return x
    return x * _keep_mask(x, prob)


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; one instance may be called twice for independent masks."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.prob, self.training)

    def add(self, residual: Tensor, x: Tensor) -> Tensor:
        """``residual + self(x)`` in one pass over the tokens (``addcmul``) instead of a multiply and an add."""
        if self.prob == 0.0 or not self.training:
            return residual + x
        return torch.addcmul(residual, x, _keep_mask(x, self.prob))

    def extra_repr(self) -> str:
        return f"prob={self.prob:.4f}"


class ConvPosEnc(nn.Module):
    """Conditional position encoding: ``x + dwconv3x3(x)`` (with bias, no norm, optional GELU on the branch)."""

    def __init__(self, dim: int, act: bool = False, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, H, W, C). The permuted view is NCHW in channels_last memory, which the conv accepts without a copy
        # and answers in the same layout, so permuting back is free too.
        w = self.proj.weight
        if (
            isinstance(self.act, nn.Identity)
            and _onednn_ok(x, w)
            and x.dtype == w.dtype
            and x.is_contiguous()
            and not torch.is_autocast_enabled("cpu")
        ):
            # CPU inference: oneDNN adds the residual in the conv's epilogue (one pass instead of two, same values).
            xc = x.permute(0, 3, 1, 2)  # (B, C, H, W) view, channels_last memory
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                xc, xc, w, self.proj.bias, [1, 1], [1, 1], [1, 1], self.proj.groups, "add", None, None, [], None
            )
            return out.permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
        feat = self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        return x + self.act(feat)


class Mlp(nn.Module):
    """Linear(C, rC) -> GELU -> Linear(rC, C); no dropout (the official blocks have none)."""

    def __init__(self, dim: int, hidden: int, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return linear(linear(x, self.fc1, gelu=True), self.fc2, residual=residual)


# --------------------------------------------------------------------------------------------------------------------
# attentions
# --------------------------------------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows: no shift, no relative bias, no mask."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, *, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        Bw, N, C = x.shape  # (B*nW, ws*ws, C)
        q, k, v = split_heads(linear(x, self.qkv), self.num_heads)  # each (Bw, h, N, d)
        if x.is_cpu and torch.is_grad_enabled() and x.requires_grad:
            # CPU training: explicit attention. On 49-token windows, forward + backward through two batched GEMMs
            # and a softmax is 1.0-1.25x (fp32) and ~6x (bf16) faster than the fused SDPA (benchmarks/attention.py).
            attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (Bw, h, N, N)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (Bw, h, N, d); scale d**-0.5 as the official code
        x = x.transpose(1, 2).reshape(Bw, N, C)  # (Bw, N, C)
        return linear(x, self.proj)


class ChannelAttention(nn.Module):
    """Channel group attention: tokens are channels, each summarising all N positions.

    Official form (``v2=False``): with q, k, v of shape ``(B, G, N, Cg)``, ``A = softmax((k * Cg**-0.5)^T v)`` of shape
    ``(B, G, Cg, Cg)`` and ``out = (A q^T)^T = q A^T``. Written as ordinary attention over channel tokens the roles are
    Q=k, K=v, V=q, which is why official checkpoints load without permuting the qkv slices.

    Florence-2 form (``v2=True``): standard roles, ``A = softmax((q * s)^T k)``, ``out = v A^T``, where ``s = N**-0.5``
    ("dynamic scale") or ``Cg**-0.5`` when ``dynamic_scale=False``.
    """

    def __init__(
        self,
        dim: int,
        num_groups: int,
        qkv_bias: bool = True,
        v2: bool = False,
        dynamic_scale: bool = True,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.head_dim = dim // num_groups
        self.v2 = v2
        self.dynamic_scale = dynamic_scale
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.core = ChannelCore(num_groups, v2, dynamic_scale)  # the same attention, one image at a time

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        B, N, C = x.shape  # (B, H*W, C)
        qkv = linear(x, self.qkv)
        out = channel_attend(qkv, self.core)  # float32 CPU on large maps: per image, no copies (fused.py)
        if out is not None:
            return linear(out, self.proj, residual=residual)
        q, k, v = split_heads(qkv, self.num_groups)  # each (B, G, N, Cg)
        if self.v2:
            scale = N**-0.5 if self.dynamic_scale else self.head_dim**-0.5
            attn = (q * scale).transpose(-1, -2) @ k  # (B, G, Cg, Cg)
            value = v
        else:
            attn = (k * self.head_dim**-0.5).transpose(-1, -2) @ v  # (B, G, Cg, Cg)
            value = q
        attn = attn.softmax(dim=-1)
        # (A v^T)^T rather than v A^T: same values, but the GEMM then has the long N axis as its output columns,
        # which oneDNN runs 5x faster than N rows of a 32-wide product (measured at 896x896).
        x = (attn @ value.transpose(-1, -2)).transpose(-1, -2)  # (B, G, Cg, N) -> (B, G, N, Cg) view
        # Contiguous tokens for the projection: on the transposed view, torch.compile lowers the Linear to a batched
        # GEMM that copies the weight on every call, with the bias and residual as separate passes (bf16 compiled:
        # batch 1 -3%, batch 32 -8%), and F.linear under autograd takes the same batched-GEMM route.
        x = x.transpose(1, 2).reshape(B, N, C).contiguous()  # (B, N, C)
        return linear(x, self.proj, residual=residual)


# --------------------------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------------------------


class _DualBlockBase(nn.Module):
    """Shared skeleton: cpe1 -> x + dp(attn(norm1 x)) -> cpe2 -> x + dp(mlp(norm2 x)). Subclasses set ``mix``."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        drop_path: float,
        ffn: bool,
        cpe_act: bool,
        norm_eps: float,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cpe1 = ConvPosEnc(dim, cpe_act, **dd)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.cpe2 = ConvPosEnc(dim, cpe_act, **dd)
        if ffn:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)
        else:
            self.norm2 = None
            self.mlp = None
        # One module used twice, as the official code: the two residuals get independent masks.
        self.drop_path = DropPath(drop_path)
        self.memory_saving = "none"  # see DaViT.set_memory_saving

    def mix(self, x: Tensor, residual: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        """The token mixer on ``(B, H, W, C)``; returns ``residual + mix(x)`` when ``residual`` is given."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = self.cpe1(x)  # (B, H, W, C)
        # Without stochastic depth the residual goes into the branch (added in a GEMM's epilogue where possible).
        add = self.drop_path.prob == 0.0 or not self.training
        # Under autograd the branches may run as custom functions that store fewer activations (fused.py).
        fused = self.memory_saving != "none" and use_fused_training(x, self.norm1.weight)
        if fused and self.memory_saving == "all":
            y = attn_branch(x, self.norm1, self.attn.qkv, self.attn.proj, self.core, add_input=add)
        else:
            y = self.mix(self.norm1(x), residual=x if add else None)
        x = y if add else self.drop_path.add(x, y)
        x = self.cpe2(x)
        if self.mlp is None or self.norm2 is None:
            return x
        if fused:
            y = ln_mlp(x, self.norm2, self.mlp.fc1, self.mlp.fc2, add_input=add)
        else:
            y = self.mlp(self.norm2(x), residual=x if add else None)
        return y if add else self.drop_path.add(x, y)


class SpatialBlock(_DualBlockBase):
    """Window (spatial-token) attention block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        ffn: bool = True,
        cpe_act: bool = False,
        norm_eps: float = 1e-5,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(dim, mlp_ratio, drop_path, ffn, cpe_act, norm_eps, device=device, dtype=dtype)
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, qkv_bias, device=device, dtype=dtype)
        self.core = WindowCore(window_size, num_heads)

    def mix(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        # Pad after norm1 and do not mask: padded zeros attend as keys carrying only the qkv bias, as official.
        xp = pad_to_multiple(x, ws)  # (B, Hp, Wp, C)
        Hp, Wp = xp.shape[1], xp.shape[2]
        tracing = _tracing()
        if not tracing and Hp == ws and Wp == ws:
            out = self.attn(xp.reshape(B, ws * ws, C)).view(B, Hp, Wp, C)  # one window: no partition copy
        else:
            out = window_reverse(self.attn(window_partition(xp, ws)), ws, B, Hp, Wp)  # (B, Hp, Wp, C)
        if tracing or Hp != H or Wp != W:
            out = out[:, :H, :W, :]
        return out if residual is None else residual + out


class ChannelBlock(_DualBlockBase):
    """Channel group attention block: global over all positions, linear in their number."""

    def __init__(
        self,
        dim: int,
        num_groups: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        ffn: bool = True,
        cpe_act: bool = False,
        norm_eps: float = 1e-5,
        v2: bool = False,
        dynamic_scale: bool = True,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(dim, mlp_ratio, drop_path, ffn, cpe_act, norm_eps, device=device, dtype=dtype)
        self.attn = ChannelAttention(dim, num_groups, qkv_bias, v2, dynamic_scale, device=device, dtype=dtype)
        self.core = self.attn.core

    def mix(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        B, H, W, C = x.shape
        res = None if residual is None else residual.reshape(B, H * W, C)  # (B, N, C)
        return self.attn(x.reshape(B, H * W, C), residual=res).view(B, H, W, C)


# --------------------------------------------------------------------------------------------------------------------
# stem, downsample, stage
# --------------------------------------------------------------------------------------------------------------------


class Stem(nn.Module):
    """Conv 7x7 stride 4 pad 3 then LayerNorm (norm *after* the conv); input zero-padded right/bottom to stride 4."""

    def __init__(self, in_chans: int, dim: int, norm_eps: float, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 7, stride=4, padding=3, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(dim, eps=norm_eps, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (4 - W % 4) % 4, 0, (4 - H % 4) % 4))  # (B, Cin, H4, W4)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))  # (B, H/4, W/4, C)


class Downsample(nn.Module):
    """LayerNorm (*before* the conv) then a stride-2 conv: 2x2 pad 0 (official) or 3x3 pad 1 (overlapped)."""

    def __init__(
        self, in_dim: int, out_dim: int, kernel_size: int, norm_eps: float, *, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps, device=device, dtype=dtype)
        self.even = kernel_size % 2 == 0
        pad = 0 if self.even else kernel_size // 2
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride=2, padding=pad, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)  # (B, H, W, Cin)
        if self.even:
            # Pad after the norm, to the kernel size, as the official code: zeros, not normalised zeros.
            x = pad_to_multiple(x, self.conv.kernel_size[0])
            if self.conv.kernel_size == (2, 2) and use_fused_training(x, self.conv.weight):
                return self._patch_linear(x)  # under autograd only: conv kept for inference and export
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H/2, W/2, Cout)

    def _patch_linear(self, x: Tensor) -> Tensor:
        """The 2x2 stride-2 conv as one Linear over 2x2 patches (same sums, another order). Under autograd its
        forward + backward is 20-40% faster than the conv's from stage 2 on, a wash at stage 1 (fp32 and bf16)."""
        B, H, W, C = x.shape
        patches = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H // 2, W // 2, 4 * C)
        w = self.conv.weight.permute(0, 2, 3, 1).reshape(self.conv.out_channels, 4 * C)  # (Cout, kh, kw, Cin)
        return F.linear(patches, w, self.conv.bias)  # (B, H/2, W/2, Cout)


class DaViTStage(nn.Module):
    """Optional downsample followed by ``depth`` dual blocks (each an ``nn.Sequential`` of single blocks)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        downsample: bool,
        downsample_kernel: int = 2,
        attention_types: Sequence[str] = ("spatial", "channel"),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: Sequence[float] = (),
        ffn: bool = True,
        cpe_act: bool = False,
        channel_attn_v2: bool = False,
        dynamic_scale: bool = True,
        norm_eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.downsample = Downsample(in_dim, dim, downsample_kernel, norm_eps, **dd) if downsample else nn.Identity()
        self.grad_checkpointing = False
        n = len(attention_types)
        dual_blocks = []
        for i in range(depth):
            singles: list[nn.Module] = []
            for j, kind in enumerate(attention_types):
                dp = drop_path[i * n + j]
                common = dict(
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dp, ffn=ffn, cpe_act=cpe_act, norm_eps=norm_eps
                )
                if kind == "spatial":
                    singles.append(SpatialBlock(dim, num_heads, window_size, **common, **dd))
                else:
                    singles.append(
                        ChannelBlock(dim, num_heads, **common, v2=channel_attn_v2, dynamic_scale=dynamic_scale, **dd)
                    )
            dual_blocks.append(nn.Sequential(*singles))
        self.blocks = nn.Sequential(*dual_blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for dual in self.blocks:
                for blk in dual:  # single blocks: the recomputed activations of one attention + MLP at a time
                    x = checkpoint(blk, x, use_reentrant=False)
            return x
        return self.blocks(x)


# --------------------------------------------------------------------------------------------------------------------
# config and model
# --------------------------------------------------------------------------------------------------------------------

ATTENTION_TYPES = ("spatial", "channel")
MEMORY_SAVING = ("none", "mlp", "all")


@dataclass(frozen=True)
class DaViTConfig:
    """Every architectural field of a DaViT. ``asdict(cfg)`` is stored with checkpoints.

    Attributes:
        embed_dims: channels per stage.
        depths: dual blocks per stage (Tiny is ``(1, 1, 3, 1)``: 12 single blocks).
        num_heads: heads of the window attention, which are also the groups of the channel attention.
        window_size: side of the square attention windows.
        mlp_ratio: hidden width of the MLPs relative to the block width.
        qkv_bias: bias on the qkv projections.
        in_chans: input image channels.
        num_classes: classifier outputs; 0 keeps pooling and the head norm but no Linear.
        downsample_kernel: 2 (official 2x2, pad 0) or 3 (overlapped 3x3, pad 1, as Huge/Giant and Florence-2).
        attention_types: the single blocks of one dual block, in order; ``("spatial",)`` or ``("channel",)`` build the
            paper's single-attention ablations and ``("channel", "spatial")`` the reversed order.
        channel_attn_v2: the Florence-2 channel attention (standard roles, ``N**-0.5`` scale).
        dynamic_scale: with ``channel_attn_v2``, scale by ``N**-0.5`` (True) or ``head_dim**-0.5``.
        ffn: keep the MLPs (False builds the attention-only variant; the second CPE still runs).
        cpe_act: GELU on the position-encoding branch (an option of the dense-task copies; off in all weights).
        drop_path_rate: final stochastic-depth rate.
        drop_path_schedule: "block" (official: linear over every single block) or "pair" (timm: over dual blocks).
        norm_eps: LayerNorm epsilon.
    """

    embed_dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (1, 1, 3, 1)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    in_chans: int = 3
    num_classes: int = 1000
    downsample_kernel: int = 2
    attention_types: tuple[str, ...] = field(default=ATTENTION_TYPES)
    channel_attn_v2: bool = False
    dynamic_scale: bool = True
    ffn: bool = True
    cpe_act: bool = False
    drop_path_rate: float = 0.1
    drop_path_schedule: str = "block"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("embed_dims", "depths", "num_heads", "attention_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == n) or n == 0:
            raise ValueError(
                f"embed_dims, depths and num_heads need one entry per stage; got {self.embed_dims}, "
                f"{self.depths}, {self.num_heads}"
            )
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if heads <= 0 or dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by its {heads} heads; pick heads that divide it")
        bad = [t for t in self.attention_types if t not in ATTENTION_TYPES]
        if bad or not self.attention_types:
            raise ValueError(f"attention_types must be a non-empty sequence of {ATTENTION_TYPES}; got {bad or '()'}")
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        if self.downsample_kernel not in (2, 3):
            raise ValueError(f"downsample_kernel must be 2 (official) or 3 (overlapped), got {self.downsample_kernel}")
        if self.drop_path_schedule not in ("block", "pair"):
            raise ValueError(f"drop_path_schedule must be 'block' or 'pair', got {self.drop_path_schedule!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DaViTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DaViTConfig fields {unknown}; valid fields are {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> DaViTConfig:
        """A copy with some fields changed (validated like the original)."""
        return replace(self, **changes)


def drop_path_rates(cfg: DaViTConfig) -> list[list[float]]:
    """Per stage, the drop-path rate of every single block in order.

    "block": ``linspace(0, rate, n_single)`` over all single blocks (official, HF Florence-2).
    "pair": ``linspace(0, rate, n_dual)`` over dual blocks, both singles of a pair sharing it (timm, mmpretrain).
    """
    n = len(cfg.attention_types)
    total_dual = sum(cfg.depths)

    def linspace(count: int) -> list[float]:
        if count == 1:
            return [0.0]
        return [cfg.drop_path_rate * i / (count - 1) for i in range(count)]

    if cfg.drop_path_schedule == "block":
        flat = linspace(total_dual * n)
    else:
        flat = [r for r in linspace(total_dual) for _ in range(n)]
    out, start = [], 0
    for d in cfg.depths:
        out.append(flat[start : start + d * n])
        start += d * n
    return out


class DaViT(nn.Module):
    """The DaViT backbone and classifier.

    Args:
        cfg: the architecture.
        features_only: build a dense-prediction backbone: no head; ``forward`` returns the NCHW maps of
            ``out_indices`` (strides 4/8/16/32), each after its own LayerNorm (the official mmdet/mmseg ``norm0..3``).
        out_indices: stages whose maps ``features_only`` returns.
        device: where to allocate parameters (``"meta"`` builds without memory).
        dtype: parameter dtype.
    """

    def __init__(
        self,
        cfg: DaViTConfig,
        *,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.features_only = features_only
        num_stages = len(cfg.embed_dims)
        self.out_indices = tuple(i % num_stages for i in out_indices)
        if not self.out_indices or len(set(self.out_indices)) != len(self.out_indices):
            raise ValueError(f"out_indices must name distinct stages among 0..{num_stages - 1}, got {out_indices}")
        self.num_classes = 0 if features_only else cfg.num_classes
        self.num_features = self.head_hidden_size = cfg.embed_dims[-1]
        self.grad_checkpointing = False

        self.stem = Stem(cfg.in_chans, cfg.embed_dims[0], cfg.norm_eps, **dd)
        dpr = drop_path_rates(cfg)
        stages = []
        in_dim = cfg.embed_dims[0]
        for i, (dim, depth, heads) in enumerate(zip(cfg.embed_dims, cfg.depths, cfg.num_heads)):
            stages.append(
                DaViTStage(
                    in_dim,
                    dim,
                    depth,
                    heads,
                    downsample=i > 0,
                    downsample_kernel=cfg.downsample_kernel,
                    attention_types=cfg.attention_types,
                    window_size=cfg.window_size,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    drop_path=dpr[i],
                    ffn=cfg.ffn,
                    cpe_act=cfg.cpe_act,
                    channel_attn_v2=cfg.channel_attn_v2,
                    dynamic_scale=cfg.dynamic_scale,
                    norm_eps=cfg.norm_eps,
                    **dd,
                )
            )
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            {"num_chs": cfg.embed_dims[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}", "index": i}
            for i in range(num_stages)
        ]
        if features_only:
            self.feature_info = [self.feature_info[i] for i in self.out_indices]
            self.out_norms = nn.ModuleDict(
                {str(i): nn.LayerNorm(cfg.embed_dims[i], eps=cfg.norm_eps, **dd) for i in self.out_indices}
            )
            self.head = None
        else:
            self.out_norms = None
            self.head = ClassifierHead(cfg.embed_dims[-1], cfg.num_classes, cfg.norm_eps, **dd)
        self.apply(_init_weights)

    # ---------------------------------------------------------------- API
    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return next(self.parameters()).dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every single block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_memory_saving(self, level: str = "none") -> None:
        """How much the training forward stores for the backward pass (same gradients to rounding at every level).

        - ``"none"`` (default): autograd through every op, the fastest on the CPU; stores ~1.04x what timm stores
          (the explicit window attention of CPU training keeps its probabilities).
        - ``"mlp"``: each MLP (norm, fc1, GELU, fc2) is one custom function that stores its input and the GELU input
          and recomputes the rest: ~0.78x timm's saved activations, ~5% slower on the CPU.
        - ``"all"``: the attention branches too (norm, qkv, attention, proj store only their input and qkv):
          ~0.62x timm's saved activations, 2-10% slower on the CPU (recomputes norms, GELUs and attention maps).

        Independent of :meth:`set_grad_checkpointing`, which recomputes whole blocks (figures: the README's speed
        section, measured by ``python benchmarks/bench.py``).
        """
        if level not in MEMORY_SAVING:
            raise ValueError(f"memory saving level must be one of {MEMORY_SAVING}, got {level!r}")
        for m in self.modules():
            if isinstance(m, _DualBlockBase):
                m.memory_saving = level

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay by name (norms and biases are exempt by shape in the engine)."""
        return set()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style parameter groups (stem, stages / blocks) for layer-wise learning-rate decay."""
        return {
            "stem": r"^stem",
            "blocks": r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        }

    def get_classifier(self) -> nn.Module:
        """The final Linear (or Identity for ``num_classes=0``)."""
        if self.head is None:
            raise RuntimeError("a features_only DaViT has no classifier")
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear with a freshly initialised one of ``num_classes`` outputs (0 removes it)."""
        if self.head is None:
            raise RuntimeError("a features_only DaViT has no classifier; build it with features_only=False")
        self.num_classes = num_classes
        self.cfg = self.cfg.replace(num_classes=num_classes)
        p = self.head.norm.weight
        self.head.fc = _new_fc(self.num_features, num_classes, p.device, p.dtype)

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"DaViT expects images shaped (B, {self.cfg.in_chans}, H, W); got {tuple(x.shape)}. "
                + (
                    "Convert grayscale images to RGB (e.g. x.expand(-1, 3, -1, -1)) or build with in_chans=1."
                    if x.ndim == 4 and x.shape[1] == 1
                    else "Add a batch dimension with x.unsqueeze(0) or fix the channel count."
                )
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` -> last stage map ``(B, C_last, H/32, W/32)`` (NCHW, before the head norm)."""
        self._check_input(x)
        x = self.stem(x)  # (B, H/4, W/4, C0)
        x = self.stages(x)
        return x.permute(0, 3, 1, 2)  # (B, C, h, w) view of channels-last memory

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """NCHW map -> logits (pool -> LayerNorm -> Linear), or the normalised pooled features if ``pre_logits``."""
        if self.head is None:
            raise RuntimeError("a features_only DaViT has no head")
        return self.head(x, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediate-feature API.

        Args:
            x: images ``(B, C, H, W)``.
            indices: last ``n`` stages if an int, these stages if a sequence, all if None.
            norm: apply the per-stage dense norms (only on a ``features_only`` model, for the stages it has).
            stop_early: stop after the last requested stage (only with ``intermediates_only``).
            output_fmt: "NCHW" or "NHWC".
            intermediates_only: return only the list of maps.

        Returns:
            The maps, or ``(final NCHW map, maps)``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        num_stages = len(self.stages)
        if indices is None:
            take = list(range(num_stages))
        elif isinstance(indices, int):
            take = list(range(num_stages - indices, num_stages))
        else:
            take = [i % num_stages for i in indices]
        self._check_input(x)
        last = max(take) if (stop_early and intermediates_only) else num_stages - 1
        x = self.stem(x)
        feats = []
        for i in range(last + 1):
            x = self.stages[i](x)
            if i in take:
                y = x
                if norm and self.out_norms is not None and str(i) in self.out_norms:
                    y = self.out_norms[str(i)](y)
                feats.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        return x.permute(0, 3, 1, 2), feats

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Logits ``(B, num_classes)``; for ``features_only``, the list of normalised NCHW maps."""
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, norm=True, stop_early=True, intermediates_only=True)  # type: ignore[return-value]
        return self.forward_head(self.forward_features(x))


class ClassifierHead(nn.Module):
    """Global average pool -> LayerNorm -> Linear. Pool *before* norm is the official order (about +0.5 top-1)."""

    def __init__(
        self, dim: int, num_classes: int, norm_eps: float = 1e-5, *, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps, device=device, dtype=dtype)
        self.fc = _new_fc(dim, num_classes, device, dtype)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x.mean(dim=(2, 3)))  # (B, C)
        return x if pre_logits else self.fc(x)


def _new_fc(dim: int, num_classes: int, device: Any, dtype: Any) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    fc = nn.Linear(dim, num_classes, device=device, dtype=dtype)
    _init_weights(fc)
    return fc


def _init_weights(m: nn.Module) -> None:
    # Official: timm-0.4.13 _init_vit_weights applied without names, so every Linear, the head included, gets
    # trunc_normal(0.02) and zero bias; LayerNorm (1, 0) and convs keep PyTorch's defaults.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
