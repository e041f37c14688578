"""``load_checkpoint``: any supported file or state dict -> a DaViT, with readable errors on mismatch."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import ConvertedStateDict, convert_state_dict
from .inspect import infer_architecture
from .io import CheckpointError, read_checkpoint, read_safetensors_metadata

__all__ = ["LoadReport", "check_weights", "load_checkpoint", "load_state"]

log = logging.getLogger(__name__)

# Keys a checkpoint may lack or carry without it being the wrong file: the classifier and the dense norms depend on
# how the model was built, not on the backbone the file holds.
_HEAD = re.compile(r"^head\.")
_OUT_NORMS = re.compile(r"^out_norms\.")


class LoadReport(dict):
    """What ``load_checkpoint`` did: ``source``, ``loaded``, ``missing``, ``unexpected``, ``reinitialized`` keys."""

    def summary(self) -> str:
        """One line for logs."""
        parts = [f"loaded {self['loaded']} tensors from a {self['source']} checkpoint"]
        for key in ("missing", "unexpected", "reinitialized"):
            if self[key]:
                parts.append(f"{key}: {_compact(self[key])}")
        return "; ".join(parts)


def load_state(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any], source: str = "auto"
) -> ConvertedStateDict:
    """Read (if a path) and convert a checkpoint to our layout."""
    if isinstance(path_or_state_dict, ConvertedStateDict):
        return path_or_state_dict
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd = convert_state_dict(read_checkpoint(path_or_state_dict), source)
        sd.origin = Path(path_or_state_dict).name
        meta = read_safetensors_metadata(path_or_state_dict)
        if meta.get("format") == "davit" or "davit_config" in meta:
            sd.source = "davit"  # our own files (same names as timm's), say so in reports
        return sd
    return convert_state_dict(path_or_state_dict, source)


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    strict: bool = True,
    reset_head: bool = False,
    source: str = "auto",
) -> LoadReport:
    """Load any supported DaViT checkpoint into ``model``.

    Args:
        model: a :class:`davit.DaViT` (classifier or ``features_only``).
        path_or_state_dict: a ``.safetensors`` / ``.pth`` / ``.pth.tar`` / ``.bin`` file, or a state dict in any
            supported layout. Files are read safely (no arbitrary unpickling).
        strict: raise if backbone tensors are missing or unexpected. Whatever ``strict`` says, a classifier-only
            checkpoint loads into a ``features_only`` model (head dropped, dense norms kept fresh) and a dense
            checkpoint into a classifier (its ``norm0..3`` dropped, the head kept fresh), and both are reported.
        reset_head: when the checkpoint's class count differs from the model's, keep the model's freshly initialised
            head instead of raising.
        source: the checkpoint layout, or "auto".

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointError: unreadable file, not DaViT, another size, or a class-count mismatch without ``reset_head``.
    """
    sd = load_state(path_or_state_dict, source)
    own = model.state_dict()
    name = sd.origin
    features_only = bool(getattr(model, "features_only", False))

    _raise_if_other_size(sd, model, name)
    incoming = dict(sd)
    reinit: list[str] = []
    if features_only:
        dropped = [k for k in incoming if _HEAD.match(k)]
        for k in dropped:
            incoming.pop(k)
    else:
        dropped = [k for k in incoming if _OUT_NORMS.match(k)]
        for k in dropped:
            incoming.pop(k)

    # Head size: a different class count is a decision, not an accident.
    fc_w = incoming.get("head.fc.weight")
    own_fc = own.get("head.fc.weight")
    if fc_w is not None and own_fc is not None and fc_w.ndim == 2 and fc_w.shape != own_fc.shape:
        if fc_w.shape == own_fc.shape[::-1]:
            raise CheckpointError(
                f"{name}: head.fc.weight is {tuple(fc_w.shape)} but this model's is {tuple(own_fc.shape)} "
                "(num_classes x features): the tensor is transposed; save it as weight.T (torch.nn.Linear layout)"
            )
    if fc_w is not None and (own_fc is None or own_fc.shape[0] != fc_w.shape[0]):
        ckpt_classes = fc_w.shape[0]
        model_classes = 0 if own_fc is None else own_fc.shape[0]
        if not reset_head:
            raise CheckpointError(
                f"{name} has a {ckpt_classes}-class head but the model has {model_classes} classes; build the model "
                f"with num_classes={ckpt_classes}, or pass reset_head=True (CLI: --reset-head) to keep the backbone "
                "and train a new head"
            )
        for k in ("head.fc.weight", "head.fc.bias"):
            incoming.pop(k, None)
        reinit += [k for k in own if k.startswith("head.fc.")]

    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in incoming.items()
        if k in own and own[k].shape != v.shape
    ]
    if shape_errors:
        raise CheckpointError(
            f"{name} ({sd.source} layout) does not fit this model: {len(shape_errors)} tensors have other shapes, "
            f"e.g. {'; '.join(shape_errors[:3])}. It is probably a checkpoint of another size: check the model name "
            "(`davit info FILE` tells which model a file holds)"
        )

    check_weights({k: v for k, v in incoming.items() if k in own}, name, own)
    missing = [k for k in own if k not in incoming]
    unexpected = [k for k in incoming if k not in own]
    tolerated = {k for k in missing if (features_only and _OUT_NORMS.match(k)) or _HEAD.match(k)}
    # Florence-2 towers carry no head norm; a classifier without a head in the file keeps its fresh one.
    hard_missing = [k for k in missing if k not in tolerated]
    if strict and (hard_missing or unexpected):
        raise CheckpointError(
            f"{name} ({sd.source} layout) does not match the model: "
            f"{len(hard_missing)} missing ({_compact(hard_missing)}), "
            f"{len(unexpected)} unexpected ({_compact(unexpected)}). Check the model name and source, or pass "
            "strict=False to load what matches"
        )
    with torch.no_grad():
        for k, v in incoming.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
    report = LoadReport(
        source=sd.source,
        loaded=sum(1 for k in incoming if k in own),
        missing=missing,
        unexpected=unexpected + dropped,
        reinitialized=reinit + [k for k in missing if k in tolerated],
        extra=list(sd.extra),
    )
    log.info(report.summary())
    return report


def check_weights(
    state: Mapping[str, torch.Tensor], name: str, model_state: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Refuse weights that would load silently but compute garbage: non-float tensors where the model has float
    parameters, and NaN or infinite values.

    Raises:
        CheckpointError: naming the file, how many tensors are bad and one of them.
    """
    ints = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
        and not v.is_floating_point()
        and (model_state is None or (k in model_state and model_state[k].is_floating_point()))
        and (model_state is not None or k.endswith((".weight", ".bias")))
    ]
    if ints:
        raise CheckpointError(
            f"{name} holds {state[ints[0]].dtype} tensors where the model has float weights ({len(ints)} tensors, "
            f"e.g. {ints[0]}): it is not a weights file of this model (or was cast by mistake); use the float "
            "checkpoint"
        )
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]  # fmt: skip
    if bad:
        raise CheckpointError(
            f"{name} holds NaN or infinite values in {len(bad)} of {len(state)} tensors (e.g. {bad[0]}): the weights "
            "are corrupt or come from a diverged run; use an earlier checkpoint"
        )


