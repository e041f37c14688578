"""Classifier evaluation: top-1/top-5/loss over a loader, and ``davit eval`` on an ImageFolder.

:func:`load_classifier` is the one way eval and predict turn ``--model/--weights/--checkpoint`` into a ready model
with its preprocessing (from the weight registry or the checkpoint's metadata) and its class names (ImageNet-1K for
ImageNet weights, the training folder's names for a fine-tuned checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LoadedClassifier",
    "autocast",
    "evaluate_classifier",
    "evaluate_imagefolder",
    "load_classifier",
    "maybe_optimize",
    "resolve_device",
]

log = logging.getLogger(__name__)

_PREPROCESSING_KEYS = ("img_size", "crop_pct", "interpolation", "mean", "std")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt")


# ------------------------------------------------------------------------------------------------------ the metrics
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str | None = None,
    amp: str | bool = "none",
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy and throughput of ``model`` over ``loader``.

    Under ``torch.distributed`` every rank evaluates its shard and the counts are summed over ranks, so each rank
    returns the global figures (a DistributedSampler that pads the last shard counts its repeated images).

    Args:
        model: maps ``(B, 3, H, W)`` images to ``(B, num_classes)`` logits. Put back in its previous train/eval mode.
        loader: yields ``(images, int_targets)`` batches.
        device: where to run; default the model's parameters' device (CPU for a parameterless module).
        amp: ``"none"`` | ``"bf16"`` | ``"fp16"`` (or a bool: bf16) autocast; logits are scored in float32.

    Returns:
        ``{"top1", "top5", "loss", "images", "images_per_second", "seconds"}``; top-5 is top-k with
        ``k = min(5, num_classes)``.
    """
    dev = resolve_device(device, model)
    was_training = model.training
    model.eval()
    # [loss_sum, top1_hits, top5_hits, images] in float64 so sums over ImageNet stay exact
    totals = torch.zeros(4, dtype=torch.float64, device=dev)
    start = time.perf_counter()
    try:
        with torch.inference_mode(), autocast(dev, amp):
            for images, targets in loader:
                images = images.to(dev, non_blocking=True)
                targets = targets.to(dev, non_blocking=True).long()
                logits = model(images).float()  # (B, num_classes)
                k = min(5, logits.shape[1])
                hits = logits.topk(k, dim=1).indices == targets[:, None]  # (B, k)
                totals += torch.stack(
                    [
                        F.cross_entropy(logits, targets, reduction="sum").double(),
                        hits[:, 0].sum().double(),
                        hits.any(dim=1).sum().double(),
                        torch.tensor(float(targets.numel()), dtype=torch.float64, device=dev),
                    ]
                )
    finally:
        model.train(was_training)
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=dev)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    loss_sum, top1, top5, n = totals.tolist()
    secs = float(seconds.item())
    if n == 0:
        raise ValueError("evaluation saw no images: the loader is empty")
    return {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "loss": loss_sum / n,
        "images": int(n),
        "images_per_second": n / secs if secs > 0 else float("inf"),
        "seconds": secs,
    }


def autocast(device: torch.device, amp: str | bool) -> contextlib.AbstractContextManager:
    """The autocast context of ``amp`` (``none``/``bf16``/``fp16`` or a bool meaning bf16) on ``device``."""
    mode = ("bf16" if amp else "none") if isinstance(amp, bool) else str(amp).lower()
    if mode in ("none", "", "fp32", "false"):
        return contextlib.nullcontext()
    if mode not in ("bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, not {amp!r}")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_device(device: torch.device | str | None, model: nn.Module | None = None) -> torch.device:
    """``"auto"``/None -> the model's device, else CUDA when available, else CPU."""
    if device is not None and str(device) != "auto":
        return torch.device(device)
    if model is not None:
        p = next(iter(model.parameters()), None)
        if p is not None and device is None:
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ loading a model
@dataclass
class LoadedClassifier:
    """A classifier ready for inference with what it needs to be fed and read.

    Attributes:
        model: the module (eval mode, on its device).
        preprocessing: ``img_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std`` of its evaluation transform.
        class_names: one name per logit.
        source: where the weights came from (a tag, a file, or "random init").
    """

    model: nn.Module
    preprocessing: dict[str, Any]
    class_names: list[str]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def transform(self, img_size: int | None = None) -> Any:
        """The evaluation transform, optionally at another input side (keeping ``crop_pct``)."""
        from ..data.transforms import build_eval_transform

        pp = dict(self.preprocessing)
        if img_size:
            pp["img_size"] = img_size
        return build_eval_transform(**pp)


