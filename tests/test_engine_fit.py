"""The training loop on a toy task: the loss goes down, outputs are written, interrupt + resume is bit-exact,
a NaN loss stops with the step named, checkpoints are atomic."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from davit.config import LoopConfig, OptimConfig, SchedConfig
from davit.engine import NonFiniteLossError, fit
from davit.engine.checkpoint import load_training_state, save_training_state
from davit.engine.distributed import all_reduce_sum
from davit.weights import read_checkpoint


class ToyData(Dataset):
    """4 Gaussian classes in 8-D; training items get fresh noise per access (an 'augmentation' using the RNG)."""

    def __init__(self, n: int, augment: bool, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 2
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, 8, generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i] + (0.3 * torch.randn(8) if self.augment else 0)
        return x, self.y[i]


class ToyTask:
    primary_metric = "acc"
    class_names = ["a", "b", "c", "d"]

    def __init__(self, nan_at_step: int | None = None, signal_at_micro: int | None = None) -> None:
        self.nan_at_step, self.signal_at_micro = nan_at_step, signal_at_micro
        self.micro = 0

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 4))

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        return ToyData(256, True, 1), ToyData(128, False, 2)

    def collate_fn(self) -> None:
        return None

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> None:
        return None

    def loss_fn(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        self.micro += 1
        loss = F.cross_entropy(model(x), y)
        if self.nan_at_step is not None and self.micro == self.nan_at_step:
            loss = loss * float("nan")
        if self.signal_at_micro is not None and self.micro == self.signal_at_micro:
            signal.raise_signal(signal.SIGINT)
        return {"loss": loss}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        hits = torch.zeros(2)
        for x, y in loader:
            hits += torch.tensor([(model(x).argmax(-1) == y).sum().item(), len(y)])
        all_reduce_sum(hits)
        return {"acc": 100.0 * float(hits[0] / hits[1])}


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    optim: OptimConfig = OptimConfig(lr=1e-2, lr_base_batch=0, weight_decay=0.01)
    sched: SchedConfig = SchedConfig(warmup=1, min_lr=1e-4)
    train: LoopConfig = LoopConfig(epochs=6, batch_size=32, workers=0, seed=7, threads=1, log_every=5)
    out: str = ""
    resume: str = ""


def _cfg(out: Path, **train: Any) -> ToyConfig:
    return ToyConfig(train=dataclasses.replace(ToyConfig.train, **train), out=str(out))


def _weights(out: Path) -> dict[str, Tensor]:
    return read_checkpoint(out / "last.safetensors")


def test_loss_goes_down_and_every_output_is_written(tmp_path: Path) -> None:
    summary = fit(_cfg(tmp_path), ToyTask())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert summary["acc"] > 90 and summary["best_acc"] >= summary["acc"]
    assert summary["epochs"] == 6 and summary["steps"] == 6 * 8 and summary["images_per_second"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 48
    for name in ("config.yaml", "log.txt", "last.pt", "last.safetensors", "best.safetensors", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epoch 6/6" in (tmp_path / "log.txt").read_text()
    state = load_training_state(tmp_path / "last.pt")
    assert state["progress"]["step"] == 48 and state["progress"]["epoch"] == 6
    assert not list(tmp_path.glob(".*.tmp"))


def test_interrupt_then_resume_is_bit_exact(tmp_path: Path) -> None:
    # EMA and gradient accumulation on, so their state must survive too; stop mid-epoch 2 (4 steps per epoch).
    opts = dict(epochs=4, ema=True, ema_decay=0.9, accum_steps=2)
    ref = fit(_cfg(tmp_path / "ref", **opts), ToyTask())
    cut = fit(_cfg(tmp_path / "cut", **opts), ToyTask(signal_at_micro=13))
    assert cut["interrupted"] and cut["stopped_by"] == "SIGINT"
    assert load_training_state(tmp_path / "cut" / "last.pt")["progress"]["step"] == 7  # after micro-batch 14
    resumed = fit(dataclasses.replace(_cfg(tmp_path / "cut", **opts), resume="auto"), ToyTask())
    assert not resumed["interrupted"] and resumed["steps"] == ref["steps"] == 16
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_a = load_training_state(tmp_path / "ref" / "last.pt")
    full_b = load_training_state(tmp_path / "cut" / "last.pt")
    for k in full_a["model"]:
        assert torch.equal(full_a["model"][k], full_b["model"][k]), k
    assert resumed["acc"] == ref["acc"]


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    fit_cfg = _cfg(tmp_path, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"step 11 \(epoch 2") as err:
        fit(fit_cfg, ToyTask(nan_at_step=11))
    assert "last.pt" in str(err.value)
    state = load_training_state(tmp_path / "last.pt")  # the end of epoch 1, readable
    assert state["progress"]["step"] == 8 and state["progress"]["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_training_state(path, {"model": {"w": torch.arange(4.0)}, "progress": {"step": 1}})
    before = path.read_bytes()

    def disk_full(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    from davit.errors import DiskFullError

    with pytest.raises(DiskFullError, match="the disk is full"):  # one clear line, not the OSError's traceback
        save_training_state(path, {"model": {"w": torch.zeros(4)}, "progress": {"step": 2}})
    assert path.read_bytes() == before
    assert load_training_state(path)["progress"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_resume_refuses_a_different_run_length(tmp_path: Path) -> None:
    from davit.config import ConfigError

    fit(_cfg(tmp_path, epochs=1), ToyTask())
    with pytest.raises(ConfigError, match="same data, batch size"):
        fit(dataclasses.replace(_cfg(tmp_path, epochs=1, batch_size=16), resume="auto"), ToyTask())
    with pytest.raises(FileNotFoundError, match="resume checkpoint not found"):
        fit(dataclasses.replace(_cfg(tmp_path / "x", epochs=1), resume=str(tmp_path / "nope.pt")), ToyTask())


def test_iteration_based_run_evaluates_every_interval(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, epochs=0, iters=20, eval_every=8)
    summary = fit(dataclasses.replace(cfg, sched=SchedConfig(name="poly", warmup=4, min_lr=0.0)), ToyTask())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 16, 20]
    assert all("acc" in r for r in rows)
    assert summary["steps"] == 20 and "epochs" not in summary  # an iteration run counts steps, not 2.5 epochs
    assert summary["best_step"] in (8, 16, 20) and "best_epoch" not in summary
    assert rows[-1]["lr"] < rows[0]["lr"]


def test_fp16_autocast_keeps_its_grad_scaler_in_the_checkpoint(tmp_path: Path) -> None:
    summary = fit(_cfg(tmp_path, epochs=2, amp="fp16"), ToyTask())
    assert summary["acc"] > 50
    scaler = load_training_state(tmp_path / "last.pt")["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler


def test_without_validation_set_best_follows_last(tmp_path: Path) -> None:
    class NoVal(ToyTask):
        def build_datasets(self) -> tuple[Dataset, None]:
            return ToyData(256, True, 1), None

    summary = fit(_cfg(tmp_path, epochs=2), NoVal())
    assert summary["best_acc"] is None and "acc" not in summary
    assert read_checkpoint(tmp_path / "best.safetensors").keys() == _weights(tmp_path).keys()
    assert all("train_loss" in json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines())
