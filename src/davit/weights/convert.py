"""Every public DaViT checkpoint layout -> ours (which is timm's layout; see ``davit-facts.md`` section 4.4).

Ours: ``stem.{conv,norm}``, ``stages.S.downsample.{norm,conv}``,
``stages.S.blocks.B.{0|1}.{cpe1.proj, norm1, attn.qkv, attn.proj, cpe2.proj, norm2, mlp.fc1, mlp.fc2}``,
``head.{norm,fc}``, and for dense backbones ``out_norms.S``.

Sources:
    official        dingmyu/davit classification (``patch_embeds``, ``main_blocks``, ``norms``, ``head``)
    official_dense  dingmyu/davit mmdet/mmseg (``backbone.`` prefix, ``norm0..3``; heads kept aside)
    timm            timm ``davit_*`` (ours; also its named-block form ``spatial_block`` / ``channel_block``)
    mmpretrain      ``backbone.patch_embed.projection``, ``stages.S.downsample``, ``ffn.layers``, ``attn.w_msa``
    florence2       Florence-2 hub remote code (``vision_tower.convs``, ``window_attn.fn``, ``conv1.fn.dw``)
    transformers    transformers ``Florence2VisionBackbone`` (``convs.i.conv``, ``conv1``, ``ffn.fc1``)
    davit           this package's own files (identical to timm)

The official channel attention and timm's use the same qkv slice order, so no tensor is permuted, only renamed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from .io import CheckpointError

__all__ = ["SOURCES", "ConvertedStateDict", "convert_state_dict", "detect_source", "unwrap_state_dict"]

_WRAPPERS = ("state_dict", "model", "model_state", "state_dict_ema", "model_ema", "module", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")


class ConvertedStateDict(dict):
    """A state dict in our layout that remembers where it came from.

    Attributes:
        source: the detected (or given) source format.
        extra: tensors that are not part of the backbone/classifier (e.g. detector or segmentation heads), keyed as
            in the file.
        origin: the file name it was read from, for messages.
    """

    def __init__(
        self,
        data: Mapping[str, Tensor],
        source: str,
        extra: Mapping[str, Tensor] | None = None,
        origin: str = "state dict",
    ) -> None:
        super().__init__(data)
        self.source = source
        self.extra: dict[str, Tensor] = dict(extra or {})
        self.origin = origin


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Strip training wrappers: ``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` / ``_orig_mod.`` prefixes."""
    sd: Mapping[str, Any] = obj
    for _ in range(3):
        if any(isinstance(v, Tensor) for v in sd.values()) and not any(k in sd for k in _WRAPPERS):
            break
        for key in _WRAPPERS:
            inner = sd.get(key)
            if isinstance(inner, Mapping) and inner:
                sd = inner
                break
        else:
            break
    out = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def detect_source(sd: Mapping[str, Tensor]) -> str:
    """Name the layout of an unwrapped state dict, or raise a CheckpointError saying what it looks like."""
    keys = set(sd)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.search(k) for k in keys)

    if has(r"(^|\.)stem\.conv\.weight$") and has(r"stages\.\d+\.blocks\."):
        return "timm"
    if has(r"^(backbone\.)?patch_embed\.projection\.weight$"):
        return "mmpretrain"
    if has(r"^backbone\.patch_embeds\.0\.proj\.weight$"):
        return "official_dense"
    if has(r"^patch_embeds\.0\.proj\.weight$"):
        return "official_dense" if has(r"^norm[0-3]\.weight$") else "official"
    if has(r"(^|\.)convs\.0\.proj\.weight$") and has(r"window_attn\.fn\."):
        return "florence2"
    if has(r"(^|\.)convs\.0\.conv\.weight$") and has(r"window_attn\.qkv\."):
        return "transformers"
    sample = ", ".join(sorted(keys)[:5])
    hint = ""
    if any(k.startswith(("conv1.", "layer1.", "fc.")) for k in keys):
        hint = " It looks like a ResNet."
    elif any(k.startswith(("blocks.", "cls_token", "pos_embed")) for k in keys):
        hint = " It looks like a plain ViT."
    elif any("layers." in k and "attn.relative_position" in k for k in keys):
        hint = " It looks like a Swin Transformer."
    raise CheckpointError(
        f"not a DaViT checkpoint: none of the known layouts ({', '.join(SOURCES)}) matches.{hint} "
        f"First keys: {sample}{'...' if len(keys) > 5 else ''}"
    )