def _raise_if_other_size(sd: ConvertedStateDict, model: nn.Module, name: str) -> None:
    cfg = getattr(model, "cfg", None)
    try:
        arch = infer_architecture(sd)
    except CheckpointError:
        return
    if cfg is not None and (
        arch["embed_dims"] != list(cfg.embed_dims)
        or arch["depths"] != list(cfg.depths)
        or arch["downsample_kernel"] != cfg.downsample_kernel
    ):
        held = arch["model"] or "DaViT"
        raise CheckpointError(
            f"{name} holds a {held} checkpoint (embed_dims {arch['embed_dims']}, depths {arch['depths']}, "
            f"{arch['downsample_kernel']}x{arch['downsample_kernel']} downsampling) but the model has embed_dims "
            f"{list(cfg.embed_dims)}, depths {list(cfg.depths)}, {cfg.downsample_kernel}x{cfg.downsample_kernel}: "
            f"it is a checkpoint of another size; build the matching model"
            + (f" (create_model({arch['model']!r}))" if arch["model"] else "")
        )


def _compact(keys: Iterable[str], limit: int = 6) -> str:
    """Group keys by their first two name parts so a list of 200 keys reads as a few lines."""
    keys = list(keys)
    if not keys:
        return "none"
    groups: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:4]) if parts[0] == "stages" else ".".join(parts[:2])
        groups[g] = groups.get(g, 0) + 1
    items = [f"{g}.* x{n}" if n > 1 else g for g, n in list(groups.items())[:limit]]
    more = len(groups) - limit
    return ", ".join(items) + (f", ... ({more} more groups)" if more > 0 else "")
