"""CPU allocator tuning: in a fresh process, freed activations stay mapped (no page faults on reuse) once tuned,
and the opt-out leaves glibc's behaviour alone."""

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


def _probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env}, check=True
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
