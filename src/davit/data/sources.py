"""Classification data from where large datasets are kept: Hugging Face ``datasets`` and webdataset tar shards.

Both are served as map-style datasets, so they ride the engine's :class:`davit.engine.fit.ResumableSampler` exactly
like an ImageFolder: the order is a permutation from ``(seed, epoch)``, every sample's augmentation is seeded from
``(seed, epoch, index)``, a run resumes bit-exactly mid-epoch and DDP ranks each see their share of an epoch once.
Unreadable samples are skipped (the next readable one takes their place) and counted across DataLoader workers.

- ``data.kind=hf``: ``data.root`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a
  folder of parquet (or other packaged) files ``datasets.load_dataset`` reads, or a hub name (``ILSVRC/imagenet-1k``;
  downloaded once into the Hugging Face cache, then memory-mapped Arrow). ``data.train_dir`` / ``data.val_dir`` name
  the splits (``val`` falls back to ``validation``). Images come from ``data.image_key`` (default: ``image``, else
  ``img``), labels from ``data.label_key``; a ``ClassLabel`` feature gives the class names.
- ``data.kind=hf`` with ``data.streaming=true``: the training split is read as a stream (nothing is downloaded
  first; ``datasets``' ``IterableDataset``) by :class:`HFStream`, which keeps the same guarantees by construction: the
  epoch's order is ``datasets``' shard-and-buffer shuffle seeded from ``(seed, epoch)``, rank ``r`` of ``w`` takes
  every ``w``-th sample of it, DataLoader worker ``k`` builds every ``k``-th batch, and a resumed run skips (reads,
  does not decode) the samples it had consumed. The validation split is read once into the ``datasets`` cache
  (evaluation indexes it).
- ``data.kind=wds``: webdataset shards: ``root/train_dir/*.tar`` (or the glob ``root/train_dir``), each sample a group
  of tar members sharing a key (``n01440764_10026.jpg`` + ``n01440764_10026.cls``). The shards are indexed once (tar
  headers only; the ``.cls`` members are read), then images are read by offset. Class names come from
  ``root/classes.txt`` (one per line) when present.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import random
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .classification import SkippingDataset
from .image import IMAGE_EXTENSIONS, ImageReadError, to_rgb

__all__ = [
    "HFImageDataset",
    "HFStream",
    "SkippingDataset",
    "WebDatasetShards",
    "build_hf_datasets",
    "build_wds_datasets",
    "decode_rgb",
]

log = logging.getLogger(__name__)

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_LABEL_EXTS = ("cls", "label", "class", "cls.txt")


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """Decode image bytes completely into an 8-bit RGB PIL image.

    Raises:
        ImageReadError: the bytes are not a readable image (the message names ``name``).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageReadError(f"cannot read image {name}: {msg}") from e


# ------------------------------------------------------------------------------------------------ Hugging Face
def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data.kind=hf needs the Hugging Face datasets library: pip install 'davit[datasets]'") from e
    return datasets


class HFImageDataset(SkippingDataset):
    """A Hugging Face ``datasets.Dataset`` of images and integer labels as ``(transform(rgb_image), label)``.

    The image column is read undecoded (bytes) and decoded here, so one corrupt image is skipped and counted
    instead of stopping the epoch.

    Args:
        ds: the split (map-style, e.g. from ``load_from_disk`` or ``load_dataset``).
        transform: PIL RGB image -> tensor; None returns the PIL image.
        image_key: the image column; ``""`` picks ``image`` or ``img``.
        label_key: the integer label column.
        substitute_unreadable: see :class:`SkippingDataset`.
    """

    def __init__(
        self,
        ds: Any,
        transform: Callable[[Image.Image], Any] | None = None,
        image_key: str = "",
        label_key: str = "label",
        substitute_unreadable: bool = True,
    ) -> None:
        super().__init__(transform, substitute_unreadable)
        self.ds, self.image_key, self.classes = _image_columns(ds, image_key, label_key)
        self.label_key = label_key
        if not self.classes:
            labels = self.ds[label_key]
            self.classes = [str(i) for i in range(int(max(labels)) + 1)] if len(labels) else []

    def __len__(self) -> int:
        return len(self.ds)

    def name(self, index: int) -> str:
        return f"sample {index}"

    def read(self, index: int) -> tuple[Image.Image, int]:
        row = self.ds[index]
        return _decode_row(row[self.image_key], f"sample {index}"), int(row[self.label_key])


def _decode_row(img: Any, name: str) -> Image.Image:
    """An image cell of a ``datasets`` row (undecoded ``{"bytes", "path"}`` or a PIL image) as RGB."""
    if isinstance(img, Image.Image):
        return to_rgb(img)
    if isinstance(img, dict):
        data = img.get("bytes")
        if data is None and img.get("path"):
            data = Path(img["path"]).read_bytes()
        if data is None:
            raise ImageReadError(f"{name} has an empty image")
        return decode_rgb(data, img.get("path") or name)
    raise ImageReadError(f"{name}: the image column holds a {type(img).__name__}, not an image")


