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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LoadedClassifier",
    "autocast",
    "check_device",
    "evaluate_classifier",
    "evaluate_imagefolder",
    "format_per_class_table",
    "load_classifier",
    "maybe_optimize",
    "per_class_report",
    "plot_confusion_matrix",
    "resolve_device",
    "write_class_report",
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
    """``"auto"``/None -> the model's device, else CUDA when available, else CPU.

    Raises:
        UserError: a device name torch does not know, or a CUDA/MPS device on a machine without one.
    """
    if device is not None and str(device) != "auto":
        return check_device(device)
    if model is not None:
        p = next(iter(model.parameters()), None)
        if p is not None and device is None:
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, or a :class:`UserError` saying which do."""
    from ..errors import UserError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N (e.g. --device cpu)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} asked for but this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UserError(f"device {device} does not exist: this machine has {n} GPU(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"device {device} asked for but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise UserError(f"device {device} is not supported by davit; use auto, cpu, cuda or cuda:N")
    return dev


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


def maybe_optimize(
    model: nn.Module,
    example: Tensor,
    enabled: bool = True,
    *,
    backend: str = "auto",
    dtype: torch.dtype | str | None = None,
    batch: int | None = None,
) -> nn.Module:
    """The fastest inference module for ``model`` (:func:`davit.optimize`) when enabled, else ``model``.

    Args:
        model: the classifier (eval mode, on its device).
        example: a representative batch (pays one-time costs now and checks the result against ``model``).
        enabled: False runs the plain model.
        backend: ``"auto"`` (:func:`davit.runtime.default_backend`: what measured fastest for the job here, torch
            when unsure), ``"torch"``, ``"aoti"``, ``"openvino"`` or ``"onnxruntime"``.
        dtype: compute precision for the torch and OpenVINO paths (None: fp32).
        batch: the batch size the job runs at; the aoti backend builds (or finds) its package for that batch
            (other shapes, e.g. a shorter last batch, run the eager fast path).

    Raises:
        UserError: a requested runtime that is not installed (one line naming the extra to install).

    A backend that fails for any other reason falls back to the plain model with a warning: inference must not
    depend on it.
    """
    if not enabled:
        return model
    from ..errors import UserError
    from ..runtime import BACKEND_CHOICES, default_backend, missing_runtime

    if backend not in BACKEND_CHOICES:
        raise UserError(f"unknown backend {backend!r}: use one of {', '.join(BACKEND_CHOICES)}")
    if batch and batch != example.shape[0]:
        aoti_example = example[:1].expand(batch, *example.shape[1:]).contiguous()
    else:
        aoti_example = example
    if backend == "auto":
        backend = default_backend(model, aoti_example, dtype)
    if backend == "aoti":
        example = aoti_example
    missing = missing_runtime(backend)
    if missing:
        raise UserError(missing)
    try:
        from ..optimize import optimize
    except ImportError:
        return model
    try:
        return optimize(model, example_input=example, dtype=dtype, backend=backend)
    except Exception as e:  # any backend failure: the eager model is always correct
        log.warning("davit.optimize (%s) failed (%s: %s); running the plain model", backend, type(e).__name__, e)
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
    report_dir: str | os.PathLike[str] | None = None,
    backend: str = "auto",
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
        report_dir: also write ``per_class.csv`` and ``confusion_matrix.png`` there (see :func:`per_class_report`)
            and add ``per_class`` rows and ``report`` paths to the result.
        backend: the inference runtime (see :func:`maybe_optimize`); with ``amp="bf16"`` the torch and OpenVINO
            paths compute in bf16 themselves instead of under autocast.

    Returns:
        The metrics of :func:`evaluate_classifier` plus ``skipped`` (unreadable images), ``model`` and ``data``.
    """
    from torch.utils.data import DataLoader

    from ..data.classification import ImageFolderDataset, collate_readable, scan_image_folder, skipped_images
    from ..data.transforms import check_img_size

    check_img_size(img_size)
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
    # Unreadable files are dropped, not replaced by a neighbour (which training does): each readable image counts once.
    ds = ImageFolderDataset(root, tf, class_names=loaded.class_names if by_name else None, substitute_unreadable=False)
    dev = resolve_device(device)
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=dev.type == "cuda",
        collate_fn=collate_readable,
    )  # fmt: skip
    side = img_size or int(loaded.preprocessing["img_size"])
    example = torch.zeros(1, 3, side, side, device=dev)
    bf16 = str(amp).lower() == "bf16" or amp is True
    net = maybe_optimize(
        loaded.model, example, enabled=optimize, backend=backend, dtype="bf16" if bf16 else None,
        batch=min(batch_size, len(ds)) or None,
    )  # fmt: skip
    if net is not loaded.model and bf16:
        amp = "none"  # the optimized module computes in bf16 itself (and returns float32 logits)
    batches: Iterable[Any] = _progress(loader, len(ds))
    recorder = _PredictionRecorder(net) if report_dir is not None else None
    if recorder is not None:
        net, batches = recorder, recorder.record(batches)
    metrics: dict[str, Any] = dict(evaluate_classifier(net, batches, device=dev, amp=amp))
    metrics.update(skipped=skipped_images(ds), model=loaded.source, data=str(root), img_size=side)
    if recorder is not None:
        metrics.update(write_class_report(*recorder.result(), loaded.class_names, report_dir))
    return metrics


def _progress(loader: Iterable[Any], total_images: int) -> Iterator[Any]:
    """A tqdm bar over the loader when stderr is a terminal."""
    import sys

    batches = (b for b in loader if b is not None)  # None: a batch of unreadable images only
    if not sys.stderr.isatty():
        yield from batches
        return
    from tqdm import tqdm

    with tqdm(total=total_images, unit="img", desc="eval", leave=False) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch[1]))