def load_classifier(
    model: str | nn.Module | None = None,
    weights: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = "auto",
) -> LoadedClassifier:
    """Build an inference-ready classifier from a zoo name, published weights or a checkpoint file.

    Args:
        model: a zoo name (``davit_tiny``; optional when the checkpoint carries its config) or a ready module
            (its ``cfg.num_classes`` or ``num_classes``, optional ``class_names`` and ``pretrained_cfg`` are used).
        weights: a published tag (``msft_in1k`` / ``davit_tiny.msft_in1k``) or a checkpoint path in any layout.
            With neither ``weights`` nor ``checkpoint``, a zoo name loads its default published weights.
        checkpoint: a checkpoint written by ``davit train`` (``best.safetensors``); its metadata gives the
            architecture, the class names and the preprocessing.
        device: where to put the model (``"auto"``: CUDA when available).

    Raises:
        ValueError: nothing to load, or both ``weights`` and ``checkpoint``.
        FileNotFoundError / CheckpointError: missing, unreadable or mismatched checkpoint.
    """
    from ..data.imagenet import imagenet_class_names
    from ..factory import create_model
    from ..weights import WEIGHTS

    if weights and checkpoint:
        raise ValueError("pass either --weights or --checkpoint, not both")
    if isinstance(model, nn.Module):
        net, meta, source = model, dict(getattr(model, "pretrained_cfg", None) or {}), type(model).__name__
        if getattr(model, "class_names", None) is not None:
            meta.setdefault("class_names", list(model.class_names))
    else:
        path = checkpoint or (weights if weights and _is_path(weights) else None)
        if path is not None:
            path = Path(path).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"checkpoint not found: {path}")
            from .run import check_task

            check_task(path, "cls")
            meta = _checkpoint_metadata(path)
            if not model and "davit_config" not in meta:
                raise ValueError(f"{path} does not record its architecture: pass --model (e.g. --model davit_tiny)")
            # the architecture comes from davit_config; the name only picks the base config for older files
            net = create_model(model or str(meta.get("model_name") or "davit_tiny"), pretrained=str(path))
            source = str(path)
        else:
            if not model:
                raise ValueError("pass --model NAME (e.g. davit_tiny), --weights TAG|PATH or --checkpoint PATH")
            name, _, tag = str(model).partition(".")
            wanted: bool | str = weights or tag or True
            net = create_model(name, pretrained=wanted)
            meta = dict(getattr(net, "pretrained_cfg", None) or {})
            source = str(meta.get("tag", wanted))
    num_classes = _num_outputs(net)
    pp = {k: meta[k] for k in _PREPROCESSING_KEYS if k in meta}
    if isinstance(meta.get("preprocessing"), Mapping):
        pp.update({k: v for k, v in meta["preprocessing"].items() if k in _PREPROCESSING_KEYS})
    tag = meta.get("tag")
    if not pp and tag in WEIGHTS:
        pp = {k: getattr(WEIGHTS[tag], k) for k in _PREPROCESSING_KEYS}
    defaults = {k: getattr(WEIGHTS["davit_tiny.msft_in1k"], k) for k in _PREPROCESSING_KEYS}
    if not pp:
        log.warning("%s records no preprocessing: using ImageNet's (224, crop 0.95, bicubic, mean/std)", source)
    pp = {**defaults, **pp}
    pp["mean"], pp["std"] = tuple(pp["mean"]), tuple(pp["std"])
    names = meta.get("class_names")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != num_classes:
            raise ValueError(f"{source} lists {len(names)} class names for a {num_classes}-class head")
    elif num_classes == 1000:
        names = list(imagenet_class_names())
    else:
        names = [f"class_{i}" for i in range(num_classes)]
    net = net.to(resolve_device(device)).eval()
    return LoadedClassifier(net, pp, names, source)


def maybe_optimize(model: nn.Module, example: Tensor, enabled: bool = True) -> nn.Module:
    """``davit.optimize(model, example)`` (the fastest inference module) when available and enabled, else ``model``.

    An optimisation that fails falls back to the plain model with a warning: inference must not depend on it.
    """
    if not enabled:
        return model
    try:
        from ..optimize import optimize
    except ImportError:
        return model
    try:
        return optimize(model, example_input=example)
    except Exception as e:  # any backend failure: the eager model is always correct
        log.warning("davit.optimize failed (%s: %s); running the plain model", type(e).__name__, e)
        return model


def _is_path(text: str) -> bool:
    return Path(text).expanduser().exists() or text.endswith(_WEIGHT_SUFFIXES) or os.sep in text


