"""Image classification on the shared engine: ``ClsConfig`` (the run) and ``ClassificationTask`` (model, data, loss,
metrics), plus :func:`train_classifier`.

The defaults are the official DaViT ImageNet-1K recipe (see ``configs/cls/davit_tiny_in1k.yaml``); the digits demo
(``configs/cls/digits.yaml``) overrides them for a micro model on 32x32 inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..config import LoopConfig, ModelConfig, OptimConfig, SchedConfig
from ..data import ClsDataConfig, build_classification_datasets, build_mixup, skipped_images
from ..engine.distributed import all_reduce_sum
from ..weights import CheckpointError

__all__ = ["ClassificationTask", "ClsConfig", "train_classifier"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClsConfig:
    """A classification run. Defaults: the official ImageNet-1K recipe for DaViT-Tiny (per process: batch 128;
    the paper ran 8 GPUs, a global batch of 1024; 300 epochs + 10 cooldown at ``min_lr``)."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name="davit_tiny"))
    data: ClsDataConfig = dataclasses.field(default_factory=ClsDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(grad_clip=1.0))
    sched: SchedConfig = dataclasses.field(default_factory=lambda: SchedConfig(warmup=5, cooldown=10))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(epochs=310, batch_size=128, amp="bf16"))
    out: str = "runs/cls"
    resume: str = ""


class ClassificationTask:
    """Classification for :func:`davit.engine.fit` (see :class:`davit.engine.Task`).

    The class count comes from the data (``model.num_classes`` must agree when set). Starting from weights whose
    head has another class count stops with a message unless ``model.reset_head=true``, which keeps the backbone and
    trains a new head (fine-tuning to a user's folder).

    Loss: soft-target cross-entropy on mixup/cutmix targets (which carry the label smoothing) when mixing is on,
    label-smoothed cross-entropy otherwise. Metrics: top-1/top-5 in percent and the validation loss, summed over ranks.
    """

    primary_metric = "top1"

    def __init__(self, cfg: ClsConfig) -> None:
        self.cfg = cfg
        self._data: tuple[Dataset, Dataset | None, list[str]] | None = None
        self.mixer: Any = None

    # --------------------------------------------------------------------------------------------------- data
    def _datasets(self) -> tuple[Dataset, Dataset | None, list[str]]:
        if self._data is None:
            self._data = build_classification_datasets(self.cfg.data)
            self.mixer = build_mixup(self.cfg.data, len(self._data[2]))
        return self._data

    @property
    def class_names(self) -> list[str]:
        """The class names, in label order."""
        return list(self._datasets()[2])

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """The recipe's augmented training set and the evaluation-transformed validation set."""
        train, val, _ = self._datasets()
        return train, val

    def collate_fn(self) -> None:
        """Images and labels batch with torch's default collate."""
        return None

    def weights_metadata(self) -> dict[str, Any]:
        """Evaluation preprocessing and the model name, for ``davit eval`` / ``davit predict`` on the weights."""
        return {"preprocessing": self.cfg.data.preprocessing(), "model_name": self.cfg.model.name}

    # -------------------------------------------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        """``davit.create_model(model.name, ...)`` with the data's class count."""
        from .. import create_model

        m = self.cfg.model
        n = len(self.class_names)
        if m.num_classes is not None and m.num_classes != n:
            raise ValueError(
                f"model.num_classes={m.num_classes} but the data has {n} classes; remove model.num_classes "
                "(it follows the data) or fix the data"
            )
        pretrained: bool | str = False
        if m.pretrained:
            pretrained = True if m.pretrained.lower() == "true" else m.pretrained
        if pretrained is False:
            return create_model(m.name, num_classes=n, **m.overrides)
        model = create_model(m.name, pretrained=pretrained, **m.overrides)
        have = model.cfg.num_classes
        if have != n or m.reset_head:
            if have != n and not m.reset_head:
                raise CheckpointError(
                    f"the weights {m.pretrained!r} have a {have}-class head but the data has {n} classes; set "
                    "model.reset_head=true to keep the backbone and train a new head"
                )
            model.reset_classifier(n)
            log.info("classifier re-initialised for %d classes (backbone from %s)", n, m.pretrained)
        return model

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> None:
        """The engine default: no weight decay on norms, biases and other 1-D parameters."""
        return None

    # ------------------------------------------------------------------------------------------- loss, metrics
    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Cross-entropy on soft (mixed) or label-smoothed targets; the loss is computed in float32."""
        images, targets = batch
        self._datasets()
        if self.mixer is not None:
            images, soft = self.mixer(images, targets)  # soft: (B, num_classes), rows sum to 1
            logits = model(images).float()
            loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
            return {"loss": loss}
        logits = model(images).float()
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.data.label_smoothing)
        acc = (logits.argmax(-1) == targets).float().mean() * 100.0
        return {"loss": loss, "acc": acc}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Top-1/top-5 (percent) and the mean cross-entropy, over every rank's shard."""
        from ..engine.evaluate import evaluate_classifier

        m = evaluate_classifier(model, loader)
        out = {"top1": m["top1"], "top5": m["top5"], "val_loss": m["loss"]}
        # Unreadable images are skipped by the datasets; report how many so far (all workers, all ranks).
        train, val, _ = self._datasets()
        count = skipped_images(train) + (skipped_images(val) if val is not None else 0)
        skipped = torch.tensor([float(count)], device=next(model.parameters()).device)  # NCCL reduces GPU tensors
        n = float(all_reduce_sum(skipped).item())
        if n > 0:
            out["skipped_images"] = n
            log.warning("%d unreadable images skipped so far (see the warnings above for their paths)", n)
        return out

    def on_fit_end(self, model: nn.Module, out_dir: Path, count: int = 8) -> dict[str, Any]:
        """Classify ``count`` held-out images spread over the validation set and log predicted vs true labels."""
        val = self._datasets()[1]
        if val is None or len(val) == 0:
            return {}
        device = next(model.parameters()).device
        picks = [round(i * (len(val) - 1) / max(count - 1, 1)) for i in range(min(count, len(val)))]
        images = torch.stack([val[i][0] for i in picks]).to(device)  # (count, 3, H, W)
        targets = [int(val[i][1]) for i in picks]
        probs = model(images).float().softmax(-1)  # (count, num_classes)
        conf, pred = probs.max(-1)
        names = self.class_names
        examples = []
        for i, t, p, c in zip(picks, targets, pred.tolist(), conf.tolist()):
            examples.append({"index": i, "true": names[t], "predicted": names[p], "probability": round(c, 4)})
            log.info(
                "held-out image %4d: predicted %-8s (p=%.3f), true %-8s %s",
                i, names[p], c, names[t], "ok" if p == t else "WRONG",
            )  # fmt: skip
        right = sum(e["true"] == e["predicted"] for e in examples)
        log.info("held-out examples: %d/%d correct", right, len(examples))
        return {"examples": examples}


def train_classifier(cfg: ClsConfig) -> dict[str, Any]:
    """Train a classifier with the shared engine; returns the summary (``top1``, ``top5``, ...)."""
    from ..engine.fit import fit

    return fit(cfg, ClassificationTask(cfg))
