"""Safe checkpoint reading and atomic writing.

Nothing here unpickles arbitrary objects: ``.safetensors`` are read with safetensors, and every pickle-based format
(``.pth``, ``.pth.tar``, ``.pt``, ``.bin``, ``.ckpt``) with ``torch.load(weights_only=True)``, which only rebuilds
tensors and plain containers.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DiskFullError, UserError

__all__ = [
    "CheckpointError",
    "atomic_write",
    "davit_config_of",
    "read_checkpoint",
    "read_safetensors_metadata",
    "remove_stale_temps",
    "save_safetensors",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


class CheckpointError(UserError):
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
    _raise_if_not_regular(p)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes): the download or save was interrupted; fetch it again")
    if p.name.endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(p):
        return _read_safetensors(p)
    _raise_if_not_torch_file(p)
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


def _raise_if_not_torch_file(p: Path) -> None:
    """A torch file is a zip archive (torch >= 1.6) or a pickle (older, protocol 2+); say what else it is."""
    with p.open("rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        what = "a JSON file"
    elif text[:1] == b"<":
        what = "an HTML or XML page (a failed download?)"
    elif head.startswith(b"version https://git-lfs"):
        what = "a Git LFS pointer (run `git lfs pull` to fetch the real file)"
    else:
        what = "of an unknown format (it starts neither as a zip archive nor as a pickle)"
    raise CheckpointError(
        f"{p} is {what}, not a checkpoint: a checkpoint is a PyTorch (.pth/.pt/.bin) or .safetensors file; "
        "check the path, or download the weights again"
    )


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


def _raise_if_not_regular(p: Path) -> None:
    """A FIFO, socket or device would block a read forever (or never end): only regular files are checkpoints."""
    import stat

    if p.exists() and not p.is_dir() and not stat.S_ISREG(p.stat().st_mode):
        raise CheckpointError(f"{p} is not a regular file (a pipe, socket or device); pass a checkpoint file")


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (empty for other formats)."""
    from safetensors import safe_open

    p = Path(path)
    _raise_if_not_regular(p)
    if not (p.name.endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(p)):
        return {}
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"cannot read the header of {p}: {_first_line(e)}") from e


# mkstemp's names: ".<name>.<8 random characters>.tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
# How torch.save and safetensors report a failed write (they do not keep the OSError)
_WRITE_FAILED = ("unexpected pos", "os error 28", "os error 122", "No space left", "Disk quota exceeded")


def davit_config_of(meta: Mapping[str, str], path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``davit_config`` dict of a safetensors header (None when absent), checked to be a JSON object.

    Raises:
        CheckpointError: the entry is not valid JSON or not an object (a corrupted or hand-edited header).
    """
    if "davit_config" not in meta:
        return None
    try:
        d = json.loads(meta["davit_config"])
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(
            f"{path}: its davit_config metadata is not valid JSON ({e}); the header is corrupt: pass --model NAME to "
            "build the architecture yourself, or re-save the file"
        ) from e
    if not isinstance(d, dict):
        raise CheckpointError(
            f"{path}: its davit_config metadata is a {type(d).__name__}, not a mapping of DaViTConfig fields; the "
            "header is corrupt: re-save the file"
        )
    return d


def atomic_write(path: str | os.PathLike[str], write: Any, size_hint: int | None = None) -> Path:
    """Call ``write(tmp_path)`` then rename into place, so a crash or full disk never leaves a half-written file.

    The temporary file lives in the destination folder (same filesystem, so the rename is atomic) and is removed on
    failure; the previous file at ``path``, if any, stays intact until the rename. The file gets the mode of a file
    created with ``open()`` (``0o666`` less the umask), so teammates read run outputs as the umask allows.

    Args:
        path: the destination.
        write: ``write(tmp_path)`` writes the whole file.
        size_hint: about how many bytes the file takes, for the message when the disk fills up.

    Raises:
        DiskFullError: the disk (or quota) is full; the message says where, how much the save needed and how much
            was free. Temporary files are removed and the previous file is intact.
    """
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 files (and some writers re-create the file): give the file open()'s mode
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException as e:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(e):
            raise DiskFullError(_disk_full_message(dst, size_hint, written)) from e
        raise
    return dst


def _umask() -> int:
    # Linux shows the umask in /proc; elsewhere it can only be read by setting it (and setting it back at once).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, Exception) and not isinstance(e, OSError) and any(s in str(e) for s in _WRITE_FAILED)


def _disk_full_message(dst: Path, size_hint: int | None, written: int) -> str:
    usage = shutil.disk_usage(dst.parent)
    need = f"{_size(size_hint)}" if size_hint else f"more than the {_size(written)} written before it failed"
    return (
        f"the disk is full: saving {dst} needed {need} but {_size(usage.free)} of {_size(usage.total)} are free on "
        f"the filesystem of {dst.parent}; free some space (or write the run to a larger disk with out=...) and resume "
        "with --resume (the previous save is intact)"
    )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that saves killed mid-write (SIGKILL, power loss) left in ``folder``.

    Only names :func:`atomic_write` makes (``.<name>.<random>.tmp``) are touched; call it when no save is running
    into ``folder`` (a run's start). Returns the removed paths.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for e in entries:
        if _TEMP_NAME.match(e.name) and e.is_file(follow_symlinks=False):
            Path(e.path).unlink(missing_ok=True)
            removed.append(Path(e.path))
    return removed


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
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), size_hint=size)


def _shares_storage(t: Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    line = s[0] if s else type(e).__name__
    return line.split(". ")[0][:160]
