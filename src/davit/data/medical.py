"""Medical image classification data: MedMNIST ``.npz`` files, 16-bit and single-channel images, DICOM files.

MedMNIST (v2, https://medmnist.com) ships every 2D set at every size (28, 64, 128, 224) as one ``.npz`` holding
``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``, ``test_labels``. Images are
``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB); labels are ``(N, 1)`` class indices (multi-class, binary and ordinal
sets) or ``(N, K)`` 0/1 columns (multi-label: ChestMNIST's 14 findings). Nothing here downloads: point it at the file.

Evaluation follows MedMNIST's own ``Evaluator`` (``getAUC`` / ``getACC``): AUC is the mean of one-vs-rest ROC AUCs
over classes (over labels for multi-label), binary tasks score the positive class's probability; accuracy is top-1,
``p > 0.5`` for binary, and for multi-label the mean over labels of the per-label accuracy at threshold 0.5.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "MEDMNIST_SPLITS",
    "TASKS",
    "MedMNISTDataset",
    "infer_task",
    "load_dicom",
    "medmnist_metrics",
    "read_medmnist",
    "to_unit_range",
]

log = logging.getLogger(__name__)

MEDMNIST_SPLITS = ("train", "val", "test")
TASKS = ("multi-class", "binary-class", "multi-label")
# ITU-R BT.601 luma, to turn RGB into one channel
_LUMA = (0.299, 0.587, 0.114)


def read_medmnist(path: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The splits of a MedMNIST-layout ``.npz``: ``{"train": (images, labels), "val": ..., "test": ...}``.

    Splits missing from the file are left out (``train`` is required). Labels come back as ``(N, K)`` arrays.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ``.npz``, no ``train_images``/``train_labels``, or inconsistent shapes; the message names
            the file and what it holds.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {p} (download e.g. pathmnist_224.npz from medmnist.com)")
    try:
        # allow_pickle=False: an .npz that needs unpickling could run code
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as e:
        raise ValueError(f"{p} is not a readable .npz file ({e})") from None
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in MEDMNIST_SPLITS:
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in arrays and lk not in arrays:
            continue
        if ik not in arrays or lk not in arrays:
            raise ValueError(f"{p} has {ik if ik in arrays else lk} but not {lk if ik in arrays else ik}")
        images, labels = arrays[ik], arrays[lk]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise ValueError(f"{p}: {ik} must be (N, H, W) or (N, H, W, 1|3), got {images.shape}")
        labels = labels.reshape(len(labels), -1) if labels.ndim != 2 else labels
        if len(images) != len(labels):
            raise ValueError(f"{p}: {len(images)} {split} images but {len(labels)} labels")
        out[split] = (images, labels)
    if "train" not in out:
        raise ValueError(
            f"{p} has no train_images/train_labels (keys: {', '.join(sorted(arrays)) or 'none'}); expected MedMNIST's "
            "layout: {train,val,test}_{images,labels}"
        )
    return out


def infer_task(labels: Sequence[np.ndarray]) -> tuple[str, int]:
    """``(task, num_outputs)`` from the label arrays of all splits.

    One label column: ``binary-class`` with 2 classes, else ``multi-class`` (ordinal sets are scored as multi-class,
    as MedMNIST does). Several 0/1 columns: ``multi-label`` with one output per column.
    """
    cols = {a.shape[1] for a in labels}
    if len(cols) != 1:
        raise ValueError(f"the splits' labels have different widths: {sorted(cols)}")
    k = cols.pop()
    if k > 1:
        values = np.unique(np.concatenate([np.unique(a) for a in labels]))
        if not set(values.tolist()) <= {0, 1}:
            raise ValueError(f"multi-label columns must hold 0/1, found values {values[:10].tolist()}")
        return "multi-label", k
    n = int(max(int(a.max()) for a in labels if a.size)) + 1
    return ("binary-class" if n == 2 else "multi-class"), n


def to_unit_range(images: np.ndarray, mode: str = "auto") -> np.ndarray:
    """Images as float32 in [0, 1].

    Args:
        images: ``(..., H, W[, C])`` of any integer or float dtype.
        mode: ``dtype`` divides by the dtype's maximum (uint8 /255, uint16 /65535); ``minmax`` stretches each
            image's own range to [0, 1] (for 12-16-bit scans whose values use a fraction of the dtype's range);
            ``auto`` is ``dtype`` for 8-bit images and ``minmax`` otherwise.
    """
    if mode not in ("auto", "dtype", "minmax"):
        raise ValueError(f"intensity mode must be auto, dtype or minmax, not {mode!r}")
    if mode == "auto":
        mode = "dtype" if images.dtype in (np.uint8, np.bool_) else "minmax"
    x = images.astype(np.float32)
    if mode == "dtype":
        if np.issubdtype(images.dtype, np.integer):
            info = np.iinfo(images.dtype)
            return (x - info.min) / float(info.max - info.min)
        return np.clip(x, 0.0, 1.0)
    axes = tuple(range(1, x.ndim)) if x.ndim >= 3 else None
    lo = x.min(axis=axes, keepdims=True) if axes else x.min()
    hi = x.max(axis=axes, keepdims=True) if axes else x.max()
    return (x - lo) / np.maximum(hi - lo, 1e-12)


class MedMNISTDataset(Dataset):
    """One split of a MedMNIST-layout ``.npz`` as ``(image, target)`` pairs.

    Images become float ``(in_chans, img_size, img_size)`` tensors normalised with ``mean``/``std``: grey images
    are replicated to 3 channels for an RGB model, RGB images are reduced to luma for a 1-channel model. Targets are
    a class index (``int64``) or, for multi-label sets, a float 0/1 vector.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, C)`` array, any dtype (see :func:`to_unit_range`).
        labels: ``(N, K)`` labels.
        task: one of :data:`TASKS`.
        img_size: output side (bicubic resize; MedMNIST's 28 px images are upscaled for ImageNet weights).
        in_chans: 1 or 3 channels out.
        mean, std: normalisation per output channel.
        intensity: see :func:`to_unit_range`.
        train: apply the training augmentation (``hflip``, and a random resized crop when ``scale`` < 1).
        hflip: horizontal flip probability in training (0 by default: laterality matters in many scans).
        scale: area range of the training random resized crop (``(1, 1)``: no crop).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        task: str,
        *,
        img_size: int = 224,
        in_chans: int = 3,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        intensity: str = "auto",
        train: bool = False,
        hflip: float = 0.0,
        scale: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, not {in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std need {in_chans} values for in_chans={in_chans}")
        self.images, self.labels, self.task = images, labels, task
        self.img_size, self.in_chans, self.intensity = int(img_size), int(in_chans), intensity
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.train, self.hflip, self.scale = train, float(hflip), tuple(scale)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Tensor:
        """Image ``i`` as a float ``(in_chans, H, W)`` tensor in [0, 1], before resizing and normalisation."""
        a = self.images[i]
        # per-image range for minmax: the image alone, not the whole array
        x = torch.from_numpy(to_unit_range(a[None], self.intensity)[0])
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
        if x.shape[0] != self.in_chans:
            if self.in_chans == 3:
                x = x.expand(3, -1, -1)  # grey -> RGB
            else:
                x = (x * torch.tensor(_LUMA).view(3, 1, 1)).sum(0, keepdim=True)  # RGB -> luma
        return x

    def target(self, i: int) -> Tensor:
        """The label of image ``i``: class index, or float 0/1 vector for multi-label sets."""
        y = self.labels[i]
        if self.task == "multi-label":
            return torch.as_tensor(y, dtype=torch.float32)
        return torch.as_tensor(int(y[0]), dtype=torch.int64)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.image(i)
        if self.train and self.scale[0] < 1.0:
            from torchvision.transforms import v2

            top, left, h, w = v2.RandomResizedCrop.get_params(x, self.scale, (3 / 4, 4 / 3))
            x = x[:, top : top + h, left : left + w]
        if tuple(x.shape[1:]) != (self.img_size, self.img_size):
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)[0]
            x = x.clamp(0.0, 1.0)  # bicubic overshoots
        if self.train and self.hflip > 0 and torch.rand(()) < self.hflip:
            x = x.flip(-1)
        return (x - self.mean) / self.std, self.target(i)


def medmnist_metrics(y_true: np.ndarray, scores: np.ndarray, task: str) -> dict[str, float]:
    """AUC and accuracy as MedMNIST's ``Evaluator`` computes them, in percent.

    Args:
        y_true: ``(N,)`` class indices, or ``(N, K)`` 0/1 for multi-label.
        scores: ``(N, K)`` probabilities: softmax for (binary/multi-)class tasks, sigmoid for multi-label.
        task: one of :data:`TASKS`.

    Returns:
        ``{"auc", "acc"}``. Classes (labels) whose ground truth has a single value in ``y_true`` have no ROC curve;
        they are left out of the AUC mean (MedMNIST's code would fail on them), and ``auc`` is NaN if none is left.
    """
    from sklearn.metrics import roc_auc_score

    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if task == "multi-label":
        y = y_true.reshape(scores.shape).astype(np.int64)
        aucs = [roc_auc_score(y[:, k], scores[:, k]) for k in range(y.shape[1]) if len(np.unique(y[:, k])) == 2]
        acc = float(np.mean([np.mean((scores[:, k] > 0.5) == y[:, k]) for k in range(y.shape[1])]))
    elif task == "binary-class":
        y = y_true.reshape(-1).astype(np.int64)
        aucs = [roc_auc_score(y, scores[:, -1])] if len(np.unique(y)) == 2 else []
        acc = float(np.mean((scores[:, -1] > 0.5) == y))
    elif task == "multi-class":
        y = y_true.reshape(-1).astype(np.int64)
        aucs = [roc_auc_score(y == k, scores[:, k]) for k in range(scores.shape[1]) if 0 < int((y == k).sum()) < len(y)]
        acc = float(np.mean(scores.argmax(1) == y))
    else:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    auc = float(np.mean(aucs)) if aucs else float("nan")
    return {"auc": 100.0 * auc, "acc": 100.0 * acc}


def load_dicom(path: str | os.PathLike[str], window: tuple[float, float] | None = None) -> np.ndarray:
    """A single-frame DICOM image as float32 ``(H, W)`` (or ``(H, W, 3)`` for colour) in [0, 1].

    Stored values go through the file's Rescale Slope/Intercept (CT: Hounsfield units), MONOCHROME1 images are
    inverted (so that bright means dense, as MONOCHROME2), then ``window`` ``(center, width)`` (default: the file's
    own Window Center/Width when it has one, else the image's min-max) maps them to [0, 1].

    Raises:
        ImportError: pydicom is missing (``pip install 'davit[medical]'``).
        ValueError: the file is not a readable DICOM image.
    """
    try:
        import pydicom
    except ImportError as e:
        raise ImportError("reading DICOM needs pydicom: pip install 'davit[medical]' (or pip install pydicom)") from e
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"DICOM file not found: {p}")
    try:
        ds = pydicom.dcmread(p)
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as e:  # pydicom raises many types for broken files; one clear message for all
        raise ValueError(f"{p} is not a readable DICOM image ({type(e).__name__}: {e})") from None
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{p} holds {ds.NumberOfFrames} frames; only single-frame 2D images are supported")
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1.0) or 1.0) + float(
        getattr(ds, "RescaleIntercept", 0.0) or 0.0
    )
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        # multi-valued windows list alternatives: take the first
        window = (float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc),
                  float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww))  # fmt: skip
    if window is not None:
        center, width = window
        lo, hi = center - width / 2.0, center + width / 2.0
        out = np.clip((pixels - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    else:
        out = to_unit_range(pixels, "minmax")
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def describe(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Counts, image shape and dtype of a MedMNIST file's splits (for logs)."""
    images = splits["train"][0]
    return {
        "splits": {k: len(v[0]) for k, v in splits.items()},
        "image_shape": list(images.shape[1:]),
        "dtype": str(images.dtype),
    }
