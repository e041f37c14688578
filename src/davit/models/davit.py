"""DaViT: Dual Attention Vision Transformers (Ding et al., ECCV 2022), the reference implementation.

This file is what a reader holds line by line against the official code (``timm/models/davit.py`` of
github.com/dingmyu/davit): plain public torch, every sub-module runs its own ``forward`` (so hooks, PEFT LoRA,
quantisation, ``torch.jit.trace``, torch.fx and ``torch.export`` see every Linear, conv and norm), the attention maths
written once as functions the modules call, and no device, vendor, grad-mode or tracing branches. Every speed trick
lives in :mod:`davit.accelerate`, which swaps these modules for faster subclasses with the same ``state_dict`` when
asked (``davit.optimize``, the training loop); a model from ``create_model`` runs this code.

Stages keep their tokens channels-last, as ``(B, H, W, C)``: LayerNorm and the Linears work on the last dimension and
the position-encoding convs see a ``permute(0, 3, 1, 2)`` view. Public outputs (``forward_features``, intermediates,
``features_only``) are NCHW as in timm.

Fidelity notes (``shared/reference/davit-facts.md`` sections 1 and 7):
- channel attention scales *k* by ``head_dim**-0.5`` and computes ``softmax(k^T v)`` applied to *q* (official roles);
  the Florence-2 "v2" form (standard roles, ``N**-0.5`` scale) is a config option;
- the stem norm follows its conv, the downsample norms precede theirs; inputs are zero-padded right/bottom to the
  conv stride, and window attention pads after its norm without masking the padded tokens;
- the head pools, then normalises, then classifies;
- depth counts dual blocks; drop path follows the official per-single-block schedule by default.

Shapes are read one dimension at a time (``x.shape[1]``), never unpacked, and padding is applied unconditionally (a
zero pad is a no-op): that keeps the file traceable by torch.fx, whose proxies cannot be unpacked or branched on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ChannelAttention",
    "ChannelBlock",
    "ConvPosEnc",
    "DaViT",
    "DaViTConfig",
    "DaViTStage",
    "Downsample",
    "FeatureInfo",
    "Mlp",
    "SpatialBlock",
    "Stem",
    "WindowAttention",
    "channel_attention",
    "channel_roles",
    "drop_path",
    "drop_path_rates",
    "merge_heads",
    "pad_to_multiple",
    "split_heads",
    "window_attention",
    "window_partition",
    "window_reverse",
]

# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def drop_path(x: Tensor, prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``prob``, rescaling the rest."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; one instance may be called twice for independent masks."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.prob, self.training)

    def extra_repr(self) -> str:
        return f"prob={self.prob:.4f}"


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad a ``(B, H, W, C)`` map on the right and bottom so H and W are multiples of ``multiple``."""
    pad_b = (multiple - x.shape[1] % multiple) % multiple
    pad_r = (multiple - x.shape[2] % multiple) % multiple
    return F.pad(x, (0, 0, 0, pad_r, 0, pad_b))


