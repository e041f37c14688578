"""The ``Task`` protocol: what a task (classification, segmentation, detection) gives the one training loop.

``davit.engine.fit(cfg, task)`` owns everything generic (devices, DDP/FSDP, loaders, optimizer, schedule, AMP, EMA,
checkpoints, logs); a task owns only its model, data, loss and metrics. No Trainer class hierarchy: any object with
these attributes works.

Optional extras the engine uses when a task has them:

- ``class_names: list[str]``: stored in the ``.safetensors`` header (``class_names``) for ``davit predict``.
- ``weights_metadata() -> dict``: more header entries (e.g. ``preprocessing``); values are stored as JSON.
- ``on_fit_end(model, out_dir) -> dict``: called on every rank after training (eval mode, no grad) with the model
  users get (the EMA when on); its result joins ``summary.json`` (the classification task shows a few predictions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..config import OptimConfig

__all__ = ["Task"]


@runtime_checkable
class Task(Protocol):
    """A training task for :func:`davit.engine.fit`.

    Attributes:
        primary_metric: the key of :meth:`evaluate`'s result that selects ``best.safetensors`` (higher is better),
            e.g. ``"top1"``, ``"miou"``, ``"bbox_ap"``.
    """

    primary_metric: str

    def build_model(self) -> nn.Module:
        """The network to train (on the CPU; the engine moves and wraps it)."""
        ...

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """The training set and the validation set (``None``: no evaluation)."""
        ...

    def collate_fn(self) -> Callable | None:
        """The DataLoader collate function; ``None`` for torch's ``default_collate``."""
        ...

    def loss_fn(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        """Forward one batch (already on the device) in training mode.

        Returns:
            ``"loss"`` (a scalar that is back-propagated) and any other scalars to log.
        """
        ...

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Flat metrics on the validation loader, in eval mode and under ``torch.no_grad``.

        Called on every rank with that rank's shard of the validation set; the task all-reduces what it needs
        (see :mod:`davit.engine.distributed`) so every rank returns the global numbers.
        """
        ...

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict] | None:
        """Optimizer parameter groups (each a dict with ``params`` and optionally ``weight_decay``/``lr_scale``);
        ``None`` for the engine default (no decay on norms/biases when ``optim.no_decay_norm_bias``)."""
        ...
