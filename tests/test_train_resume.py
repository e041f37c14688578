"""``davit train`` killed with SIGKILL and resumed gives the same final weights as an uninterrupted run (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from davit.engine.checkpoint import load_training_state
from davit.weights import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A micro DaViT on 16x16 digits with every source of randomness on: drop path (torch RNG), mixup/cutmix (numpy RNG),
# random-resized-crop augmentation in a DataLoader worker (per-sample seeds), EMA, gradient accumulation.
RECIPE = f"""
_base_: {ROOT / "configs/cls/digits.yaml"}
model:
  overrides: {{embed_dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], window_size: 4,
              drop_path_rate: 0.2}}
data: {{img_size: 16, mixup: 0.8, cutmix: 1.0, val_split: 0.6}}
train: {{epochs: 3, batch_size: 32, accum_steps: 2, ema: true, ema_decay: 0.99, workers: 1, threads: 1,
         log_every: 5}}
sched: {{warmup: 1}}
"""


def _davit(*args: str) -> list[str]:
    return [sys.executable, "-m", "davit", "train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(RECIPE)
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = subprocess.Popen(_davit("--config", str(cfg), "--out", str(ref_out)), env=_env(), stderr=subprocess.PIPE)
    cut = subprocess.Popen(_davit("--config", str(cfg), "--out", str(cut_out)), env=_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (cut_out / "last.pt").exists():
            assert cut.poll() is None, cut.stderr.read().decode()[-2000:] if cut.stderr else "run ended early"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        time.sleep(0.2)  # somewhere inside epoch 2 (or inside the saves that follow last.pt)
        cut.send_signal(signal.SIGKILL)
        cut.wait()
    finally:
        if cut.poll() is None:
            cut.kill()
    assert cut.returncode == -signal.SIGKILL
    assert not (cut_out / "summary.json").exists(), "the run finished before it was killed: nothing was tested"
    killed_at = load_training_state(cut_out / "last.pt")["progress"]["step"]
    assert 0 < killed_at < 3 * 11
    resumed = subprocess.run(
        _davit("--config", str(cfg), "--out", str(cut_out), "--resume"), env=_env(), capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-3000:] if ref.stderr else ""
    assert f"resumed from {cut_out / 'last.pt'}" in (cut_out / "log.txt").read_text()
    a, b = read_checkpoint(ref_out / "last.safetensors"), read_checkpoint(cut_out / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    sa, sb = load_training_state(ref_out / "last.pt"), load_training_state(cut_out / "last.pt")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sa["progress"]["step"] == sb["progress"]["step"] == 3 * 11


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_sigterm_save_and_exit_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(RECIPE.replace("epochs: 3", "epochs: 40"))
    out = tmp_path / "run"
    proc = subprocess.Popen(_davit("--config", str(cfg), "--out", str(out)), env=_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "last.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    state = load_training_state(out / "last.pt")
    assert state["progress"]["step"] > 11  # saved after the signal, mid-run, not the end-of-epoch-1 file
    assert sig.name in (out / "log.txt").read_text()
