"""DDP and FSDP on 2 CPU processes (gloo, torchrun): the same learning curve as 1 process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import davit
from davit.weights import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Deterministic per global step whatever the process count: no drop path or mixing (their RNG streams are per rank);
# the crop augmentation is seeded per sample, so it stays on.
RECIPE = f"""
_base_: {ROOT / "configs/cls/digits.yaml"}
model:
  overrides: {{embed_dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], window_size: 4,
              drop_path_rate: 0.0}}
data: {{img_size: 16}}
train: {{epochs: 0, iters: 16, eval_every: 8, batch_size: 32, workers: 0, threads: 1}}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _single(cfg: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "davit", "train", "--config", str(cfg), "--out", str(out)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _torchrun(cfg: Path, out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "davit", "train", "--config", str(cfg), "--out", str(out), "train.batch_size=16", *overrides]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + err).decode()[-4000:]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process at batch 32 and two DDP processes at batch 16, run side by side."""
    tmp = tmp_path_factory.mktemp("dist")
    cfg = tmp / "micro.yaml"
    cfg.write_text(RECIPE)
    outs = {"cfg": cfg, "single": tmp / "single", "ddp": tmp / "ddp"}
    for p in [_single(cfg, outs["single"]), _torchrun(cfg, outs["ddp"])]:
        _finish(p)
    return outs


def _same_curve(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [8, 16]
    for x, y in zip(ra, rb):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-3)
        assert abs(y["top1"] - x["top1"]) <= 0.3  # at most 1 of the 360 held-out digits
    assert ra[-1]["train_loss"] < ra[0]["train_loss"]
    wa, wb = read_checkpoint(a / "last.safetensors"), read_checkpoint(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-3, msg=k)


def test_ddp_two_processes_match_one_process(runs: dict[str, Path]) -> None:
    summary = json.loads((runs["ddp"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert "distributed: ddp, rank 0/2" in (runs["ddp"] / "log.txt").read_text()
    _same_curve(runs["single"], runs["ddp"])


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(runs: dict[str, Path]) -> None:
    runs["fsdp"] = runs["cfg"].parent / "fsdp"
    _finish(_torchrun(runs["cfg"], runs["fsdp"], "train.distributed=fsdp"))
    summary = json.loads((runs["fsdp"] / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "distributed: fsdp, rank 0/2" in (runs["fsdp"] / "log.txt").read_text()
    _same_curve(runs["single"], runs["fsdp"])
    # the gathered full weights rebuild a model from the file alone
    model = davit.create_model("davit_tiny", pretrained=str(runs["fsdp"] / "best.safetensors"))
    assert model.cfg.embed_dims == (8, 16, 32, 64) and model.cfg.num_classes == 10
