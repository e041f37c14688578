"""``davit train``: a recipe file + overrides -> the task's config -> :func:`davit.engine.fit`.

The task is the recipe's top-level ``task:`` key (``cls`` | ``seg`` | ``det`` | ``med``), else the recipe's folder name
(``configs/seg/...`` -> ``seg``), else classification. Overrides may use the full dotted key (``train.epochs=4``) or,
when it is unambiguous, the bare field name (``epochs=4``, ``lr=5e-4``, ``batch_size=64``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_dict, merge, parse_overrides, read_yaml

__all__ = ["TASKS", "load_run_config", "resolve_overrides", "train_from_config"]

# task name -> (module, config class, task class)
TASKS: dict[str, tuple[str, str, str]] = {
    "cls": ("davit.tasks.classification", "ClsConfig", "ClassificationTask"),
    "seg": ("davit.tasks.segmentation.task", "SegConfig", "SegTask"),
    "det": ("davit.tasks.detection.task", "DetConfig", "DetTask"),
    "med": ("davit.tasks.medical", "MedConfig", "MedicalTask"),
}


def _task_classes(name: str) -> tuple[type, type]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; the recipe's task: key must be one of {', '.join(TASKS)}")
    module, cfg_cls, task_cls = TASKS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_cls), getattr(mod, task_cls)


def resolve_overrides(cfg_cls: type, overrides: Sequence[str]) -> list[str]:
    """Expand bare field names to ``section.field`` when exactly one section of ``cfg_cls`` has that field."""
    hints = typing.get_type_hints(cfg_cls)
    top = {f.name for f in dataclasses.fields(cfg_cls)}
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if sep and "." not in key and key not in top:
            owners = [
                name
                for name in top
                if dataclasses.is_dataclass(hints[name]) and key in {f.name for f in dataclasses.fields(hints[name])}
            ]
            if len(owners) == 1:
                key = f"{owners[0]}.{key}"
            elif len(owners) > 1:
                raise ConfigError(
                    f"override {item!r} is ambiguous: {', '.join(sorted(o + '.' + key for o in owners))}; "
                    "write the full key"
                )
        out.append(f"{key}{sep}{value}")
    return out


def load_run_config(
    config: str | os.PathLike[str], overrides: Sequence[str] = (), task: str | None = None
) -> tuple[str, Any]:
    """Read a recipe (with ``_base_``) and overrides into ``(task_name, config)``."""
    data = read_yaml(config)
    name = task or data.pop("task", None) or (Path(config).parent.name if Path(config).parent.name in TASKS else "cls")
    data.pop("task", None)
    cfg_cls, _ = _task_classes(name)
    cfg = from_dict(cfg_cls, merge(data, parse_overrides(resolve_overrides(cfg_cls, overrides))))
    return name, cfg


def train_from_config(
    config: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    out: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train from a recipe file: ``davit train --config FILE [--out DIR] [--resume] [key=value ...]``.

    Args:
        config: the recipe YAML.
        overrides: ``key=value`` items (``train.epochs=4`` or ``epochs=4``).
        out: the run folder (overrides the recipe's ``out``).
        resume: continue from ``out/last.pt`` when it exists (``resume=auto``).

    Returns:
        The run's summary (see :func:`davit.engine.fit`).
    """
    from .fit import fit

    items = list(overrides)
    if out:
        items.append(f"out={out}")
    if resume:
        items.append("resume=auto")
    name, cfg = load_run_config(config, items)
    _, task_cls = _task_classes(name)
    return fit(cfg, task_cls(cfg))