def window_partition(x: Tensor, ws: int) -> Tensor:
    """``(B, Hp, Wp, C) -> (B*nW, ws*ws, C)``, windows in row-major order; Hp and Wp are multiples of ``ws``."""
    C = x.shape[-1]
    x = x.reshape(x.shape[0], x.shape[1] // ws, ws, x.shape[2] // ws, ws, C)  # (B, nH, ws, nW, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)  # (B*nH*nW, ws*ws, C)


def window_reverse(windows: Tensor, ws: int, Hp: int, Wp: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, ws*ws, C) -> (B, Hp, Wp, C)``."""
    C = windows.shape[-1]
    x = windows.reshape(-1, Hp // ws, Wp // ws, ws, ws, C)  # (B, nH, nW, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)  # (B, Hp, Wp, C)


def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, N, 3*C)`` -> q, k, v, each ``(B, heads, N, C/heads)``, as the official reshape/permute."""
    C = qkv.shape[-1] // 3
    qkv = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(x: Tensor) -> Tensor:
    """``(B, heads, N, d) -> (B, N, heads*d)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])


def window_attention(q: Tensor, k: Tensor) -> Tensor:
    """Window attention probabilities ``softmax(q k^T / sqrt(d))``, ``(B*nW, heads, N, N)`` (official: no bias,
    no mask; padded tokens take part as keys)."""
    q = q * q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1)).softmax(dim=-1)


def channel_roles(
    q: Tensor, k: Tensor, v: Tensor, v2: bool = False, dynamic_scale: bool = True
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Which of q, k, v play query, key and value in channel attention over channel tokens, and the scale.

    Official (``v2=False``): ``A = softmax((k * Cg**-0.5)^T v)``, applied to ``q``; as ordinary attention over channel
    tokens the roles are Q=k, K=v, V=q, which is why official checkpoints load without permuting the qkv slices.
    Florence-2 (``v2=True``): standard roles, ``A = softmax((q * s)^T k)`` applied to ``v``, with ``s = N**-0.5``
    ("dynamic scale") or ``Cg**-0.5``.
    """
    if v2:
        return q, k, v, (q.shape[-2] ** -0.5 if dynamic_scale else q.shape[-1] ** -0.5)
    return k, v, q, k.shape[-1] ** -0.5


def channel_attention(
    q: Tensor, k: Tensor, v: Tensor, v2: bool = False, dynamic_scale: bool = True
) -> tuple[Tensor, Tensor]:
    """Channel group attention probabilities ``(B, G, Cg, Cg)`` and the ``(B, G, N, Cg)`` tensor they are applied to
    (roles and scale from :func:`channel_roles`)."""
    query, key, value, scale = channel_roles(q, k, v, v2, dynamic_scale)
    return ((query * scale).transpose(-1, -2) @ key).softmax(dim=-1), value


def _check_images(x: Any, in_chans: int) -> None:
    # Only real tensors can be checked: under torch.fx the input is a proxy whose sizes are unknown.
    if not isinstance(x, Tensor):
        return
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"DaViT expects images shaped (B, {in_chans}, H, W); got {tuple(x.shape)}. "
            + (
                "Convert grayscale images to RGB (e.g. x.expand(-1, 3, -1, -1)) or build with in_chans=1."
                if x.ndim == 4 and x.shape[1] == 1
                else "Add a batch dimension with x.unsqueeze(0) or fix the channel count."
            )
        )


class ConvPosEnc(nn.Module):
    """Conditional position encoding: ``x + dwconv3x3(x)`` (with bias, no norm, optional GELU on the branch)."""

    def __init__(self, dim: int, act: bool = False, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        feat = self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, C, H, W) view -> (B, H, W, C)
        return x + self.act(feat)


