"""``davit.optimize``: the fastest inference module for the machine it runs on.

What it does, and why (measured on a 2-core AVX-512/AMX CPU with torch 2.14; ``benchmarks/bench.py`` measures it
side by side with timm on any machine):

- ``optimize`` runs a copy of the model (the caller's model stays the reference, untouched) with
  :mod:`davit.accelerate` installed: on the CPU, bias, GELU and residual additions fused into the Linear GEMMs and
  the depthwise position-encoding convs (oneDNN epilogues: no bias-broadcast copies, no separate GELU/add passes),
  window attention as the explicit softmax(QK^T)V in cache-sized chunks of windows (faster than SDPA on 49-token
  windows), channel attention one image at a time on maps of >= 196 tokens (strided GEMMs, no copies); without
  autograd (``torch.inference_mode``). On CPU without compile the copy's Linear weights, and its 2x2 downsample convs
  as Linears over 2x2 patches, are pre-packed in oneDNN's blocked layout (no per-call weight re-layout: batch-1
  Linears 10-30% faster, bit-identical outputs); like compile's weight
  freezing this is a snapshot, so call ``optimize`` again after changing the weights. ``accelerate=False`` (or
  ``DAVIT_ACCELERATE=0``) runs the reference modules instead.
- bfloat16 (``dtype=torch.bfloat16``, only where the hardware has it natively: AVX512-BF16/AMX on CPU, CUDA compute
  >= 8.0): on CPU a bf16 copy of the weights is made once (half the fp32 size, milliseconds) and the whole network runs
  in bf16, which was ~30% faster than autocast (no per-call weight casts, half the activation traffic) at the same
  logit error (~6e-3 relative to fp32); on CUDA it runs under bf16 autocast.
- ``compile=True`` adds ``torch.compile`` (Inductor, with weight freezing and the C++ wrapper on CPU; fp32 Linears
  over >= 512 rows (every fp32 Linear on non-Intel CPUs, where MKL is the slower one) are traced as oneDNN's fused
  Linear, where Inductor alone would pick MKL's SGEMM plus separate
  bias, GELU and residual passes: fp32 batch 32 -8.5%, batch 1 -5.6% in a same-process A/B). One-time
  cost: ~20-30 s of compilation on 2 idle CPU cores (minutes on a busy machine) for each new input shape (batch, H,
  W) and dtype, paid inside ``optimize`` when ``example_input`` is given, else at the first call. Measured gain on
  davit_tiny, 224x224 (``benchmarks/bench.py``, README "Speed"; an Intel Xeon with AMX / an AMD EPYC): batch-1
  latency -20-30% / -10-16%, batch-32 bf16 +10-15% / +6%, batch-32 fp32 +2-5% / +0%. Worth it for a server at
  fixed shapes; off by default on CPU because every new image size recompiles. On CUDA it is on by default.
- It changes no process-wide setting: the allocator policy (:func:`davit.allocator.tune_cpu_allocator`, batch-32
  fp32 +40% here) belongs to the launcher (``davit predict``/``eval``/``benchmark`` set it) or to an explicit call;
  compiler options are passed to this compile only (``torch.compile(options=...)``), not set globally.

Numerics: the fp32 path is the eager model's arithmetic (oneDNN and the reference GEMMs agree to rounding; the timm
parity tests run on it); bf16 logits are within ~1e-2 relative of fp32, as any bf16 inference.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from .accelerate import Policy, accelerate_enabled, install
from .accelerate.compat import bf16_supported
from .accelerate.kernels import prepack_linears

__all__ = ["OptimizedModel", "bf16_supported", "optimize"]  # bf16_supported re-exported from davit.accelerate

log = logging.getLogger(__name__)


class OptimizedModel(nn.Module):
    """An inference-only wrapper: ``forward(x)`` runs the model without autograd, in the chosen precision.

    Attributes:
        model: the eager model (eval mode), for anything beyond ``forward``.
        dtype: the compute dtype (``torch.float32`` or ``torch.bfloat16``).
        compiled: whether ``torch.compile`` is in the path.
        autocast: whether ``forward`` runs under autocast (CUDA bf16) rather than on a bf16 copy of the weights.
    """

    def __init__(
        self, model: nn.Module, dtype: torch.dtype, compiled: bool, runner: Any, autocast: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.compiled = compiled
        self.autocast = autocast
        # Not a submodule attribute (a compiled wrapper would register the model twice in state_dict).
        object.__setattr__(self, "_runner", runner)
        self._device_type = next(model.parameters()).device.type
        # Inductor options that must hold while a (re)compile happens, i.e. around every call of a compiled runner:
        # set by optimize() for the CPU compile; patched per call and restored, never left set globally.
        self._inductor_options: dict[str, Any] = {}

    def _compiling(self) -> contextlib.AbstractContextManager:
        if not self._inductor_options:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(**self._inductor_options)

    @property
    def cfg(self) -> Any:
        """The wrapped model's config."""
        return self.model.cfg

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type, dtype=self.dtype)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        with torch.inference_mode(), self._autocast(), self._compiling():
            out = self._runner(x if self.autocast else x.to(self.dtype))
        if isinstance(out, Tensor):
            return out.float()
        return [o.float() for o in out]

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, compiled={self.compiled}"


