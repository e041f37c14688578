"""``fit(cfg, task)``: the one training loop of every task, epoch- or iteration-based, on one CPU or many GPUs.

What it owns: devices and DDP/FSDP, loaders with a resumable sampler, the optimizer (no decay on norms/biases, lr
scaled by the global batch), the per-iteration schedule, AMP, EMA, gradient accumulation and clipping, evaluation,
checkpoints, logs and curves. A :class:`davit.engine.Task` owns the model, the data, the loss and the metrics.

Outputs in ``cfg.out``: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` (one line per epoch, or per evaluation in
iteration-based runs), ``summary.json``, ``last.pt`` (full state), ``last.safetensors`` and ``best.safetensors``
(weights with the model config and class names), ``curves.png``. All written atomically, by rank 0. The same scalars
go to the trackers of ``train.loggers`` (TensorBoard by default when installed; :mod:`davit.engine.loggers`).

Bit-exact resume (CPU): the sampler's order is a function of ``(seed, epoch)``; every sample's augmentation is seeded
from ``(seed, epoch, index)`` inside the dataset call, independent of workers and of where the run was resumed; the
main process's python/numpy/torch RNG states (dropout, drop path, mixup) are saved in ``last.pt`` with the model,
optimizer, schedule, EMA, scaler and position. Killing a run at any point and resuming from its last save therefore
replays exactly the steps the uninterrupted run took.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import random
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..accelerate import accelerate_enabled, install
from ..allocator import tune_cpu_allocator
from ..config import ConfigError, save_config, to_dict
from ..errors import LoaderWorkerError
from ..weights import atomic_write, remove_stale_temps
from .checkpoint import (
    capture_rng,
    load_training_state,
    restore_rng,
    save_training_state,
    save_weights,
    weights_metadata,
)
from .distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    unwrap,
    wrap_model,
)
from .ema import ModelEMA
from .optim import build_optimizer, default_param_groups, freeze, scaled_lr
from .schedule import LRSchedule, build_schedule
from .task import Task
from .workers import (
    WorkerWatch,
    dead_workers,
    death_error,
    death_reason,
    is_worker_death,
    shutdown_workers,
    worker_init,
)

__all__ = ["NonFiniteLossError", "ResumableSampler", "fit", "move_to_device"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# ------------------------------------------------------------------------------------------------------- sampling
def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # hash() of a tuple of ints is not randomised per process (only str/bytes are), so this is stable across runs.
    return hash((seed, epoch, index)) & 0x7FFFFFFF


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ResumableSampler(Sampler):
    """A per-epoch permutation of ``range(n)`` from ``(seed, epoch)``, sharded over ranks, resumable mid-epoch.

    Every rank takes every ``world``-th index of the same permutation, truncated so all ranks get the same count
    (their steps stay in lockstep). The samples of global step ``k`` are then the same set whatever the number of
    processes, as long as the global batch is kept: one process with batch ``2B`` sees ``perm[2kB:2(k+1)B]``, two
    processes with batch ``B`` split exactly those.

    Yields ``(index, sample_seed)`` pairs for :class:`_SeededDataset` (or plain indices with ``with_seed=False``).
    """

    def __init__(
        self, n: int, *, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, with_seed: bool = True
    ) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.shuffle, self.with_seed = shuffle, with_seed
        self.per_rank = n // world
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its ``start``-th sample (of this rank's shard)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch, from its start."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        return perm[self.rank : self.per_rank * self.world : self.world][self.start :]

    def __iter__(self) -> Iterator[Any]:
        for i in self.indices():
            yield (i, _sample_seed(self.seed, self.epoch, i)) if self.with_seed else i

    def __len__(self) -> int:
        return self.per_rank - self.start


class _ShardSampler(Sampler):
    """Evaluation: rank ``r`` takes ``r, r + world, ...``; padded to equal length only under FSDP, whose forward is a
    collective every rank must join (DDP evaluation stays exact, with no duplicated sample)."""

    def __init__(self, n: int, rank: int, world: int, pad: bool) -> None:
        self.idx = list(range(rank, n, world))
        if pad and n > 0:
            per_rank = math.ceil(n / world)
            self.idx += self.idx[: per_rank - len(self.idx)] or [0] * (per_rank - len(self.idx))

    def __iter__(self) -> Iterator[int]:
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def _seed_sample(seed: int) -> None:
    # torch.manual_seed would also queue a lazy CUDA seeding that records a stack trace (milliseconds per call);
    # augmentation runs on the CPU generator only.
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


class _SeededDataset(Dataset):
    """Seeds python/numpy/torch from the sample's seed before each item, so augmentations do not depend on the
    worker, the worker count or where a run resumed. In the main process the caller's RNG states are restored."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:
            _seed_sample(seed)
            return self.dataset[index]
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            _seed_sample(seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _state_dict_mismatch(e: BaseException) -> str:
    """The first concrete difference in a ``load_state_dict`` error (its first line only says "Error(s) in ...")."""
    for line in str(e).splitlines():
        line = line.strip()
        m = re.match(
            r"size mismatch for (\S+): copying a param with shape (?:torch\.Size\()?(\[[^\]]*\])\)? from "
            r"checkpoint, the shape in current model is (?:torch\.Size\()?(\[[^\]]*\])",
            line,
        )
        if m:
            return f"{m[1]} is {m[2]} in the checkpoint but {m[3]} in this model"
        if line.startswith(("Missing key(s)", "Unexpected key(s)")):
            return line.rstrip(".")[:300]
    return _first_line(e)


def move_to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Tensors inside (nested) dicts, lists and tuples to ``device``; 4-D float images NHWC if ``channels_last``."""
    if isinstance(batch, Tensor):
        t = batch.to(device, non_blocking=True)
        if channels_last and t.ndim == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device, channels_last) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device, channels_last) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, channels_last) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------------------- state
@dataclasses.dataclass
class _Progress:
    epoch: int = 0  # the epoch being run (0-based)
    batch: int = 0  # micro-batches of that epoch already consumed by this rank
    step: int = 0  # optimizer steps done
    seconds: float = 0.0  # wall-clock of training so far, across resumes
    train_seconds: float = 0.0  # wall-clock of the train steps alone (for images/s)
    train_images: int = 0  # images seen by all ranks
    best: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class _Stop:
    """SIGINT/SIGTERM -> a flag the loop checks after each optimizer step (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: saving last.pt after this step, then stopping", signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------------------ fit
def fit(cfg: Any, task: Task) -> dict[str, Any]:
    """Train ``task`` as ``cfg`` says and return the summary (also written to ``cfg.out/summary.json``).

    Args:
        cfg: a task config with ``optim``, ``sched``, ``train`` (:class:`davit.config.LoopConfig`), ``out`` and
            ``resume`` (``""``, ``"auto"`` = ``out/last.pt`` if present, or a path).
        task: the :class:`davit.engine.Task`.

    Returns:
        The summary: the last evaluation's metrics, ``best_<primary>``, ``epochs``, ``steps``, ``seconds``,
        ``images_per_second``, ``interrupted``, ...

    Raises:
        NonFiniteLossError: the loss became NaN/inf (``last.pt`` keeps the last good state).
        ConfigError: an impossible configuration (dataset smaller than a global batch, bad resume path, ...).
    """
    import torch.distributed as dist

    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.train)
    try:
        return _Run(cfg, task, info).run()
    finally:
        if info.mode != "none" and owns_group:
            cleanup()


class _Run:
    def __init__(self, cfg: Any, task: Task, info: DistInfo) -> None:
        self.cfg, self.task, self.info = cfg, task, info
        self.tc = cfg.train
        self.out = Path(cfg.out)
        self.device = info.device
        self.p = _Progress()
        self.task_name = _task_name(cfg)

    # ------------------------------------------------------------------------------------------------ set-up
    def _setup_logging(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        root = logging.getLogger("davit")
        level = root.level
        stack.callback(root.setLevel, level)
        if not self.info.is_main:
            root.setLevel(logging.WARNING)
            return stack
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        self.out.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(self.out / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(fh)
        stack.callback(root.removeHandler, fh)
        stack.callback(fh.close)
        return stack

    def _set_cpu_allocator(self) -> None:
        """glibc's malloc policy (davit/allocator.py); measured on davit_tiny fp32 batch 32, memory_saving=all +
        checkpointing, fresh processes: peak RSS 1.96 GB "memory", 2.41-2.73 glibc defaults, 3.05-3.30 "speed";
        seconds per step ~9.5, ~7.6, ~5.7."""
        tc = self.tc
        want = tc.cpu_allocator
        if want == "auto":
            want = "memory" if tc.grad_checkpointing else "speed"
        if want == "system":
            return
        got = tune_cpu_allocator(want)
        if got == "memory" and tc.grad_checkpointing and tc.cpu_allocator == "auto":
            log.info(
                "gradient checkpointing: the CPU allocator returns freed memory to the OS (lowest peak RSS, steps "
                "~25%% slower than glibc's defaults); train.cpu_allocator=speed or system trades the other way"
            )
        elif got == "speed" and tc.memory_saving != "none":
            log.info(
                "memory saving is on but the CPU allocator keeps freed memory for speed: peak RSS ~10-25%% higher "
                "than with glibc's defaults, steps ~20-40%% faster; train.cpu_allocator=memory trades the other way"
            )

    def _accelerate(self, model: nn.Module) -> None:
        """Install davit.accelerate's training kernels on the model (train.accelerate, train.memory_saving)."""
        tc = self.tc
        if tc.memory_saving != "none" and not accelerate_enabled(tc.accelerate):
            raise ConfigError("train.memory_saving needs the accelerated modules; set train.accelerate=true")
        n = install(model, mode="train", memory_saving=tc.memory_saving, enabled=tc.accelerate)
        if tc.memory_saving != "none" and n == 0:
            name = type(model).__name__
            raise ConfigError(f"{name} has no DaViT blocks to save memory in; set train.memory_saving=none")
        log.debug("accelerated %d DaViT modules for training", n)

    def _build(self) -> None:
        tc, info = self.tc, self.info
        if tc.epochs <= 0 and tc.iters <= 0:
            raise ConfigError("set train.epochs (epoch-based run) or train.iters (iteration-based run) to a number > 0")
        if info.mode == "fsdp" and tc.ema:
            raise ConfigError("train.ema is not supported with train.distributed=fsdp; set train.ema=false")
        if tc.amp == "fp16" and self.device.type == "cpu":
            log.warning("train.amp=fp16 on the CPU is slow and rarely supported well; bf16 is the CPU choice")
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        if self.device.type == "cpu":
            self._set_cpu_allocator()
        # Same seed on every rank while building: identical initial weights (FSDP shards them without a broadcast).
        _seed_all(tc.seed)
        model = self.task.build_model()
        model_cfg = getattr(self.cfg, "model", None)
        if getattr(model_cfg, "freeze", ""):
            freeze(model, model_cfg.freeze)
        self.n_params = sum(p.numel() for p in model.parameters())
        if tc.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                name = type(model).__name__
                raise ConfigError(f"{name} has no set_grad_checkpointing(); set train.grad_checkpointing=false")
            model.set_grad_checkpointing(True)
        model.to(self.device)
        self._accelerate(model)
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(model, tc.ema_decay) if tc.ema else None
        self.model = wrap_model(model, info)
        self.raw = unwrap(self.model)

        train_ds, val_ds = self.task.build_datasets()
        if train_ds is None or len(train_ds) == 0:
            raise ConfigError("the training set is empty; check the data section")
        per_step = tc.batch_size * info.world_size
        if len(train_ds) < per_step * tc.accum_steps:
            raise ConfigError(
                f"the training set has {len(train_ds)} items, fewer than one global batch "
                f"({tc.batch_size} x {info.world_size} processes x {tc.accum_steps} accumulation steps); "
                "lower train.batch_size or train.accum_steps"
            )
        collate = self.task.collate_fn()
        if isinstance(train_ds, IterableDataset):  # a stream orders, shards and resumes itself: it is the sampler
            self.sampler, self.loader = train_ds, self._stream_loader(train_ds, collate)
        else:
            self.sampler = ResumableSampler(len(train_ds), seed=tc.seed, rank=info.rank, world=info.world_size)
            self.loader = DataLoader(
                _SeededDataset(train_ds),
                batch_size=tc.batch_size,
                sampler=self.sampler,
                num_workers=tc.workers,
                collate_fn=collate,
                drop_last=True,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=worker_init,
                persistent_workers=tc.workers > 0,
                # An explicit generator: the loader's worker base seed must not draw from the global RNG.
                generator=torch.Generator().manual_seed(tc.seed),
            )
        self.val_loader = None
        if val_ds is not None and len(val_ds) > 0:
            self.val_loader = DataLoader(
                val_ds,
                batch_size=tc.batch_size,
                sampler=_ShardSampler(len(val_ds), info.rank, info.world_size, pad=info.mode == "fsdp"),
                num_workers=tc.workers,
                collate_fn=collate,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=worker_init,
                persistent_workers=tc.workers > 0,
                # Without a generator the first iterator draws its worker seed from the global RNG; with persistent
                # workers only the first does, which a resumed run would do at another point of the RNG stream.
                generator=torch.Generator().manual_seed(tc.seed + 1),
            )
        self.micro_per_epoch = len(train_ds) // info.world_size // tc.batch_size
        self.steps_per_epoch = self.micro_per_epoch // tc.accum_steps
        self.total_steps = tc.epochs * self.steps_per_epoch if tc.epochs else tc.iters
        self.global_batch = per_step * tc.accum_steps

        groups = self.task.param_groups(self.raw, self.cfg.optim) or default_param_groups(self.raw, self.cfg.optim)
        self.lr = scaled_lr(self.cfg.optim, self.global_batch)
        self.optimizer = build_optimizer(groups, self.cfg.optim, self.lr)
        self.sched: LRSchedule = build_schedule(
            self.cfg.sched, self.lr, self.total_steps, self.steps_per_epoch if tc.epochs else 1
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.amp == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)
        self.class_names = getattr(self.task, "class_names", None)
        log.info(
            "%s: %s params | %d train / %s val items | %d process(es) x batch %d x accum %d = global batch %d | "
            "lr %.3g (%s) | %d steps (%d per epoch) | device %s, amp %s",
            type(self.raw).__name__,
            f"{self.n_params:,}",
            len(train_ds),
            len(val_ds) if val_ds is not None else 0,
            info.world_size,
            tc.batch_size,
            tc.accum_steps,
            self.global_batch,
            self.lr,
            f"{self.cfg.optim.lr:.3g} per {self.cfg.optim.lr_base_batch} images"
            if self.cfg.optim.lr_base_batch > 0
            else "not scaled with the batch",
            self.total_steps,
            self.steps_per_epoch,
            self.device,
            tc.amp,
        )

    def _stream_loader(self, train_ds: Any, collate: Any) -> DataLoader:
        """The loader of a stream (``davit.data.sources.HFStream``): no sampler, the stream shards itself."""
        tc, info = self.tc, self.info
        train_ds.configure(seed=tc.seed, rank=info.rank, world=info.world_size, batch_size=tc.batch_size)
        # Not persistent: each epoch's workers must receive the stream's new epoch and start position.
        return DataLoader(
            train_ds,
            batch_size=tc.batch_size,
            num_workers=tc.workers,
            collate_fn=collate,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init,
            # Each iterator draws a base seed; from its own generator, not from the global RNG (dropout, mixup).
            generator=torch.Generator().manual_seed(tc.seed),
        )

    # --------------------------------------------------------------------------------------------- state I/O
    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if not r:
            return None
        if r == "auto":
            p = self.out / "last.pt"
            if not p.exists():
                log.info("resume=auto: no %s yet, starting fresh", p)
                return None
            return p
        p = Path(r).expanduser()
        if p.is_dir():
            p = p / "last.pt"
        if not p.exists():
            raise FileNotFoundError(f"resume checkpoint not found: {p} (use resume=auto to resume only if present)")
        return p

    def _load(self, path: Path) -> None:
        state = load_training_state(path)
        if int(state["steps_per_epoch"]) != self.steps_per_epoch or int(state["total_steps"]) != self.total_steps:
            raise ConfigError(
                f"{path} was saved by a run of {state['total_steps']} steps ({state['steps_per_epoch']} per epoch), "
                f"this config gives {self.total_steps} ({self.steps_per_epoch} per epoch): resume with the same "
                "data, batch size, processes and length, or start a new run (another out=, no resume)"
            )
        if self.info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            try:
                self.raw.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ConfigError(
                    f"{path} was saved by a run with another model or optimizer ({_state_dict_mismatch(e)}): resume "
                    "with the config that run used (its config.yaml), or start a new run (another out=, no --resume)"
                ) from None
        self.sched.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError(f"{path} has no EMA state but train.ema=true; resume with train.ema=false")
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        pos = state["progress"]
        self.p = _Progress(**{**pos, "history": list(pos["history"])})
        ranks = state["ranks"]
        mine = ranks[self.info.rank] if self.info.rank < len(ranks) else ranks[0]
        self.acc = {k: torch.tensor(v, dtype=torch.float64) for k, v in mine["acc"].items()}
        restore_rng(mine["rng"])
        log.info("resumed from %s at epoch %d, step %d/%d", path, self.p.epoch + 1, self.p.step, self.total_steps)

    def _full_model_state(self, module: nn.Module | None = None) -> dict[str, Tensor]:
        if module is None and self.info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in (module or self.raw).state_dict().items()}

    def _weights_state(self) -> dict[str, Tensor]:
        """The weights users get: the EMA's when EMA is on."""
        return self._full_model_state(self.ema.module if self.ema is not None else None)

    def _save(self, best: bool = False) -> None:
        """``last.pt`` + ``last.safetensors`` (+ ``best.safetensors``); collective: every rank calls it.

        A state with non-finite weights is never saved: the previous ``last.pt`` stays the last good one.
        """
        model_state = self._full_model_state()
        self._check_finite({}, model_state)
        if self.info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim_state = get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            optim_state = self.optimizer.state_dict()
        weights = self._weights_state() if self.ema is not None else model_state
        ranks = all_gather_object({"rng": capture_rng(), "acc": {k: float(v) for k, v in self.acc.items()}})
        if self.info.is_main:
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "progress": dataclasses.asdict(self.p),
                "ranks": ranks,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "config": json.dumps(to_dict(self.cfg)),
            }
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            save_training_state(self.out / "last.pt", state)
            self._export(weights, last=True, best=best)
        barrier()

    def _export(self, weights: dict[str, Tensor], last: bool, best: bool) -> None:
        """Write ``last.safetensors`` and/or ``best.safetensors`` of the current progress (main rank)."""
        extra = self.task.weights_metadata() if hasattr(self.task, "weights_metadata") else {}  # type: ignore[attr-defined]
        model_cfg = getattr(self.cfg, "model", None)
        if getattr(model_cfg, "name", None):
            extra.setdefault("model_name", model_cfg.name)
        # The task and the whole resolved config make the file self-describing: info, eval, predict and export
        # need nothing else (config_for_checkpoint reads them back).
        meta = weights_metadata(
            self.raw, self.class_names, epoch=self.p.epoch, step=self.p.step,
            config=json.dumps(to_dict(self.cfg)), **({"task": self.task_name} if self.task_name else {}), **extra,
        )  # fmt: skip
        if last:
            save_weights(self.out / "last.safetensors", weights, meta)
        if best:
            save_weights(self.out / "best.safetensors", weights, meta)

    def _sync_exports(self) -> None:
        """After a resume, rewrite ``last.safetensors`` (and ``best.safetensors`` when the resumed step was the best)
        if they do not record ``last.pt``'s step: a kill inside the save after ``last.pt`` leaves them one save
        behind, and a finished run resumed does not save again. Collective (FSDP gathers the weights)."""
        p = self.p

        def stale(name: str) -> bool:
            try:
                from safetensors import safe_open

                with safe_open(str(self.out / name), "pt") as h:
                    return str((h.metadata() or {}).get("step")) != str(p.step)
            except Exception:  # missing, cut short or not safetensors: rewrite it
                return True

        row = p.history[-1] if p.history else None
        was_best = row is not None and row.get("step") == p.step and (
            self.val_loader is None or p.best_epoch == (row["epoch"] if self.tc.epochs else p.step)
        )  # fmt: skip
        # Rank 0's view decides for all: every rank must take the same branch into the collective gather below.
        last, best = all_gather_object((stale("last.safetensors"), was_best and stale("best.safetensors")))[0]
        if not (last or best):
            return
        weights = self._weights_state()
        if self.info.is_main:
            log.info("rewriting the exported weights of step %d, which an interrupted save left behind", p.step)
            self._export(weights, last=last, best=best)
        barrier()

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"the run folder {self.out} is a file; pass --out (out=) a folder path")
        with self._setup_logging() as stack:
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            if self.info.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                # Saves killed mid-write leave their temporary files (as large as last.pt): the run owns them.
                for stale in remove_stale_temps(self.out):
                    log.info("removed %s, left by an interrupted save", stale)
                atomic_write(self.out / "config.yaml", lambda tmp: save_config(self.cfg, tmp, task=self.task_name))
            if self.info.mode != "none":
                i = self.info
                log.info("distributed: %s, rank %d/%d on %s (%s)", i.mode, i.rank, i.world_size, i.device, i.backend)
            self._build()
            from .loggers import build_loggers

            self.loggers = build_loggers(
                self.tc.loggers, self.out, to_dict(self.cfg), enabled=self.info.is_main, project=self.tc.project
            )
            stack.callback(self.loggers.close)
            self.acc: dict[str, Tensor] = {}
            path = self._resume_path()
            if path is not None:
                self._load(path)
                self._sync_exports()
            else:
                # Different streams per rank for dropout / drop path / mixup after the identical initialisation.
                _seed_all(self.tc.seed + self.info.rank)
            from tqdm.contrib.logging import logging_redirect_tqdm

            with _Stop() as stop, WorkerWatch() as self._watch, logging_redirect_tqdm():
                try:
                    interrupted = self._loop(stop)
                finally:
                    # Now, not at interpreter exit: the workers ignore SIGTERM (davit.engine.workers says why).
                    shutdown_workers(self.loader, self.val_loader)
            return self._finish(interrupted, stop.signum)

    def _loop(self, stop: _Stop) -> bool:
        from tqdm import tqdm

        tc, p = self.tc, self.p
        bar = tqdm(
            total=self.total_steps,
            initial=p.step,
            disable=not self.info.is_main,
            dynamic_ncols=True,
            mininterval=0.5,
            unit="step",
        )
        self.model.train()
        self._stop, self._stopping, self._in_eval = stop, False, False
        self._t0, self._sec0 = time.perf_counter(), p.seconds
        try:
            self._loop_steps(bar)
        except RuntimeError as e:
            if not is_worker_death(e):
                raise
            # torch's "exited unexpectedly" does not say how; the process objects know (a negative code: a signal).
            dead = dead_workers(self.loader) or dead_workers(self.val_loader)
            reason = death_reason(death_error(dead) if dead else e)
            # The error surfaces only between micro-steps (WorkerWatch defers torch's SIGCHLD error to the checks),
            # so after a whole optimizer step the state is whole: keep the work done since the last save (an
            # evaluation cut short is not: its row is missing; other ranks cannot join a save either).
            saved = p.batch % tc.accum_steps == 0 and p.step > 0 and not self._in_eval and self.info.mode == "none"
            if saved:
                self._tick()
                self._save()
            last = self.out / "last.pt"
            if saved:
                where = f"saved {last} at step {p.step}; resume with: {self._resume_command()}"
            elif last.is_file():
                where = f"the last save is {last}; resume with: {self._resume_command()}"
            else:
                where = "nothing was saved yet; start again"
            raise LoaderWorkerError(
                f"a data loader worker died ({reason}): most likely the out-of-memory killer; lower "
                f"train.workers or train.batch_size; {where}"
            ) from None
        finally:
            bar.close()
        return self._stopping

    def _loop_steps(self, bar: Any) -> None:
        """The steps until the end of training or a stop request (``self._stopping``, saved already)."""
        tc, p = self.tc, self.p
        while p.step < self.total_steps:
            self.sampler.set_epoch(p.epoch, start=p.batch * tc.batch_size)
            remaining = self.steps_per_epoch * tc.accum_steps - p.batch
            bar.set_description(f"epoch {p.epoch + 1}" + (f"/{tc.epochs}" if tc.epochs else ""))
            t_steps = time.perf_counter()
            for batch in self._watch.batches(itertools.islice(self.loader, remaining), self.loader):
                if not self._micro_step(batch):
                    continue
                p.train_seconds += time.perf_counter() - t_steps
                bar.update(1)
                if p.step % 10 == 0 or p.step == self.total_steps:
                    bar.set_postfix(loss=f"{float(self._last_loss):.4f}", lr=f"{self._last_lr:.2e}")
                if p.step % tc.log_every == 0:
                    log.info(
                        "epoch %d step %d/%d loss %.4f lr %.3e",
                        p.epoch + 1, p.step, self.total_steps, float(self._last_loss), self._last_lr,
                    )  # fmt: skip
                    self.loggers.log_interval(p.step, float(self._last_loss), self._last_lr, p.train_images)
                if self._stopping:
                    self._tick()
                    self._save()
                    return
                if not tc.epochs and (p.step % tc.eval_every == 0 or p.step == self.total_steps):
                    self._record(evaluate=True)
                if p.step >= self.total_steps:
                    break
                t_steps = time.perf_counter()
            if p.batch >= self.steps_per_epoch * tc.accum_steps:
                p.epoch += 1
                p.batch = 0
                if tc.epochs:
                    self._record(evaluate=p.epoch % tc.eval_every == 0 or p.epoch == tc.epochs)

    def _tick(self) -> None:
        """Bring ``seconds`` up to now (wall-clock across resumes)."""
        self.p.seconds = self._sec0 + time.perf_counter() - self._t0

    def _micro_step(self, batch: Any) -> bool:
        """Forward/backward one micro-batch; step the optimizer at the end of an accumulation. True if it stepped."""
        tc, p = self.tc, self.p
        k = p.batch % tc.accum_steps
        if k == 0:
            self._last_lr = self.sched.apply(self.optimizer)
            self._nonfinite = torch.zeros((), device=self.device)
            self._bad_loss = float("nan")
        last = k == tc.accum_steps - 1
        batch = move_to_device(batch, self.device, tc.channels_last)
        with self._sync(last), self._autocast():
            out = self.task.loss_fn(self.model, batch)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            self._nonfinite += 1.0
            self._bad_loss = float(loss.detach())
        self.scaler.scale(loss / tc.accum_steps).backward()
        for name, v in out.items():
            v = v.detach().float().mean() if isinstance(v, Tensor) else torch.tensor(float(v))
            key = "train_" + name if not name.startswith("train_") else name
            self.acc[key] = self.acc.get(key, torch.zeros((), dtype=torch.float64)) + v.cpu().double()
        self.acc["_n"] = self.acc.get("_n", torch.zeros((), dtype=torch.float64)) + 1
        self._last_loss = loss.detach()
        p.batch += 1
        p.train_images += _batch_len(batch) * self.info.world_size
        if not last:
            return False
        # One collective per step carries both the NaN check and the stop request, so every rank agrees on both.
        stop = torch.tensor(float(self._stop.signum > 0), device=self.device)
        flags = all_reduce_sum(torch.stack([self._nonfinite, stop])).tolist()
        self._stopping = flags[1] > 0
        if flags[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"the loss is {self._bad_loss:g} at step {p.step + 1} (epoch {p.epoch + 1}, lr {self._last_lr:.3g}); "
                f"stopped without saving it. {self._last_good()}"
            )
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.raw)
        p.step += 1
        return True

    def _resume_command(self) -> str:
        """The command that continues this run (the task's own subcommand; a custom task may set ``cli_command``)."""
        command = getattr(self.task, "cli_command", None) or _CLI_COMMANDS.get(self.task_name or "", "davit train")
        return f"{command} --config {self.out / 'config.yaml'} --out {self.out} --resume"

    def _last_good(self) -> str:
        """Where the last good state is and what to do, for the messages of a diverged run."""
        fix = "lower optim.lr, set optim.grad_clip, or use train.amp=bf16 instead of fp16"
        last = self.out / "last.pt"
        if last.is_file():
            return f"The last good state is {last}: {fix}, then resume with: {self._resume_command()}"
        return f"No checkpoint was saved yet (the run diverged before its first save): {fix}, then start again"

    def _check_finite(self, metrics: Mapping[str, float], model_state: Mapping[str, Tensor] | None = None) -> None:
        """Refuse to save or rank a diverged state: non-finite weights, or a non-finite evaluation loss."""
        where = f"after step {self.p.step} (epoch {self.p.epoch + 1})"
        bad = [k for k, v in metrics.items() if "loss" in k and not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(
                f"the validation {bad[0]} is {metrics[bad[0]]:g} {where}: the weights diverged; stopped without "
                f"saving them. {self._last_good()}"
            )
        if model_state is not None:
            nonfinite = [
                k for k, v in model_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
            ]
            if nonfinite:
                raise NonFiniteLossError(
                    f"{len(nonfinite)} weight tensors hold NaN or inf {where} (e.g. {nonfinite[0]}): the weights "
                    f"diverged; stopped without saving them. {self._last_good()}"
                )

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if last or self.tc.accum_steps == 1 or self.info.mode == "none":
            return contextlib.nullcontext()
        if self.info.mode == "ddp":
            return self.model.no_sync()  # type: ignore[operator]
        self.model.set_requires_gradient_sync(False)  # type: ignore[operator]
        return _ReenableGradSync(self.model)

    # ----------------------------------------------------------------------------------------- evaluate/record
    def _evaluate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        net = self.ema.module if self.ema is not None else (self.model if self.info.mode == "fsdp" else self.raw)
        was_training = net.training
        net.eval()
        self._in_eval = True
        try:
            with torch.no_grad(), self._autocast():
                metrics = self.task.evaluate(net, self.val_loader)
        finally:
            self._in_eval = False
            net.train(was_training)
            self.model.train()
        return {k: float(v) for k, v in metrics.items()}

    def _record(self, evaluate: bool) -> None:
        """Close an epoch (or an evaluation interval): reduce the train means, evaluate, log, save."""
        self._watch.check()
        p = self.p
        sums = {k: v for k, v in self.acc.items()}
        keys = sorted(sums)
        if keys:
            reduced = all_reduce_sum(torch.stack([sums[k] for k in keys]).to(self.device)).cpu()
            sums = dict(zip(keys, reduced.tolist()))
        n = max(sums.pop("_n", 1.0), 1.0)
        row: dict[str, Any] = {"epoch": p.epoch if self.tc.epochs else p.step / self.steps_per_epoch, "step": p.step}
        row.update({k: v / n for k, v in sums.items()})
        row["lr"] = self._last_lr
        self.acc = {}
        metrics = self._evaluate() if evaluate else {}
        self._check_finite(metrics)
        row.update(metrics)
        self._tick()
        row["seconds"] = round(p.seconds, 3)
        row["images_per_second"] = round(p.train_images / max(p.train_seconds, 1e-9), 2)
        p.history.append(row)
        self.loggers.log_row(row)
        primary = self.task.primary_metric
        # NaN compares False, but say it: a NaN metric must never become the best.
        improved = primary in metrics and math.isfinite(metrics[primary]) and metrics[primary] > p.best
        if improved:
            # iteration runs count in steps: an "epoch 18.75" would name no checkpoint a user can find
            p.best, p.best_epoch = metrics[primary], row["epoch"] if self.tc.epochs else p.step
        # Without a validation set the latest weights are the best we know of.
        is_best = improved or self.val_loader is None
        where = f"epoch {p.epoch}/{self.tc.epochs}" if self.tc.epochs else f"step {p.step}/{self.total_steps}"
        shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("train_") or k in metrics)
        log.info("%s: %s | lr %.3g | %.1f s", where, shown, row["lr"], p.seconds)
        self._save(best=is_best)
        if self.info.is_main:
            self._write_metrics()

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.p.history)
        atomic_write(self.out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))

    def _finish(self, interrupted: bool, signum: int) -> dict[str, Any]:
        p = self.p
        last_eval = next((r for r in reversed(p.history) if self.task.primary_metric in r), {})
        summary: dict[str, Any] = {
            k: v for k, v in last_eval.items() if k not in ("epoch", "step", "lr", "seconds", "images_per_second")
        }
        summary.update(
            {
                "primary_metric": self.task.primary_metric,
                f"best_{self.task.primary_metric}": p.best if p.best_epoch >= 0 else None,
                ("best_epoch" if self.tc.epochs else "best_step"): p.best_epoch if p.best_epoch >= 0 else None,
                **({"epochs": p.epoch} if self.tc.epochs else {}),
                "steps": p.step,
                "total_steps": self.total_steps,
                "seconds": round(p.seconds, 2),
                "images_per_second": round(p.train_images / max(p.train_seconds, 1e-9), 2),
                "params": self.n_params,
                "global_batch": self.global_batch,
                "lr": self.lr,
                "world_size": self.info.world_size,
                "device": str(self.device),
                "interrupted": interrupted,
                "out": str(self.out),
            }
        )
        if interrupted:
            summary["stopped_by"] = signal.Signals(signum).name if signum else "signal"
            summary["resume_command"] = self._resume_command()
            if self.info.is_main:
                log.warning("stopped at step %d; resume with: %s", p.step, summary["resume_command"])
        elif hasattr(self.task, "on_fit_end"):
            net = self.ema.module if self.ema is not None else (self.model if self.info.mode == "fsdp" else self.raw)
            net.eval()
            with torch.no_grad():
                summary.update(self.task.on_fit_end(net, self.out) or {})  # type: ignore[attr-defined]
        if self.info.is_main:
            atomic_write(self.out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
            if p.history:
                from .curves import plot_curves

                plot_curves(p.history, self.out / "curves.png", self.task.primary_metric)
            log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}))
            if p.best_epoch >= 0:
                log.info(
                    "weights: %s (%s %.4g at %s %s), %s, full state %s",
                    self.out / "best.safetensors", self.task.primary_metric, p.best,
                    "epoch" if self.tc.epochs else "step", p.best_epoch,
                    self.out / "last.safetensors", self.out / "last.pt",
                )  # fmt: skip
        barrier()
        return summary


class _ReenableGradSync(contextlib.AbstractContextManager):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __exit__(self, *exc: object) -> None:
        self.model.set_requires_gradient_sync(True)  # type: ignore[operator]


# The subcommand that trains each task (``davit train`` trains them all; users see their own command echoed).
_CLI_COMMANDS = {"cls": "davit train", "seg": "davit seg train", "det": "davit det train"}


def _task_name(cfg: Any) -> str | None:
    from .run import task_name

    try:
        return task_name(cfg)
    except ConfigError:  # a custom task's config: the file records no task
        return None


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values()))) if batch else 0
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0]) if not isinstance(batch[0], (int, float, str)) else len(batch)
    return 0
