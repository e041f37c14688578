"""Medical image classification on the shared engine: MedMNIST ``.npz`` sets, single- and multi-label.

``davit train --config configs/med/medmnist_davit_tiny.yaml data.path=pathmnist_224.npz`` fine-tunes ImageNet
weights; validation reports MedMNIST's AUC and accuracy (``auc`` selects ``best.safetensors``), and at the end the
test split is scored the same way (``test_auc``, ``test_acc`` in ``summary.json``). :func:`evaluate_medmnist` scores
any checkpoint on any split.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..config import LoopConfig, ModelConfig, OptimConfig, SchedConfig
from ..data.config import IMAGENET_MEAN, IMAGENET_STD
from ..data.medical import TASKS, MedMNISTDataset, describe, infer_task, medmnist_metrics, read_medmnist
from ..engine.distributed import all_gather_object

__all__ = ["MedConfig", "MedDataConfig", "MedicalTask", "evaluate_medmnist"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MedDataConfig:
    """A MedMNIST-layout ``.npz`` and how its images reach the model.

    Attributes:
        path: the ``.npz`` (``{train,val,test}_{images,labels}``; any MedMNIST 2D set and size).
        task: ``auto`` (from the labels), ``multi-class``, ``binary-class`` or ``multi-label``.
        class_names: optional names, one per output (default ``class_0`` ...).
        img_size: the side the model sees (images are resized, bicubic).
        in_chans: 3 replicates grey images to RGB (the ImageNet weights unchanged); 1 builds a one-channel model
            whose stem kernels are the RGB kernels summed (see :func:`davit.create_model`); RGB sets become luma.
        mean, std: normalisation; empty = ImageNet's (their averages for one channel).
        intensity: ``auto`` | ``dtype`` | ``minmax`` (16-bit images: per-image min-max under ``auto``).
        hflip: training flip probability. scale: training random-resized-crop area range.
        val_split: the split evaluated during training (``val``; ``test`` is scored at the end).
    """

    path: str = ""
    task: str = "auto"
    class_names: tuple[str, ...] = ()
    img_size: int = 224
    in_chans: int = 3
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    intensity: str = "auto"
    hflip: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    val_split: str = "val"

    def __post_init__(self) -> None:
        if self.task not in ("auto", *TASKS):
            raise ValueError(f"data.task must be auto or one of {', '.join(TASKS)}, not {self.task!r}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"data.in_chans must be 1 or 3, not {self.in_chans}")
        if self.mean and len(self.mean) != self.in_chans or self.std and len(self.std) != self.in_chans:
            raise ValueError(f"data.mean and data.std need {self.in_chans} values for in_chans={self.in_chans}")

    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` per input channel."""
        if self.mean and self.std:
            return tuple(self.mean), tuple(self.std)
        if self.in_chans == 1:
            return (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),)
        return IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class MedConfig:
    """A medical classification run (defaults: fine-tune DaViT-Tiny's ImageNet weights at 224)."""

    model: ModelConfig = dataclasses.field(
        default_factory=lambda: ModelConfig(name="davit_tiny", pretrained="true", overrides={"drop_path_rate": 0.1})
    )
    data: MedDataConfig = dataclasses.field(default_factory=MedDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, lr_base_batch=128))
    sched: SchedConfig = dataclasses.field(default_factory=lambda: SchedConfig(warmup=1))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(epochs=20, batch_size=64))
    out: str = "runs/med"
    resume: str = ""