def optimize(
    model: nn.Module,
    *,
    example_input: Tensor | None = None,
    dtype: torch.dtype | str | None = None,
    compile: bool | None = None,
    accelerate: bool = True,
    policy: Policy | None = None,
    backend: str = "torch",
) -> OptimizedModel | Any:
    """The fastest inference module for ``model`` on the machine it runs on.

    Args:
        model: a model from ``davit.create_model`` (classifier or ``features_only``), on its target device. It is
            switched to eval mode and kept as ``.model``; the fast path runs a snapshot of its weights (CPU eager:
            a copy with pre-packed Linear weights; bf16: a bf16 copy; compile: frozen weights).
        example_input: a representative batch; when given, the one-time costs (oneDNN primitive creation, and the
            compilation with ``compile=True``) are paid here instead of at the first call, and the result is checked
            against the eager model (a ``RuntimeError`` if fp32 differs by more than 1e-4 relative).
        dtype: None or ``torch.float32`` (exact fp32), or ``torch.bfloat16`` / ``"bf16"`` to allow bf16 compute
            (used only where the hardware has native bf16; otherwise fp32 with a logged warning).
        compile: wrap in ``torch.compile``; default: on for CUDA, off for CPU (see the module notes). One-time cost
            ~20-30 s per input shape and dtype on 2 idle CPU cores; -20-30% batch-1 latency, +10-15% bf16 throughput.
        accelerate: install :mod:`davit.accelerate` on the copy (False, or ``DAVIT_ACCELERATE=0``: the reference).
        policy: the acceleration policy (default: detected for the device, mode "infer" or "compile").
        backend: ``"torch"`` (this module's path), ``"aoti"`` (the ``compile=True`` graph built once by
            AOTInductor into a package cached per (weights, shape, dtype, torch and davit code, CPU) and loaded in
            ~0.2 s by later processes, :func:`davit.aoti.aoti_model`; needs ``example_input``; CPU), ``"openvino"``
            or ``"onnxruntime"`` (the model converted once to that runtime, :func:`davit.runtime.to_runtime`; same
            float32 outputs), or ``"auto"``: with an ``example_input``, times torch, OpenVINO (when installed) and
            the aoti package (when one is cached for that shape and dtype: nothing is compiled implicitly) on it (a
            few calls each, :func:`davit.runtime.fastest`) and returns the fastest for that shape; without one,
            torch.

    Returns:
        An :class:`OptimizedModel`: ``out = fast(x)`` gives float32 outputs (logits, or the list of feature maps).
    """
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
        dtype = names[dtype]
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"optimize supports float32 and bfloat16 compute, got {dtype}; fp16 loses accuracy here")
    if isinstance(model, OptimizedModel):
        model = model.model
    if backend != "torch":
        return _other_backend(model, backend, example_input, dtype, compile, accelerate, policy)
    model.eval()
    device = next(model.parameters()).device
    if dtype == torch.bfloat16 and not bf16_supported(device):
        log.warning("%s has no native bfloat16; optimize keeps float32", device)
        dtype = torch.float32
    if compile is None:
        compile = device.type == "cuda"
    # A snapshot the fast path owns: the caller's model keeps running the reference, hooks and wrappers included.
    runner: Any = copy.deepcopy(model).requires_grad_(False)
    autocast = False
    if dtype == torch.bfloat16:
        if device.type == "cpu":
            runner = runner.to(torch.bfloat16)
        else:
            autocast = True
    if accelerate_enabled(accelerate):
        mode = "compile" if compile else "infer"
        n = install(runner, policy or Policy.detect(device, mode=mode))
        if n and device.type == "cpu" and not compile:
            prepack_linears(runner)
    if compile:
        if device.type == "cuda":
            runner = torch.compile(runner, mode="max-autotune-no-cudagraphs", dynamic=False)
        else:
            # Freezing folds the (constant) weights into the graph and lets Inductor pre-pack them for oneDNN; the C++
            # wrapper calls the generated kernels and the oneDNN ops from C++ instead of a Python wrapper (batch-1
            # latency -10% in bf16 (21.2 -> 18.9 ms) and -5% in fp32, batch 32 -2%, for ~5 s more compiling). Passed
            # as this compile's options, so no global Inductor setting changes. Freezing must also be set while each
            # (re)compile runs (torch 2.14 decides it before applying the options: without it the oneDNN Linears'
            # weights are graph inputs and the lowering fails, "weight must be a graph constant"), hence the per-call
            # patch in OptimizedModel.forward. dynamic=False: a new input shape compiles a static graph of its own;
            # torch's default turns the second shape into a symbolic-shape trace, which took > 20 min for
            # davit_tiny 224 -> 768 on 2 cores (sympy simplification) and runs slower than static graphs.
            runner = torch.compile(runner, options={"freezing": True, "cpp_wrapper": True}, dynamic=False)
    fast = OptimizedModel(model, dtype, bool(compile), runner, autocast)
    if compile and device.type == "cpu":
        fast._inductor_options = {"freezing": True}
    if example_input is not None:
        _check(fast, model, example_input)
    return fast


