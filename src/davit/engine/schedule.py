"""Learning-rate schedules, evaluated per optimizer step: warmup + cosine (with ``min_lr`` and cooldown), step, poly,
constant.

Lengths in :class:`davit.config.SchedConfig` count epochs for epoch-based runs and iterations for iteration-based
runs; :func:`build_schedule` converts them to optimizer steps, so every schedule is stepped once per iteration (an
epoch-based cosine still moves smoothly inside each epoch).
"""

from __future__ import annotations

import bisect
import math

from torch.optim import Optimizer

from ..config import SchedConfig

__all__ = ["LRSchedule", "build_schedule"]


class LRSchedule:
    """The lr at every optimizer step, applied to each param group as ``lr * group.get("lr_scale", 1)``.

    Conventions (those of the official recipes):

    - cosine follows timm's ``CosineLRScheduler`` with ``warmup_prefix=False``: the cosine runs from step 0 over
      ``total - cooldown`` steps from ``lr`` to ``min_lr``; the first ``warmup`` steps are replaced by a linear ramp
      from ``warmup_lr`` to ``lr``; the cooldown tail holds ``min_lr``.
    - step and poly follow mmcv: a multiplicative linear warmup starting at ``warmup_lr / lr`` of the regular lr;
      poly decays ``(lr - min_lr) * (1 - t / total) ** power + min_lr``.
    - constant: warmup (as cosine), then ``lr``.

    Args:
        cfg: the schedule section.
        base_lr: the peak lr (already scaled by the global batch).
        total_steps: optimizer steps in the whole run.
        steps_per_unit: optimizer steps per schedule unit (steps per epoch for epoch-based runs, 1 otherwise).
    """

    def __init__(self, cfg: SchedConfig, base_lr: float, total_steps: int, steps_per_unit: int = 1) -> None:
        if total_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got total_steps={total_steps}")
        self.cfg = cfg
        self.base_lr = base_lr
        self.total = total_steps
        self.warmup = cfg.warmup * steps_per_unit
        self.cooldown = cfg.cooldown * steps_per_unit
        self.milestones = sorted(m * steps_per_unit for m in cfg.milestones)
        if self.warmup + self.cooldown > self.total:
            raise ValueError(
                f"sched.warmup ({cfg.warmup}) + sched.cooldown ({cfg.cooldown}) exceed the run length; shorten them"
            )
        self.step_count = 0

    def lr_at(self, t: int) -> float:
        """The lr for optimizer step ``t`` (0-based)."""
        c = self.cfg
        if c.name in ("cosine", "constant"):
            if t < self.warmup:
                return c.warmup_lr + (self.base_lr - c.warmup_lr) * t / self.warmup
            if c.name == "constant":
                return self.base_lr
            span = self.total - self.cooldown
            if t >= span:
                return c.min_lr
            return c.min_lr + 0.5 * (self.base_lr - c.min_lr) * (1.0 + math.cos(math.pi * t / span))
        if c.name == "step":
            lr = self.base_lr * c.gamma ** bisect.bisect_right(self.milestones, t)
        else:  # poly
            lr = (self.base_lr - c.min_lr) * (1.0 - min(t, self.total) / self.total) ** c.power + c.min_lr
        if t < self.warmup:
            ratio = c.warmup_lr / self.base_lr
            lr *= ratio + (1.0 - ratio) * t / self.warmup
        return lr

    def apply(self, optimizer: Optimizer, t: int | None = None) -> float:
        """Set every group's lr for step ``t`` (default: the next step) and return the base lr."""
        t = self.step_count if t is None else t
        lr = self.lr_at(t)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1

    def state_dict(self) -> dict[str, int]:
        """The position (the schedule is otherwise a pure function of the config)."""
        return {"step_count": self.step_count, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position."""
        self.step_count = int(state["step_count"])


def build_schedule(cfg: SchedConfig, base_lr: float, total_steps: int, steps_per_unit: int = 1) -> LRSchedule:
    """The schedule for a run of ``total_steps`` optimizer steps (see :class:`LRSchedule`)."""
    return LRSchedule(cfg, base_lr, total_steps, steps_per_unit)
