"""Reading the architecture a checkpoint implies from its tensor shapes."""

from __future__ import annotations

import re
from typing import Any

from ..models import MODEL_CONFIGS
from .convert import ConvertedStateDict
from .io import CheckpointError

__all__ = ["infer_architecture"]


def infer_architecture(sd: ConvertedStateDict) -> dict[str, Any]:
    """Read the architecture a converted state dict implies: dims, depths, kernel, classes, and the zoo match."""
    if "stem.conv.weight" not in sd:
        raise CheckpointError("the checkpoint has no stem (stem.conv.weight): it is not a full DaViT backbone")
    dims = [int(sd["stem.conv.weight"].shape[0])]
    kernel = 2
    i = 1
    while f"stages.{i}.downsample.conv.weight" in sd:
        w = sd[f"stages.{i}.downsample.conv.weight"]
        dims.append(int(w.shape[0]))
        kernel = int(w.shape[-1])
        i += 1
    depths = [0] * len(dims)
    singles = 0
    rx = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(\d+)\.")
    for k in sd:
        m = rx.match(k)
        if m:
            s, b, j = (int(g) for g in m.groups())
            if s < len(depths):
                depths[s] = max(depths[s], b + 1)
            singles = max(singles, j + 1)
    fc = sd.get("head.fc.weight")
    arch = {
        "embed_dims": dims,
        "depths": depths,
        "downsample_kernel": kernel,
        "num_classes": int(fc.shape[0]) if fc is not None else 0,
        "blocks_per_pair": singles,
        "ffn": any(".mlp." in k for k in sd),
        "dense_norms": sorted(int(k.split(".")[1]) for k in sd if re.match(r"^out_norms\.\d+\.weight$", k)),
    }
    v2 = sd.source in ("florence2", "transformers")
    arch["model"] = next(
        (
            name
            for name, info in MODEL_CONFIGS.items()
            if list(info.cfg.embed_dims) == dims
            and list(info.cfg.depths) == depths
            and info.cfg.downsample_kernel == kernel
            and info.cfg.channel_attn_v2 == v2
        ),
        None,
    )
    return arch
