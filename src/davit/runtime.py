"""Run a model through OpenVINO or onnxruntime as an inference module (the runtimes models are served with on CPUs).

    fast = davit.runtime.to_runtime(model, "openvino", dtype="bf16")   # converts once, from the reference model
    logits = fast(images)                                               # float32 torch tensor, any batch size

How: the model is exported once to ONNX with the TorchScript tracer (:func:`export_onnx_module`; dynamic batch,
height and width, as ``davit export`` does), then either loaded into an onnxruntime session or converted by
``openvino.convert_model`` and compiled for the device. OpenVINO compiles one executable per image size (batch stays
dynamic; ~1-2 s on 2 cores, the first time a size is seen) because its CPU plugin runs static spatial shapes faster
than fully dynamic ones. Going through ONNX rather than tracing the torch module in ``openvino.convert_model`` keeps
one conversion path for both runtimes and works on any model the ONNX exporter takes.

Precision: ``dtype=None``/fp32 sets OpenVINO's ``INFERENCE_PRECISION_HINT`` to ``f32`` explicitly (on CPUs with
AVX512-BF16 or AMX its default is bf16); ``bf16`` sets ``bf16`` where the device has it (otherwise f32 with a logged
warning). onnxruntime's CPU provider has no bf16 kernels for these graphs, so it always computes in fp32.

Outputs are float32 torch tensors on the CPU (a list for models with several outputs, e.g. ``features_only``), like
:class:`davit.optimize.OptimizedModel`'s.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "RuntimeModel",
    "check_runtime",
    "default_backend",
    "export_onnx_module",
    "export_openvino",
    "fastest",
    "missing_runtime",
    "to_runtime",
]

log = logging.getLogger(__name__)

BACKENDS = ("openvino", "onnxruntime")
# What ``davit predict/eval --backend`` and ``davit.optimize(backend=...)`` accept.
BACKEND_CHOICES = ("auto", "torch", "aoti", "openvino", "onnxruntime")
_EXTRAS = {"openvino": ("openvino", "openvino"), "onnxruntime": ("onnxruntime", "export")}


def default_backend(model: nn.Module, example: Tensor, dtype: torch.dtype | str | None = None) -> str:
    """What ``backend="auto"`` means for ``davit predict`` / ``eval``: the fastest path measured here that needs no
    compile or conversion now (``docs/speed.md``).

    ``"aoti"`` when an AOTInductor package of ``model`` for ``example``'s shape and ``dtype`` is already cached (it
    loads in ~0.2 s and is the fastest batch-1 path measured; build one with ``--backend aoti``), else ``"torch"``
    (``davit.optimize``: ready in ~0.2 s). OpenVINO and onnxruntime are never picked implicitly: converting costs
    ~3-5 s, more than they save on a predict or eval job here.
    """
    if example.device.type != "cpu":
        return "torch"
    from .accelerate import Policy, accelerate_enabled
    from .aoti import aoti_package_path

    dt = torch.bfloat16 if _dtype_name(dtype) == "bf16" else torch.float32
    policy = Policy.detect("cpu", mode="compile") if accelerate_enabled() else None
    if aoti_package_path(model, tuple(example.shape), dt, policy).exists():
        return "aoti"
    return "torch"


def missing_runtime(backend: str) -> str | None:
    """A one-line message when ``backend``'s runtime is not installed (naming the extra that installs it), else
    None. Checks importability without importing (OpenVINO's import is heavy)."""
    import importlib.util

    if backend not in _EXTRAS:
        return None
    module, extra = _EXTRAS[backend]
    if importlib.util.find_spec(module) is None:
        return f"the {backend} backend needs {module}, which is not installed: pip install 'davit[{extra}]'"
    return None


def ort_session_options(threads: int | None) -> Any:
    """onnxruntime session options for our graphs: ``threads`` intra-op threads, one inter-op thread, every graph
    optimisation, and no spinning: onnxruntime's idle intra-op threads otherwise spin after every run and take the
    cores from whatever runs next in the process (torch pre/post-processing, another model); in the benchmark every
    torch path ran 25-40% slower and OpenVINO 20% slower beside a spinning session."""
    ort = _require("onnxruntime")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _require(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as e:
        extra = "openvino" if name == "openvino" else "export"
        raise ImportError(f"the {name} backend needs {name}: pip install 'davit[{extra}]'") from e


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    if dtype is None:
        return "fp32"
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", "fp32": "fp32", "float32": "fp32", "f32": "fp32"}
    names.update({"bf16": "bf16", "bfloat16": "bf16"})
    if dtype not in names:
        raise ValueError(f"dtype must be fp32 or bf16 (a name or torch dtype), got {dtype!r}")
    return names[dtype]


def export_onnx_module(
    module: nn.Module,
    example: Tensor,
    path: str | Path,
    *,
    input_name: str = "images",
    output_names: Sequence[str] = ("logits",),
    dynamic_size: bool = True,
    opset: int = 17,
) -> Path:
    """Trace ``module`` (float32, CPU, eval) into an ONNX file whose batch (and, with ``dynamic_size``, height and
    width) are dynamic.

    Args:
        module: any traceable module taking one image batch ``(B, C, H, W)``.
        example: the example batch traced.
        path: the ``.onnx`` file written (parents are created).
        input_name: the graph's input name.
        output_names: names of the module's outputs, in order (one per tensor it returns).
        dynamic_size: mark height and width dynamic too.
        opset: ONNX opset.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes: dict[str, dict[int, str]] = {
        input_name: {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    }
    axes.update({name: {0: "batch"} for name in output_names})
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every static size check (rank, channels), which are static on purpose.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module.eval(),
            (example.float().cpu(),),
            str(path),
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def _cpu_fp32_copy(model: nn.Module) -> nn.Module:
    """The model to trace: float32, CPU, eval, and the portable reference (never ``davit.accelerate``'s kernels)."""
    from .accelerate import installed, uninstall

    p0 = next(model.parameters())
    if p0.device.type == "cpu" and p0.dtype == torch.float32 and installed(model) is None:
        return model.eval()
    import copy

    model = copy.deepcopy(model).to("cpu", torch.float32)
    uninstall(model)
    return model.eval()


def _output_names(model: nn.Module, example: Tensor) -> list[str]:
    with torch.no_grad():
        out = model(example)
    if isinstance(out, Tensor):
        return ["logits"] if getattr(model, "num_classes", 0) else ["output"]
    return [f"output{i}" for i in range(len(out))]


def _ov_config(precision: str, threads: int | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        # One request at a time, as a torch module is called: latency mode with one stream uses all threads on it.
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads
    return cfg


def _ov_has_bf16(core: Any, device: str) -> bool:
    with contextlib.suppress(Exception):
        return "BF16" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    return False


class RuntimeModel(nn.Module):
    """An inference module backed by OpenVINO or onnxruntime: ``forward(x)`` takes a torch batch and returns float32
    torch tensors (on the CPU).

    Attributes:
        backend: ``"openvino"`` or ``"onnxruntime"``.
        dtype: the compute precision, ``torch.float32`` or ``torch.bfloat16``.
        onnx_path: the intermediate ONNX file (kept only when a ``cache_dir`` was given).
    """

    def __init__(
        self,
        backend: str,
        graph: Any,
        dtype: torch.dtype,
        *,
        threads: int | None,
        device: str,
        onnx_path: Path | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.dtype = dtype
        self.onnx_path = onnx_path
        self._device = device
        self._threads = threads
        self._graph = graph  # onnxruntime: the session; OpenVINO: the converted ov.Model (dynamic batch, H, W)
        self._compiled: dict[tuple[int, ...], Any] = {}

    def _ov_compiled(self, shape: tuple[int, ...]) -> Any:
        key = tuple(shape[1:])
        if key not in self._compiled:
            import openvino as ov

            t0 = time.perf_counter()
            model = self._graph.clone()
            model.reshape({0: ov.PartialShape([-1, *key])})
            precision = "bf16" if self.dtype == torch.bfloat16 else "f32"
            self._compiled[key] = ov.Core().compile_model(model, self._device, _ov_config(precision, self._threads))
            log.info("openvino: compiled for %s in %.1f s", "x".join(map(str, key)), time.perf_counter() - t0)
        return self._compiled[key]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        xn = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.backend == "openvino":
            res = self._ov_compiled(tuple(xn.shape))(xn, share_inputs=True)
            outs = [res[i] for i in range(len(res))]
        else:
            outs = self._graph.run(None, {self._graph.get_inputs()[0].name: xn})
        tensors = [torch.from_numpy(o).float() for o in outs]
        return tensors[0] if len(tensors) == 1 else tensors

    def extra_repr(self) -> str:
        return f"backend={self.backend}, dtype={self.dtype}"


def to_runtime(
    model: nn.Module,
    backend: str = "openvino",
    *,
    dtype: torch.dtype | str | None = None,
    example_input: Tensor | None = None,
    img_size: int | tuple[int, int] = 224,
    threads: int | None = None,
    device: str = "CPU",
    cache_dir: str | Path | None = None,
) -> RuntimeModel:
    """Convert ``model`` once and return an inference module that runs it in ``backend``.

    Args:
        model: a DaViT (classifier or ``features_only``) or any traceable module taking one image batch; it is not
            modified (a float32 CPU copy is traced if it lives elsewhere).
        backend: ``"openvino"`` or ``"onnxruntime"``.
        dtype: None / fp32, or bf16 (OpenVINO only, where the device computes it natively; see the module notes).
        example_input: a representative batch: traced, then run once (pays OpenVINO's compile for its size) and
            compared with the eager model (``RuntimeError`` above 1e-4 relative in fp32, 5e-2 in bf16).
        img_size: the example image size traced when no ``example_input`` is given.
        threads: inference threads (default: ``torch.get_num_threads()``).
        device: OpenVINO device name (``"CPU"``, ``"GPU"``, ``"AUTO"``); onnxruntime uses CUDA when its provider is
            installed and the model is on a CUDA device, else the CPU.
        cache_dir: keep the intermediate ONNX file there (default: a temporary directory, deleted).

    Returns:
        A :class:`RuntimeModel`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown runtime backend {backend!r}; use one of {', '.join(BACKENDS)}")
    precision = _dtype_name(dtype)
    threads = threads or torch.get_num_threads()
    on_cuda = next(model.parameters()).device.type == "cuda"
    ref = _cpu_fp32_copy(model)
    if example_input is None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        example = torch.randn(1, getattr(getattr(ref, "cfg", None), "in_chans", 3), h, w)
    else:
        example = example_input.detach().to("cpu", torch.float32)
    tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="davit-runtime-")
    folder = Path(cache_dir) if cache_dir else Path(tmp.name)  # type: ignore[union-attr]
    try:
        t0 = time.perf_counter()
        onnx_path = export_onnx_module(
            ref, example[:1], folder / "model.onnx", output_names=_output_names(ref, example[:1])
        )
        if backend == "openvino":
            ov = _require("openvino")
            core = ov.Core()
            if precision == "bf16" and not _ov_has_bf16(core, device):
                log.warning("OpenVINO device %s has no native bfloat16; computing in float32", device)
                precision = "fp32"
            graph = ov.convert_model(str(onnx_path))
        else:
            ort = _require("onnxruntime")
            if precision == "bf16":
                log.warning("onnxruntime computes these graphs in float32 only; bf16 was asked, fp32 is used")
                precision = "fp32"
            so = ort_session_options(threads)
            providers = ["CPUExecutionProvider"]
            if on_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            graph = ort.InferenceSession(str(onnx_path), so, providers=providers)
        log.info("%s: converted in %.1f s", backend, time.perf_counter() - t0)
    finally:
        if tmp is not None:
            tmp.cleanup()
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    fast = RuntimeModel(backend, graph, dt, threads=threads, device=device, onnx_path=onnx_path if cache_dir else None)
    if example_input is not None:
        check_runtime(fast, ref, example)
    return fast


def check_runtime(fast: RuntimeModel, model: nn.Module, x: Tensor) -> float:
    """Run ``fast`` on ``x`` and compare with the float32 eager ``model``.

    Returns:
        The largest relative error (max |difference| / max |reference|) over the outputs.

    Raises:
        RuntimeError: above 1e-4 in fp32 or 5e-2 in bf16.
    """
    got = fast(x)
    with torch.no_grad():
        ref = model(x.to("cpu", torch.float32))
    pairs = zip(got, ref) if isinstance(got, list) else [(got, ref)]
    tol = 1e-4 if fast.dtype == torch.float32 else 5e-2
    worst = 0.0
    for a, b in pairs:
        err = ((a - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err)
        if not err <= tol:
            raise RuntimeError(f"{fast.backend} differs from the eager model by {err:.2e} relative (> {tol:.0e})")
    return worst


def export_openvino(
    model: nn.Module,
    path: str | Path,
    *,
    img_size: int | tuple[int, int] = 224,
    check_sizes: Sequence[tuple[int, int, int]] | None = ((1, 224, 224), (2, 250, 333)),
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Write ``model`` as an OpenVINO IR (``path`` ``.xml`` + ``.bin``, float32 weights) with dynamic batch, height and
    width, then check it in OpenVINO (f32 precision) against the eager model.

    Args:
        model: a DaViT classifier or ``features_only`` model, or any traceable module taking one image batch.
        path: the ``.xml`` file (the weights go beside it in ``.bin``).
        img_size: the example image size traced.
        check_sizes: ``(batch, H, W)`` inputs compared with the eager model; None skips the check.
        atol: largest allowed absolute difference of the outputs.

    Returns:
        ``{"path", "seconds", "max_abs_err": {"BxHxW": err}}``.

    Raises:
        ValueError: OpenVINO disagreeing with the model by more than ``atol``.
    """
    ov = _require("openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR is written as NAME.xml (+ NAME.bin); got {path.name!r}")
    ref = _cpu_fp32_copy(model)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    example = torch.randn(1, getattr(getattr(ref, "cfg", None), "in_chans", 3), h, w)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="davit-ov-") as tmp:
        onnx_path = export_onnx_module(ref, example, Path(tmp) / "model.onnx", output_names=_output_names(ref, example))
        graph = ov.convert_model(str(onnx_path))
        path.parent.mkdir(parents=True, exist_ok=True)
        # save_model halves the weights to fp16 by default; DaViT's logits are checked at 1e-4, so keep fp32.
        ov.save_model(graph, str(path), compress_to_fp16=False)
    out: dict[str, Any] = {"path": str(path), "seconds": round(time.perf_counter() - t0, 2)}
    if check_sizes:
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        gen = torch.Generator().manual_seed(0)
        errs = {}
        for b, hh, ww in check_sizes:
            x = torch.randn(b, example.shape[1], hh, ww, generator=gen)
            with torch.no_grad():
                want = ref(x)
            want = [want] if isinstance(want, Tensor) else list(want)
            res = compiled(x.numpy())
            err = max(float((torch.from_numpy(res[i]) - t).abs().max()) for i, t in enumerate(want))
            errs[f"{b}x{hh}x{ww}"] = err
            if not err <= atol:
                raise ValueError(f"OpenVINO differs from the model by {err:.2e} (> {atol:.0e}) at input {b}x{hh}x{ww}")
        out["max_abs_err"] = errs
    return out


def fastest(
    candidates: dict[str, nn.Module], example_input: Tensor, *, rounds: int = 3
) -> tuple[str, dict[str, float]]:
    """Which of ``candidates`` (name -> inference module) runs ``example_input`` fastest here: each is warmed up
    twice, then timed in ``rounds`` interleaved rounds (median), so a load spike hits all of them alike.

    Cheap for the shapes it is meant for (a few calls per candidate, e.g. ~1 s for davit_tiny at batch 1); what
    ``davit.optimize(backend="auto")`` uses to choose between torch, OpenVINO and onnxruntime for a shape.

    Returns:
        The fastest name and every candidate's median seconds per call.
    """
    if not candidates:
        raise ValueError("fastest() needs at least one candidate")
    for m in candidates.values():
        for _ in range(2):
            m(example_input)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(max(1, rounds)):
        for k, m in candidates.items():
            t0 = time.perf_counter()
            m(example_input)
            times[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = min(med, key=med.__getitem__)
    log.info(
        "fastest for %s: %s (%s)", tuple(example_input.shape), best, {k: f"{v * 1e3:.1f} ms" for k, v in med.items()}
    )
    return best, med
