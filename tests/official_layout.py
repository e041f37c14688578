"""Our (timm's) DaViT parameter names -> the official dingmyu/davit names (facts section 4.4).

Written independently of the library's converter, so tests that build official-format checkpoints from our models
check the converter instead of repeating it.
"""

from __future__ import annotations

import re

import torch

_RULES = [
    (r"stem\.conv\.", "patch_embeds.0.proj."),
    (r"stem\.norm\.", "patch_embeds.0.norm."),
    (r"stages\.(\d+)\.downsample\.conv\.", r"patch_embeds.\1.proj."),
    (r"stages\.(\d+)\.downsample\.norm\.", r"patch_embeds.\1.norm."),
    (r"stages\.(\d+)\.blocks\.", r"main_blocks.\1."),
    (r"out_norms\.(\d)\.", r"norm\1."),
    (r"head\.norm\.", "norms."),
    (r"head\.fc\.", "head."),
]


def to_official(
    sd: dict[str, torch.Tensor], prefix: str = "", extra_rules: list[tuple[str, str]] = ()
) -> dict[str, torch.Tensor]:
    """Rename a state dict to the official layout; ``prefix`` is where the backbone sits (``"backbone."`` in
    mmdet/mmseg files), ``extra_rules`` rename the rest (e.g. heads). Tensors are cloned."""
    rules = [(f"^{re.escape(prefix)}{pat}", prefix + rep) for pat, rep in _RULES]
    rules += [(r"\.cpe1\.", ".cpe.0."), (r"\.cpe2\.", ".cpe.1."), *extra_rules]
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v.clone()
    return out
