"""The acceleration policy: which fast paths to install, decided once from the machine or passed explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import compat

__all__ = ["ENV_SWITCH", "MODES", "Policy", "accelerate_enabled"]

ENV_SWITCH = "DAVIT_ACCELERATE"
MODES = ("infer", "compile", "train")
MEMORY_SAVING = ("none", "mlp", "all")
_OFF = ("0", "false", "no", "off")


def accelerate_enabled(requested: bool = True) -> bool:
    """``requested``, unless the environment switch ``DAVIT_ACCELERATE=0`` turns acceleration off for the process."""
    return requested and os.environ.get(ENV_SWITCH, "").strip().lower() not in _OFF


@dataclass(frozen=True)
class Policy:
    """What :func:`davit.accelerate.install` installs. Build one with :meth:`detect` or by hand (tests pass both
    CPU vendors' policies explicitly on any machine).

    Attributes:
        mode: ``"infer"`` (eager inference without autograd: ``davit.optimize``), ``"compile"`` (inference traced by
            ``torch.compile``) or ``"train"`` (autograd: the training loop; also correct under ``no_grad``).
        device_type: ``"cpu"`` or ``"cuda"`` (others get the reference modules).
        onednn: use oneDNN's fused CPU ops (bias, GELU and residual in the GEMM/conv epilogue).
        onednn_fp32: also route fp32 training GEMMs, and every compiled fp32 Linear, through oneDNN. MKL, which the
            plain fp32 ops use, runs its AVX2 kernels on non-Intel CPUs, while oneDNN uses AVX-512 where the CPU has
            it: on a 2-core AMD EPYC fp32 GEMMs measured MKL 156-169 vs oneDNN 206-210 GFLOP/s. On Intel CPUs the
            two run fp32 at the same rate and the plain ops were measured faster in training.
        memory_saving: ``"none"``, ``"mlp"`` or ``"all"`` (train mode): block branches as custom autograd functions
            that store fewer activations and recompute the rest (see :mod:`davit.accelerate.kernels`).
        compiled_onednn_min_rows: compile mode, Intel policy: fp32 Linears over at least this many rows are traced as
            oneDNN's fused op (below it Inductor's MKL path was faster; batch 32 -8.5%, batch 1 -5.6%).
        bias_fused_max_k: training: Linears with at most this many inputs ...
        bias_fused_min_rows: ... over at least this many rows add their bias in oneDNN's epilogue (the stage-1
            Linears: F.linear's bias-broadcast copy there cost as much as the GEMM: 21 vs 14 ms).
        onednn_dw_max_rows: onednn_fp32: weight gradients of widening Linears over at most this many rows go
            through oneDNN (those of narrowing ones always do); over more rows MKL's reduction was 1.1-3x faster.
            4096 takes davit_tiny's stage 3 at batch 16 (3136 rows: 1.3-1.6x faster than MKL on an AMD EPYC).
        channel_per_image: (min tokens, max tokens, min batch x tokens) for fp32 CPU channel attention one image at a
            time (strided MKL GEMMs with no copies; 28.7 -> 5.9 ms at batch 16 x 3136 tokens x 96 channels).
        channel_per_image_infer: CPU inference (no autograd), fp32 and bf16: channel attention one image at a time on
            maps of at least this many tokens (1.3-4x faster than the batched matmuls at 196-50176 tokens, batch 1-32;
            on 49-token maps the batched form is faster at batch 32).
        window_chunk_bytes: CPU inference window attention runs over chunks of windows whose attention maps take at
            most this many bytes (1 MiB: fastest of 256 KiB-4 MiB for fp32, within 5% of the best for bf16).
    """

    mode: str = "infer"
    device_type: str = "cpu"
    onednn: bool = False
    onednn_fp32: bool = False
    memory_saving: str = "none"
    compiled_onednn_min_rows: int = 512
    bias_fused_max_k: int = 128
    bias_fused_min_rows: int = 8192
    onednn_dw_max_rows: int = 4096
    channel_per_image: tuple[int, int, int] = (196, 3136, 1568)
    channel_per_image_infer: int = 196
    window_chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"acceleration mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.memory_saving not in MEMORY_SAVING:
            raise ValueError(
                f"memory saving level must be one of {', '.join(MEMORY_SAVING)}; got {self.memory_saving!r}"
            )
        if self.memory_saving != "none" and self.mode != "train":
            raise ValueError("memory saving applies to training only; use mode='train'")
        if self.onednn and not compat.onednn_available():
            raise ValueError("this torch build has no oneDNN fused ops; build the policy with onednn=False")

    @classmethod
    def detect(cls, device: torch.device | str = "cpu", mode: str = "infer", **overrides: Any) -> Policy:
        """The policy for ``device`` on this machine: oneDNN where the build has it (CPU), its fp32 GEMMs on
        non-Intel CPUs. ``overrides`` set any field (``memory_saving="all"``)."""
        dev = torch.device(device).type
        onednn = dev == "cpu" and compat.onednn_available()
        vendor = compat.cpu_vendor() if onednn else ""
        base = cls(
            mode=mode,
            device_type=dev,
            onednn=onednn,
            onednn_fp32=onednn and vendor not in ("", "GenuineIntel"),
        )
        return replace(base, **overrides) if overrides else base

    def replace(self, **changes: Any) -> Policy:
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)
