"""CPU allocator policies, each in a fresh process: "speed" keeps freed activations mapped (no page faults on reuse),
"memory" hands freed blocks back to the OS where glibc's defaults keep them in the heap, and the opt-out leaves
glibc's behaviour alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)

PROBE = """
import json, resource, torch
from davit.allocator import tune_cpu_allocator
on = tune_cpu_allocator()
mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
x = torch.randn(16384, 256)  # 16-64 MB activations, as a batch of images makes
with torch.no_grad():
    for _ in range(6):  # the heap settles within a few passes
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mlp(x)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(json.dumps({"on": on, "again": tune_cpu_allocator(), "faults": faults}))
"""


# glibc's defaults raise the mmap threshold when a mapped block is freed, so later blocks of that size come from the
# heap; freed heap blocks under a live one stay resident. The "memory" policy keeps every block over 1 MiB mapped.
HOLES = """
import json, sys, torch
from davit.allocator import tune_cpu_allocator
mode = tune_cpu_allocator(sys.argv[1]) if sys.argv[1] != "none" else None
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
torch.ones(4 << 20)  # a 16 MB block, mapped and freed: glibc's threshold rises above 8 MB
before = rss_mb()
big, pins = [], []
for _ in range(16):  # 16 x 8 MB activations, each followed by a small long-lived tensor
    big.append(torch.ones(2 << 20))
    pins.append(torch.ones(64 << 10))
del big
print(json.dumps({"mode": mode, "held_mb": rss_mb() - before}))
"""


def _probe(*argv: str, code: str = PROBE, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_allocator_reuses_freed_memory_and_opt_out_does_not() -> None:
    tuned = _probe(DAVIT_MALLOC_TUNING="1")
    plain = _probe(DAVIT_MALLOC_TUNING="0")
    assert tuned["on"] and tuned["again"]  # idempotent
    assert not plain["on"]
    pages = 64 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")  # one 64 MB activation
    assert plain["faults"] > 0.25 * pages  # glibc unmapped the freed activations: their pages fault in again
    assert tuned["faults"] < 0.05 * plain["faults"]  # kept and reused


def test_memory_policy_returns_freed_blocks_that_glibc_defaults_keep() -> None:
    plain = _probe("none", code=HOLES, DAVIT_MALLOC_TUNING="1")
    lean = _probe("memory", code=HOLES, DAVIT_MALLOC_TUNING="1")
    assert lean["mode"] == "memory"
    assert plain["held_mb"] > 100  # the 128 MB of freed activations stay resident in the heap
    assert lean["held_mb"] < 0.25 * plain["held_mb"]  # mapped one by one and unmapped when freed
    # The environment wins over the caller: "speed" keeps the freed blocks for reuse.
    forced = _probe("memory", code=HOLES, DAVIT_MALLOC_TUNING="speed")
    assert forced["mode"] == "speed" and forced["held_mb"] > 100


def test_unknown_allocator_policy_is_refused() -> None:
    from davit.allocator import tune_cpu_allocator

    with pytest.raises(ValueError, match="speed, memory"):
        tune_cpu_allocator("fast")
