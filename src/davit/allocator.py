"""CPU allocator tuning for glibc: trade memory for speed (keep freed activations) or speed for memory (return them).

glibc's malloc serves a large block from a fresh ``mmap`` and returns it with ``munmap`` when the tensor dies, so the
next pass page-faults all of that memory back in, at about 1-5 us per 4 KiB page. It also raises its mmap threshold
(up to 32 MB) each time it unmaps a block, after which blocks of that size come from the heap, where freed holes keep
the process's resident memory (RSS) high. :func:`tune_cpu_allocator` sets, through ``mallopt`` in the running process,
one of two policies:

``"speed"`` (the ``davit predict`` / ``eval`` / ``benchmark`` launchers, the CPU training loop): large blocks come
    from the heap and freed memory stays mapped for reuse, as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<2 GB>
    MALLOC_TOP_PAD_=512M`` would. davit_tiny fp32 inference at batch 32: 15.0 images/s with glibc's defaults, 26.1
    tuned (``benchmarks/bench.py``, section ``alloc``). The price: the process keeps its memory high-water mark
    until it exits.
``"memory"`` (the CPU training loop with gradient checkpointing): every block over 1 MiB is mapped on its own and
    returned when freed (``MALLOC_MMAP_THRESHOLD_=1048576``: a fixed threshold also stops glibc's raising of it), so
    RSS follows the memory in use. davit_tiny fp32 training, batch 32, ``memory_saving="all"`` + checkpointing, fresh
    processes: peak RSS 1.96 GB against 2.41-2.73 GB with glibc's defaults and 3.05-3.30 GB with ``"speed"``; steps
    ~25% slower than glibc's defaults (the page faults).

``DAVIT_MALLOC_TUNING`` in the environment overrides the caller: ``0`` leaves the allocator alone, ``speed`` or
``memory`` picks that policy. Not glibc (musl, macOS, Windows): nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["MODES", "tune_cpu_allocator"]

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_SETTINGS = {
    "speed": ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 512 << 20)),
    # glibc's own defaults for the rest (mallopt(3)), so that "memory" also undoes an earlier "speed"
    "memory": (
        (_M_MMAP_MAX, 65536),
        (_M_MMAP_THRESHOLD, 1 << 20),
        (_M_TRIM_THRESHOLD, 128 << 10),
        (_M_TOP_PAD, 128 << 10),
    ),
}
MODES = tuple(_SETTINGS)
_OFF = ("0", "false", "no", "off")
_current: str | None = None


def tune_cpu_allocator(mode: str = "speed") -> str | None:
    """Set glibc's malloc policy for this process (see the module notes): ``"speed"`` or ``"memory"``.

    Returns the policy in effect (the environment's ``DAVIT_MALLOC_TUNING=speed|memory`` wins over ``mode``), or
    None when nothing was done: ``DAVIT_MALLOC_TUNING=0``, a C library other than glibc, or ``mallopt`` refusing.
    Calling it again with the policy already in effect does nothing.
    """
    global _current
    if mode not in _SETTINGS:
        raise ValueError(f"allocator mode must be one of {', '.join(MODES)}; got {mode!r}")
    env = os.environ.get("DAVIT_MALLOC_TUNING", "").strip().lower()
    if env in _OFF:
        return None
    if env in _SETTINGS:
        mode = env
    elif env not in ("", "1", "true", "yes", "on"):
        raise ValueError(f"DAVIT_MALLOC_TUNING must be 0, 1, {' or '.join(MODES)}; got {env!r}")
    if _current == mode:
        return mode
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in _SETTINGS[mode]):
        log.warning("mallopt refused the %r allocator policy; glibc's behaviour is unchanged or partly changed", mode)
        return None
    _current = mode
    if mode == "speed":
        log.info("CPU allocator: freed memory is kept for reuse (DAVIT_MALLOC_TUNING=0 to disable)")
    else:
        log.info(
            "CPU allocator: freed blocks over 1 MiB go back to the OS (lower peak RSS, slower; see davit.allocator)"
        )
    return mode
