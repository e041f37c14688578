"""``curves.png``: training loss and evaluation metrics against epochs (matplotlib, Agg canvas, no pyplot)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..weights import atomic_write

__all__ = ["plot_curves"]


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], primary: str) -> Path:
    """Left: the training (and validation) losses per epoch; right: the primary metric (and top-5) per epoch."""
    # A bare Figure renders with the Agg canvas without pyplot: no GUI backend, no global figure state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_metric = fig.subplots(1, 2)
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
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _positive(history: Sequence[dict[str, Any]], keys: Sequence[str]) -> bool:
    vals = [r[k] for r in history for k in keys if k in r]
    return bool(vals) and min(vals) > 0
