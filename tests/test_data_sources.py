"""Hugging Face ``datasets`` folders and webdataset shards as training data: reading, corrupt samples, order, resume."""

from __future__ import annotations

import dataclasses
import io
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from davit.data import ClsDataConfig, build_classification_datasets
from davit.data.sources import WebDatasetShards
from davit.engine.fit import ResumableSampler, _SeededDataset

pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "fox"]
N_PER_CLASS = 6


def _png(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(split: str) -> list[tuple[bytes, int]]:
    base = 0 if split == "train" else 1000
    return [(_png(base + 10 * c + i), c) for c in range(len(CLASSES)) for i in range(N_PER_CLASS)]


def _hf_dict(corrupt: int | None = None):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    splits = {}
    for split in ("train", "validation"):
        rows = _samples(split)
        images = [{"bytes": b, "path": None} for b, _ in rows]
        if corrupt is not None and split == "train":
            images[corrupt] = {"bytes": b"\x89PNG not really", "path": None}
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": [c for _, c in rows]}, features=features)
    return datasets.DatasetDict(splits)


def _write_shards(folder: Path, rows: list[tuple[bytes, int]], per_shard: int) -> None:
    folder.mkdir(parents=True)
    for s in range(0, len(rows), per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:04d}.tar", "w") as tar:
            for i, (data, label) in enumerate(rows[s : s + per_shard], start=s):
                for name, payload in ((f"s{i:05d}.png", data), (f"s{i:05d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _cfg(kind: str, root: Path | str, **kw) -> ClsDataConfig:
    base = dict(kind=kind, root=str(root), img_size=16, crop_pct=1.0, auto_augment="", reprob=0.0, mixup=0.0,
                cutmix=0.0, scale=(0.5, 1.0))  # fmt: skip
    return ClsDataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("hf") / "pets"
    _hf_dict().save_to_disk(str(p))
    return p


def test_hf_save_to_disk_and_parquet_folder_give_the_same_samples(hf_disk: Path, tmp_path: Path) -> None:
    pq = tmp_path / "parquet"
    pq.mkdir()
    for split, ds in _hf_dict().items():
        ds.to_parquet(str(pq / f"{split}-00000-of-00001.parquet"))
    a_train, a_val, a_names = build_classification_datasets(_cfg("hf", hf_disk))
    b_train, b_val, b_names = build_classification_datasets(_cfg("hf", pq))
    assert a_names == b_names == CLASSES
    assert len(a_train) == len(b_train) == 18 and len(a_val) == len(b_val) == 18  # val -> "validation"
    for i in (0, 7, 17):
        xa, ya = a_val[i]
        xb, yb = b_val[i]
        assert ya == yb == i // N_PER_CLASS
        assert xa.shape == (3, 16, 16) and torch.equal(xa, xb)
    # the decoded pixels are the written ones (eval transform at full size: resize is the identity, then normalise)
    raw = a_val.read(5)[0]
    assert np.array_equal(np.asarray(raw), np.asarray(Image.open(io.BytesIO(_samples("val")[5][0])).convert("RGB")))


def test_hf_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    p = tmp_path / "bad"
    _hf_dict(corrupt=3).save_to_disk(str(p))
    train, _, _ = build_classification_datasets(_cfg("hf", p, val_dir=""))
    x, y = train[3]  # replaced by the next readable sample
    assert train.num_skipped == 1 and y == train.read(4)[1] and x.shape == (3, 16, 16)
    train[2]
    assert train.num_skipped == 1


def test_hf_errors_name_the_fix(hf_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no split 'holdout'.*splits: train, validation"):
        build_classification_datasets(_cfg("hf", hf_disk, val_dir="holdout"))
    with pytest.raises(ValueError, match="no 'target' column.*data.label_key"):
        build_classification_datasets(_cfg("hf", hf_disk, label_key="target"))
    with pytest.raises(FileNotFoundError, match="not a hub name"):
        build_classification_datasets(_cfg("hf", tmp_path / "missing" / "folder"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'davit\[datasets\]'"):
        build_classification_datasets(_cfg("hf", hf_disk))


def test_wds_shards_read_labels_names_and_skip_bad_samples(tmp_path: Path) -> None:
    rows = _samples("train")
    rows[4] = (b"not an image at all", rows[4][1])
    _write_shards(tmp_path / "train", rows, per_shard=5)
    _write_shards(tmp_path / "val", _samples("val"), per_shard=7)
    # a sample without its label is left out at indexing time
    with tarfile.open(tmp_path / "train" / "shard-0003.tar", "a") as tar:
        info = tarfile.TarInfo("orphan.png")
        payload = _png(99)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    train, val, names = build_classification_datasets(_cfg("wds", tmp_path))
    assert names == CLASSES and len(train) == 18 and len(val) == 18 and train.num_incomplete == 1
    assert len(train.shards) == 4 and len(val.shards) == 3
    assert [val[i][1] for i in range(18)] == [i // N_PER_CLASS for i in range(18)]
    img, label = val.read(9)
    assert label == 1
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(_samples("val")[9][0])).convert("RGB")))
    _, y = train[4]
    assert train.num_skipped == 1 and y == rows[5][1]


def test_wds_order_resume_and_rank_shards_are_exact(tmp_path: Path) -> None:
    _write_shards(tmp_path / "train", _samples("train"), per_shard=4)
    train, _, _ = build_classification_datasets(_cfg("wds", tmp_path, val_dir=""))
    assert isinstance(train, WebDatasetShards)
    ds = _SeededDataset(train)

    def epoch(start: int = 0, rank: int = 0, world: int = 1, epoch: int = 1) -> list[tuple[torch.Tensor, int]]:
        s = ResumableSampler(len(train), seed=7, rank=rank, world=world)
        s.set_epoch(epoch, start)
        return [ds[k] for k in s]

    full = epoch()
    resumed = epoch(start=5)
    assert len(resumed) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(full[5:], resumed))  # augmentations too
    other = epoch(epoch=2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other))
    s0 = ResumableSampler(len(train), seed=7, rank=0, world=2, with_seed=False)
    s1 = ResumableSampler(len(train), seed=7, rank=1, world=2, with_seed=False)
    s0.set_epoch(1)
    s1.set_epoch(1)
    i0, i1 = list(s0), list(s1)
    assert len(i0) == len(i1) == 9 and not set(i0) & set(i1) and set(i0) | set(i1) == set(range(18))


def test_training_on_a_datasets_folder_resumes_bit_exactly(hf_disk: Path, tmp_path: Path) -> None:
    _train_stop_resume(_cfg("hf", hf_disk), tmp_path)


def test_training_on_webdataset_shards_resumes_bit_exactly(tmp_path: Path) -> None:
    _write_shards(tmp_path / "wds" / "train", _samples("train"), per_shard=5)
    _write_shards(tmp_path / "wds" / "val", _samples("val"), per_shard=5)
    _train_stop_resume(_cfg("wds", tmp_path / "wds"), tmp_path)


def _train_stop_resume(data: ClsDataConfig, tmp_path: Path) -> None:
    """A run stopped by SIGTERM mid-epoch and resumed ends with the weights of an uninterrupted run."""
    from davit.config import LoopConfig, ModelConfig, OptimConfig, SchedConfig
    from davit.engine.fit import fit
    from davit.tasks.classification import ClassificationTask, ClsConfig

    model = ModelConfig(
        name="davit_tiny",
        overrides={"embed_dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), "window_size": 2},
    )
    train = LoopConfig(epochs=2, batch_size=4, workers=0, threads=1, log_every=1000)
    cfg = ClsConfig(model=model, data=data, optim=OptimConfig(lr=1e-3, lr_base_batch=4), train=train,
                    sched=SchedConfig(warmup=0), out=str(tmp_path / "ref"))  # fmt: skip

    class StopAt(ClassificationTask):
        calls = 0

        def loss_fn(self, model, batch):  # type: ignore[no-untyped-def]
            StopAt.calls += 1
            if StopAt.calls == 6:  # mid epoch 2 (4 steps per epoch)
                signal.raise_signal(signal.SIGTERM)
            return super().loss_fn(model, batch)

    ref = fit(cfg, ClassificationTask(cfg))
    assert ref["steps"] == 8 and not ref["interrupted"]
    cut_cfg = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    stopped = fit(cut_cfg, StopAt(cut_cfg))
    assert stopped["interrupted"] and stopped["steps"] == 6
    resumed = fit(dataclasses.replace(cut_cfg, resume="auto"), ClassificationTask(cut_cfg))
    assert resumed["steps"] == 8 and not resumed["interrupted"]
    from davit.weights import read_checkpoint

    a = read_checkpoint(tmp_path / "ref" / "last.safetensors")
    b = read_checkpoint(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pq = tmp_path_factory.mktemp("pq")
    for split, ds in _hf_dict(corrupt=None).items():
        # several files per split: the stream shuffles shards as well as samples
        for k in range(3):
            ds.shard(3, k, contiguous=True).to_parquet(str(pq / f"{split}-{k:05d}-of-00003.parquet"))
    return pq


def _stream_epoch(train, *, rank=0, world=1, batch=2, workers=0, epoch=1, start=0) -> list[tuple[torch.Tensor, int]]:
    from torch.utils.data import DataLoader

    train.configure(seed=3, rank=rank, world=world, batch_size=batch)
    train.set_epoch(epoch, start)
    out = []
    for x, y in DataLoader(train, batch_size=batch, num_workers=workers, drop_last=True):
        out.extend(zip(x, y.tolist()))
    return out


def test_stream_order_is_a_function_of_seed_epoch_rank_and_resumes(parquet_dir: Path) -> None:
    from davit.data.sources import HFStream

    train, val, names = build_classification_datasets(_cfg("hf", parquet_dir, streaming=True))
    assert isinstance(train, HFStream) and len(train) == 18 and names == CLASSES and len(val) == 18
    # the evaluation split, streamed then read into the cache, is the one a plain load gives
    _, plain_val, _ = build_classification_datasets(_cfg("hf", parquet_dir))
    assert all(torch.equal(val[i][0], plain_val[i][0]) and val[i][1] == plain_val[i][1] for i in (0, 9, 17))
    full = _stream_epoch(train)
    assert len(full) == 18 and sorted(y for _, y in full) == sorted(i // N_PER_CLASS for i in range(18))
    assert [y for _, y in full] != sorted(y for _, y in full)  # shuffled
    again = _stream_epoch(train, workers=2)  # two workers build alternate batches: the same sequence
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(full, again)) and len(again) == 18
    resumed = _stream_epoch(train, start=6)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(full[6:], resumed)) and len(resumed) == 12
    other = _stream_epoch(train, epoch=2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other))
    # two ranks: disjoint shares of the same epoch, equal counts, every sample once
    r0, r1 = _stream_epoch(train, rank=0, world=2), _stream_epoch(train, rank=1, world=2)
    assert len(r0) == len(r1) == 8  # 9 per rank, batches of 2, the partial batch dropped
    keys = lambda items: [(y, float(x.sum())) for x, y in items]  # noqa: E731
    assert not set(keys(r0)) & set(keys(r1))


def test_stream_skips_a_corrupt_image_and_keeps_batch_positions(tmp_path: Path) -> None:
    _hf_dict(corrupt=2)["train"].to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    train, _, _ = build_classification_datasets(_cfg("hf", tmp_path, streaming=True, val_dir=""))
    items = _stream_epoch(train, batch=3)
    assert len(items) == 18 and train.num_skipped == 1


def test_training_on_a_stream_resumes_bit_exactly(parquet_dir: Path, tmp_path: Path) -> None:
    _train_stop_resume(_cfg("hf", parquet_dir, streaming=True), tmp_path)


def test_cli_names_the_missing_extra_in_one_line(
    hf_disk: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from davit.cli import main

    monkeypatch.setitem(sys.modules, "datasets", None)
    rc = main(["train", "--config", str(Path(__file__).parents[1] / "configs/cls/digits.yaml"), "data.kind=hf",
               f"data.root={hf_disk}", "train.loggers=[]"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("davit train: error:") and "pip install 'davit[datasets]'" in err[-1]


@pytest.mark.slow
def test_stream_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    """2 DDP processes at batch 16 on a streamed split see, per step, the samples 1 process sees at batch 32."""
    import datasets
    from sklearn.datasets import load_digits
    from test_train_distributed import RECIPE, _finish, _same_curve, _single, _torchrun

    d = load_digits()
    images = [Image.fromarray((x * 255 / 16).astype(np.uint8)).convert("RGB") for x in d.images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))})
    for split, idx in (("train", range(0, 1437)), ("validation", range(1437, 1797))):
        rows = {"image": [images[i] for i in idx], "label": [int(d.target[i]) for i in idx]}
        ds = datasets.Dataset.from_dict(rows, features=features)
        for k in range(4):
            ds.shard(4, k, contiguous=True).to_parquet(str(tmp_path / "pq" / f"{split}-{k:05d}-of-00004.parquet"))
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(RECIPE + f"data: {{img_size: 16, kind: hf, root: {tmp_path / 'pq'}, streaming: true}}\n")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for p in [_single(cfg, single), _torchrun(cfg, ddp)]:
        _finish(p)
    import yaml

    assert yaml.safe_load((ddp / "config.yaml").read_text())["data"]["streaming"] is True
    _same_curve(single, ddp)


def test_without_substitution_an_unreadable_sample_is_none(tmp_path: Path) -> None:
    rows = _samples("val")
    rows[2] = (b"broken", rows[2][1])
    _write_shards(tmp_path / "val", rows, per_shard=6)
    ds = WebDatasetShards(sorted((tmp_path / "val").glob("*.tar")), substitute_unreadable=False)
    assert ds[2] is None and ds.num_skipped == 1 and ds[3][1] == rows[3][1]
