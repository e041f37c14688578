"""Optimizer construction: parameter groups without weight decay on norms/biases, lr scaled by the global batch."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import OptimConfig

__all__ = ["build_optimizer", "default_param_groups", "freeze", "layer_id", "scaled_lr"]

log = logging.getLogger(__name__)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``cfg.lr`` is for a global batch of ``cfg.lr_base_batch``; scale it linearly (``lr_base_batch=0``: as is).

    A batch far below ``lr_base_batch`` shrinks the lr by the same factor: fine-tuning at batch 8 with an lr meant
    for 256 trains at 1/32 of it and hardly moves. That is warned about, loudly, with the fix.
    """
    if cfg.lr_base_batch <= 0:
        return cfg.lr
    lr = cfg.lr * global_batch / cfg.lr_base_batch
    if global_batch * 8 <= cfg.lr_base_batch:
        log.warning(
            "optim.lr %.3g is per %d images; at a global batch of %d it scales down %dx to %.3g, which may barely "
            "train. Set optim.lr_base_batch=0 to use optim.lr as given (or raise optim.lr)",
            cfg.lr, cfg.lr_base_batch, global_batch, round(cfg.lr_base_batch / global_batch), lr,
        )  # fmt: skip
    return lr


def default_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: decay, and no decay for 1-D params (norm weights, biases, layer scales), ``.bias`` tensors and the
    model's ``no_weight_decay()`` names, as the official recipe (timm's ``add_weight_decay``) does.

    With ``cfg.no_decay_norm_bias`` off, every parameter decays. With ``cfg.layer_decay < 1`` each group is split
    by DaViT layer (see :func:`layer_id`) and carries ``lr_scale = layer_decay ** (num_layers - layer_id)``.
    """
    skip: set[str] = set()
    if hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    depths = _depths(model) if cfg.layer_decay < 1.0 else None
    n_layers = sum(depths) + 1 if depths else 0
    groups: dict[tuple[bool, int], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = cfg.no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        lid = layer_id(name, depths) if depths else 0
        groups.setdefault((no_decay, lid), []).append(p)
    out = []
    for (no_decay, lid), params in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        g = {"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        if depths:
            g["lr_scale"] = cfg.layer_decay ** (n_layers - lid)
        out.append(g)
    return out


def _davit(model: nn.Module) -> nn.Module | None:
    from ..models import DaViT

    return model if isinstance(model, DaViT) else next((m for m in model.modules() if isinstance(m, DaViT)), None)


def _depths(model: nn.Module) -> list[int] | None:
    net = _davit(model)
    if net is None:
        log.warning("optim.layer_decay: no DaViT inside %s; every parameter keeps the full lr", type(model).__name__)
        return None
    return [int(d) for d in net.cfg.depths]


def layer_id(name: str, depths: list[int]) -> int:
    """The depth of a parameter for layer-wise lr decay: 0 for the stem, ``1 + index`` for the dual blocks in order
    (a stage's downsampling counts with its first block), ``sum(depths) + 1`` for everything after the backbone
    (head, dense-task necks and heads). A ``backbone.`` prefix (segmentation, detection) is looked through."""
    parts = name.split(".")
    while parts and parts[0] in ("backbone", "body", "module", "_orig_mod"):
        parts = parts[1:]
    if parts[:1] == ["stem"]:
        return 0
    if parts[:1] == ["stages"] and len(parts) > 2:
        stage = int(parts[1])
        first = 1 + sum(depths[:stage])
        if parts[2] == "blocks" and len(parts) > 3:
            return first + int(parts[3])
        return first
    return sum(depths) + 1


def freeze(model: nn.Module, spec: str) -> list[str]:
    """Freeze the DaViT inside ``model``: ``"backbone"`` (stem and every stage) or ``"N"`` (stem and first N stages).

    Returns:
        The names of the frozen parameters (``requires_grad=False``; the optimizer skips them).
    """
    spec = str(spec).strip().lower()
    if spec in ("", "none", "0"):
        return []
    net = _davit(model)
    if net is None:
        raise ValueError(f"model.freeze={spec!r}: {type(model).__name__} holds no DaViT backbone to freeze")
    n = len(net.stages) if spec == "backbone" else int(spec)
    for part in [net.stem, *list(net.stages)[:n]]:
        for p in part.parameters():
            p.requires_grad_(False)
    ids = {id(p) for part in [net.stem, *list(net.stages)[:n]] for p in part.parameters()}
    frozen = [k for k, p in model.named_parameters() if id(p) in ids]
    log.info("froze %d parameter tensors (%s)", len(frozen), "the backbone" if spec == "backbone" else f"{n} stages")
    return frozen


def build_optimizer(params: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum ``betas[0]``) over ``params`` groups at the (already scaled) ``lr``."""
    n = sum(p.numel() for g in params for p in g["params"])
    log.debug("optimizer %s over %d params in %d groups, lr %.3g", cfg.name, n, len(params), lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay)
    fused = _fused_ok(params)
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)


def _fused_ok(params: list[dict]) -> bool | None:
    """Use the single-kernel AdamW when every parameter is a plain CPU/CUDA float tensor (DDP's are; FSDP's DTensors
    keep the default). On 2 CPU cores it updates davit_tiny in 17 ms instead of 51 (the same update, to rounding)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        DTensor = ()  # noqa: N806
    for g in params:
        for p in g["params"]:
            if isinstance(p, DTensor) or p.device.type not in ("cpu", "cuda") or not p.is_floating_point():
                return None
    return True
