"""Window attention on the CPU: timm's fused SDPA against the explicit softmax(QK^T)V that davit's ``WindowAttention``
uses when autograd records (forward + backward, davit_tiny's four stages at batch 16), or with ``--infer`` against
the chunked inference kernel ``davit.accelerate.kernels.window_attend`` (forward only, no autograd).

    python benchmarks/attention.py [--batch 16] [--threads 2] [--out benchmarks/results]
    python benchmarks/attention.py --infer --batch 1 --size 768

Prints a table (ms per forward+backward, median of interleaved rounds) and writes ``attention-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from davit.accelerate import Policy
from davit.accelerate.kernels import window_attend

HERE = Path(__file__).resolve().parent
# davit_tiny: (windows per image, heads) per stage at 224x224 with 7x7 windows; head dim 32
STAGES = [(64, 3), (16, 6), (4, 12), (1, 24)]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return window_attend(q, k, v, Policy().window_chunk_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--infer", action="store_true", help="inference: SDPA vs davit's chunked window_attend")
    p.add_argument("--size", type=int, default=224, help="image size (sets the windows per stage)")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for stage, (_, heads) in enumerate(STAGES):
            side = -(-(a.size // 4 >> stage) // 7)  # windows per side: the stage's map padded to 7x7 windows
            shape = (a.batch * side * side, heads, 49, 32)
            q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=not a.infer) for _ in range(3))
            grad = torch.randn(shape, dtype=dtype)
            times: dict[str, list[float]] = {"timm (SDPA)": [], "ours (explicit)": []}
            fns = {"timm (SDPA)": sdpa, "ours (explicit)": explicit if not a.infer else chunked}
            with torch.no_grad():
                err = (sdpa(q, k, v) - fns["ours (explicit)"](q, k, v)).abs().max().item()
            for r in range(a.rounds + 1):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    if a.infer:
                        with torch.inference_mode():
                            fn(q, k, v)
                    else:
                        fn(q, k, v).backward(grad)
                    if r:  # round 0 warms up
                        times[name].append((time.perf_counter() - t0) * 1e3)
            med = {n: statistics.median(t) for n, t in times.items()}
            rows.append(
                {
                    "dtype": str(dtype).replace("torch.", ""),
                    "stage": stage + 1,
                    "shape": list(shape),
                    **{n: round(m, 2) for n, m in med.items()},
                    "speedup": round(med["timm (SDPA)"] / med["ours (explicit)"], 2),
                    "max_abs_diff": err,
                }
            )
    print(f"{'dtype':<10}{'stage':>6}{'timm SDPA ms':>14}{'ours ms':>9}{'speed-up':>10}{'max diff':>10}")
    for r in rows:
        print(
            f"{r['dtype']:<10}{r['stage']:>6}{r['timm (SDPA)']:>14.2f}{r['ours (explicit)']:>9.2f}"
            f"{r['speedup']:>9.2f}x{r['max_abs_diff']:>10.1e}"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "attention-infer-latest.json" if a.infer else "attention-latest.json"
    meta = {"batch": a.batch, "threads": a.threads, "size": a.size, "infer": a.infer}
    (out / name).write_text(json.dumps({**meta, "rows": rows}))


if __name__ == "__main__":
    main()
