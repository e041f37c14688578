"""One way in for every task: a recipe (by name or path) + ``key=value`` overrides -> the task's config -> ``fit``.

Recipes ship inside the package (``davit/recipes/<task>/<name>.yaml``) and are found by name: ``cls/digits``,
``seg/synthetic_demo``, ``det/maskrcnn_davit_tiny_1x_coco`` (``davit recipes`` lists them); a path to any YAML file
works too. The task is the recipe's top-level ``task:`` key (``cls`` | ``seg`` | ``det`` | ``med``), else the
recipe's folder name (``recipes/seg/...`` -> ``seg``), else classification. Overrides may use the full dotted key
(``train.epochs=4``) or, when it is unambiguous, the bare field name (``epochs=4``, ``lr=5e-4``, ``batch_size=64``).

Every weights file a run writes records its task and its whole resolved config (``task`` and ``config`` in the
safetensors header), so :func:`config_for_checkpoint` rebuilds the run's config from the file alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_dict, merge, parse_overrides, read_yaml

__all__ = [
    "RECIPES_DIR",
    "TASKS",
    "checkpoint_task",
    "config_for_checkpoint",
    "find_recipe",
    "list_recipes",
    "load_run_config",
    "resolve_overrides",
    "task_name",
    "train_from_config",
]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

# task name -> (module, config class, task class)
TASKS: dict[str, tuple[str, str, str]] = {
    "cls": ("davit.tasks.classification", "ClsConfig", "ClassificationTask"),
    "seg": ("davit.tasks.segmentation.task", "SegConfig", "SegTask"),
    "det": ("davit.tasks.detection.task", "DetConfig", "DetTask"),
    "med": ("davit.tasks.medical", "MedConfig", "MedicalTask"),
}

# What a user runs with a file of each task (for "this file belongs to another command" errors).
COMMANDS = {"cls": "davit eval / davit predict", "seg": "davit seg eval / davit seg predict",
            "det": "davit det eval / davit det predict", "med": "davit.tasks.medical.evaluate_medmnist"}  # fmt: skip
TASK_WORDS = {"cls": "classification", "seg": "segmentation", "det": "detection", "med": "medical classification"}


def _task_classes(name: str) -> tuple[type, type]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; the recipe's task: key must be one of {', '.join(TASKS)}")
    module, cfg_cls, task_cls = TASKS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_cls), getattr(mod, task_cls)


def task_name(cfg: Any) -> str:
    """The task (``cls`` | ``seg`` | ``det``) a config object belongs to."""
    for name, (_, cfg_cls, _) in TASKS.items():
        if type(cfg).__name__ == cfg_cls:
            return name
    raise ConfigError(f"{type(cfg).__name__} is not a task config ({', '.join(c for _, c, _ in TASKS.values())})")


# --------------------------------------------------------------------------------------------------------- recipes
def find_recipe(config: str | os.PathLike[str]) -> Path:
    """A recipe path from a name (``cls/digits``, ``cls/digits.yaml``, ``configs/cls/digits.yaml``) or a file path.

    Raises:
        ConfigError: no such file nor packaged recipe (the message lists the closest names).
    """
    p = Path(config).expanduser()
    if p.is_file():
        return p
    text = str(config).replace(os.sep, "/")
    for prefix in ("configs/", "recipes/"):
        text = text[len(prefix) :] if text.startswith(prefix) else text
    for cand in (RECIPES_DIR / text, RECIPES_DIR / f"{text}.yaml"):
        if cand.is_file():
            return cand
    names = [r["name"] for r in list_recipes()]
    close = difflib.get_close_matches(text.removesuffix(".yaml"), names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"config file not found: {config!s} is neither a file nor a packaged recipe{hint} (`davit recipes` lists them)"
    )


def list_recipes() -> list[dict[str, str]]:
    """The packaged recipes: ``name`` (what ``--config`` takes), ``task`` and ``description`` (its first comment)."""
    out = []
    for p in sorted(RECIPES_DIR.glob("*/*.yaml")):
        if p.name.startswith("_"):  # bases for _base_ inheritance, not runnable on their own
            continue
        first = next((ln for ln in p.read_text().splitlines() if ln.startswith("#")), "#")
        out.append({"name": f"{p.parent.name}/{p.stem}", "task": p.parent.name, "description": first[1:].strip()})
    return out


# ---------------------------------------------------------------------------------------------------- the loader
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
    config: str | os.PathLike[str] | None, overrides: Sequence[str] = (), task: str | None = None
) -> tuple[str, Any]:
    """The one config loader: defaults < recipe (with ``_base_``) < ``key=value`` overrides -> ``(task, config)``.

    Args:
        config: a packaged recipe name (``cls/digits``), a YAML path (a run's ``config.yaml`` works too), or None
            for the task's defaults (then ``task`` is required).
        overrides: ``key=value`` items; bare field names are expanded when unambiguous.
        task: the expected task; a recipe of another task is an error naming the right command.
    """
    if config is None:
        if task is None:
            raise ConfigError("pass a recipe (--config NAME|FILE) or a task")
        data: dict[str, Any] = {}
        name = task
    else:
        path = find_recipe(config)
        data = read_yaml(path)
        found = data.pop("task", None) or (path.parent.name if path.parent.name in TASKS else None)
        if task is not None and found is not None and found != task:
            raise ConfigError(
                f"{config} is a {TASK_WORDS.get(found, found)} recipe (task: {found}), not a {TASK_WORDS[task]} one; "
                f"train it with `davit train --config {config}`"
            )
        name = task or found or "cls"
    cfg_cls, _ = _task_classes(name)
    cfg = from_dict(cfg_cls, merge(data, parse_overrides(resolve_overrides(cfg_cls, overrides))))
    return name, cfg


# ------------------------------------------------------------------------------------------- self-describing files
def _header(path: Path) -> dict[str, Any]:
    from ..weights import read_safetensors_metadata

    try:
        return dict(read_safetensors_metadata(path))
    except Exception:  # a pickle checkpoint or an unreadable header: nothing recorded
        return {}


def checkpoint_task(path: str | os.PathLike[str]) -> str | None:
    """The task recorded in a weights file written by ``davit train`` (``cls`` | ``seg`` | ``det``), or None."""
    meta = _header(Path(path).expanduser())
    if "task" in meta:
        return str(meta["task"])
    if "davit_config" in meta:  # classifier files written before the task was recorded
        return "cls"
    return None


def check_task(path: str | os.PathLike[str], expected: str) -> None:
    """Raise a one-line error naming the right command when ``path`` holds a model of another task."""
    found = checkpoint_task(path)
    if found is not None and found != expected:
        raise ConfigError(
            f"{path} holds a {TASK_WORDS.get(found, found)} model, not a {TASK_WORDS[expected]} one: "
            f"use {COMMANDS.get(found, 'the matching command')}"
        )


def config_for_checkpoint(
    checkpoint: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    task: str | None = None,
) -> tuple[str, Any]:
    """The run config of a weights file: ``config`` if given, else the file's own header, else ``config.yaml``
    beside it (files written before headers carried the config).

    Raises:
        ConfigError: the file is of another task than ``task``, or records no config and has none beside it.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if task is not None:
        check_task(path, task)
    if config is not None:
        return load_run_config(config, overrides, task)
    meta = _header(path)
    if "config" in meta and "task" in meta:
        name = str(meta["task"])
        cfg_cls, _ = _task_classes(name)
        data = json.loads(meta["config"])
        return name, from_dict(cfg_cls, merge(data, parse_overrides(resolve_overrides(cfg_cls, overrides))))
    beside = path.parent / "config.yaml"
    if beside.is_file():
        return load_run_config(beside, overrides, task)
    raise ConfigError(
        f"{path} records no training config and there is no config.yaml beside it; pass --config with the recipe "
        "it was trained with"
    )


# ------------------------------------------------------------------------------------------------------- training
def train_from_config(
    config: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    out: str | None = None,
    resume: bool | str = False,
    device: str | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """Train from a recipe: ``davit train --config NAME|FILE [--out DIR] [--resume [PATH]] [key=value ...]``.

    Args:
        config: a packaged recipe name (``cls/digits``) or a YAML file.
        overrides: ``key=value`` items (``train.epochs=4`` or ``epochs=4``).
        out: the run folder (overrides the recipe's ``out``).
        resume: True (or ``"auto"``) continues from ``out/last.pt`` when it exists; a path resumes from that file.
        device: ``train.device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``).
        task: the expected task (``davit seg train`` passes ``seg``); default: the recipe's.

    Returns:
        The run's summary (see :func:`davit.engine.fit`).
    """
    from .fit import fit

    items = list(overrides)
    # An option and an override that set the same key differently: refuse rather than pick one silently.
    for flag, key, value in (("--out", "out", out), ("--device", "train.device", device)):
        given = [o.partition("=")[2] for o in items if o.partition("=")[0].strip() in (key, key.split(".")[-1])]
        if value and given and any(str(g) != str(value) for g in given):
            raise ConfigError(f"{flag} {value} contradicts the override {key}={given[-1]}; give only one of them")
    if out:
        items.append(f"out={out}")
    if resume:
        items.append(f"resume={'auto' if resume is True else resume}")
    if device:
        items.append(f"train.device={device}")
    name, cfg = load_run_config(config, items, task)
    _, task_cls = _task_classes(name)
    return fit(cfg, task_cls(cfg))