def _num_outputs(model: nn.Module) -> int:
    n = getattr(getattr(model, "cfg", None), "num_classes", None) or getattr(model, "num_classes", None)
    if n:
        return int(n)
    raise ValueError("the model has no classifier head (num_classes=0); evaluate or predict with a classifier")


def _checkpoint_metadata(path: Path) -> dict[str, Any]:
    """``class_names`` / ``preprocessing`` / ``davit_config`` recorded with a checkpoint (JSON values decoded)."""
    from ..weights import read_checkpoint, read_safetensors_metadata

    meta: dict[str, Any] = dict(read_safetensors_metadata(path))
    if not meta and not str(path).endswith(".safetensors"):
        # a training state (.pt) keeps them as plain entries beside the tensors
        obj = read_checkpoint(path)
        if str(obj.get("format", "")).startswith("davit.train"):
            raise ValueError(
                f"{path} is a training state (for --resume); use the weights file beside it: "
                f"{path.with_name('best.safetensors')} or {path.with_name('last.safetensors')}"
            )
        meta = {k: v for k, v in obj.items() if k in ("class_names", "preprocessing", "davit_config", "data")}
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    # a run's data section (ClsDataConfig) carries the same preprocessing fields
    data = out.get("data")
    if isinstance(data, Mapping) and "preprocessing" not in out:
        out["preprocessing"] = {k: data[k] for k in _PREPROCESSING_KEYS if k in data}
    return out


# ------------------------------------------------------------------------------------------------------ davit eval
def evaluate_imagefolder(
    model: str | nn.Module | None,
    root: str | os.PathLike[str],
    *,
    weights: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    img_size: int | None = None,
    workers: int = 2,
    device: torch.device | str | None = "auto",
    amp: str | bool = "none",
    optimize: bool = True,
) -> dict[str, Any]:
    """Top-1/top-5 of a classifier on an ImageFolder with the weights' own preprocessing.

    Args:
        model: zoo name or module (see :func:`load_classifier`).
        root: ``root/<class>/<images>``; a dataset folder holding ``train/`` and ``val/`` means its ``val/``.
            Class folders map to logits by name when the checkpoint records class names (the folder may hold a
            subset), else by sorted order (ImageNet's synset folders), which needs as many folders as logits.
        weights, checkpoint: see :func:`load_classifier`.
        batch_size, workers: the DataLoader's.
        img_size: evaluate at this side instead of the weights' own (``crop_pct`` kept).
        device, amp: where and in which precision to run.
        optimize: run through ``davit.optimize`` when available.

    Returns:
        The metrics of :func:`evaluate_classifier` plus ``skipped`` (unreadable images), ``model`` and ``data``.
    """
    from torch.utils.data import DataLoader

    from ..data.classification import ImageFolderDataset, scan_image_folder, skipped_images

    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / "val").is_dir() and (root / "train").is_dir():
        root = root / "val"
        log.info("evaluating on %s", root)
    loaded = load_classifier(model, weights=weights, checkpoint=checkpoint, device=device)
    n_out = len(loaded.class_names)
    folder_classes, _ = scan_image_folder(root)
    by_name = set(folder_classes) <= set(loaded.class_names)
    if not by_name and len(folder_classes) != n_out:
        raise ValueError(
            f"{root} has {len(folder_classes)} class folders but the model has {n_out} outputs and its class names do "
            "not match the folder names: evaluate on a folder with one sub-folder per model class (sorted order), or "
            "a checkpoint that records its class names"
        )
    tf = loaded.transform(img_size)
    ds = ImageFolderDataset(root, tf, class_names=loaded.class_names if by_name else None)
    dev = resolve_device(device)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=dev.type == "cuda")
    side = img_size or int(loaded.preprocessing["img_size"])
    example = torch.zeros(1, 3, side, side, device=dev)
    net = maybe_optimize(loaded.model, example, enabled=optimize)
    metrics: dict[str, Any] = dict(evaluate_classifier(net, _progress(loader, len(ds)), device=dev, amp=amp))
    metrics.update(skipped=skipped_images(ds), model=loaded.source, data=str(root), img_size=side)
    return metrics


def _progress(loader: Iterable[Any], total_images: int) -> Iterator[Any]:
    """A tqdm bar over the loader when stderr is a terminal."""
    import sys

    if not sys.stderr.isatty():
        yield from loader
        return
    from tqdm import tqdm

    with tqdm(total=total_images, unit="img", desc="eval", leave=False) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch[1]))