class Mlp(nn.Module):
    """Linear(C, rC) -> GELU -> Linear(rC, C); no dropout (the official blocks have none)."""

    def __init__(self, dim: int, hidden: int, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------------------------------
# attentions
# --------------------------------------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows: no shift, no relative bias, no mask.

    ``attn_probs`` is an identity the probabilities pass through, ``(B*nW, heads, N, N)``: a forward hook on it
    reads them (``davit.explain``) without a second copy of the model.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, *, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.attn_probs = nn.Identity()
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = split_heads(self.qkv(x), self.num_heads)  # each (B*nW, h, N, d)
        attn = self.attn_probs(window_attention(q, k))  # (B*nW, h, N, N)
        return self.proj(merge_heads(attn @ v))  # (B*nW, N, C)


class ChannelAttention(nn.Module):
    """Channel group attention: tokens are channels, each summarising all N positions (see
    :func:`channel_attention` for the official and Florence-2 forms).

    ``attn_probs`` is an identity the group attention matrices ``(B, G, Cg, Cg)`` pass through (a hook point).
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
        self.attn_probs = nn.Identity()
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = split_heads(self.qkv(x), self.num_groups)  # each (B, G, N, Cg)
        attn, value = channel_attention(q, k, v, self.v2, self.dynamic_scale)  # (B, G, Cg, Cg), (B, G, N, Cg)
        attn = self.attn_probs(attn)
        out = (attn @ value.transpose(-1, -2)).transpose(-1, -2)  # (B, G, N, Cg), as the official code
        return self.proj(merge_heads(out))  # (B, N, C)


# --------------------------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------------------------


class _DualBlockBase(nn.Module):
    """Shared skeleton: cpe1 -> x + dp(mix(norm1 x)) -> cpe2 -> x + dp(mlp(norm2 x)). Subclasses define ``mix``."""

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

    def mix(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The token mixer on normalised ``(B, H, W, C)`` tokens."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = self.cpe1(x)  # (B, H, W, C)
        x = x + self.drop_path(self.mix(self.norm1(x)))
        x = self.cpe2(x)
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


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

    def mix(self, x: Tensor) -> Tensor:
        ws = self.window_size
        # Pad after norm1 and do not mask: padded zeros attend as keys carrying only the qkv bias, as official.
        xp = pad_to_multiple(x, ws)  # (B, Hp, Wp, C)
        out = window_reverse(self.attn(window_partition(xp, ws)), ws, xp.shape[1], xp.shape[2])  # (B, Hp, Wp, C)
        return out[:, : x.shape[1], : x.shape[2], :]  # crop the padding (a no-op view without it)


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

    def mix(self, x: Tensor) -> Tensor:
        return self.attn(x.flatten(1, 2)).reshape(x.shape)  # (B, H*W, C) tokens -> (B, H, W, C)


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
        x = F.pad(x, (0, (4 - x.shape[-1] % 4) % 4, 0, (4 - x.shape[-2] % 4) % 4))  # (B, Cin, H4, W4)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))  # (B, H/4, W/4, C)


class Downsample(nn.Module):
    """LayerNorm (*before* the conv) then a stride-2 conv: 2x2 pad 0 (official) or 3x3 pad 1 (overlapped).

    With the 2x2 kernel the normalised map is zero-padded right/bottom to even sizes (zeros, not normalised zeros,
    as the official code); the 3x3 kernel pads inside the conv.
    """

    def __init__(
        self, in_dim: int, out_dim: int, kernel_size: int, norm_eps: float, *, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps, device=device, dtype=dtype)
        self.pad_to = kernel_size if kernel_size % 2 == 0 else 1
        pad = 0 if kernel_size % 2 == 0 else kernel_size // 2
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride=2, padding=pad, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(self.norm(x), self.pad_to)  # (B, H, W, Cin)
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H/2, W/2, Cout)


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
        if self.grad_checkpointing:
            for dual in self.blocks:
                for blk in dual:  # single blocks: the recomputed activations of one attention + MLP at a time
                    x = checkpoint(blk, x, use_reentrant=False)
            return x
        return self.blocks(x)


# --------------------------------------------------------------------------------------------------------------------
# config and model
# --------------------------------------------------------------------------------------------------------------------

ATTENTION_TYPES = ("spatial", "channel")


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
        for name in ("embed_dims", "depths", "num_heads"):
            values = getattr(self, name)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
                raise ValueError(f"{name} must be whole numbers >= 1 (one per stage); got {list(values)}")
        if not (self.mlp_ratio > 0 and self.in_chans >= 1 and self.num_classes >= 0):  # num_classes=0: no head
            raise ValueError(
                f"mlp_ratio must be > 0, in_chans >= 1 and num_classes >= 0; got {self.mlp_ratio}, {self.in_chans}, "
                f"{self.num_classes}"
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
        info = [
            {"num_chs": cfg.embed_dims[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}", "index": i}
            for i in range(num_stages)
        ]
        self.feature_info = FeatureInfo([info[i] for i in self.out_indices] if features_only else info)
        if features_only:
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
        _check_images(x, self.cfg.in_chans)

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


class FeatureInfo(list):
    """timm's feature-info vocabulary over a list of per-stage dicts (``num_chs``, ``reduction``, ``module``,
    ``index``): ``.channels()``, ``.reduction()``, ``.module_name()``, ``.get(key)``, ``.get_dicts()``."""

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """The ``key`` field of every entry, of entry ``idx``, or of the entries in ``idx``."""
        if idx is None:
            return [d[key] for d in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        """The entries (optionally only ``keys`` of them, and only those in ``idx``)."""
        pick = self if idx is None else ([self[idx]] if isinstance(idx, int) else [self[i] for i in idx])
        out = [dict(d) if keys is None else {k: d[k] for k in keys} for d in pick]
        return out[0] if isinstance(idx, int) else out

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channels of each returned map."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Stride of each returned map relative to the input."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Module name of each returned map (``stages.i``)."""
        return self.get("module", idx)