# --------------------------------------------------------------------------------- per-class table, confusion matrix
class _PredictionRecorder(nn.Module):
    """Wraps a classifier to keep each batch's top-1 class (and, through :meth:`record`, its targets).

    It lets :func:`evaluate_classifier` compute its figures in the same single pass that feeds the per-class report.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.preds: list[Tensor] = []
        self.targets: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        self.preds.append(logits.argmax(dim=1).cpu())
        return logits

    def record(self, batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for images, targets in batches:
            self.targets.append(torch.as_tensor(targets).reshape(-1).cpu())
            yield images, targets

    def result(self) -> tuple[Tensor, Tensor]:
        """``(targets, predictions)``, one entry per evaluated image."""
        return torch.cat(self.targets).long(), torch.cat(self.preds).long()


def per_class_report(
    targets: Tensor | Sequence[int], preds: Tensor | Sequence[int], class_names: Sequence[str]
) -> tuple[list[dict[str, Any]], Any, list[int]]:
    """Per-class accuracy and the confusion matrix of top-1 predictions.

    Args:
        targets: true class index per image.
        preds: predicted (top-1) class index per image.
        class_names: one name per model output.

    Returns:
        ``(rows, matrix, labels)``: one row per class present in ``targets`` (``class``, ``index``, ``images``,
        ``correct``, ``accuracy`` = recall in percent, ``precision`` in percent or None when never predicted,
        ``top_confusion``: the class its images were most often mistaken for, or None); ``matrix[i, j]`` counts
        images of ``labels[i]`` predicted as ``labels[j]``, over the classes that occur as a target or a prediction.
    """
    from sklearn.metrics import confusion_matrix

    t = np.asarray(torch.as_tensor(targets).cpu(), dtype=np.int64).reshape(-1)
    p = np.asarray(torch.as_tensor(preds).cpu(), dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} targets but {p.size} predictions")
    labels = sorted(set(t.tolist()) | set(p.tolist()))
    cm = confusion_matrix(t, p, labels=labels)  # (L, L) rows = truth
    present = set(t.tolist())
    rows = []
    for i, k in enumerate(labels):
        if k not in present:
            continue
        n, hit, predicted = int(cm[i].sum()), int(cm[i, i]), int(cm[:, i].sum())
        off = cm[i].copy()
        off[i] = 0
        rows.append(
            {
                "class": class_names[k] if k < len(class_names) else str(k),
                "index": int(k),
                "images": n,
                "correct": hit,
                "accuracy": 100.0 * hit / n,
                "precision": 100.0 * hit / predicted if predicted else None,
                "top_confusion": class_names[labels[int(off.argmax())]] if off.any() else None,
            }
        )
    return rows, cm, labels


def plot_confusion_matrix(
    matrix: Any, names: Sequence[str], path: str | os.PathLike[str], title: str = "confusion matrix"
) -> Path:
    """Write the confusion matrix as a PNG: rows (truth) normalised to fractions, counts in the cells when small.

    Up to 30 classes get their names on both axes and the count in every non-empty cell; up to 80, names only;
    beyond that (ImageNet's 1000), a heat map without names, where the diagonal and off-diagonal clusters still show.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix, dtype=np.float64)
    k = cm.shape[0]
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = float(min(max(4.0, 0.35 * k + 2.5), 14.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=100)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 80:
        ticks = np.arange(k)
        size = 9 if k <= 30 else 6
        ax.set_xticks(ticks, [str(n) for n in names], rotation=90, fontsize=size)
        ax.set_yticks(ticks, [str(n) for n in names], fontsize=size)
    if k <= 30:
        for i, j in zip(*np.nonzero(cm)):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_class_report(
    targets: Tensor, preds: Tensor, class_names: Sequence[str], out_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """Write ``per_class.csv`` and ``confusion_matrix.png`` into ``out_dir``.

    Returns:
        ``{"per_class": rows, "report": {"per_class": csv path, "confusion_matrix": png path}}``.
    """
    import csv

    rows, cm, labels = per_class_report(targets, preds, class_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "per_class.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["class"])
        writer.writeheader()
        writer.writerows(rows)
    names = [class_names[k] if k < len(class_names) else str(k) for k in labels]
    png = plot_confusion_matrix(
        cm, names, out / "confusion_matrix.png", title=f"confusion matrix ({len(targets)} images)"
    )
    return {"per_class": rows, "report": {"per_class": str(csv_path), "confusion_matrix": str(png)}}


def format_per_class_table(rows: Sequence[Mapping[str, Any]], limit: int = 30) -> str:
    """The per-class rows as an aligned text table; with more than ``limit`` classes, the ``limit`` worst."""
    shown = sorted(rows, key=lambda r: (r["accuracy"], r["class"]))[:limit] if len(rows) > limit else list(rows)
    width = max([len("class")] + [len(str(r["class"])) for r in shown])
    lines = []
    if len(rows) > limit:
        lines.append(f"the {limit} classes with the lowest accuracy of {len(rows)}:")
    lines.append(
        f"{'class':<{width}}  {'images':>6}  {'correct':>7}  {'accuracy':>8}  {'precision':>9}  most confused with"
    )
    for r in shown:
        prec = f"{r['precision']:.1f}" if r["precision"] is not None else "-"
        lines.append(
            f"{r['class']:<{width}}  {r['images']:>6}  {r['correct']:>7}  {r['accuracy']:>8.1f}  {prec:>9}  "
            f"{r['top_confusion'] or '-'}"
        )
    return "\n".join(lines)