def _other_backend(
    model: nn.Module, backend: str, x: Tensor | None, dtype: torch.dtype, *torch_args: Any
) -> OptimizedModel | Any:
    from . import runtime

    if backend in runtime.BACKENDS:
        return runtime.to_runtime(model, backend, dtype=dtype, example_input=x)
    compile, accelerate, policy = torch_args
    if backend == "aoti":
        from .aoti import aoti_model

        if x is None:
            raise ValueError("backend='aoti' compiles for one input shape: pass example_input")
        model.eval()
        if dtype == torch.bfloat16 and not bf16_supported(next(model.parameters()).device):
            log.warning("no native bfloat16 here; the aoti package computes in float32")
            dtype = torch.float32
        eager = optimize(model, dtype=dtype, accelerate=accelerate, policy=None)  # other shapes run this
        fast = aoti_model(model, x, dtype=dtype, policy=policy, fallback=eager)
        _check(fast, model, x)
        return fast
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r}; use 'torch', 'aoti', 'openvino', 'onnxruntime' or 'auto'")
    fast = optimize(model, example_input=x, dtype=dtype, compile=compile, accelerate=accelerate, policy=policy)
    if x is None or next(model.parameters()).device.type != "cpu":
        return fast
    candidates = {"torch": fast}
    if accelerate_enabled(accelerate) and runtime.default_backend(model, x, dtype) == "aoti":
        # A package for this shape is cached (nothing is compiled implicitly): loading it takes ~0.2-2 s.
        candidates["aoti"] = optimize(model, example_input=x, dtype=dtype, backend="aoti")
    with contextlib.suppress(ImportError):
        candidates["openvino"] = runtime.to_runtime(model, "openvino", dtype=dtype, example_input=x)
    if len(candidates) == 1:
        return fast
    best, _ = runtime.fastest(candidates, x)
    return candidates[best]


def _check(fast: OptimizedModel, model: nn.Module, x: Tensor) -> None:
    """Warm up on ``x`` (pays compilation / primitive creation now) and compare with the eager fp32 model."""
    out = fast(x)
    with torch.inference_mode():
        ref = model(x)
    pairs = zip(out, ref) if isinstance(out, list) else [(out, ref)]
    tol = 1e-4 if fast.dtype == torch.float32 else 5e-2
    for a, b in pairs:
        err = ((a - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
        if err > tol:
            raise RuntimeError(f"optimized model differs from eager by {err:.2e} relative (> {tol:.0e})")