def _image_columns(ds: Any, image_key: str, label_key: str) -> tuple[Any, str, list[str]]:
    """``(ds with the image column undecoded, image_key, class names)``; checks the columns exist."""
    datasets = _require_datasets()
    cols = list(ds.column_names or ds.features.keys())
    image_key = image_key or next((c for c in ("image", "img") if c in cols), "")
    if image_key not in cols:
        raise ValueError(f"the dataset has no image column (columns: {', '.join(cols)}); set data.image_key")
    if label_key not in cols:
        raise ValueError(f"the dataset has no {label_key!r} column (columns: {', '.join(cols)}); set data.label_key")
    if isinstance(ds.features[image_key], datasets.Image):
        # Undecoded bytes: a corrupt image is then skipped here instead of failing inside datasets.
        ds = ds.cast_column(image_key, datasets.Image(decode=False))
    label_feat = ds.features[label_key]
    names = list(label_feat.names) if isinstance(label_feat, datasets.ClassLabel) else []
    return ds.select_columns([image_key, label_key]), image_key, names


class HFStream(IterableDataset):
    """A streamed ``datasets.IterableDataset`` split with a deterministic, resumable, rank- and worker-sharded order.

    The training loop calls :meth:`configure` once and :meth:`set_epoch` before each epoch (as on its sampler).
    An unreadable sample is counted and replaced by the worker's previous readable one (or, at the very start, the
    next), so every batch keeps its size and position.

    Args:
        ds: the streamed split (``load_dataset(..., streaming=True)[split]``).
        length: samples per epoch (from the dataset's metadata, or counted once).
        transform: PIL RGB image -> tensor.
        image_key: the image column.
        label_key: the label column.
        classes: the class names.
        buffer_size: ``datasets``' shuffle buffer (the order also shuffles the shards).
    """

    def __init__(
        self,
        ds: Any,
        length: int,
        transform: Callable[[Image.Image], Any] | None,
        image_key: str,
        label_key: str,
        classes: list[str],
        buffer_size: int = 1000,
    ) -> None:
        self.ds, self.n, self.transform = ds, length, transform
        self.image_key, self.label_key, self.classes = image_key, label_key, classes
        self.buffer_size = buffer_size
        self.seed, self.rank, self.world, self.batch_size = 0, 0, 1, 1
        self.epoch, self.start = 0, 0
        self._skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def num_skipped(self) -> int:
        """Unreadable-sample encounters so far (all workers, all epochs)."""
        return int(self._skipped.item())

    def __len__(self) -> int:
        return self.n

    def configure(self, *, seed: int, rank: int, world: int, batch_size: int) -> None:
        """The run's seed, this process's rank among ``world``, and the per-process batch size."""
        self.seed, self.rank, self.world, self.batch_size = seed, rank, world, batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its ``start``-th sample (of this rank's share)."""
        self.epoch, self.start = epoch, start

    def _rank_rows(self) -> Any:
        """``(global position, row)`` of this rank's share of the epoch, in order, truncated to equal counts."""
        kw: dict[str, Any] = {}
        if "max_buffer_input_shards" in inspect.signature(self.ds.shuffle).parameters:
            # One shard at a time: interleaving shards runs reader threads whose shutdown sleeps 5 s (datasets 4+).
            kw["max_buffer_input_shards"] = 1
        stream = self.ds.shuffle(seed=(self.seed * 100_003 + self.epoch) % 2**32, buffer_size=self.buffer_size, **kw)
        per_rank = self.n // self.world
        g = 0
        # .iter(), not iter(): inside a DataLoader worker, iter() would hand each worker only some of the shards;
        # here every worker reads the whole order and builds its own batches of it.
        for batch in stream.iter(batch_size=256):
            for i in range(len(batch[self.label_key])):
                if g >= per_rank * self.world:
                    return
                if g % self.world == self.rank:
                    yield g, {self.image_key: batch[self.image_key][i], self.label_key: batch[self.label_key][i]}
                g += 1

    def __iter__(self) -> Any:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        last: tuple[Image.Image, int] | None = None
        owed = 0
        for k, (g, row) in enumerate(self._rank_rows()):
            if k < self.start or ((k - self.start) // self.batch_size) % workers != wid:
                continue  # another worker's batch, or consumed before the resume: read, not decoded
            try:
                item = (_decode_row(row[self.image_key], f"stream sample {g}"), int(row[self.label_key]))
            except ImageReadError as e:
                self._skipped += 1
                log.warning("skipping unreadable sample (%s); %d skipped so far", e, self.num_skipped)
                if last is None:
                    owed += 1
                    continue
                item = last
            last = item
            for _ in range(owed + 1):
                yield self._transform(item, g)
            owed = 0

    def _transform(self, item: tuple[Image.Image, int], g: int) -> tuple[Any, int]:
        img, label = item
        if self.transform is None:
            return img, label
        # Augmentation seeded per sample: independent of workers and of where the run resumed.
        seed = hash((self.seed, self.epoch, g)) & 0x7FFFFFFF
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            return self.transform(img), label
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _load_hf(root: str, streaming: bool = False) -> Any:
    """A ``DatasetDict`` (or Dataset) from a save_to_disk folder, a folder of data files, or a hub name."""
    datasets = _require_datasets()
    p = Path(root).expanduser()
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return datasets.load_from_disk(str(p))  # memory-mapped already: streamed below by to_iterable_dataset
        return datasets.load_dataset(str(p), streaming=streaming)
    if p.exists():
        raise ValueError(f"data.root={root} is a file; pass the dataset folder (save_to_disk or parquet files)")
    if root.count("/") != 1 or root.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"data.root={root}: no such folder, and not a hub name (user/dataset); for data.kind=hf set it to a "
            "save_to_disk folder, a folder of parquet files, or a Hugging Face hub dataset name"
        )
    return datasets.load_dataset(root, streaming=streaming)


def _split(dd: Any, name: str, root: str) -> Any:
    if not hasattr(dd, "keys"):  # a single Dataset: it is the training split
        if name in ("train", ""):
            return dd
        raise ValueError(f"{root} holds one split only; set data.val_dir='' or save a DatasetDict with {name!r}")
    keys = list(dd.keys())
    for cand in (name, "validation" if name == "val" else None):
        if cand and cand in keys:
            return dd[cand]
    raise ValueError(f"{root} has no split {name!r} (splits: {', '.join(keys)}); set data.train_dir / data.val_dir")


def _stream(split: Any, cfg: Any, transform: Callable) -> HFStream:
    datasets = _require_datasets()
    n = None
    if isinstance(split, datasets.Dataset):
        n = len(split)
        split = split.to_iterable_dataset(num_shards=min(len(split), 64))
    else:
        info = split.info.splits.get(split.split) if split.info.splits and split.split else None
        n = info.num_examples if info is not None and info.num_examples else None
    ds, image_key, classes = _image_columns(split, cfg.image_key, cfg.label_key)
    if n is None or not classes:
        log.info("counting the streamed split once (its size is not in the dataset's metadata)")
        labels = [int(r[cfg.label_key]) for r in ds.select_columns([cfg.label_key])]
        n = len(labels)
        classes = classes or [str(i) for i in range(max(labels) + 1)]
    return HFStream(ds, n, transform, image_key, cfg.label_key, classes)


def _materialize(split: Any, image_key: str) -> Any:
    """A streamed split as a map-style Dataset (evaluation shards its set by index): only this split is read, once,
    into the ``datasets`` cache; a map-style split is returned as is."""
    datasets = _require_datasets()
    if isinstance(split, datasets.Dataset):
        return split
    key = image_key or next((c for c in ("image", "img") if c in split.features), "")
    if isinstance(split.features.get(key), datasets.Image):
        split = split.cast_column(key, datasets.Image(decode=False))  # copy the encoded bytes, do not re-encode
    log.info("reading the streamed evaluation split into the datasets cache (once)")

    def rows() -> Any:
        yield from split

    return datasets.Dataset.from_generator(rows, features=split.features)


def build_hf_datasets(
    cfg: Any, train_tf: Callable, eval_tf: Callable
) -> tuple[HFImageDataset | HFStream, HFImageDataset | None, list[str]]:
    """``(train, val, class_names)`` of a ``data.kind=hf`` config (see the module docstring)."""
    if not cfg.root:
        raise FileNotFoundError("data.root is empty: set it to a datasets folder or a hub name (data.kind=hf)")
    if cfg.streaming:
        dd = _load_hf(cfg.root, streaming=True)
        train: HFImageDataset | HFStream = _stream(_split(dd, cfg.train_dir, cfg.root), cfg, train_tf)
    else:
        dd = _load_hf(cfg.root)
        train = HFImageDataset(_split(dd, cfg.train_dir, cfg.root), train_tf, cfg.image_key, cfg.label_key)
    val = None
    if cfg.val_dir:
        val_split = _materialize(_split(dd, cfg.val_dir, cfg.root), cfg.image_key)
        val = HFImageDataset(val_split, eval_tf, cfg.image_key, cfg.label_key)
        if len(val.classes) > len(train.classes):
            train.classes = val.classes
    return train, val, list(train.classes)


# ------------------------------------------------------------------------------------------------- webdataset
def _shard_paths(root: Path, part: str) -> list[Path]:
    folder = root / part
    if folder.is_dir():
        paths = sorted(folder.glob("*.tar"))
    else:
        paths = sorted(root.glob(part)) if part else sorted(root.glob("*.tar"))
    if not paths:
        raise FileNotFoundError(
            f"no .tar shards at {folder} (data.kind=wds reads root/<train_dir>/*.tar or the glob root/<train_dir>)"
        )
    return paths


def _index_shard(path: Path) -> tuple[list[tuple[str, int, int, str]], list[int], int]:
    """``(samples, labels, dropped)``: per sample (key, data offset, size, image ext), its label, and how many
    members groups were unusable (no image, no label, or a truncated tar tail)."""
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    dropped = 0
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        try:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(m.name), stem)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                ext = ext.lower()
                if ext in _IMAGE_EXTS:
                    groups[key]["img"] = (m.offset_data, m.size, ext)
                elif ext in _LABEL_EXTS:
                    raw = tar.extractfile(m).read()  # type: ignore[union-attr]
                    try:
                        groups[key]["cls"] = int(raw.decode().strip())
                    except ValueError:
                        groups[key]["bad"] = True
        except (tarfile.TarError, OSError) as e:
            log.warning("shard %s is truncated or corrupt after %d samples (%s); using what precedes it", path,
                        len(order), e)  # fmt: skip
            dropped += 1
    samples, labels = [], []
    for key in order:
        g = groups[key]
        if "img" not in g or "cls" not in g or g.get("bad"):
            dropped += 1
            continue
        samples.append((key, *g["img"]))
        labels.append(g["cls"])
    return samples, labels, dropped


