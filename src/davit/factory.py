"""``create_model``: zoo name + options -> a ready ``DaViT``, optionally with published or local weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .models import DaViT, DaViTConfig, get_config
from .weights import WeightInfo, load_checkpoint, load_state, read_safetensors_metadata, resolve_pretrained

__all__ = ["create_model"]

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt")


def create_model(
    name: str,
    *,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> DaViT:
    """Build a zoo model, optionally with weights.

    Args:
        name: a zoo name from :func:`davit.list_models`, optionally with a weight tag (``"davit_tiny.msft_in1k"``
            implies ``pretrained="msft_in1k"``); or ``"hf-hub:user/repo"`` (``local-dir:/folder``) for weights that
            :func:`davit.hub.push_to_hub` published (their architecture and weights; ``pretrained`` is ignored).
        pretrained: False; True for the model's default published weights; a weight tag (``"msft_in1k"``); or a local
            checkpoint path in any supported format (official, timm, mmpretrain, Florence-2, ours).
        num_classes: classifier outputs. Default: the weights' class count when loading weights, else 1000. A count
            that differs from the weights keeps the backbone and re-initialises the head.
        features_only: return a dense backbone whose forward gives NCHW maps at strides 4/8/16/32, each after its
            per-stage LayerNorm (the official mmdet/mmseg ``norm0..3``).
        out_indices: the stages a ``features_only`` model returns.
        device: where to build; ``"meta"`` allocates nothing (weights cannot be loaded there).
        dtype: parameter dtype.
        **overrides: any :class:`davit.DaViTConfig` field (``drop_path_rate=0.2``, ``window_size=12``, ...).

    Returns:
        The model (in train mode, as every ``nn.Module``). Loaded weights' metadata is on ``model.pretrained_cfg``.
    """
    if name.startswith(("hf-hub:", "local-dir:")):
        return _create_from_hub(
            name, num_classes=num_classes, features_only=features_only, out_indices=out_indices, device=device,
            dtype=dtype, **overrides,
        )  # fmt: skip
    model_name, _, tag = name.partition(".")
    cfg = get_config(model_name)
    if tag and pretrained is False:
        pretrained = tag
    info: WeightInfo | None = None
    state = None
    if pretrained is not False and pretrained is not None:
        if str(device) == "meta":
            raise ValueError("weights cannot be loaded on the meta device; build on 'cpu' (or a GPU) instead")
        if isinstance(pretrained, (str, Path)) and (
            Path(str(pretrained)).expanduser().exists() or str(pretrained).endswith(_WEIGHT_SUFFIXES)
        ):
            path = Path(str(pretrained)).expanduser()
            state = load_state(path)
            cfg = _config_from_file(path, cfg)
        else:
            info = resolve_pretrained(model_name, pretrained)
            cfg = cfg.replace(**info.cfg_overrides)
            state = load_state(info.fetch(), info.source)
    if overrides:
        cfg = cfg.replace(**overrides)
    ckpt_classes = _num_classes(state) if state is not None else None
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
    elif ckpt_classes is not None:
        cfg = cfg.replace(num_classes=ckpt_classes)
    model = DaViT(cfg, features_only=features_only, out_indices=out_indices, device=device, dtype=dtype)
    if state is not None:
        load_checkpoint(model, state, strict=True, reset_head=num_classes is not None)
        model.pretrained_cfg = info.metadata() if info is not None else {"file": str(pretrained)}
    return model


def _create_from_hub(name: str, **kwargs: Any) -> DaViT:
    """A model from a repo :func:`davit.hub.push_to_hub` wrote: its weights' header carries the architecture."""
    from .hub import load_hub_files
    from .models import list_models

    weights, config = load_hub_files(name)
    arch = config.get("architecture")
    model = create_model(arch if arch in list_models() else "davit_tiny", pretrained=str(weights), **kwargs)
    # Keep what loading the file recorded; add where it came from (and the repo's labels and preprocessing).
    extra = {"hub_id": name, "class_names": config.get("class_names"), "preprocessing": config.get("preprocessing")}
    model.pretrained_cfg = {**extra, **(getattr(model, "pretrained_cfg", None) or {}), "hub_id": name}
    return model


def _num_classes(state: dict[str, torch.Tensor]) -> int:
    fc = state.get("head.fc.weight")
    return int(fc.shape[0]) if fc is not None else 0


def _config_from_file(path: Path, default: DaViTConfig) -> DaViTConfig:
    """Our own safetensors files carry their config; use its architecture fields (class count comes from tensors)."""
    meta = read_safetensors_metadata(path)
    if "davit_config" not in meta:
        return default
    d = json.loads(meta["davit_config"])
    d.pop("num_classes", None)
    return default.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
