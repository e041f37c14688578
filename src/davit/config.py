"""Typed run configuration: dataclass defaults < recipe YAML (with ``_base_`` inheritance) < ``key=value`` overrides.

Every task describes its run as a tree of frozen dataclasses. ``load_config(Cls, path, overrides)`` builds one,
checking every key against the dataclass fields (a typo is an error naming the valid keys) and converting values to
the annotated types. ``save_config`` writes the resolved tree back as YAML beside each run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError

__all__ = [
    "ConfigError",
    "LoopConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "from_dict",
    "load_config",
    "merge",
    "parse_overrides",
    "save_config",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(UserError):
    """A recipe or override that does not fit the config schema; the message names the key and the fix."""


class _DuplicateKey(yaml.YAMLError):
    """A mapping that gives one key twice (PyYAML would silently keep the last)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, naming it and its line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # before super() flattens `<<:` merges, whose keys may be overridden
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe, following ``_base_: other.yaml`` (relative to the file, a string or list) recursively."""
    p = Path(path)
    if p.resolve() in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain, p.resolve()))
        raise ConfigError(f"_base_ files include each other in a cycle ({cycle}); remove one of these _base_ entries")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as e:
        raise ConfigError(f"{p}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of config keys, not a {type(data).__name__}")
    bases = data.pop("_base_", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str):
            raise ConfigError(f"{p}: _base_ must be a file name or a list of them, not {base!r}")
        merged = merge(merged, read_yaml(p.parent / base, (*_chain, p.resolve())))
    return merge(merged, data)


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins, nested mappings merge."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "epochs=4"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a field inside {part!r}, which is not a section")
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, an optional YAML recipe and ``key=value`` overrides.

    The low-level builder under :func:`davit.engine.run.load_run_config` (which also finds packaged recipes by name
    and picks the task); a recipe's ``task:`` key is not a field and is dropped here.
    """
    data = read_yaml(path) if path else {}
    data.pop("task", None)
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, converting values and rejecting unknown keys."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
            f"valid keys{' in ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(hints[k], v, where + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config{' section ' + where.rstrip('.') if where else ''}: {e}") from e


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} is a section; give it a mapping, not {value!r}")
        return from_dict(tp, value, key + ".")
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, key) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key} needs {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, key) for a, v in zip(args, value))
        conv = [_convert(args[0], v, key) for v in value] if args else list(value)
        return tuple(conv) if (origin is tuple or tp is tuple) else conv
    if origin in (dict,) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {args}, got {value!r}")
        return value
    return value


def to_dict(cfg: Any) -> Any:
    """Dataclass tree -> plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike[str], task: str | None = None) -> Path:
    """Write the resolved config as YAML (with its ``task:`` key first when given, so it is a complete recipe)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"task": task, **to_dict(cfg)} if task else to_dict(cfg)
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# ------------------------------------------------------------------------------------ sections shared by every task
# Each task's top-level config (ClsConfig, SegConfig, DetConfig) holds these sections next to its own data section:
# ``model``, ``data``, ``optim``, ``sched``, ``train``, plus ``out`` and ``resume``.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which network to build and from which weights.

    Attributes:
        name: a zoo name (``davit_tiny`` ... ``davit_giant``), optionally with a weight tag.
        pretrained: ``""`` for random init, ``"true"`` for the default published weights, a weight tag
            (``"msft_in1k"``) or a local checkpoint path.
        num_classes: classifier outputs; ``None`` keeps the weights' count (or the dataset's for classification).
        reset_head: re-initialise the classifier even when the class count matches (fine-tuning to new classes).
        overrides: any :class:`davit.DaViTConfig` field, e.g. ``{drop_path_rate: 0.2, window_size: 12}``.
        freeze: ``""`` trains everything; ``"backbone"`` freezes the DaViT's stem and every stage (a linear probe for
            a classifier: only the head trains); ``"N"`` freezes the stem and the first N stages (1..4).
    """

    name: str = "davit_tiny"
    pretrained: str = ""
    num_classes: int | None = None
    reset_head: bool = False
    overrides: dict = dataclasses.field(default_factory=dict)
    freeze: str = ""

    def __post_init__(self) -> None:
        f = str(self.freeze).strip().lower()
        if f not in ("", "none", "backbone") and not (f.isdigit() and 0 <= int(f) <= 4):
            raise ValueError(f"model.freeze must be '', 'backbone' or a stage count 0..4, got {self.freeze!r}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer. ``lr`` is for a global batch of ``lr_base_batch`` images and scales linearly (0 = no scaling).

    Attributes:
        name: ``adamw`` | ``sgd``.
        lr: learning rate at a global batch of ``lr_base_batch``.
        lr_base_batch: the global batch ``lr`` refers to; the engine uses ``lr * global_batch / lr_base_batch``.
        weight_decay: decoupled weight decay.
        betas: AdamW betas (``betas[0]`` is the SGD momentum).
        eps: AdamW epsilon.
        no_decay_norm_bias: no weight decay on norms, biases and other 1-D parameters (and the model's
            ``no_weight_decay()`` names), as in the official recipe.
        grad_clip: clip the global gradient norm to this value (0 = off).
        layer_decay: layer-wise lr decay for fine-tuning (BEiT/ConvNeXt style): the head keeps the lr, each DaViT
            block below it gets ``layer_decay`` times the lr of the one above, the stem the smallest (1.0 = off).
    """

    name: str = "adamw"
    lr: float = 1e-3
    lr_base_batch: int = 1024
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    no_decay_norm_bias: bool = True
    grad_clip: float = 0.0
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"optim.name must be adamw or sgd, got {self.name!r}")
        if self.lr <= 0 or self.lr_base_batch < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.lr must be > 0; lr_base_batch, weight_decay and grad_clip must be >= 0")