class WebDatasetShards(SkippingDataset):
    """Webdataset tar shards as a map-style dataset of ``(transform(rgb_image), label)``.

    Args:
        shards: the tar files, in a fixed order (their order defines the sample indices).
        transform: PIL RGB image -> tensor; None returns the PIL image.
        class_names: names by label; default ``"0".."max label"``.
        substitute_unreadable: see :class:`SkippingDataset`.
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str]],
        transform: Callable[[Image.Image], Any] | None = None,
        class_names: Sequence[str] | None = None,
        substitute_unreadable: bool = True,
    ) -> None:
        super().__init__(transform, substitute_unreadable)
        self.shards = [str(s) for s in shards]
        self.samples: list[tuple[int, int, int]] = []  # (shard, offset, size)
        self.keys: list[str] = []
        self.targets: list[int] = []
        dropped = 0
        for si, path in enumerate(self.shards):
            samples, labels, d = _index_shard(Path(path))
            dropped += d
            self.samples.extend((si, off, size) for _, off, size, _ in samples)
            self.keys.extend(k for k, *_ in samples)
            self.targets.extend(labels)
        if dropped:
            log.warning("%d incomplete sample(s) in %d shard(s) were left out (no image or no label)", dropped,
                        len(self.shards))  # fmt: skip
        self.num_incomplete = dropped
        if not self.samples:
            raise ValueError(
                f"no samples with an image and a .cls label in {len(self.shards)} shard(s) ({self.shards[0]})"
            )
        n_cls = max(self.targets) + 1
        self.classes = list(class_names) if class_names is not None else [str(i) for i in range(n_cls)]
        if len(self.classes) < n_cls:
            raise ValueError(f"labels go up to {n_cls - 1} but only {len(self.classes)} class names are given")
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return f"{self.keys[index]} in {self.shards[self.samples[index][0]]}"

    def read(self, index: int) -> tuple[Image.Image, int]:
        si, off, size = self.samples[index]
        # One open handle per shard per process (workers get their own after the fork: the dict is copied empty).
        f = self._files.get(si)
        if f is None:
            f = self._files[si] = open(self.shards[si], "rb")  # noqa: SIM115
        f.seek(off)
        return decode_rgb(f.read(size), self.name(index)), self.targets[index]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def build_wds_datasets(
    cfg: Any, train_tf: Callable, eval_tf: Callable
) -> tuple[WebDatasetShards, WebDatasetShards | None, list[str]]:
    """``(train, val, class_names)`` of a ``data.kind=wds`` config (see the module docstring)."""
    if not cfg.root:
        raise FileNotFoundError("data.root is empty: set it to the folder holding the shards (data.kind=wds)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root} (data.kind=wds: root/<train_dir>/*.tar)")
    names_file = root / "classes.txt"
    names = [n for n in names_file.read_text().splitlines() if n] if names_file.is_file() else None
    train = WebDatasetShards(_shard_paths(root, cfg.train_dir), train_tf, names)
    val = None
    if cfg.val_dir:
        val = WebDatasetShards(_shard_paths(root, cfg.val_dir), eval_tf, names or train.classes)
    return train, val, list(train.classes)
