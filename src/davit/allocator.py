"""CPU allocator tuning for glibc: keep freed activations instead of handing them back to the OS.

glibc's malloc serves every large block (a 224x224 batch's activations are tens of MB each) with a fresh ``mmap`` and
returns it with ``munmap`` when the tensor dies, so the next forward pass page-faults all of that memory back in, at
about 1-5 us per 4 KiB page. Measured here: davit_tiny fp32 inference at batch 32 runs at 17.7-19.9 images/s with
glibc's defaults and 25.3-27.4 with this tuning (``benchmarks/bench.py``, section ``alloc``, two runs); a training
step's first iterations spend most of their extra time in the same faults.

:func:`tune_cpu_allocator` applies, through ``mallopt`` in the running process, what the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<2 GB> MALLOC_TOP_PAD_=512M`` would: large blocks come from the heap and
freed memory stays mapped for reuse. The price: the process keeps its high-water mark of memory until it exits, which
suits an inference server or a training run, not a short-lived tool in a memory-tight place. ``davit.optimize`` and
the CPU training loop call it; ``DAVIT_MALLOC_TUNING=0`` in the environment (or ``optimize(..., tune_allocator=False)``)
leaves the allocator alone. Not glibc (musl, macOS, Windows): nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["tune_cpu_allocator"]

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 512 << 20))
_done = False


def tune_cpu_allocator() -> bool:
    """Tune glibc's malloc for PyTorch CPU work (see the module notes). Idempotent; returns whether it is in effect.

    Skipped (False) when ``DAVIT_MALLOC_TUNING=0``, when the C library is not glibc, or when ``mallopt`` refuses.
    """
    global _done
    if _done:
        return True
    if os.environ.get("DAVIT_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in _SETTINGS):
        log.warning("mallopt refused the allocator tuning; CPU speed may suffer from page faults")
        return False
    _done = True
    log.info("CPU allocator: freed memory is kept for reuse (DAVIT_MALLOC_TUNING=0 to disable)")
    return True
