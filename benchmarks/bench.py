"""DaViT speed and memory against timm, measured side by side in one run.

    python benchmarks/bench.py [--quick] [--model davit_tiny] [--out benchmarks/results]
    davit benchmark [--quick] ...                      (the same script)

Sections (each can be skipped with --skip NAME):
  gemm    this machine's fp32 (MKL and oneDNN) and bf16 GEMM rates, the ceilings the table's "peak" column uses;
  infer   every path a user would pick, per image size (224, and 768 = Florence-2's, at batch 1 and --big-batch)
          and batch (1 latency in ms, 32 throughput in images/s), fp32 and bf16: peers timm eager (autocast for
          bf16), timm compiled (torch.compile, weight freezing, C++ wrapper), timm exported to onnxruntime (fp32),
          timm converted by OpenVINO (precision hint f32 / bf16, 2 threads, latency hint, 1 stream, static batch);
          ours eager, ``davit.optimize`` (and with ``compile=True``), the cached AOTInductor package
          (``backend="aoti"``), our graph in onnxruntime and in OpenVINO (``davit.runtime``). Each row shows
          its ratio to the best peer of its (size, batch, dtype), and a summary compares our default path and our
          best path without a per-shape compile with that peer. Every configuration is timed in interleaved
          rounds in this process and reported as the median; --skip compile / onnx / openvino drops those rows;
  train   one AdamW (PyTorch's fused kernel, both sides) + cross-entropy step, fp32 and bf16 autocast, each
          configuration in a fresh process: speed (images/s at batch 16 after 3 warm-up steps, ours vs timm, and
          ours with ``train.memory_saving=all``) and
          memory at batch 32 with glibc's default allocator (peak RSS, and the MB autograd saves for the backward
          pass) for timm and ours at every memory-saving level, with and without gradient checkpointing;
  scale   batch-1 fp32 time per megapixel at 224, 448, 896 (ours and timm, interleaved);
  alloc   fp32 inference with glibc's default allocator vs ``davit.allocator.tune_cpu_allocator`` (fresh processes);
  hires   one 2048x2048 image through our model in a fresh process: time and peak RSS.

Fairness: glibc's allocator hands large activations back to the OS after every op, so every new activation pays page
faults; the script re-executes itself with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64G MALLOC_TOP_PAD_=512M``
(--no-malloc-tuning keeps the default) and the setting applies to both sides equally (same process, or the same
environment for the worker processes). Each sample records the CPU share the process got (CPU time / wall time /
threads); a row whose samples got less than 90% is marked * and the run warns (figures under load are no claims);
the machine load is recorded at the start and end. Writes ``<out>/bench-<time>.json``, ``<out>/latest.json``
and a PNG chart, and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_TOP_PAD_": "536870912"}
HERE = Path(__file__).resolve().parent
DROP_PATH = 0.1  # the paper's Tiny recipe; set on both sides (timm's default is 0, ours 0.1)
# A sample taken while the process got less than this share of its threads' CPU time was slowed by other load: the
# row is marked and the run warns (such figures are not claims).
CPU_SHARE_MIN = 0.9


def _reexec_with_malloc_tuning() -> None:
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ---------------------------------------------------------------------------------------------------------- timing
def _sample(fn: Callable[[], Any], reps: int, threads: int) -> tuple[float, float]:
    """Seconds per call (mean over ``reps`` back-to-back calls) and the CPU share the process got meanwhile."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    wall = time.perf_counter() - w0
    return wall / reps, (time.process_time() - c0) / wall / threads


def interleaved(
    cands: dict[str, Callable[[], Any]], rounds: int, reps: int, threads: int
) -> dict[str, dict[str, float]]:
    """Time every candidate once per round, rounds interleaved; median seconds per call and median CPU share."""
    for fn in cands.values():  # warm-up (allocator, oneDNN primitive caches, onnxruntime arenas)
        fn()
        fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():
            samples[k].append(_sample(fn, reps, threads))
    out = {}
    for k, s in samples.items():
        secs = [a for a, _ in s]
        out[k] = {
            "sec": statistics.median(secs),
            "sec_min": min(secs),
            "spread": (max(secs) - min(secs)) / statistics.median(secs),
            "cpu_share": statistics.median(b for _, b in s),
        }
    return out


# ------------------------------------------------------------------------------------------------------------ gemm
def gemm_peak(quick: bool, threads: int) -> dict[str, float]:
    """GFLOP/s of a large fp32 GEMM through MKL (``F.linear``) and oneDNN, and of a bf16 GEMM (oneDNN)."""
    import torch
    import torch.nn.functional as F

    M, K, N = 8192, 1024, 1024
    x, w = torch.randn(M, K), torch.randn(N, K)
    xb, wb = x.bfloat16(), w.bfloat16()
    lp = torch.ops.mkldnn._linear_pointwise
    cands = {
        "fp32_mkl": lambda: F.linear(x, w),
        "fp32_onednn": lambda: lp(x, w, None, "none", [], ""),
        "bf16_onednn": lambda: F.linear(xb, wb),
    }
    res = interleaved(cands, rounds=3 if quick else 7, reps=2, threads=threads)
    flop = 2 * M * K * N
    # The ceiling is the best sample: a GEMM can only be slowed down by other load, never sped up.
    out = {k: round(flop / v["sec_min"] / 1e9, 1) for k, v in res.items()}
    out["fp32"] = max(out["fp32_mkl"], out["fp32_onednn"])
    out["bf16"] = out["bf16_onednn"]
    return out


