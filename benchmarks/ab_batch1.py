"""Batch-1 A/B in one process, interleaved single calls: timm in OpenVINO (dynamic / static batch) vs ours (our graph
in OpenVINO, ``davit.optimize``, the cached AOTInductor package). Prints median, 10th percentile and minimum per path.

    SIZE=224 B=1 ROUNDS=40 REPS=1 VARIANTS=dyn,static python benchmarks/ab_batch1.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import openvino as ov
    import timm
    import torch
    from bench import _sample, _timm_sd_from_ours

    import davit
    from davit.runtime import export_onnx_module

    torch.set_num_threads(2)
    size, batch = int(os.environ.get("SIZE", 224)), int(os.environ.get("B", 1))
    rounds, reps = int(os.environ.get("ROUNDS", 40)), int(os.environ.get("REPS", 1))
    torch.manual_seed(0)
    ours = davit.create_model("davit_tiny").eval()
    ref = timm.create_model("davit_tiny", num_classes=1000).eval()
    ref.load_state_dict(_timm_sd_from_ours(ours.state_dict(), ref))
    x = torch.randn(batch, 3, size, size)
    xn = x.numpy()
    onnx_path = os.path.join(tempfile.mkdtemp(prefix="davit-ab-"), "ours.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_graph = ov.convert_model(ref, example_input=torch.randn(1, 3, size, size), input=[-1, 3, size, size])
        export_onnx_module(ours, x[:1], onnx_path)
    ours_graph = ov.convert_model(onnx_path)
    core = ov.Core()

    def compiled(graph: Any, hint: str, static: bool) -> Any:
        g = graph.clone()
        g.reshape({0: ov.PartialShape([batch if static else -1, 3, size, size])})
        cfg = {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        c = core.compile_model(g, "CPU", {**cfg, "NUM_STREAMS": 1})
        return lambda: c(xn, share_inputs=True)

    def torch_call(m: Any) -> Any:
        def fn() -> Any:
            with torch.inference_mode():
                return m(x)

        return fn

    cands: dict[str, Any] = {}
    for dn, hint, dt in (("fp32", "f32", torch.float32), ("bf16", "bf16", torch.bfloat16)):
        for v in os.environ.get("VARIANTS", "dyn,static").split(","):
            cands[f"{dn}/timm ov {v}"] = compiled(timm_graph, hint, v == "static")
            cands[f"{dn}/ours ov {v}"] = compiled(ours_graph, hint, v == "static")
        cands[f"{dn}/ours optimize"] = torch_call(davit.optimize(ours, example_input=x, dtype=dt))
        t0 = time.perf_counter()
        aoti = davit.optimize(ours, example_input=x, dtype=dt, backend="aoti")
        print("aoti", dn, "built" if aoti.built else "loaded", f"{time.perf_counter() - t0:.1f} s", flush=True)
        cands[f"{dn}/ours aoti"] = torch_call(aoti)
    for fn in cands.values():
        fn()
        fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():
            samples[k].append(_sample(fn, reps, 2))
    for k, s in samples.items():
        secs = sorted(a for a, _ in s)
        share = statistics.median(c for _, c in s)
        print(
            f"{k:24s} med {statistics.median(secs) * 1e3:8.2f}  p10 {secs[len(secs) // 10] * 1e3:8.2f}  "
            f"min {secs[0] * 1e3:8.2f} ms  cpu share {share:.2f}",
            flush=True,
        )
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
