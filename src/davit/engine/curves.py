"""``curves.png``: training loss, evaluation metrics and the learning rate against epochs (matplotlib, Agg canvas)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..weights import atomic_write

__all__ = ["plot_curves"]


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], primary: str) -> Path:
    """Left: the training (and validation) losses per epoch; middle: the primary metric (and top-5) per epoch; right:
    the learning rate at the end of each epoch (or evaluation interval)."""
    # A bare Figure renders with the Agg canvas without pyplot: no GUI backend, no global figure state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4), dpi=100)
    ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
    losses = sorted({k for r in history for k in r if k.endswith("loss") and k.startswith(("train_", "val_"))})
    for key in losses:
        xs = [r["epoch"] for r in history if key in r]
        ax_loss.plot(xs, [r[key] for r in history if key in r], marker=".", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log" if _positive(history, losses) else "linear")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    if losses:
        ax_loss.legend()
    metric_keys = [primary] + [k for k in ("top5",) if k != primary and any(k in r for r in history)]
    for key in metric_keys:
        xs = [r["epoch"] for r in history if key in r]
        if xs:
            ax_metric.plot(xs, [r[key] for r in history if key in r], marker="o", label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("evaluation")
    ax_metric.grid(alpha=0.3)
    if any(primary in r for r in history):
        ax_metric.legend()
    lr_rows = [r for r in history if "lr" in r]
    ax_lr.plot([r["epoch"] for r in lr_rows], [r["lr"] for r in lr_rows], marker=".", color="tab:green")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _positive(history: Sequence[dict[str, Any]], keys: Sequence[str]) -> bool:
    vals = [r[k] for r in history for k in keys if k in r]
    return bool(vals) and min(vals) > 0
