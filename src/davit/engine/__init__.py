"""engine layer: the one training loop (``fit``), optimizer/schedule, checkpoints, distributed helpers."""

from __future__ import annotations

from .fit import NonFiniteLossError, ResumableSampler, fit, move_to_device
from .task import Task

__all__ = ["NonFiniteLossError", "ResumableSampler", "Task", "fit", "move_to_device"]
