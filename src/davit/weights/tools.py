"""File-level tools behind ``davit convert`` and ``davit info``."""

from __future__ import annotations

import json
import math
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
    """What a checkpoint file holds: task, container format, key layout, model, classes, preprocessing, params.

    Segmentation and detection files written by ``davit train`` are described from the config in their header.
    """
    p = Path(path)
    meta = read_safetensors_metadata(p) if p.is_file() else {}
    if meta.get("task") in ("seg", "det"):
        return _describe_dense(p, meta)
    sd = load_state(p)
    arch = infer_architecture(sd)
    info: dict[str, Any] = {
        "file": str(p),
        "task": "cls (use davit eval / davit predict / davit export)",
        "container": "safetensors" if meta or p.suffix == ".safetensors" else "pickle (read with weights_only=True)",
        "layout": "davit" if meta.get("format") == "davit" else sd.source,
        "model": meta.get("model_name") or meta.get("model") or arch["model"] or "custom (no zoo model has these dims)",
        "params": sum(int(v.numel()) for v in sd.values() if isinstance(v, Tensor)),
        "tensors": len(sd),
        "num_classes": arch["num_classes"],
        "embed_dims": arch["embed_dims"],
        "depths": arch["depths"],
        "downsample": f"{arch['downsample_kernel']}x{arch['downsample_kernel']}",
        "dense_norms": arch["dense_norms"] or "none",
        "extra_tensors": len(sd.extra),
    }
    for key in ("class_names", "preprocessing"):
        if key in meta:
            info[key] = json.loads(meta[key])
    if meta.get("format") != "davit":
        # Valid (timm / official / converted weights carry none), but say what is missing rather than leave it out.
        info["metadata"] = (
            "none from davit: architecture inferred from the tensor shapes; no class names or preprocessing "
            "(davit convert adds davit metadata)"
        )
    cfg = davit_config_of(meta, path)
    if cfg is not None:
        try:
            info["config"] = DaViTConfig.from_dict(
                {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
            ).to_dict()
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its davit_config metadata does not describe a DaViT ({e})") from e
    return info


def _describe_dense(p: Path, meta: dict[str, str]) -> dict[str, Any]:
    from safetensors import safe_open

    cfg = json.loads(meta.get("config", "{}"))
    task = meta["task"]
    with safe_open(str(p), framework="pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    model = cfg.get("model", {})
    info: dict[str, Any] = {
        "file": str(p),
        "task": f"{task} (use davit {task} eval / davit {task} predict"
        + (" / davit export)" if task == "seg" else ")"),
        "container": "safetensors",
        "layout": "davit",
        "model": model.get("name", "unknown"),
        "head": cfg.get("head") if task == "seg" else cfg.get("detector"),
        "params": params,
    }
    if "class_names" in meta:
        names = json.loads(meta["class_names"])
        info.update(num_classes=len(names), class_names=names)
    info["config"] = cfg
    return info
