"""File-level tools behind ``davit convert`` and ``davit info``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ..models import DaViT, DaViTConfig, count_params, get_config
from .inspect import infer_architecture
from .io import CheckpointError, davit_config_of, read_safetensors_metadata, save_safetensors
from .load import load_checkpoint, load_state

__all__ = ["convert_file", "describe_file", "infer_architecture"]

FORMAT_VERSION = "1"


def convert_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], model: str, source: str = "auto"
) -> dict[str, Any]:
    """Convert any DaViT checkpoint to a ``.safetensors`` file in our layout, carrying its config in the metadata.

    The weights are loaded strictly into ``model`` first, so a file that does not fit never gets written.
    """
    sd = load_state(src, source)
    arch = infer_architecture(sd)
    cfg = get_config(model).replace(num_classes=arch["num_classes"])
    dense = bool(arch["dense_norms"]) and "head.norm.weight" not in sd
    net = DaViT(cfg, features_only=dense, out_indices=tuple(arch["dense_norms"]) or (0, 1, 2, 3))
    load_checkpoint(net, sd, strict=True)
    meta = {
        "format": "davit",
        "format_version": FORMAT_VERSION,
        "model": model,
        "source": sd.source,
        "davit_config": json.dumps(cfg.to_dict()),
        "features_only": json.dumps(dense),
    }
    out = save_safetensors(net.state_dict(), dst, meta)
    return {"path": str(out), "model": model, "params": count_params(net), "source": sd.source}


def describe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint file holds: container format, key layout, matching zoo model, classes, params."""
    p = Path(path)
    sd = load_state(p)
    arch = infer_architecture(sd)
    meta = read_safetensors_metadata(p)
    info: dict[str, Any] = {
        "file": str(p),
        "container": "safetensors" if meta or p.suffix == ".safetensors" else "pickle (read with weights_only=True)",
        "layout": "davit" if meta.get("format") == "davit" else sd.source,
        "model": meta.get("model") or arch["model"] or "unknown (no zoo model has these dims/depths)",
        "params": sum(int(v.numel()) for v in sd.values() if isinstance(v, Tensor)),
        "tensors": len(sd),
        "num_classes": arch["num_classes"],
        "embed_dims": arch["embed_dims"],
        "depths": arch["depths"],
        "downsample": f"{arch['downsample_kernel']}x{arch['downsample_kernel']}",
        "dense_norms": arch["dense_norms"] or "none",
        "extra_tensors": len(sd.extra),
    }
    cfg = davit_config_of(meta, path)
    if cfg is not None:
        try:
            info["config"] = DaViTConfig.from_dict(
                {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
            ).to_dict()
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its davit_config metadata does not describe a DaViT ({e})") from e
    return info