# ----------------------------------------------------------------------------------------------------------- infer
def _onnx_session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    from davit.runtime import ort_session_options

    # The peer gets the options our sessions use (not spinning: a spinning session's idle threads slowed every other
    # path in this process, torch 25-40%, OpenVINO 20% at 224 batch 1; onnxruntime itself ran no slower without it).
    return ort.InferenceSession(path, ort_session_options(threads), providers=["CPUExecutionProvider"])


def _export_timm_onnx(model: Any, path: str, size: int = 224) -> None:
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, size, size),),
            path,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def _openvino_timm(model: Any, size: int, threads: int, batches: list[int]) -> dict[tuple[str, int], Any]:
    """timm's model as an OpenVINO user deploys it: ``convert_model`` on the torch module, compiled with an explicit
    precision hint (on AVX512-BF16/AMX CPUs OpenVINO defaults to bf16), latency hint, one stream, ``threads``
    inference threads, and the input shape fixed to each timed batch (static shapes were 11-16% faster than a dynamic
    batch at batch 1 in one A/B: the peer gets its best setting). Returns ``{(dtype, batch): compiled}``."""
    import openvino as ov
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = ov.convert_model(model, example_input=torch.randn(1, 3, size, size), input=[-1, 3, size, size])
    core = ov.Core()
    out = {}
    for batch in batches:
        g = graph.clone()
        g.reshape({0: ov.PartialShape([batch, 3, size, size])})
        for name, hint in (("fp32", "f32"), ("bf16", "bf16")):
            cfg = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
            out[name, batch] = core.compile_model(g, "CPU", {**cfg, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    return out


def _compile_timm(model: Any) -> Any:
    """timm under ``torch.compile`` (Inductor) with the weight freezing and C++ wrapper ``davit.optimize(compile=True)``
    uses, so both compiled rows get the same compiler settings."""
    import torch

    return torch.compile(copy.deepcopy(model), options={"freezing": True, "cpp_wrapper": True}, dynamic=False)


def low_cpu_share(row: dict[str, Any]) -> bool:
    """Whether a row's samples ran while the process got less than 90% of its CPU time (other load on the cores)."""
    return row.get("cpu_share", 1.0) < CPU_SHARE_MIN


def bench_infer(args: argparse.Namespace, flops_per_image: float) -> dict[str, Any]:
    """Every inference path a user would pick, per (image size, batch), timed in interleaved rounds in this process.

    Peers: timm eager, timm compiled, timm exported to onnxruntime, timm converted by OpenVINO. Ours: eager,
    ``davit.optimize`` (default and ``compile=True``), and our graph in onnxruntime and OpenVINO (``davit.runtime``).
    fp32 and bf16 (autocast for the eager peers, the precision hint for OpenVINO; onnxruntime has no bf16 path).
    """
    import numpy as np
    import timm
    import torch

    import davit
    from davit.export import export_onnx
    from davit.optimize import optimize

    torch.manual_seed(0)
    threads = args.threads
    ours = davit.create_model(args.model).eval()
    ref = timm.create_model(args.model, num_classes=1000).eval()
    # Same weights on both sides (timm's keys map 1:1 onto ours), so logits can be cross-checked.
    ref.load_state_dict(_timm_sd_from_ours(ours.state_dict(), ref))
    tmp = tempfile.mkdtemp(prefix="davit-bench-")
    info: dict[str, Any] = {}
    ours_sess = None
    if "onnx" not in args.skip:
        exp = export_onnx(ours, f"{tmp}/ours.onnx", check_sizes=((2, 224, 224),))
        info["ours_onnx_export_s"] = exp["seconds"]
        info["ours_onnx_max_abs_err"] = exp["max_abs_err"]
        ours_sess = _onnx_session(f"{tmp}/ours.onnx", threads)  # dynamic batch, height and width: one for all sizes
    ours_ov: dict[str, Any] = {}
    if "openvino" not in args.skip:
        from davit.runtime import to_runtime

        for dtype_name in ("fp32", "bf16"):
            t0 = time.perf_counter()
            ours_ov[dtype_name] = to_runtime(ours, "openvino", dtype=dtype_name, threads=threads)
            info[f"ours_openvino_{dtype_name}_convert_s"] = round(time.perf_counter() - t0, 1)

    def bf16() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def run(m: Any, x: Any, ctx: Callable[[], Any] | None = None) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.inference_mode(), ctx() if ctx else contextlib.nullcontext():
                return m(x)

        return fn

    compile_on = "compile" not in args.skip
    results: dict[str, Any] = {}
    for size in args.sizes:
        timm_sess = timm_ov = None
        batches = [1, args.batch] if size == 224 else [1, args.big_batch]
        if "onnx" not in args.skip:
            t0 = time.perf_counter()
            _export_timm_onnx(ref, f"{tmp}/timm{size}.onnx", size)  # timm's graph bakes the spatial size in
            info[f"timm_onnx_export_{size}_s"] = round(time.perf_counter() - t0, 1)
            timm_sess = _onnx_session(f"{tmp}/timm{size}.onnx", threads)
        if "openvino" not in args.skip:
            t0 = time.perf_counter()
            timm_ov = _openvino_timm(ref, size, threads, batches)
            info[f"timm_openvino_{size}_convert_s"] = round(time.perf_counter() - t0, 1)
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            xn = x.numpy()
            fast: dict[str, Any] = {}
            for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                for comp in (False, True) if compile_on else (False,):
                    key = dtype_name + ("+compile" if comp else "")
                    t0 = time.perf_counter()
                    # optimize sets no process-wide allocator policy: the run's setting applies to both sides
                    fast[key] = optimize(copy.deepcopy(ours), example_input=x, dtype=dtype, compile=comp)
                    info[f"optimize_{key}_{size}_b{batch}_s"] = round(time.perf_counter() - t0, 1)
                if "aoti" not in args.skip:
                    # The cached AOTInductor package: built once per (weights, shape, dtype) on this machine, then
                    # only loaded (the seeded weights are the same every run, so a second run finds them).
                    t0 = time.perf_counter()
                    fast[f"{dtype_name}+aoti"] = optimize(ours, example_input=x, dtype=dtype, backend="aoti")
                    built = "built" if fast[f"{dtype_name}+aoti"].built else "loaded"
                    info[f"aoti_{dtype_name}_{size}_b{batch}_{built}_s"] = round(time.perf_counter() - t0, 1)
            cands: dict[str, Callable[[], Any]] = {}
            for dtype_name, ctx in (("fp32", None), ("bf16", bf16)):
                cands[f"{dtype_name}/timm eager"] = run(ref, x, ctx)
                if compile_on:
                    t0 = time.perf_counter()
                    compiled = _compile_timm(ref)
                    run(compiled, x, ctx)()  # compile now, outside the timed rounds
                    info[f"timm_compile_{dtype_name}_{size}_b{batch}_s"] = round(time.perf_counter() - t0, 1)
                    cands[f"{dtype_name}/timm compiled"] = run(compiled, x, ctx)
                if timm_ov is not None:
                    cands[f"{dtype_name}/timm openvino"] = lambda c=timm_ov[dtype_name, batch], xn=xn: c(
                        xn, share_inputs=True
                    )
                if timm_sess is not None and dtype_name == "fp32":
                    name = timm_sess.get_inputs()[0].name
                    cands["fp32/timm onnxruntime"] = lambda s=timm_sess, name=name, xn=xn: s.run(None, {name: xn})
                cands[f"{dtype_name}/ours eager"] = run(ours, x, ctx)
                cands[f"{dtype_name}/ours optimize"] = run(fast[dtype_name], x)
                if compile_on:
                    cands[f"{dtype_name}/ours optimize compile"] = run(fast[f"{dtype_name}+compile"], x)
                if f"{dtype_name}+aoti" in fast:
                    cands[f"{dtype_name}/ours aoti (cached)"] = run(fast[f"{dtype_name}+aoti"], x)
                if dtype_name in ours_ov:
                    cands[f"{dtype_name}/ours openvino"] = run(ours_ov[dtype_name], x)
                if ours_sess is not None and dtype_name == "fp32":
                    name = ours_sess.get_inputs()[0].name
                    cands["fp32/ours onnxruntime"] = lambda s=ours_sess, name=name, xn=xn: s.run(None, {name: xn})
            # Numerics of every path against our eager fp32 logits (relative to the largest logit).
            with torch.inference_mode():
                base = ours(x).float()
            errs = {}
            for k, call in cands.items():
                out = call()
                if not isinstance(out, torch.Tensor):  # onnxruntime: a list of arrays; OpenVINO: its result object
                    out = torch.from_numpy(np.asarray(out[0]))
                errs[k] = float((out.float() - base).abs().max() / base.abs().max())
            big = batch > 1 or size > 224
            rounds = args.big_rounds if size > 224 else args.rounds if big else args.rounds + 2
            reps = 1 if big else (3 if args.quick else 5)
            timed = interleaved(cands, rounds=rounds, reps=reps, threads=threads)
            flops = flops_per_image * (size / 224) ** 2  # the cost is linear in pixels (windows are a fixed size)
            for k, v in timed.items():
                dtype_name = k.split("/")[0]
                ips = batch / v["sec"]
                peak = args.gemm.get(dtype_name)
                prefix = f"b{batch}" if size == 224 else f"{size}/b{batch}"
                results[f"{prefix}/{k}"] = {
                    "size": size,
                    "batch": batch,
                    "dtype": dtype_name,
                    "path": k.split("/", 1)[1],
                    "ms": round(v["sec"] * 1000, 2),
                    "img_s": round(ips, 2),
                    "spread": round(v["spread"], 3),
                    "cpu_share": round(v["cpu_share"], 2),
                    "rel_err_vs_ours_fp32": errs[k],
                    "gemm_peak_frac": round(ips * flops / (peak * 1e9), 3) if peak else None,
                }
            low = [k for k, v in timed.items() if v["cpu_share"] < CPU_SHARE_MIN]
            if low:
                print(
                    f"  WARNING: {size}px batch {batch}: the process got < {CPU_SHARE_MIN:.0%} of its CPU time in "
                    f"{len(low)} of {len(timed)} rows (marked *): other load on the cores, those figures are no claims",
                    flush=True,
                )
            print(f"  {size}px batch {batch} done (load {os.getloadavg()[0]:.1f})", flush=True)
    return {"rows": results, "info": info}


def _timm_sd_from_ours(sd: dict[str, Any], ref: Any) -> dict[str, Any]:
    """Our state dict in timm's key layout (blocks ``.0``/``.1`` are timm's spatial/channel blocks)."""
    ref_keys = list(ref.state_dict())
    mapped = {}
    for k in ref_keys:
        ours_key = k.replace("spatial_block", "0").replace("channel_block", "1")
        mapped[k] = sd[ours_key]
    return mapped


# ----------------------------------------------------------------------------------------------- worker processes
def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that across ``execve``, so a
    worker would inherit the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_setup(
    impl: str, model_name: str, dtype: str, batch: int, level: str = "none", ckpt: bool = False
) -> tuple[Any, Callable[..., None]]:
    """A training model (``impl`` "ours" or "timm", drop path 0.1) and ``step(extra_ctx)``: one AdamW +
    cross-entropy step on a fixed random batch, fp32 or bf16 autocast, the forward inside ``extra_ctx``."""
    import torch

    import davit

    if impl == "timm":
        import timm

        model = timm.create_model(model_name, num_classes=1000, drop_path_rate=DROP_PATH)
    else:
        model = davit.create_model(model_name, drop_path_rate=DROP_PATH)
        davit.accelerate.install(model, mode="train", memory_saving=level)  # what `davit train` installs
        if ckpt:
            model.set_grad_checkpointing(True)
    model.train()
    # PyTorch's single-kernel AdamW on both sides: what `davit train` runs (timm's model gets the same optimiser).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext

    def step(extra: contextlib.AbstractContextManager | None = None) -> None:
        with ctx(), extra or contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def _worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: one training configuration, or one high-resolution forward."""
    import torch

    import davit

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rss0 = _peak_rss_mb()
    if kind == "alloc":
        from davit.allocator import tune_cpu_allocator

        if spec["tuned"]:
            tune_cpu_allocator()
        if spec["impl"] == "timm":
            import timm

            net = timm.create_model(spec["model"]).eval()
        else:
            net = davit.optimize(davit.create_model(spec["model"]))
        x = torch.randn(spec["batch"], 3, 224, 224)
        times = []
        with torch.inference_mode():
            for _ in range(6):
                t0 = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - t0)
        return {"img_s": round(spec["batch"] / statistics.median(times[2:]), 2), "peak_rss_mb": round(_peak_rss_mb())}
    if kind == "hires":
        model = davit.create_model(spec["model"]).eval()
        x = torch.randn(1, 3, spec["size"], spec["size"])
        times = []
        with torch.inference_mode():
            for _ in range(spec["reps"]):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        return {
            "size": spec["size"],
            "sec": round(min(times), 2),
            "peak_rss_mb": round(_peak_rss_mb()),
            "rss_before_mb": round(rss0),
        }
    if spec.get("alloc"):
        from davit.allocator import tune_cpu_allocator

        tune_cpu_allocator(spec["alloc"])
    model, step = train_setup(
        spec["impl"], spec["model"], spec["dtype"], spec["batch"], spec.get("level", "none"), spec.get("ckpt", False)
    )
    rss_model = _peak_rss_mb()
    times, cpu = [], []
    n = spec["warmup"] + spec["steps"]
    saved = _SavedBytes(model)
    for i in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        # The last step also counts what autograd saves (the hook only records sizes; it keeps nothing alive).
        step(saved if i == n - 1 else contextlib.nullcontext())
        if i >= spec["warmup"]:  # the first steps allocate AdamW's state and grow the heap (page faults)
            times.append(time.perf_counter() - t0)
            cpu.append((time.process_time() - c0) / times[-1] / spec["threads"])
    sec = statistics.median(times)
    return {
        "img_s": round(spec["batch"] / sec, 2),
        "cpu_share": round(statistics.median(cpu), 2),
        "sec_per_step": round(sec, 3),
        "peak_rss_mb": round(_peak_rss_mb()),
        "saved_mb": round(saved.mb),
        "rss_after_build_mb": round(rss_model),
    }


class _SavedBytes:
    """Context manager: MB that autograd keeps for the backward pass (unique storages, parameters excluded), i.e. the
    activation memory independent of the allocator; autocast's weight copies count, as they are saved too."""

    def __init__(self, model: Any) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self.mb = 0.0

    def _pack(self, t: Any) -> Any:
        st = t.untyped_storage()
        if st.data_ptr() not in self.params:
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> None:
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        self.mb = sum(self.seen.values()) / 2**20


def _spawn(kind: str, spec: dict[str, Any], default_malloc: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if not (default_malloc and k in MALLOC_ENV)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (impl, memory-saving level, gradient checkpointing, allocator policy) per training row; memory rows run under
# glibc's defaults (None) unless they name a davit.allocator policy ("memory": what `davit train` picks with
# checkpointing on the CPU; timm gets a row under the same policy for a like-for-like ratio).
SPEED_CONFIGS = [("timm", "none", False, None), ("ours", "none", False, None), ("ours", "all", False, None)]
MEMORY_CONFIGS = [("timm", "none", False, None), ("ours", "none", False, None), ("ours", "mlp", False, None)]
MEMORY_CONFIGS += [("ours", "all", False, None), ("ours", "none", True, None), ("ours", "all", True, None)]
MEMORY_CONFIGS += [("timm", "none", False, "memory"), ("ours", "all", True, "memory")]


def _train_name(impl: str, dtype: str, level: str, ckpt: bool, alloc: str | None = None) -> str:
    name = f"{dtype}/{impl}" + (f" saving={level}" if level != "none" else "") + (" +grad-ckpt" if ckpt else "")
    return name + (f" alloc={alloc}" if alloc else "")


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """Speed (batch --train-batch, the allocator setting) and memory (batch --mem-batch, glibc's defaults, which
    return freed memory to the OS as users' processes do), each configuration in a fresh process."""
    runs: dict[str, list[dict[str, Any]]] = {}
    plans = [("speed", c, args.train_batch) for c in SPEED_CONFIGS]
    if "memory" not in args.skip:
        plans += [("memory", c, args.mem_batch) for c in MEMORY_CONFIGS]
    # Configurations alternate over rounds so load spikes hit both sides.
    for rnd in range(args.train_rounds):
        for what, (impl, level, ckpt, alloc), batch in plans:
            if what == "memory" and rnd:
                continue  # memory does not depend on the machine's load: one round
            for dtype in ("fp32", "bf16"):
                spec = {
                    "impl": impl,
                    "dtype": dtype,
                    "level": level,
                    "ckpt": ckpt,
                    "model": args.model,
                    "batch": batch,
                    "warmup": 1 if what == "memory" else (2 if args.quick else 3),
                    "steps": 2 if what == "memory" else 3,
                    "threads": args.threads,
                    "alloc": alloc,
                }
                name = f"{what}/{_train_name(impl, dtype, level, ckpt, alloc)}"
                r = _spawn("train", spec, default_malloc=what == "memory")
                r["batch"] = batch
                runs.setdefault(name, []).append(r)
                print(f"  train {name}: {r} (load {os.getloadavg()[0]:.1f})", flush=True)
    rows = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows[name] = rs[0]
            continue
        # The median run is the figure (robust to a load spike either side); the best one is kept beside it (load only
        # ever slows a run down), and so is the lowest CPU share any round got.
        speeds = sorted(ok, key=lambda r: r["img_s"])
        mid = speeds[(len(speeds) - 1) // 2]
        rows[name] = {
            **mid,
            "img_s_max": speeds[-1]["img_s"],
            "cpu_share_min": min(r["cpu_share"] for r in ok),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
            "runs": len(ok),
        }
    # Paired per round (timm and ours ran back to back in each round, so a load spike hits both): median ratio.
    for name, rs in runs.items():
        what, dtype, impl = name.split("/", 2)
        peer = runs.get(f"{what}/{dtype}/timm")
        if what != "speed" or impl == "timm" or not peer:
            continue
        pairs = [a["img_s"] / b["img_s"] for a, b in zip(rs, peer) if "error" not in a and "error" not in b]
        if pairs:
            rows[name]["vs_timm_paired"] = [round(p, 3) for p in pairs]
            rows[name]["vs_timm_median"] = round(statistics.median(pairs), 3)
    return rows


def bench_alloc(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 inference at the throughput batch with glibc's default allocator vs ``tune_cpu_allocator`` (what
    ``davit.optimize`` and the training loop apply), each in a fresh process without the benchmark's environment."""
    rows: dict[str, Any] = {}
    for tuned in (False, True):
        for impl in ("timm", "ours"):
            spec = {"impl": impl, "tuned": tuned, "model": args.model, "batch": args.batch, "threads": args.threads}
            name = f"{impl} {'tuned' if tuned else 'glibc default'}"
            rows[name] = _spawn("alloc", spec, default_malloc=True)
            print(f"  alloc {name}: {rows[name]} (load {os.getloadavg()[0]:.1f})", flush=True)
    return rows


def bench_scale(args: argparse.Namespace) -> dict[str, Any]:
    import timm
    import torch

    import davit

    ours = davit.create_model(args.model).eval()
    ref = timm.create_model(args.model, num_classes=1000).eval()
    rows = {}
    for size in args.scale_sizes:
        x = torch.randn(1, 3, size, size)

        def run(m: Any, x: Any = x) -> Callable[[], Any]:
            def fn() -> Any:
                with torch.inference_mode():
                    return m(x)

            return fn

        timed = interleaved({"ours": run(ours), "timm": run(ref)}, rounds=args.rounds, reps=1, threads=args.threads)
        for side, v in timed.items():
            rows[f"{size}/{side}"] = {
                "size": size,
                "path": side,
                "ms": round(v["sec"] * 1000, 1),
                "ms_per_mpix": round(v["sec"] * 1000 / (size * size / 1e6), 1),
                "cpu_share": round(v["cpu_share"], 2),
            }
        print(f"  scale {size}: {rows[f'{size}/ours']['ms_per_mpix']} ms/MPix ours", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------- report
def flops_per_image(model_name: str) -> float:
    """FLOPs of one 224x224 forward (torch's FlopCounterMode: GEMMs, convs and attention; 2 FLOPs per MAC)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import davit

    m = davit.create_model(model_name).eval()  # the reference model: plain ATen ops the counter knows
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 3, 224, 224))
    return float(fc.get_total_flops())


def summarize_infer(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (size, batch, dtype): the best peer (timm by any path), our default path (``davit.optimize``), our best
    path without a per-process compile (the cached AOTInductor package counts: it is compiled once per machine and
    only loaded afterwards), and their ratios (speed: > 1 means ours is faster)."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for r in rows.values():
        groups.setdefault((r.get("size", 224), r["batch"], r["dtype"]), []).append(r)
    out = []
    for (size, batch, dtype), rs in groups.items():
        peers = [r for r in rs if r["path"].startswith("timm")]
        ours = [
            r for r in rs if r["path"].startswith("ours") and "compile" not in r["path"] and r["path"] != "ours eager"
        ]
        if not peers or not ours:
            continue
        best_peer = max(peers, key=lambda r: r["img_s"])
        default = next((r for r in ours if r["path"] == "ours optimize"), None)
        best_ours = max(ours, key=lambda r: r["img_s"])
        out.append(
            {
                "size": size,
                "batch": batch,
                "dtype": dtype,
                "best_peer": best_peer["path"],
                "best_peer_img_s": best_peer["img_s"],
                "default_img_s": default["img_s"] if default else None,
                "default_vs_best_peer": round(default["img_s"] / best_peer["img_s"], 3) if default else None,
                "best_ours": best_ours["path"],
                "best_ours_img_s": best_ours["img_s"],
                "best_ours_vs_best_peer": round(best_ours["img_s"] / best_peer["img_s"], 3),
                "low_cpu_share": any(low_cpu_share(r) for r in (best_peer, best_ours, *([default] if default else []))),
            }
        )
    return out


def _fmt_speed(r: dict[str, Any]) -> str:
    """ms per batch-1 call, images/s for batches."""
    return f"{r['ms']:.1f} ms" if r["batch"] == 1 else f"{r['img_s']:.1f} img/s"


def print_table(res: dict[str, Any]) -> None:
    print(
        f"\n{res['meta']['model']}  |  {res['meta']['cpu']}  |  {res['meta']['threads']} threads  |  load "
        f"{res['meta']['load_start']:.1f} -> {res['meta']['load_end']:.1f}  |  GEMM peak fp32 "
        f"{res['gemm'].get('fp32', '-')} / bf16 {res['gemm'].get('bf16', '-')} GFLOP/s"
    )
    rows = res.get("infer", {}).get("rows", {})
    if rows:
        print(
            f"\n{'inference':<40}{'ms':>9}{'img/s':>9}{'vs best':>9}{'vs timm':>9}{'of peak':>9}{'cpu':>7}"
            f"{'rel err':>10}\n{'':<40}{'':>9}{'':>9}{'peer':>9}{'eager':>9}"
        )
        groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
        for r in rows.values():
            groups.setdefault((r.get("size", 224), r["batch"], r["dtype"]), []).append(r)
        for (size, batch, dtype), rs in groups.items():
            peers = [r for r in rs if r["path"].startswith("timm")]
            best = max((r["img_s"] for r in peers), default=float("nan"))
            eager = next((r["img_s"] for r in peers if r["path"] == "timm eager"), float("nan"))
            print(f"{size}px b{batch} {dtype}")
            for r in rs:
                peak = f"{r['gemm_peak_frac']:.0%}" if r["gemm_peak_frac"] is not None else "-"
                mark = "*" if low_cpu_share(r) else " "
                print(
                    f"  {r['path']:<38}{r['ms']:>9.1f}{r['img_s']:>9.2f}{r['img_s'] / best:>8.2f}x"
                    f"{r['img_s'] / eager:>8.2f}x{peak:>9}{r['cpu_share']:>6.2f}{mark}"
                    f"{r['rel_err_vs_ours_fp32']:>10.1e}"
                )
        summary = res["infer"].get("summary", [])
        if summary:
            print(
                f"\nsummary: ours vs the best peer (ratio > 1: ours faster)\n{'':<22}{'best peer':<26}"
                f"{'davit.optimize':>16}{'ratio':>8}  {'ours, best path':<30}{'ratio':>8}"
            )
            for s in summary:
                find = {
                    r["path"]: r
                    for r in rows.values()
                    if (r.get("size", 224), r["batch"], r["dtype"]) == (s["size"], s["batch"], s["dtype"])
                }
                peer, ours = find[s["best_peer"]], find[s["best_ours"]]
                default = find.get("ours optimize")
                mark = " *" if s["low_cpu_share"] else ""
                dflt = f"{_fmt_speed(default):>16}{s['default_vs_best_peer']:>7.2f}x" if default else f"{'-':>24}"
                print(
                    f"{str(s['size']) + 'px b' + str(s['batch']) + ' ' + s['dtype']:<22}"
                    f"{s['best_peer'][5:] + ' ' + _fmt_speed(peer):<26}{dflt}"
                    f"  {s['best_ours'][5:] + ' ' + _fmt_speed(ours):<30}{s['best_ours_vs_best_peer']:>7.2f}x{mark}"
                )
        if any(low_cpu_share(r) for r in rows.values()):
            print(
                f"  * the process got < {CPU_SHARE_MIN:.0%} of its CPU time while these rows were timed (other load):"
                " not claims"
            )
    train = res.get("train", {})
    if train:
        print(
            f"\n{'training step (speed, median of rounds)':<40}{'img/s':>9}{'vs timm':>9}{'paired':>9}{'best':>8}"
            f"{'cpu min':>8}{'rounds':>7}"
        )
        for k, r in train.items():
            if k.startswith("speed/"):
                t = train.get(f"speed/{k.split('/')[1]}/timm", {})
                if "error" in r:
                    print(f"{k[6:]:<40} error: {r['error']}")
                    continue
                sp = r["img_s"] / t["img_s"] if t.get("img_s") else float("nan")
                paired = f"{r['vs_timm_median']:>8.2f}x" if "vs_timm_median" in r else f"{'':>9}"
                cpu = r.get("cpu_share_min", r["cpu_share"])
                mark = "*" if cpu < CPU_SHARE_MIN else " "
                print(
                    f"{k[6:] + ' b' + str(r['batch']):<40}{r['img_s']:>9.2f}{sp:>8.2f}x{paired}"
                    f"{r.get('img_s_max', r['img_s']):>8.2f}{cpu:>7.2f}{mark}{r.get('runs', 1):>7}"
                )
        print(
            f"\n{'training step (memory)':<40}{'peak RSS MB':>12}{'vs timm':>9}{'saved MB':>10}{'vs timm':>9}"
            f"{'img/s':>7}"
        )
        for k, r in train.items():
            if k.startswith("memory/"):
                t = train.get(f"memory/{k.split('/')[1]}/timm", {})
                if "error" in r:
                    print(f"{k[7:]:<40} error: {r['error']}")
                    continue
                mem = r["peak_rss_mb"] / t["peak_rss_mb"] if t.get("peak_rss_mb") else float("nan")
                sv = r["saved_mb"] / t["saved_mb"] if t.get("saved_mb") else float("nan")
                print(
                    f"{k[7:] + ' b' + str(r['batch']):<40}{r['peak_rss_mb']:>12}{mem:>8.2f}x{r['saved_mb']:>10}"
                    f"{sv:>8.2f}x{r['img_s']:>7.2f}"
                )
    scale = res.get("scale", {})
    if scale:
        print(f"\n{'resolution (fp32 b1)':<34}{'ms':>9}{'ms/MPix':>9}{'vs 448':>9}{'cpu':>6}")
        for r in scale.values():
            base = scale.get(f"448/{r['path']}", scale.get(f"{min(s['size'] for s in scale.values())}/{r['path']}"))
            print(
                f"{r['path'] + ' ' + str(r['size']):<34}{r['ms']:>9.1f}{r['ms_per_mpix']:>9.1f}"
                f"{r['ms_per_mpix'] / base['ms_per_mpix']:>8.2f}x{r['cpu_share']:>6.2f}"
            )
    alloc = res.get("alloc", {})
    if alloc:
        print(f"\n{'allocator, fp32 b' + str(res['meta']['batch']):<40}{'img/s':>9}{'peak RSS MB':>12}")
        for k, r in alloc.items():
            print(f"{k:<40}{r.get('img_s', float('nan')):>9.2f}{r.get('peak_rss_mb', 0):>12}")
    hires = res.get("hires")
    if hires:
        print(f"\n2048x2048 ours fp32 b1: {hires}")


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    rows = res.get("infer", {}).get("rows", {})
    for ax, batch, key, label in ((axes[0], res["meta"]["batch"], "img_s", "images/s"), (axes[1], 1, "ms", "ms")):
        sel = {k.split("/", 1)[1]: r[key] for k, r in rows.items() if r["batch"] == batch and r.get("size", 224) == 224}
        if sel:
            names = list(sel)
            colors = ["tab:orange" if "timm" in n else "tab:blue" for n in names]
            ax.barh(names, [sel[n] for n in names], color=colors)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_title(f"batch {batch} inference ({label}, {'higher' if key == 'img_s' else 'lower'} is better)")
    scale = res.get("scale", {})
    for side, color in (("ours", "tab:blue"), ("timm", "tab:orange")):
        pts = sorted((r["size"], r["ms_per_mpix"]) for r in scale.values() if r["path"] == side)
        if pts:
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=side)
    if res.get("hires") and "sec" in res["hires"]:
        axes[2].plot(
            [2048], [res["hires"]["sec"] * 1000 / (2048 * 2048 / 1e6)], "s", color="tab:blue", label="ours 2048 (min)"
        )
    axes[2].set_xlabel("image side (px)")
    axes[2].set_ylabel("ms per megapixel (fp32, batch 1)")
    axes[2].set_title("resolution scaling (flat = linear in pixels)")
    axes[2].set_ylim(bottom=0)
    axes[2].legend()
    mem = {k[len("memory/fp32/") :]: r for k, r in res.get("train", {}).items() if k.startswith("memory/fp32/")}
    mem = {k: r for k, r in mem.items() if "error" not in r}
    if mem:
        names = list(mem)
        axes[3].barh(names, [mem[n]["peak_rss_mb"] / 1024 for n in names], color="lightgray", label="peak RSS")
        colors = ["tab:orange" if n.startswith("timm") else "tab:blue" for n in names]
        axes[3].barh(names, [mem[n]["saved_mb"] / 1024 for n in names], color=colors, label="saved for backward")
        axes[3].invert_yaxis()
        axes[3].set_xlabel("GB")
        axes[3].set_title(f"training memory, fp32 b{next(iter(mem.values()))['batch']}")
        axes[3].legend(loc="lower right")
    fig.suptitle(
        f"{res['meta']['model']} on {res['meta']['cpu']}, {res['meta']['threads']} threads ({res['meta']['date']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
    return ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, batch 8 instead of 32, a few minutes")
    p.add_argument("--model", default="davit_tiny", help="davit_tiny | davit_small | davit_base")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON and PNG")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--batch", type=int, default=None, help="throughput batch (default 32, quick 8)")
    p.add_argument("--train-batch", type=int, default=None, help="training speed batch (default 16, quick 8)")
    p.add_argument("--mem-batch", type=int, default=None, help="training memory batch (default 32, quick 8)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 7, quick 3)")
    p.add_argument("--train-rounds", type=int, default=None, help="training speed rounds, median reported (default 5)")
    p.add_argument("--sizes", default=None, help="inference image sizes (default 224,768; quick 224)")
    p.add_argument("--big-batch", type=int, default=4, help="the small throughput batch above 224 px (default 4)")
    p.add_argument("--big-rounds", type=int, default=None, help="timing rounds above 224 px (default: --rounds)")
    p.add_argument(
        "--skip",
        default="",
        help="comma list of sections to skip: gemm,infer,onnx,openvino,compile,aoti,train,memory,scale,alloc,hires",
    )
    p.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default allocator settings")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if a.quick:
        a.skip.update({"compile", "aoti"})  # ~25-90 s of compilation per shape and dtype
    a.batch = a.batch or (8 if a.quick else 32)
    a.train_batch = a.train_batch or (8 if a.quick else 16)
    a.mem_batch = a.mem_batch or (8 if a.quick else 32)
    a.rounds = a.rounds or (3 if a.quick else 7)
    a.big_rounds = a.big_rounds or a.rounds
    a.train_rounds = a.train_rounds or (1 if a.quick else 5)
    a.scale_sizes = [224, 448] if a.quick else [224, 448, 896, 1344]
    a.sizes = [int(v) for v in (a.sizes or ("224" if a.quick else "224,768")).split(",") if v.strip()]
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_worker(args._worker[0], json.loads(args._worker[1]))))
        return {}
    if not args.no_malloc_tuning:
        _reexec_with_malloc_tuning()
    import onnxruntime
    import openvino
    import timm
    import torch

    import davit

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    started = time.time()
    res: dict[str, Any] = {
        "meta": {
            "model": args.model,
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu": _cpu_name(),
            "threads": args.threads,
            "batch": args.batch,
            "quick": args.quick,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__.split("-")[0],
            "davit": davit.__version__,
            "commit": _git_commit(),
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
            "load_start": os.getloadavg()[0],
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        }
    }
    print(f"benchmark {args.model} ({'quick' if args.quick else 'full'}), load {os.getloadavg()[0]:.1f}", flush=True)
    res["gemm"] = gemm_peak(args.quick, args.threads) if "gemm" not in args.skip else {}
    args.gemm = res["gemm"]
    print(f"  gemm {res['gemm']}", flush=True)
    res["meta"]["flops_per_image"] = flops_per_image(args.model)
    if "infer" not in args.skip:
        res["infer"] = bench_infer(args, res["meta"]["flops_per_image"])
        res["infer"]["summary"] = summarize_infer(res["infer"]["rows"])
    if "scale" not in args.skip:
        res["scale"] = bench_scale(args)
    if "alloc" not in args.skip:
        res["alloc"] = bench_alloc(args)
    if "train" not in args.skip:
        res["train"] = bench_train(args)
    if "hires" not in args.skip:
        res["hires"] = _spawn(
            "hires", {"model": args.model, "size": 2048, "reps": 1 if args.quick else 2, "threads": args.threads}
        )
    res["meta"]["load_end"] = os.getloadavg()[0]
    res["meta"]["seconds"] = round(time.time() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"bench-{stamp}.json", "latest.json"):
        (out / name).write_text(json.dumps(res, indent=2))
    plot(res, out / "latest.png")
    print_table(res)
    print(f"\nwrote {out / f'bench-{stamp}.json'} and {out / 'latest.png'} in {res['meta']['seconds']} s")
    return res


if __name__ == "__main__":
    main()
