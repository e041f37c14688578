"""Run checkpoints: ``last.pt`` (the full training state, for bit-exact resume) and ``*.safetensors`` (weights only,
with the model config and class names in the header so ``davit.create_model(name, pretrained=path)`` rebuilds it).

Every file is written with :func:`davit.weights.atomic_write` (temp file + fsync + rename): a crash, a kill or a full
disk during a save leaves the previous file intact. ``last.pt`` is read back with :func:`davit.weights.read_checkpoint`
(``torch.load(weights_only=True)``), so it holds only tensors and plain containers: RNG states are stored as tensors
and lists, never as pickled objects.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..weights import CheckpointError, atomic_write, read_checkpoint, save_safetensors

__all__ = [
    "capture_rng",
    "load_training_state",
    "restore_rng",
    "save_training_state",
    "save_weights",
    "weights_metadata",
]

FORMAT = "davit.train/1"


def capture_rng() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states as tensors and plain lists."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write ``state`` (tensors and plain containers) to ``path`` atomically."""
    payload = {"format": FORMAT, **state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), size_hint=_nbytes(payload))


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors inside nested containers (what a save of ``obj`` needs, give or take its index)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``last.pt`` written by :func:`save_training_state` (safely, without unpickling objects)."""
    state = read_checkpoint(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a davit training state (no format {FORMAT!r}); to start from weights instead, set "
            "model.pretrained=<file> and leave resume empty"
        )
    return state


def weights_metadata(model: nn.Module, class_names: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """``davit_config`` (the model's ``cfg.to_dict()``) and ``class_names`` for a safetensors header."""
    meta: dict[str, Any] = {"format": "davit"}
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        meta["davit_config"] = json.dumps(cfg.to_dict())
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    for k, v in extra.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_weights(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Weights only, as safetensors, atomically, with string ``metadata`` in the header."""
    return save_safetensors({k: v.detach().cpu() for k, v in state_dict.items()}, path, metadata)
