"""Safe checkpoint reading and atomic writing.

Nothing here unpickles arbitrary objects: ``.safetensors`` are read with safetensors, and every pickle-based format
(``.pth``, ``.pth.tar``, ``.pt``, ``.bin``, ``.ckpt``) with ``torch.load(weights_only=True)``, which only rebuilds
tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CheckpointError", "atomic_write", "read_checkpoint", "read_safetensors_metadata", "save_safetensors"]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be used, with the reason and the fix in the message."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint file safely into a dict (tensors, nested dicts, numbers, strings).

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is truncated, corrupt, not a checkpoint, or needs unsafe unpickling.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; pass the checkpoint file inside it (*.safetensors, *.pth, *.bin)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes): the download or save was interrupted; fetch it again")
    if p.name.endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(p):
        return _read_safetensors(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"cannot read {p}: the file is truncated or corrupt ({_first_line(e)}); download or save it again"
        ) from e
    except Exception as e:  # pickle.UnpicklingError for objects that weights_only refuses, and other decoders
        msg = _first_line(e)
        if "weights_only" in msg or "Unsupported global" in msg or "Weights only load failed" in msg:
            raise CheckpointError(
                f"{p} contains Python objects that cannot be loaded safely ({msg[:200]}); re-save only its tensors, "
                "e.g. torch.save(model.state_dict(), path), or convert it to .safetensors"
            ) from e
        raise CheckpointError(f"cannot read {p} as a checkpoint: {msg}") from e
    if isinstance(obj, Mapping):
        return dict(obj)
    raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")


def _looks_like_safetensors(p: Path) -> bool:
    # safetensors files start with an 8-byte little-endian header length followed by '{'.
    try:
        with p.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(p: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(p), device="cpu"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot read {p}: not a valid safetensors file or truncated ({_first_line(e)}); download or save it again"
        ) from e


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (empty for other formats)."""
    from safetensors import safe_open

    p = Path(path)
    if not (p.name.endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(p)):
        return {}
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"cannot read the header of {p}: {_first_line(e)}") from e


def atomic_write(path: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(tmp_path)`` then rename into place, so a crash or full disk never leaves a half-written file.

    The temporary file lives in the destination folder (same filesystem, so the rename is atomic) and is removed on
    failure; the previous file at ``path``, if any, stays intact until the rename.
    """
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def save_safetensors(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write tensors to ``path`` atomically; non-string metadata values are stored as JSON."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    # safetensors refuses shared or non-contiguous storage: give it compact copies.
    tensors = {
        k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous()
        for k, v in state_dict.items()
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _shares_storage(t: Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    line = s[0] if s else type(e).__name__
    return line.split(". ")[0][:160]
