"""Classification datasets (ImageFolder / ImageNet, the scikit-learn digits) and batch mixing (mixup / cutmix).

``build_classification_datasets(cfg)`` gives ``(train, val, class_names)``; every item is ``(image_tensor, int)``.
``build_mixup(cfg, num_classes)`` gives the batch-level mixer of the recipe, or None when mixing is off (then train
with ``F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .config import ClsDataConfig
from .image import ImageReadError, is_image_file, load_rgb
from .transforms import build_train_transform, eval_transform_from_config

__all__ = [
    "DigitsDataset",
    "ImageFolderDataset",
    "Mixer",
    "SkippingDataset",
    "build_classification_datasets",
    "build_mixup",
    "collate_readable",
    "digits_split",
    "scan_image_folder",
    "walk_files",
    "skipped_images",
]

log = logging.getLogger(__name__)

# Files an OS or a photo tool leaves in folders; they are ignored, never reported as "non-image files".
_JUNK = {"thumbs.db", "desktop.ini", "icon\r"}
# How many consecutive unreadable files one __getitem__ steps over before it gives up.
_MAX_SKIP = 64


def build_classification_datasets(
    cfg: ClsDataConfig,
) -> tuple[Dataset, Dataset | None, list[str]]:
    """The training and validation datasets of ``cfg`` with their class names.

    Training items are augmented with the recipe's transform, validation items get the evaluation transform
    (resize to ``img_size / crop_pct``, centre crop, normalise).

    Returns:
        ``(train_ds, val_ds, class_names)``; ``val_ds`` is None for an ImageFolder run with ``val_dir=""``.

    Raises:
        FileNotFoundError: the data folder or one of its splits is missing.
        ValueError: an empty class folder, a non-image file, images outside class folders, or a val set whose classes
            differ from train's (the message names the folder).
    """
    train_tf = build_train_transform(cfg)
    eval_tf = eval_transform_from_config(cfg)
    if cfg.kind == "digits":
        if cfg.root:  # a user pointing a digits recipe at their folder would otherwise train on digits unawares
            log.warning(
                "warning: data.root=%s is ignored: data.kind=digits uses scikit-learn's built-in digits; add "
                "data.kind=imagefolder to train on that folder",
                cfg.root,
            )
        train_idx, val_idx = digits_split(cfg.val_split, cfg.split_seed)
        classes = [str(i) for i in range(10)]
        return (
            DigitsDataset(train_idx, cfg.img_size, train_tf),
            DigitsDataset(val_idx, cfg.img_size, eval_tf),
            classes,
        )
    if cfg.kind in ("hf", "wds"):
        from .sources import build_hf_datasets, build_wds_datasets

        return (build_hf_datasets if cfg.kind == "hf" else build_wds_datasets)(cfg, train_tf, eval_tf)
    if not cfg.root:
        raise FileNotFoundError("data.root is empty: set it to the dataset folder (e.g. data.root=/data/imagenet)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root} (set data.root to the folder holding {cfg.train_dir}/)")
    train_ds = ImageFolderDataset(root / cfg.train_dir, train_tf)
    val_ds = None
    if cfg.val_dir:
        val_ds = ImageFolderDataset(root / cfg.val_dir, eval_tf)
        if val_ds.classes != train_ds.classes:
            only_train = sorted(set(train_ds.classes) - set(val_ds.classes))
            only_val = sorted(set(val_ds.classes) - set(train_ds.classes))
            raise ValueError(
                f"the classes of {val_ds.root} differ from those of {train_ds.root}: "
                f"only in train: {_few(only_train)}; only in val: {_few(only_val)}. "
                "Both folders need the same class sub-folders."
            )
    return train_ds, val_ds, list(train_ds.classes)


def skipped_images(dataset: Dataset) -> int:
    """How many unreadable images ``dataset`` (or the dataset a Subset wraps) has skipped so far, in all workers."""
    while not hasattr(dataset, "num_skipped") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return int(getattr(dataset, "num_skipped", 0))


# ---------------------------------------------------------------------------------------------------- ImageFolder
def scan_image_folder(root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``root/<class>/<image>`` files: sorted class names and ``(path, class_index)`` samples.

    Files are looked for recursively inside each class folder. Hidden files and OS junk (``Thumbs.db``) are ignored.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` holds no class folders, holds files beside them, or a class folder holds no images or
            holds non-image files (the message names the folder).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file; pass the folder holding one sub-folder per class")
    entries = sorted((e for e in os.scandir(root) if not _ignored(e.name)), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir()]
    loose = [e.name for e in entries if not e.is_dir()]
    if not classes:
        raise ValueError(
            f"{root} holds no class folders: the ImageFolder layout is {root}/<class_name>/<image files>"
            + (f" (found files {_few(loose)} directly inside it)" if loose else "")
        )
    if loose:
        raise ValueError(
            f"{root} holds files beside its class folders ({_few(loose)}): images must be inside "
            f"{root}/<class_name>/; move or delete these files"
        )
    samples: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        folder = root / name
        files, others = [], []
        for f in walk_files(folder):
            if _ignored(os.path.basename(f)):
                continue
            (files if is_image_file(f) else others).append(f)
        if others:
            raise ValueError(
                f"class folder {folder} holds {len(others)} non-image file(s) ({_few(others)}); "
                "move or delete them (image extensions: jpg, jpeg, png, bmp, ppm, pgm, tif, tiff, webp, gif)"
            )
        if not files:
            raise ValueError(f"class folder {folder} is empty: it holds no images; add images or delete the folder")
        samples.extend((f, idx) for f in files)
    return classes, samples


# A walk stops with an error past this many folders: a dataset is wide, not this deep in folders.
MAX_WALK_DIRS = 200_000


def walk_files(folder: str | os.PathLike[str], max_dirs: int = MAX_WALK_DIRS) -> list[str]:
    """Every file under ``folder`` (sorted, hidden folders skipped), following symlinks but never around a loop.

    A symlinked folder that leads back to one of its own ancestors (``loop -> ..``) or to a folder already walked is
    skipped with a warning, so every real folder is read once: the walk is linear in the tree, never exponential.

    Raises:
        ValueError: more than ``max_dirs`` folders (the message names the root).
    """
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    warned = odd_dirs = 0
    # (path, real ancestors' ids): the ancestors tell a loop from a second link to the same folder
    # The folders above the root count as ancestors too: a link to one of them (``loop -> ..``) would read the
    # sibling folders (other classes) into this one.
    above = set()
    for parent in Path(folder).resolve().parents:
        try:
            pst = os.stat(parent)
        except OSError:
            continue
        above.add((pst.st_dev, pst.st_ino))
    seen.update(above)
    stack: list[tuple[str, frozenset[tuple[int, int]]]] = [(os.fspath(folder), frozenset(above))]
    while stack:
        path, ancestors = stack.pop()
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            if warned < 3:
                why = "a loop back to its own parent" if key in ancestors else "a second link to a folder already read"
                log.warning("skipping %s: %s", path, why)
            warned += 1
            continue
        seen.add(key)
        if len(seen) - len(above) > max_dirs:
            raise ValueError(
                f"{folder} holds more than {max_dirs:,} folders (following symlinks): is a symlink pointing at a "
                "large tree? Point the data at the image folders themselves"
            )
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            raise ValueError(f"cannot list {path}: {e.strerror}; check its permissions") from e
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir and is_image_file(e.name):
                # A folder named like an image (x.png) is a mistake, not a sub-tree of images: skip it, say so once.
                if not odd_dirs:
                    log.warning("skipping %s: a folder named like an image file (not read)", e.path)
                odd_dirs += 1
            elif is_dir:
                if not e.name.startswith("."):
                    subdirs.append(e.path)
            elif e.is_file() or not e.is_symlink():
                out.append(e.path)
            else:
                log.warning("skipping %s: a broken symlink", e.path)
        stack.extend((d, ancestors | {key}) for d in reversed(subdirs))
    if warned > 3:
        log.warning("skipped %d symlinked folders in %s in all (loops or repeated links)", warned, folder)
    return out


class SkippingDataset(Dataset):
    """Base of the map-style sources: ``transform(image), label`` items, unreadable samples skipped and counted.

    Subclasses implement ``__len__``, :meth:`read` and :meth:`name`. With ``substitute_unreadable`` (training) an
    unreadable sample is replaced by the next readable one, so an epoch keeps its length; without it (evaluation) the
    item is None, for a collate function that drops it, so every readable sample is scored once.
    """

    unit = "sample"  # the word messages use for one item

    def __init__(self, transform: Callable[[Image.Image], Any] | None, substitute_unreadable: bool = True) -> None:
        self.transform = transform
        self.substitute_unreadable = substitute_unreadable
        # Shared memory: DataLoader workers' skips add up where the training loop reads them.
        self._skipped = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._warned: set[str] = set()

    @property
    def num_skipped(self) -> int:
        """Unreadable-sample encounters so far (all workers, all epochs)."""
        return int(self._skipped.item())

    def read(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label of sample ``index``; raises :class:`ImageReadError` when unreadable."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        """A name for sample ``index`` in messages."""
        return str(index)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        n = len(self)
        tries = min(_MAX_SKIP, n) if self.substitute_unreadable else 1
        for step in range(tries):
            i = (index + step) % n
            try:
                img, target = self.read(i)
            except ImageReadError as e:
                self._skipped += 1
                key = self.name(i)
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("skipping unreadable %s (%s); %d skipped so far", self.unit, e, self.num_skipped)
                continue
            return (self.transform(img) if self.transform is not None else img), target
        if not self.substitute_unreadable:
            return None
        raise ImageReadError(
            f"{tries} consecutive unreadable {self.unit}s from item {index} ({self.name(index)}): the dataset looks "
            "corrupt; check it (e.g. re-download or re-extract it)"
        )


class ImageFolderDataset(SkippingDataset):
    """``root/<class>/<image>`` images as ``(transform(rgb_image), class_index)``.

    Unreadable files (corrupt, truncated, not really images) are skipped: the item is replaced by the next readable
    file, a warning names the file once per process, and :attr:`num_skipped` counts skips across DataLoader workers
    (the counter lives in shared memory), so a training log can report it and the epoch goes on.

    Args:
        root: the split folder (e.g. ``imagenet/train``).
        transform: PIL RGB image -> tensor; None returns the PIL image.
        class_names: index classes by this list instead of the sorted folder names (every folder must be in it),
            e.g. to evaluate a checkpoint on a folder holding a subset of its classes.
        substitute_unreadable: replace an unreadable file by the next readable one (training: the epoch keeps its
            length). With False an unreadable item is returned as None; evaluation drops it with
            :func:`collate_readable`, so every readable image is scored exactly once.
    """

    unit = "image"

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        class_names: Sequence[str] | None = None,
        substitute_unreadable: bool = True,
    ) -> None:
        super().__init__(transform, substitute_unreadable)
        self.root = Path(root).expanduser()
        folder_classes, samples = scan_image_folder(self.root)
        if class_names is not None:
            index = {n: i for i, n in enumerate(class_names)}
            unknown = [c for c in folder_classes if c not in index]
            if unknown:
                raise ValueError(
                    f"{self.root} has class folders the model does not know: {_few(unknown)} "
                    f"(the model's classes: {_few(list(class_names))})"
                )
            samples = [(p, index[folder_classes[i]]) for p, i in samples]
            self.classes = list(class_names)
        else:
            self.classes = folder_classes
        self.samples = samples
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return str(self.samples[index][0])

    def read(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return load_rgb(path), target


def collate_readable(batch: Sequence[tuple[Any, int] | None]) -> tuple[Tensor, Tensor] | None:
    """Default collation of the readable items of ``batch`` (None for an all-unreadable batch)."""
    from torch.utils.data import default_collate

    items = [b for b in batch if b is not None]
    return default_collate(items) if items else None


# ----------------------------------------------------------------------------------------------------------- digits
def digits_split(val_split: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train / held-out indices into scikit-learn's 1797 digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    train_idx, val_idx = train_test_split(np.arange(len(y)), test_size=val_split, random_state=seed, stratify=y)
    return np.sort(train_idx), np.sort(val_idx)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (8x8, 16 grey levels) as RGB images upscaled to ``img_size``.

    Args:
        indices: which of the 1797 digits (see :func:`digits_split`); None for all.
        img_size: side of the square RGB image handed to ``transform`` (bicubic upscaling).
        transform: PIL RGB image -> tensor; None returns the PIL image.
    """

    num_skipped = 0
    classes = [str(i) for i in range(10)]

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray | None = None,
        img_size: int = 32,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        idx = np.arange(len(d.target)) if indices is None else np.asarray(indices, dtype=np.int64)
        # grey levels 0..16 -> 0..255
        self.images = np.round(d.images[idx] * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
        self.targets = [int(t) for t in d.target[idx]]
        self.img_size = img_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])  # (8, 8) uint8 -> mode L
        img = img.resize((self.img_size, self.img_size), Image.Resampling.BICUBIC).convert("RGB")
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


