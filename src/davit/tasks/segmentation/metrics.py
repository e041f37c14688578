"""Segmentation metrics from a confusion matrix: mIoU, mAcc, aAcc and per-class IoU / accuracy (mmseg's definitions).

- IoU_c = TP_c / (TP_c + FP_c + FN_c); classes absent from both prediction and ground truth (union 0) are NaN and left
  out of the mean, as mmseg's ``nanmean``.
- Acc_c = TP_c / (TP_c + FN_c) (NaN when the class never occurs in the ground truth).
- aAcc = sum TP / number of labelled pixels. Pixels labelled with the ignore index are not counted.
All values are percentages; ``metrics_from_confusion`` reports the per-class IoU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ConfusionMatrix", "metrics_from_confusion"]


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` int64 confusion matrix, rows = ground truth, columns = prediction.

    Args:
        num_classes: K.
        ignore_index: ground-truth value that is not counted.
        device: where the matrix lives (the predictions' device avoids copies).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add predictions and labels of the same shape (any shape; integer class indices)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} shapes differ")
        k = self.num_classes
        valid = target != self.ignore_index
        t = target[valid].long().to(self.mat.device)
        p = pred[valid].long().to(self.mat.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise ValueError(f"labels must lie in 0..{k - 1} or be {self.ignore_index}; got {t.min()}..{t.max()}")
        self.mat += torch.bincount(t * k + p, minlength=k * k).reshape(k, k)  # (K*K,) -> (K, K)

    def all_reduce(self) -> None:
        """Sum the matrix over DDP ranks (no-op in single-process runs)."""
        from ...engine.distributed import all_reduce_sum

        all_reduce_sum(self.mat)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """The metrics of :func:`metrics_from_confusion`."""
        return metrics_from_confusion(self.mat, class_names)


def metrics_from_confusion(mat: Tensor, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """``{"miou", "macc", "aacc", "iou.<name>"...}`` in percent from a ``(K, K)`` matrix.

    Classes with an undefined IoU (never predicted and never labelled) get no ``iou.<name>`` entry, so the result is
    valid JSON (no NaN).
    """
    mat = mat.double().cpu()
    tp = mat.diag()
    gt = mat.sum(1)
    pred = mat.sum(0)
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = gt.sum()
    out = {
        "miou": 100 * float(iou.nanmean()) if (union > 0).any() else 0.0,
        "macc": 100 * float(acc.nanmean()) if (gt > 0).any() else 0.0,
        "aacc": 100 * float(tp.sum() / total) if total > 0 else 0.0,
    }
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for a {len(tp)}-class confusion matrix")
    out.update({f"iou.{n}": 100 * float(v) for n, v, u in zip(names, iou, union) if u > 0})
    return out
