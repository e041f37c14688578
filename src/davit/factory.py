"""``create_model``: zoo name + options -> a ready ``DaViT``, optionally with published or local weights."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .models import DaViT, DaViTConfig, get_config
from .weights import (
    CheckpointError,
    WeightInfo,
    load_checkpoint,
    load_state,
    read_safetensors_metadata,
    resolve_pretrained,
)
from .weights.registry import DEFAULT_TAGS, WEIGHTS

__all__ = ["create_model", "file_metadata"]

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
            ``in_chans=1`` (or any count) with RGB weights adapts the stem: for one channel its kernels are summed
            over R, G and B (a grey image then gives the response an RGB image of the same grey gives); for other
            counts the RGB kernels repeat, scaled by 3 / in_chans (timm's ``adapt_input_conv``).

    Returns:
        The model (in train mode, as every ``nn.Module``). ``model.pretrained_cfg`` holds its preprocessing and
        labels in timm's key names (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``,
        ``num_classes``, ``label_names``), from the weights (registry or file header) or the published defaults.

    Raises:
        CheckpointError: the file holds another zoo model than ``name``, or a segmentation/detection model.
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
    meta: dict[str, Any] = {}
    if pretrained is not False and pretrained is not None:
        if str(device) == "meta":
            raise ValueError("weights cannot be loaded on the meta device; build on 'cpu' (or a GPU) instead")
        if isinstance(pretrained, (str, Path)) and (
            Path(str(pretrained)).expanduser().exists() or str(pretrained).endswith(_WEIGHT_SUFFIXES)
        ):
            path = Path(str(pretrained)).expanduser()
            meta = file_metadata(path)
            _check_file_fits(path, model_name, meta)
            state = load_state(path)
            cfg = _config_from_file(meta, cfg, path)
        else:
            info = resolve_pretrained(model_name, pretrained)
            cfg = cfg.replace(**info.cfg_overrides)
            state = load_state(info.fetch(), info.source)
    if overrides:
        fields = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UserError(
                f"unknown DaViT config field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (in model "
                f"overrides); valid fields: {', '.join(sorted(fields))}"
            )
        cfg = cfg.replace(**overrides)
    if state is not None:
        _adapt_input_channels(state, cfg.in_chans)
    ckpt_classes = _num_classes(state) if state is not None else None
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
    elif ckpt_classes is not None:
        cfg = cfg.replace(num_classes=ckpt_classes)
    model = DaViT(cfg, features_only=features_only, out_indices=out_indices, device=device, dtype=dtype)
    reset = num_classes is not None and num_classes != ckpt_classes
    if state is not None:
        load_checkpoint(model, state, strict=True, reset_head=num_classes is not None)
    model.pretrained_cfg = _pretrained_cfg(model_name, cfg.num_classes, info, meta, pretrained, reset)
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


def file_metadata(path: str | Path) -> dict[str, Any]:
    """What a weights file records about itself (JSON values decoded): ``davit_config``, ``class_names``,
    ``preprocessing``, ``model_name``, ``task``, ``config`` ... Empty for files that record nothing (pickles)."""
    out: dict[str, Any] = {}
    for k, v in read_safetensors_metadata(path).items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    if "model_name" not in out and isinstance(out.get("model"), str):
        out["model_name"] = out["model"]  # `davit convert` writes the zoo name as "model"
    if "preprocessing" not in out and isinstance(out.get("config"), dict):
        data = out["config"].get("data") or {}
        out["preprocessing"] = {
            k: data[k] for k in ("img_size", "crop_pct", "interpolation", "mean", "std") if k in data
        }
    return out


def _check_file_fits(path: Path, model_name: str, meta: dict[str, Any]) -> None:
    """A file of another task or another zoo model is an error, never a silently different model."""
    from .weights import CheckpointError

    task = meta.get("task", "cls")
    if task not in ("cls", "med"):  # a medical run's weights are a plain DaViT classifier
        word = {"seg": "segmentation", "det": "detection"}.get(str(task), str(task))
        raise CheckpointError(
            f"{path} holds a {word} model, not a classifier: use `davit {task} predict --checkpoint {path}` "
            f"(or davit.tasks.{'segmentation.load_seg_model' if task == 'seg' else 'detection.load_detector'})"
        )
    recorded = meta.get("model_name")
    if isinstance(recorded, str) and recorded.partition(".")[0] != model_name:
        raise CheckpointError(
            f"{path} holds a {recorded} (its header records it), not a {model_name}: "
            f"create_model({recorded!r}, pretrained=...)"
        )


def _pretrained_cfg(
    model_name: str, num_classes: int, info: WeightInfo | None, meta: dict[str, Any], pretrained: Any, reset: bool
) -> dict[str, Any]:
    """timm-style ``pretrained_cfg``: preprocessing and labels from the weights (registry or file header), else the
    published weights' preprocessing, so ``timm.data.resolve_data_config(model=m)`` answers right."""
    from .data.transforms import pretrained_cfg

    labels = None
    if info is not None:
        pp = {k: getattr(info, k) for k in ("img_size", "crop_pct", "interpolation", "mean", "std")}
        extra = info.metadata()
        if num_classes == 1000 and info.num_classes == 1000 and not reset:
            from .data.imagenet import imagenet_class_names

            labels = list(imagenet_class_names())
    elif meta or pretrained not in (False, None):
        pp = meta.get("preprocessing") or {}
        extra = {"file": str(pretrained), **({"task": meta["task"]} if "task" in meta else {})}
        names = meta.get("class_names")
        if isinstance(names, list) and len(names) == num_classes and not reset:
            labels = names
    else:
        default = DEFAULT_TAGS.get(model_name)
        pp = {k: getattr(WEIGHTS[default], k) for k in ("img_size", "crop_pct")} if default else {}
        extra = {}
    extra.pop("num_classes", None)
    return pretrained_cfg(pp, num_classes=num_classes, label_names=labels, architecture=model_name, **extra)


def _num_classes(state: dict[str, torch.Tensor]) -> int:
    fc = state.get("head.fc.weight")
    return int(fc.shape[0]) if fc is not None else 0


def _config_from_file(meta: dict[str, Any], default: DaViTConfig, path: Path) -> DaViTConfig:
    """Our own safetensors files carry their config; use its architecture fields (class count comes from tensors)."""
    if "davit_config" not in meta:
        return default
    d = meta["davit_config"]
    if not isinstance(d, dict):
        raise CheckpointError(
            f"{path}: its davit_config metadata is not a JSON mapping of DaViTConfig fields ({str(d)[:60]!r}); the "
            "header is corrupt: pass --model NAME to build the architecture yourself, or re-save the file"
        )
    d = dict(d)
    d.pop("num_classes", None)
    try:
        return default.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: its davit_config metadata does not describe a DaViT ({e}); the header is corrupt or from another "
            "version: re-save the file"
        ) from e


def _adapt_input_channels(state: dict[str, torch.Tensor], in_chans: int) -> None:
    """Give the checkpoint's stem conv ``in_chans`` input channels (in place; a no-op when they already match)."""
    w = state.get("stem.conv.weight")
    if w is None or w.ndim != 4 or w.shape[1] == in_chans:
        return
    if w.shape[1] != 3:
        raise ValueError(
            f"the checkpoint's stem takes {w.shape[1]} channels and the model {in_chans}: only RGB (3-channel) "
            "weights can be adapted"
        )
    if in_chans == 1:
        state["stem.conv.weight"] = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // 3)
        state["stem.conv.weight"] = w.repeat(1, reps, 1, 1)[:, :in_chans] * (3.0 / in_chans)
