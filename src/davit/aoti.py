"""A compile paid once per machine: the accelerated model built by AOTInductor into a cached package.

    fast = davit.optimize(model, example_input=x, backend="aoti")   # first time: exports and compiles (~30-90 s)
    fast = davit.optimize(model, example_input=x, backend="aoti")   # any later process: loads the package (~0.2 s)

``torch.compile`` (``optimize(compile=True)``) recompiles in every new process and for every new input shape, which
``davit predict`` and a server restarting do not want to pay. AOTInductor (``torch.export`` then
``torch._inductor.aoti_compile_and_package``) writes the same Inductor code, compiled, into a ``.pt2`` file that
``aoti_load_package`` maps back in a fraction of a second. The model compiled is the one ``optimize(compile=True)``
compiles: a snapshot with :mod:`davit.accelerate` installed in ``"compile"`` mode (fused oneDNN Linears) and the
weights frozen into the package (constant folding, oneDNN pre-packing).

Each package holds one static input shape ``(batch, channels, H, W)`` and one dtype; it is cached under
``$DAVIT_CACHE/aoti`` (default ``~/.cache/davit/aoti``) by a key over everything that makes the code valid: torch's
version, davit's model and kernel code (a hash of its source), the CPU model (the generated code targets its
instruction set), the weights (a hash of the state dict), the shape, the dtype and the acceleration policy. Calling
with another shape runs the eager fast path (:func:`davit.optimize`'s) for that call, never a compile mid-call:
build a package per shape you serve.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["AOTIModel", "aoti_cache_dir", "aoti_package_path", "aoti_model"]

log = logging.getLogger(__name__)


def aoti_cache_dir() -> Path:
    """Where packages are cached: ``$DAVIT_CACHE/aoti`` or ``~/.cache/davit/aoti``."""
    root = os.environ.get("DAVIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "davit")
    return Path(root) / "aoti"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """A hash of the code a package bakes in (the model and its fast kernels): a package built by another version
    of davit is never loaded, it is rebuilt."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for sub in ("models", "accelerate"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def aoti_package_path(
    model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, policy: Any, cache_dir: str | Path | None = None
) -> Path:
    """The package file for ``model`` at input ``shape`` in ``dtype`` under ``policy`` (it may not exist yet)."""
    key = "|".join(
        [
            torch.__version__,
            _code_hash(),
            _cpu_model(),
            _weights_hash(model),
            "x".join(map(str, shape)),
            str(dtype),
            repr(policy),
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    name = type(model).__name__
    return Path(cache_dir or aoti_cache_dir()) / f"{name}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{digest}.pt2"


def _build(runner: nn.Module, example: Tensor, path: Path) -> None:
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(runner, (example,))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed: a concurrent reader never sees half a package.
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs={"freezing": True})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    log.info("aoti: compiled %s in %.1f s", path.name, time.perf_counter() - t0)


class AOTIModel(nn.Module):
    """An inference module running a cached AOTInductor package for its input shape (float32 outputs).

    Attributes:
        model: the eager model, for anything beyond ``forward``.
        dtype: the compute dtype.
        package: the ``.pt2`` file.
        load_seconds: what loading the package cost in this process.
        built: whether this process compiled the package (False: it was loaded from the cache).
    """

    def __init__(
        self, model: nn.Module, dtype: torch.dtype, runner: Any, shape: tuple[int, ...], package: Path, fallback: Any
    ) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.package = package
        self.shape = shape
        self.load_seconds = 0.0
        self.built = False
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "_fallback", fallback)

    @property
    def cfg(self) -> Any:
        """The wrapped model's config."""
        return self.model.cfg

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if tuple(x.shape) != self.shape:
            # Another shape: the eager fast path, not a compile in the middle of a call.
            return self._fallback(x)
        with torch.inference_mode():
            out = self._runner(x.to(self.dtype).contiguous())
        if isinstance(out, Tensor):
            return out.float()
        if isinstance(out, (list, tuple)) and len(out) == 1:
            return out[0].float()
        return [o.float() for o in out]

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, shape={self.shape}, package={self.package.name}"


def aoti_model(
    model: nn.Module,
    example_input: Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    policy: Any = None,
    cache_dir: str | Path | None = None,
    fallback: Any = None,
) -> AOTIModel:
    """Load (or build once, then load) the AOTInductor package of ``model`` for ``example_input``'s shape.

    Args:
        model: an eval-mode model on the CPU (not modified: a snapshot is compiled).
        example_input: the input whose shape the package serves.
        dtype: ``torch.float32`` or ``torch.bfloat16`` (bf16: the whole network in bf16, as ``optimize``'s).
        policy: the acceleration policy (default ``Policy.detect("cpu", mode="compile")``).
        cache_dir: where packages live (default :func:`aoti_cache_dir`).
        fallback: what runs inputs of other shapes (default: the model itself).

    Returns:
        An :class:`AOTIModel`.
    """
    import copy

    from .accelerate import Policy, accelerate_enabled, install

    if next(model.parameters()).device.type != "cpu":
        raise ValueError("the aoti backend compiles for the CPU; on CUDA use optimize(model, compile=True)")
    model.eval()
    policy = policy or Policy.detect("cpu", mode="compile")
    shape = tuple(example_input.shape)
    path = aoti_package_path(model, shape, dtype, policy if accelerate_enabled() else None, cache_dir)
    built = False
    if not path.exists():
        runner = copy.deepcopy(model).requires_grad_(False).to(dtype)
        if accelerate_enabled():
            install(runner, policy)
        _build(runner, example_input.detach().to(dtype).contiguous(), path)
        built = True
    t0 = time.perf_counter()
    loaded = torch._inductor.aoti_load_package(str(path))
    fast = AOTIModel(model, dtype, loaded, shape, path, fallback or model)
    fast.load_seconds = time.perf_counter() - t0
    fast.built = built
    log.info("aoti: loaded %s in %.2f s", path.name, fast.load_seconds)
    return fast