class MedicalTask:
    """MedMNIST classification for :func:`davit.engine.fit` (see :class:`davit.engine.Task`).

    Loss: cross-entropy for (binary/multi-)class sets, binary cross-entropy with logits per label for multi-label
    sets. Metrics: MedMNIST's AUC and accuracy (:func:`davit.data.medical.medmnist_metrics`) and the loss.
    """

    primary_metric = "auc"

    def __init__(self, cfg: MedConfig) -> None:
        self.cfg = cfg
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._task: tuple[str, int] | None = None

    # ------------------------------------------------------------------------------------------------- data
    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The file's splits (read once)."""
        if self._splits is None:
            if not self.cfg.data.path:
                raise ValueError("data.path is empty: pass the MedMNIST file, e.g. data.path=pathmnist_224.npz")
            self._splits = read_medmnist(self.cfg.data.path)
            log.info("%s: %s", self.cfg.data.path, describe(self._splits))
        return self._splits

    @property
    def task(self) -> str:
        """``multi-class``, ``binary-class`` or ``multi-label``."""
        return self._task_and_outputs()[0]

    @property
    def num_outputs(self) -> int:
        """Classes (or labels, for multi-label sets)."""
        return self._task_and_outputs()[1]

    def _task_and_outputs(self) -> tuple[str, int]:
        if self._task is None:
            task, n = infer_task([labels for _, labels in self.splits().values()])
            if self.cfg.data.task != "auto" and self.cfg.data.task != task:
                if {self.cfg.data.task, task} != {"binary-class", "multi-class"}:
                    raise ValueError(f"data.task={self.cfg.data.task} but the labels look {task}")
                task = self.cfg.data.task
            self._task = (task, n)
        return self._task

    @property
    def class_names(self) -> list[str]:
        """Names per output (``data.class_names`` or ``class_<i>``)."""
        names = list(self.cfg.data.class_names)
        if names and len(names) != self.num_outputs:
            raise ValueError(f"data.class_names lists {len(names)} names for {self.num_outputs} outputs")
        return names or [f"class_{i}" for i in range(self.num_outputs)]

    def dataset(self, split: str, train: bool = False) -> MedMNISTDataset:
        """One split of the file with the run's preprocessing (augmented when ``train``)."""
        splits = self.splits()
        if split not in splits:
            raise ValueError(f"{self.cfg.data.path} has no {split!r} split (it has {', '.join(splits)})")
        d = self.cfg.data
        mean, std = d.norm()
        images, labels = splits[split]
        return MedMNISTDataset(
            images, labels, self.task, img_size=d.img_size, in_chans=d.in_chans, mean=mean, std=std,
            intensity=d.intensity, train=train, hflip=d.hflip, scale=d.scale,
        )  # fmt: skip

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """The training split and ``data.val_split`` (None when the file has no such split)."""
        val = self.dataset(self.cfg.data.val_split) if self.cfg.data.val_split in self.splits() else None
        return self.dataset("train", train=True), val

    def collate_fn(self) -> None:
        """torch's default collate."""
        return None

    def weights_metadata(self) -> dict[str, Any]:
        """What evaluation needs to feed the weights: the task and the preprocessing."""
        d = self.cfg.data
        mean, std = d.norm()
        return {
            "model_name": self.cfg.model.name,
            "medical": {"task": self.task, "img_size": d.img_size, "in_chans": d.in_chans, "mean": mean, "std": std,
                        "intensity": d.intensity},
        }  # fmt: skip

    # ------------------------------------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        """DaViT with one output per class (label), ``in_chans`` from the data, ImageNet weights adapted."""
        from .. import create_model

        m = self.cfg.model
        overrides = {**m.overrides, "in_chans": self.cfg.data.in_chans}
        pretrained: bool | str = False
        if m.pretrained:
            pretrained = True if m.pretrained.lower() == "true" else m.pretrained
        # a head of another class count is always replaced: fine-tuning to a medical set is the point
        return create_model(m.name, pretrained=pretrained, num_classes=self.num_outputs, **overrides)

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> None:
        """The engine default (no decay on norms and biases)."""
        return None

    # ------------------------------------------------------------------------------------------ loss, metrics
    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.task == "multi-label":
            return F.binary_cross_entropy_with_logits(logits, targets.float())
        return F.cross_entropy(logits, targets.long())

    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Cross-entropy (BCE per label for multi-label sets), in float32."""
        images, targets = batch
        return {"loss": self._loss(model(images).float(), targets)}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """MedMNIST's AUC and accuracy (percent) and the loss, over every rank's shard."""
        out = score_loader(model, loader, self.task, self._loss)
        return {"auc": out["auc"], "acc": out["acc"], "val_loss": out["loss"]}

    def on_fit_end(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        """Score the test split (when the file has one) with the final model."""
        if "test" not in self.splits() or self.cfg.data.val_split == "test":
            return {}
        loader = DataLoader(self.dataset("test"), batch_size=self.cfg.train.batch_size, shuffle=False)
        m = score_loader(model, loader, self.task, self._loss)
        log.info("test split: AUC %.2f  ACC %.2f  (%d images)", m["auc"], m["acc"], m["images"])
        return {"test_auc": m["auc"], "test_acc": m["acc"]}


@torch.no_grad()
def score_loader(model: nn.Module, loader: Any, task: str, loss_fn: Any = None) -> dict[str, float]:
    """Probabilities over a loader, gathered from every rank, scored with :func:`medmnist_metrics`."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    scores, targets, loss_sum, n = [], [], 0.0, 0
    try:
        for images, y in loader:
            logits = model(images.to(dev)).float()
            if loss_fn is not None:
                loss_sum += float(loss_fn(logits, y.to(dev))) * len(y)
            p = logits.sigmoid() if task == "multi-label" else logits.softmax(-1)
            scores.append(p.cpu().numpy())
            targets.append(y.cpu().numpy())
            n += len(y)
    finally:
        model.train(was_training)
    # AUC needs every score, not sums: gather the shards (a DistributedSampler's padding repeats a few images)
    parts = all_gather_object((scores, targets, loss_sum, n))
    scores = [s for part in parts for s in part[0]]  # type: ignore[index]
    targets = [t for part in parts for t in part[1]]  # type: ignore[index]
    loss_sum = sum(float(part[2]) for part in parts)  # type: ignore[index]
    n = sum(int(part[3]) for part in parts)  # type: ignore[index]
    if n == 0:
        raise ValueError("evaluation saw no images: the split is empty")
    out = medmnist_metrics(np.concatenate(targets), np.concatenate(scores), task)
    return {**out, "loss": loss_sum / n, "images": n}


def evaluate_medmnist(
    checkpoint: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    split: str = "test",
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """AUC and accuracy of a checkpoint written by a medical run on one split of a MedMNIST ``.npz``.

    The checkpoint's metadata gives the architecture, the task and the preprocessing.
    """
    import json

    from .. import create_model
    from ..weights import read_safetensors_metadata

    meta = read_safetensors_metadata(checkpoint)
    if "medical" not in meta:
        raise ValueError(f"{checkpoint} was not written by a medical run (no 'medical' metadata); pass its weights")
    med = json.loads(meta["medical"]) if isinstance(meta["medical"], str) else meta["medical"]
    model = create_model(str(meta.get("model_name", "davit_tiny")), pretrained=str(checkpoint)).to(device).eval()
    images, labels = read_medmnist(path).get(split, (None, None))
    if images is None:
        raise ValueError(f"{path} has no {split!r} split")
    ds = MedMNISTDataset(
        images, labels, med["task"], img_size=med["img_size"], in_chans=med["in_chans"], mean=med["mean"],
        std=med["std"], intensity=med["intensity"],
    )  # fmt: skip
    out = score_loader(model, DataLoader(ds, batch_size=batch_size), med["task"])
    return {**out, "split": split, "task": med["task"]}
