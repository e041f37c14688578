"""Where the time goes: per-op wall time of one inference batch or one training step, ours and timm in one run.

    python benchmarks/op_profile.py                          # training step, fp32, batch 16
    python benchmarks/op_profile.py --mode infer --batch 32  # davit.optimize (eager) vs timm eager inference
    python benchmarks/op_profile.py --dtype bf16 --shapes --top 40

Each ATen op is timed synchronously around its call by a ``TorchDispatchMode`` (CPU ops run to completion before
returning, so the wall time is the op's own). On this machine the PyTorch profiler inflated memory-bound ops such as
``gelu_backward`` 3-14x; this timer adds ~10 us per op (within ~5% of an untimed training step or batch-32 forward,
~15% at batch 1), and the table reports the untimed time beside the timed one. Ops called
inside oneDNN-fused kernels appear as those kernels (``_linear_pointwise``, ``_convolution_pointwise``).
Writes ``<out>/op-profile-<mode>-<dtype>-b<batch>.json`` and prints a table per implementation.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from bench import train_setup  # benchmarks/ is on sys.path when this script runs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import davit
from davit.allocator import tune_cpu_allocator

_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_linear_pointwise")
_CONVS = ("convolution", "_convolution", "convolution_backward")


def _gemm_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of a GEMM-shaped op (matmuls, oneDNN's fused Linear, dense convolutions), 0 for everything else.

    Depthwise convolutions count as 0: a few FLOPs per byte, they run at memory speed, not at the GEMM rate.
    """
    name = func.overloadpacket.__name__
    if name == "_linear_pointwise":  # (x, w, b, ...) or the binary form (x, other, w, b, ...)
        x, w = (args[0], args[2]) if len(args) > 2 and isinstance(args[2], torch.Tensor) else (args[0], args[1])
        return 2 * x.numel() * w.shape[0]
    if name not in _MATMULS and name not in _CONVS:
        return 0
    if name in _CONVS:
        groups = args[9] if name == "convolution_backward" else args[8]
        if groups != 1:
            return 0
    fn = flop_registry.get(func.overloadpacket)
    return int(fn(*args, out_val=out, **kwargs)) if fn is not None else 0


class _OpTimer(TorchDispatchMode):
    def __init__(self, shapes: bool, clock: Any = time.perf_counter) -> None:
        super().__init__()
        self.shapes, self.clock = shapes, clock
        self.ms: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.flops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        t0 = self.clock()
        out = func(*args, **(kwargs or {}))
        key = func.overloadpacket.__name__
        if self.shapes:
            key += str([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:2])
        self.ms[key] += (self.clock() - t0) * 1e3
        self.calls[key] += 1
        self.flops[key] += _gemm_flops(func, args, kwargs or {}, out)
        return out


def _runner(impl: str, mode: str, dtype: str, batch: int, size: int = 224) -> Any:
    """A zero-argument callable running one batch (inference) or one step (training, as ``bench.py`` trains)."""
    if mode == "train":
        return train_setup(impl, "davit_tiny", dtype, batch)[1]
    bf16 = dtype == "bf16"
    x = torch.randn(batch, 3, size, size)
    if impl == "timm":
        import timm

        model = timm.create_model("davit_tiny", num_classes=1000).eval()
    else:
        fast = davit.optimize(davit.create_model("davit_tiny"), dtype=torch.bfloat16 if bf16 else None)
        return lambda: fast(x)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def infer() -> None:
        with torch.inference_mode(), ctx():
            model(x)

    return infer


def profile(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    run = _runner(impl, args.mode, args.dtype, args.batch, args.size)
    # --cpu-time: this thread's CPU time instead of wall time. With --threads 1 every op runs on the calling thread,
    # so the figures leave out the time other processes held the core (a shared machine's load), not the op's work.
    clock = time.thread_time if args.cpu_time else time.perf_counter
    for _ in range(args.warmup):
        run()
    t0 = clock()
    run()
    untimed = (clock() - t0) * 1e3
    with _OpTimer(args.shapes, clock):  # the first timed call pays the mode's one-time set-up
        run()
    timer = _OpTimer(args.shapes, clock)
    t0 = clock()
    with timer:
        run()
    timed = (clock() - t0) * 1e3
    ops = sorted(timer.ms.items(), key=lambda kv: -kv[1])
    gemm_ms = sum(v for k, v in timer.ms.items() if timer.flops[k])
    return {
        "untimed_ms": round(untimed, 1),
        "timed_ms": round(timed, 1),
        "sum_of_ops_ms": round(sum(timer.ms.values()), 1),
        # GEMM-shaped ops (matmuls, fused Linears, dense convs): their time and FLOPs; the rest is memory-bound work.
        "gemm_ms": round(gemm_ms, 1),
        "gemm_gflop": round(sum(timer.flops.values()) / 1e9, 2),
        "ops": [{"op": k, "ms": round(v, 2), "calls": timer.calls[k], "gflop": timer.flops[k] / 1e9} for k, v in ops],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="image size (inference only; training runs at 224)")
    p.add_argument("--impl", choices=["both", "ours", "timm"], default="both")
    p.add_argument("--shapes", action="store_true", help="split each op by its first two input shapes")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--cpu-time", action="store_true", help="time by this thread's CPU time (use with --threads 1 under load)"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if os.environ.get("DAVIT_MALLOC_TUNING", "1") != "0":
        tune_cpu_allocator()  # both sides: no page faults on freed activations
    impls = ["ours", "timm"] if args.impl == "both" else [args.impl]
    result: dict[str, Any] = {"mode": args.mode, "dtype": args.dtype, "batch": args.batch, "threads": args.threads}
    result["size"] = args.size
    result["clock"] = "thread CPU time" if args.cpu_time else "wall"
    for impl in impls:
        r = profile(impl, args)
        result[impl] = r
        what = "training step" if args.mode == "train" else "inference batch"
        print(f"\n{impl}: {what}, {args.dtype}, batch {args.batch}: {r['untimed_ms']:.0f} ms untimed, "
              f"{r['timed_ms']:.0f} ms timed, ops sum to {r['sum_of_ops_ms']:.0f} ms")  # fmt: skip
        rate = r["gemm_gflop"] / max(r["gemm_ms"], 1e-9) * 1e3
        other = r["sum_of_ops_ms"] - r["gemm_ms"]
        print(f"GEMM-shaped ops: {r['gemm_gflop']:.1f} GFLOP in {r['gemm_ms']:.0f} ms ({rate:.0f} GFLOP/s); "
              f"everything else: {other:.0f} ms ({other / r['sum_of_ops_ms']:.0%} of op time)")  # fmt: skip
        print(f"{'op':<70} {'ms':>9} {'share':>6} {'calls':>6} {'GFLOP/s':>8}")
        for row in r["ops"][: args.top]:
            share = row["ms"] / r["sum_of_ops_ms"]
            gfs = f"{row['gflop'] / row['ms'] * 1e3:8.0f}" if row["gflop"] else f"{'':>8}"
            print(f"{row['op'][:70]:<70} {row['ms']:9.1f} {share:6.1%} {row['calls']:6d} {gfs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = "" if args.size == 224 else f"-s{args.size}"
    path = out / f"op-profile-{args.mode}-{args.dtype}-b{args.batch}{size}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
