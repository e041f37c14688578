"""Exponential moving average of the weights, on torch's ``AveragedModel``."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["ModelEMA"]


class ModelEMA(AveragedModel):
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; buffers are averaged too.

    The first update copies the weights (``AveragedModel``'s convention), so early evaluations are not dominated by
    the random initialisation. ``ema.module`` is the averaged network.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights in."""
        self.update_parameters(model)