def _rename(sd: Mapping[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def _named_blocks_to_index(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # timm's named blocks, mmpretrain, Florence-2 and transformers name the pair members; ours index them in the
    # default order (spatial first).
    return _rename(sd, [(r"\.spatial_block\.", ".0."), (r"\.channel_block\.", ".1.")])


def _from_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return _rename(
        sd,
        [
            (r"^patch_embeds\.0\.proj\.", "stem.conv."),
            (r"^patch_embeds\.0\.norm\.", "stem.norm."),
            (r"^patch_embeds\.(\d+)\.proj\.", r"stages.\1.downsample.conv."),
            (r"^patch_embeds\.(\d+)\.norm\.", r"stages.\1.downsample.norm."),
            (r"^main_blocks\.(\d+)\.", r"stages.\1.blocks."),
            (r"\.cpe\.0\.", ".cpe1."),
            (r"\.cpe\.1\.", ".cpe2."),
            (r"^norms\.", "head.norm."),
            (r"^head\.(weight|bias)$", r"head.fc.\1"),
            (r"^norm([0-3])\.", r"out_norms.\1."),
        ],
    )


def _split_backbone(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if not any(k.startswith("backbone.") for k in sd):
        return dict(sd), {}
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    extra = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    return backbone, extra


def _from_official_dense(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    backbone, extra = _split_backbone(sd)
    return _from_official(backbone), extra


def _from_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return _named_blocks_to_index(sd)


def _from_mmpretrain(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    backbone, extra = _split_backbone(sd)
    head = {k: v for k, v in extra.items() if k.startswith("head.fc.")}
    extra = {k: v for k, v in extra.items() if k not in head}
    # mmpretrain hangs the downsample of stage S+1 on the end of stage S.
    out = _rename(
        backbone,
        [
            (r"^patch_embed\.projection\.", "stem.conv."),
            (r"^patch_embed\.norm\.", "stem.norm."),
            (r"^stages\.(\d+)\.downsample\.projection\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.conv."),
            (r"^stages\.(\d+)\.downsample\.norm\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.norm."),
            (r"\.attn\.w_msa\.", ".attn."),
            (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
            (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
            (r"^norm3\.", "head.norm."),
        ],
    )
    out.update(head)
    return _named_blocks_to_index(out), extra


def _strip_tower(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    # Keep the vision tower (keys after any '...vision_tower.' prefix, or bare), set the rest (language model,
    # projections) aside.
    tower, extra = {}, {}
    for k, v in sd.items():
        name = k.rpartition("vision_tower.")[2]
        if name.startswith(("convs.", "blocks.")):
            tower[name] = v
        else:
            extra[k] = v
    return tower, extra


def _from_florence2(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    tower, extra = _strip_tower(sd)
    out = _rename(
        tower,
        [
            (r"^convs\.0\.proj\.", "stem.conv."),
            (r"^convs\.0\.norm\.", "stem.norm."),
            (r"^convs\.(\d+)\.proj\.", r"stages.\1.downsample.conv."),
            (r"^convs\.(\d+)\.norm\.", r"stages.\1.downsample.norm."),
            (r"^blocks\.(\d+)\.", r"stages.\1.blocks."),
            (r"\.(window_attn|channel_attn)\.norm\.", ".norm1."),
            (r"\.(window_attn|channel_attn)\.fn\.", ".attn."),
            (r"\.ffn\.norm\.", ".norm2."),
            (r"\.ffn\.fn\.net\.", ".mlp."),
            (r"\.conv1\.fn\.dw\.", ".cpe1.proj."),
            (r"\.conv2\.fn\.dw\.", ".cpe2.proj."),
        ],
    )
    return _named_blocks_to_index(out), extra


def _from_transformers(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    tower, extra = _strip_tower(sd)
    out = _rename(
        tower,
        [
            (r"^convs\.0\.conv\.", "stem.conv."),
            (r"^convs\.0\.norm\.", "stem.norm."),
            (r"^convs\.(\d+)\.conv\.", r"stages.\1.downsample.conv."),
            (r"^convs\.(\d+)\.norm\.", r"stages.\1.downsample.norm."),
            (r"^blocks\.(\d+)\.", r"stages.\1.blocks."),
            (r"\.(window_attn|channel_attn)\.", ".attn."),
            (r"\.ffn\.fc([12])\.", r".mlp.fc\1."),
            (r"\.conv1\.", ".cpe1.proj."),
            (r"\.conv2\.", ".cpe2.proj."),
        ],
    )
    return _named_blocks_to_index(out), extra


def _with_extra(fn: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]) -> Callable[..., Any]:
    return lambda sd: (fn(sd), {})


SOURCES: dict[str, Callable[[Mapping[str, Tensor]], tuple[dict[str, Tensor], dict[str, Tensor]]]] = {
    "davit": _with_extra(_from_timm),
    "timm": _with_extra(_from_timm),
    "official": _with_extra(_from_official),
    "official_dense": _from_official_dense,
    "mmpretrain": _from_mmpretrain,
    "florence2": _from_florence2,
    "transformers": _from_transformers,
}


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "auto") -> ConvertedStateDict:
    """Map any supported DaViT checkpoint onto this package's parameter names.

    Args:
        state_dict: a state dict, possibly wrapped (``{"state_dict": ...}``, ``{"model": ...}``, ``module.``).
        source: one of :data:`SOURCES` or "auto" to detect it.

    Returns:
        A :class:`ConvertedStateDict` (a dict) whose ``.source`` names the layout and ``.extra`` holds non-backbone
        tensors (e.g. detection heads).

    Raises:
        CheckpointError: not a DaViT checkpoint, or an unknown ``source``.
    """
    sd = unwrap_state_dict(state_dict)
    if not sd:
        raise CheckpointError("the checkpoint holds no tensors; is it a training log or an optimizer state?")
    if source == "auto":
        source = detect_source(sd)
    elif source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; choose 'auto' or one of {', '.join(SOURCES)}")
    converted, extra = SOURCES[source](sd)
    return ConvertedStateDict(converted, source, extra)
