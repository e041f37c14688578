"""A/B two source trees of davit on the same workloads, in alternating fresh processes (e.g. a branch against main).

    python benchmarks/ab_checkout.py --a /path/to/main/src --b src --rounds 5

Each round runs every workload once per tree, in a fresh process each (``PYTHONPATH`` points at the tree's ``src``),
alternating which tree goes first; the table shows the medians and the ratio B/A of times (< 1: B is faster). The
allocator is set the same way for both through glibc's environment variables (and ``DAVIT_MALLOC_TUNING=0``, so
neither tree's code changes it). Workloads: davit_tiny at 224 (a suffix ``-s768`` sets the image size),
``compiled-*`` for ``optimize(compile=True)``, ``davit.optimize`` inference fp32/bf16 at batch 1 and
32, and one training step at batch 16 (AdamW fused, cross-entropy; fp32 and bf16 autocast) with the tree's training
acceleration (``davit.accelerate.install(mode="train")`` where the tree has it; older trees accelerate inside the
model). Writes ``benchmarks/results/ab-<date>.json``. Like every figure on a shared machine, only the ratio measured
in the same run is a claim.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = ["infer-fp32-b32", "infer-fp32-b1", "infer-bf16-b32", "infer-bf16-b1", "train-fp32-b16", "train-bf16-b16"]
_ALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "536870912",
    "DAVIT_MALLOC_TUNING": "0",
}


def _worker(workload: str, reps: int) -> None:
    import contextlib

    import torch

    import davit

    torch.set_num_threads(2)
    kind, dtype, b, *rest = workload.split("-")  # e.g. infer-bf16-b1, or infer-bf16-b1-s768 for 768x768
    batch, size = int(b[1:]), int(rest[0][1:]) if rest else 224
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    model = davit.create_model("davit_tiny")
    if kind in ("infer", "compiled"):  # compiled: optimize(compile=True), compiled in the warm-up
        fast = davit.optimize(model, dtype=torch.bfloat16 if dtype == "bf16" else None, compile=kind == "compiled")

        def step() -> None:
            fast(x)

    else:
        if hasattr(davit, "accelerate"):
            davit.accelerate.install(model, mode="train")
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        y = torch.randint(0, 1000, (batch,))
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext

        def step() -> None:
            with ctx():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": statistics.median(times)}))


def _run(src: str, workload: str, reps: int) -> float:
    env = {**os.environ, **_ALLOC_ENV, "PYTHONPATH": str(Path(src).resolve())}
    cmd = [sys.executable, __file__, "--_worker", workload, "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", help="source folder A (holding the davit package)")
    ap.add_argument("--b", help="source folder B")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per process (median)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        _worker(args._worker, args.reps)
        return
    if not args.a or not args.b:
        ap.error("give both --a and --b (source folders holding the davit package)")
    loads = args.workloads.split(",")
    res: dict[str, dict[str, list[float]]] = {w: {"a": [], "b": []} for w in loads}
    for r in range(args.rounds):
        for w in loads:
            order = ("a", "b") if r % 2 == 0 else ("b", "a")
            for side in order:
                res[w][side].append(_run(getattr(args, side), w, args.reps))
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"{'workload':<16} {'A median s':>11} {'B median s':>11} {'B/A':>6}  (A={args.a}, B={args.b})")
    table = {}
    for w in loads:
        a, b = statistics.median(res[w]["a"]), statistics.median(res[w]["b"])
        table[w] = {"a": a, "b": b, "ratio_b_over_a": b / a, "runs": res[w]}
        print(f"{w:<16} {a:>11.4f} {b:>11.4f} {b / a:>6.3f}")
    out = Path(__file__).parent / "results" / f"ab-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"a": args.a, "b": args.b, "rounds": args.rounds, "results": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
