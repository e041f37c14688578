"""Process groups from the torchrun environment, DDP/FSDP wrapping, all-reduce helpers, rank-0-only side effects.

Single-process runs need none of this: every helper degrades to a no-op when no process group is initialised, so a
task's ``evaluate`` can call :func:`all_reduce_sum` unconditionally.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ConfigError, LoopConfig

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "unwrap",
    "wrap_model",
]

log = logging.getLogger(__name__)

# Module classes that become their own FSDP unit (one all-gather per block keeps peak memory at one block).
_FSDP_UNITS = ("SpatialBlock", "ChannelBlock", "Downsample", "Stem")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process runs: ``mode`` is ``none`` | ``ddp`` | ``fsdp``."""

    mode: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs and draws progress bars."""
        return self.rank == 0


def _pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec} but no CUDA device is available; use train.device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"train.device={spec} does not exist: this machine has {n} GPU(s), cuda:0..cuda:{n - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device={spec} but MPS is not available here; use train.device=cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(cfg: LoopConfig) -> DistInfo:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and start the process group (nccl on GPU, gloo on CPU).

    ``train.distributed=auto`` runs DDP when launched by torchrun with more than one process; ``ddp``/``fsdp`` need
    torchrun (``torchrun --nproc_per_node N -m davit train ...``); ``none`` ignores the environment.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    mode = cfg.distributed
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none":
        return DistInfo("none", 0, 1, 0, _pick_device(cfg.device, 0))
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            f"train.distributed={mode} needs the torchrun environment: "
            f"torchrun --nproc_per_node N -m davit train --config ... (or set train.distributed=none)"
        )
    device = _pick_device(cfg.device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(mode, rank, world, local_rank, device, backend)


def cleanup() -> None:
    """Destroy the process group if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in single-process runs)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in single-process runs)."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place and return it (no-op in single-process runs)."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over ranks in place and return it."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (a one-element list in single-process runs)."""
    if get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, info: DistInfo, fsdp_units: Sequence[str] = _FSDP_UNITS) -> nn.Module:
    """DDP or FSDP (torch's ``fully_shard``, one unit per block, then the root) for ``info.mode``; as is otherwise.

    The model must already be on ``info.device``.
    """
    if info.mode == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if info.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for module in list(model.modules())[1:]:
            if type(module).__name__ in fsdp_units:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
