"""Experiment tracking: TensorBoard by default, W&B offline and MLflow to a local store, the scalars of metrics.jsonl
plus lr and throughput per interval, rank 0 only; curves.png has the lr panel."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from davit.config import LoopConfig, OptimConfig, SchedConfig
from davit.engine import fit
from davit.engine.loggers import build_loggers, resolve_logger_names


class Tiny:
    primary_metric = "acc"

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 2)

    def build_datasets(self) -> tuple[TensorDataset, TensorDataset]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        y = (x[:, 0] > 0).long()
        return TensorDataset(x, y), TensorDataset(x[:16], y[:16])

    def collate_fn(self) -> None:
        return None

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> None:
        return None

    def loss_fn(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(model(x), y)}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        x, y = next(iter(loader))
        return {"acc": float((model(x).argmax(-1) == y).float().mean() * 100)}


@dataclasses.dataclass(frozen=True)
class Cfg:
    optim: OptimConfig = OptimConfig(lr=0.1, lr_base_batch=0)
    sched: SchedConfig = SchedConfig(warmup=1, min_lr=1e-3)
    train: LoopConfig = LoopConfig(epochs=3, batch_size=16, workers=0, threads=1, log_every=2)
    out: str = ""
    resume: str = ""


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_default_run_writes_tensorboard_with_the_metrics_rows_and_intervals(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    fit(Cfg(out=str(tmp_path)), Tiny())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tb = _tb_scalars(tmp_path / "tensorboard")
    for key in ("train_loss", "acc", "lr", "images_per_second"):
        got = tb[f"epoch/{key}"]
        assert [s for s, _ in got] == [r["step"] for r in rows]
        assert [v for _, v in got] == pytest.approx([r[key] for r in rows], rel=1e-6)
    # per interval (log_every=2 of 12 steps): loss and lr at steps 2, 4, ..., 12; throughput from the second on
    assert [s for s, _ in tb["train/lr"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in tb["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert len(tb["train/images_per_second"]) >= 2 and all(v > 0 for _, v in tb["train/images_per_second"])
    lrs = [v for _, v in tb["train/lr"]]
    assert lrs[0] > lrs[-1]  # cosine decay is visible


def test_no_logger_when_off_or_not_rank_zero(tmp_path: Path) -> None:
    fit(Cfg(out=str(tmp_path / "off"), train=dataclasses.replace(Cfg.train, loggers=())), Tiny())
    assert not (tmp_path / "off" / "tensorboard").exists()
    assert build_loggers(["tensorboard", "wandb"], tmp_path, {}, enabled=False).backends == []


def test_logger_names_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="train.loggers"):
        LoopConfig(epochs=1, loggers=("neptune",))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ImportError, match=r"pip install 'davit\[loggers\]'"):
        resolve_logger_names(["wandb"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None)
    assert resolve_logger_names(["auto"]) == []  # auto without tensorboard installed: nothing, no error


def test_mlflow_logs_to_a_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = Cfg(out=str(tmp_path / "run"), train=dataclasses.replace(Cfg.train, loggers=("mlflow",), project="exp1"))
    fit(cfg, Tiny())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("exp1")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "16"
    acc = client.get_metric_history(run.info.run_id, "epoch/acc")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m.step for m in acc] == [r["step"] for r in rows]
    assert [m.value for m in acc] == pytest.approx([r["acc"] for r in rows])
    assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 6


def test_wandb_runs_offline_without_a_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = Cfg(out=str(tmp_path / "run"), train=dataclasses.replace(Cfg.train, loggers=("wandb",), epochs=1))
    fit(cfg, Tiny())
    (log_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb")
    deadline = time.monotonic() + 20
    # wandb's service process may still be writing the file when finish() returns
    while len(history := _wandb_history(log_file)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sorted(history) == [2, 4]
    assert history[4]["epoch/acc"] == pytest.approx(row["acc"]) and history[4]["epoch/lr"] == pytest.approx(row["lr"])
    assert "train/lr" in history[2] and "train/images_per_second" in history[4]


def _wandb_history(path: Path) -> dict[int, dict[str, Any]]:
    """The history records of an offline W&B run file (a LevelDB-style log of protobuf records in 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, buf, out = 7, b"", {}
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if (n == 0 and kind == 0) or pos + 7 + n > len(raw):  # end of data, or a chunk still being written
            break
        buf += raw[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                out[int(rec.history.step.num)] = items
    return out


def test_curves_png_has_the_lr_panel(tmp_path: Path) -> None:
    from davit.engine.curves import plot_curves

    hist = [{"epoch": e, "step": 10 * e, "train_loss": 2.0 / e, "top1": 10.0 * e, "lr": 1e-3 / e} for e in (1, 2, 3)]
    path = plot_curves(hist, tmp_path / "curves.png", "top1")
    from PIL import Image

    assert Image.open(path).size == (1400, 400)  # three panels: loss, evaluation, learning rate