# ----------------------------------------------------------------------------------------------------------- mixing
class Mixer:
    """Batch mixup / cutmix with label smoothing: ``(images, int targets) -> (images, soft targets)``.

    Wraps timm's ``Mixup`` in batch mode (the official recipe). Each soft-target row sums to 1. timm pairs each image
    with its mirror in the batch, so it needs an even batch; an odd last batch mixes all but its last image, which
    keeps its smoothed one-hot target.
    """

    def __init__(self, cfg: ClsDataConfig, num_classes: int) -> None:
        from timm.data import Mixup

        self.num_classes = num_classes
        self.label_smoothing = cfg.label_smoothing
        self._mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode="batch",
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )

    def smooth_one_hot(self, targets: Tensor) -> Tensor:
        """Label-smoothed one-hot targets ``(B, num_classes)``."""
        off = self.label_smoothing / self.num_classes
        out = torch.full((targets.shape[0], self.num_classes), off, device=targets.device)
        return out.scatter_(1, targets.long().view(-1, 1), 1.0 - self.label_smoothing + off)

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        n = images.shape[0]
        if n % 2 == 0:
            return self._mixup(images, targets)
        if n == 1:
            return images, self.smooth_one_hot(targets)
        head, soft = self._mixup(images[:-1].clone(), targets[:-1])
        return torch.cat([head, images[-1:]]), torch.cat([soft, self.smooth_one_hot(targets[-1:])])


def build_mixup(cfg: ClsDataConfig, num_classes: int) -> Mixer | None:
    """The batch mixer of ``cfg``, or None when mixup and cutmix are off (use smoothed cross-entropy then)."""
    if not cfg.mixing:
        return None
    return Mixer(cfg, num_classes)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK


def _few(items: Sequence[str], n: int = 3) -> str:
    items = [str(i) for i in items]
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