@dataclasses.dataclass(frozen=True)
class SchedConfig:
    """Learning-rate schedule, stepped every iteration.

    ``warmup``, ``milestones`` and ``cooldown`` count epochs in epoch-based runs and iterations in iteration-based
    runs. Cosine decays from the (scaled) lr to ``min_lr`` over the run minus ``cooldown``, then holds ``min_lr``.

    Attributes:
        name: ``cosine`` | ``step`` | ``poly`` | ``constant``.
        warmup: linear warmup length from ``warmup_lr``.
        warmup_lr: the lr at the first step.
        min_lr: the floor of cosine and poly decays.
        milestones: where ``step`` multiplies the lr by ``gamma``.
        gamma: the step factor.
        power: the poly exponent.
        cooldown: the tail held at ``min_lr`` (the official recipe runs 300 + 10 epochs).
    """

    name: str = "cosine"
    warmup: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 1.0
    cooldown: int = 0

    def __post_init__(self) -> None:
        if self.name not in ("cosine", "step", "poly", "constant"):
            raise ValueError(f"sched.name must be one of cosine, step, poly, constant; got {self.name!r}")
        if self.warmup < 0 or self.cooldown < 0:
            raise ValueError("sched.warmup and sched.cooldown must be >= 0")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The training loop. Exactly one of ``epochs`` and ``iters`` is > 0.

    Attributes:
        epochs: epoch-based run length.
        iters: iteration-based run length (optimizer steps).
        batch_size: images per process per step (the global batch is ``batch_size * world_size * accum_steps``).
        accum_steps: gradient accumulation steps per optimizer step.
        amp: ``none`` | ``bf16`` | ``fp16`` autocast (fp16 uses a gradient scaler).
        channels_last: NHWC memory format for the model and the images.
        grad_checkpointing: recompute activations in the backward pass to save memory.
        accelerate: train with :mod:`davit.accelerate`'s fused kernels installed (same results to rounding, faster
            on the CPU); ``false`` (or ``DAVIT_ACCELERATE=0``) trains the reference modules.
        memory_saving: ``none`` | ``mlp`` | ``all``: accelerated DaViT branches that store fewer activations for the
            backward pass at a few % of speed (``davit.accelerate.Policy``); combines with ``grad_checkpointing``.
        cpu_allocator: glibc's malloc policy on the CPU (``davit.allocator``): ``speed`` keeps freed memory for
            reuse, ``memory`` returns it to the OS (lower peak RSS, slower steps), ``system`` leaves glibc's defaults,
            ``auto`` is ``memory`` with ``grad_checkpointing`` and ``speed`` without.
        ema: keep an exponential moving average of the weights (evaluated and saved as the weights when on).
        ema_decay: EMA decay per optimizer step.
        eval_every: evaluate every this many epochs (or iterations for iteration-based runs).
        log_every: a log line every this many iterations.
        seed: the seed of everything (python, numpy, torch, the sampler).
        workers: DataLoader worker processes.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:1`` ...
        distributed: ``auto`` (DDP under torchrun) | ``none`` | ``ddp`` | ``fsdp``.
        threads: CPU threads per process for torch ops (0 = torch's default). Small models on a busy CPU run
            several times faster on 1 thread: OpenMP threads spin-wait for each other on tiny matrices.
        loggers: experiment trackers (:mod:`davit.engine.loggers`): ``auto`` (TensorBoard when installed),
            ``tensorboard``, ``wandb``, ``mlflow``; ``[]`` for none.
        project: the W&B project / MLflow experiment name.
    """

    epochs: int = 0
    iters: int = 0
    batch_size: int = 32
    accum_steps: int = 1
    amp: str = "none"
    channels_last: bool = False
    grad_checkpointing: bool = False
    accelerate: bool = True
    memory_saving: str = "none"
    cpu_allocator: str = "auto"
    ema: bool = False
    ema_decay: float = 0.9999
    eval_every: int = 1
    log_every: int = 50
    seed: int = 42
    workers: int = 2
    device: str = "auto"
    distributed: str = "auto"
    threads: int = 0
    loggers: tuple[str, ...] = ("auto",)
    project: str = "davit"

    def __post_init__(self) -> None:
        bad = [n for n in self.loggers if n not in ("auto", "none", "tensorboard", "wandb", "mlflow")]
        if bad:
            raise ValueError(f"train.loggers: unknown {bad[0]!r}; choose from auto, none, tensorboard, wandb, mlflow")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"train.amp must be none, bf16 or fp16; got {self.amp!r}")
        if self.memory_saving not in ("none", "mlp", "all"):
            raise ValueError(f"train.memory_saving must be none, mlp or all; got {self.memory_saving!r}")
        if self.cpu_allocator not in ("auto", "speed", "memory", "system"):
            raise ValueError(f"train.cpu_allocator must be auto, speed, memory or system; got {self.cpu_allocator!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            # Checked here, before any data or model is built: torch.device() would raise a RuntimeError mid-start.
            raise ValueError(f"train.device must be one of cpu, cuda, cuda:N, mps, auto; got {self.device!r}")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"train.distributed must be auto, none, ddp or fsdp; got {self.distributed!r}")
        if self.epochs < 0 or self.iters < 0 or (self.epochs > 0 and self.iters > 0):
            raise ValueError("set exactly one of train.epochs and train.iters to a positive number")
        if self.batch_size < 1 or self.accum_steps < 1 or self.eval_every < 1 or self.log_every < 1:
            raise ValueError("train.batch_size, accum_steps, eval_every and log_every must be >= 1")
        if self.threads < 0 or self.workers < 0:
            raise ValueError("train.threads and train.workers must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
