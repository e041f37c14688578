"""Detection under DDP (2 CPU processes, gloo, torchrun): each rank evaluates its shard and the COCO metrics are
computed on the gathered detections, so they equal a single-process evaluation of the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from davit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "det" / "synthetic_demo.yaml"


@pytest.mark.slow
def test_ddp_training_and_gathered_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["det", "make-synthetic", str(data), "--n", "16", "--n-val", "7", "--size", "96"]) == 0
    out = tmp_path / "ddp"
    overrides = [
        f"data.train_images={data / 'train'}",
        f"data.train_ann={data / 'annotations' / 'train.json'}",
        f"data.val_images={data / 'val'}",
        f"data.val_ann={data / 'annotations' / 'val.json'}",
        "data.train_sizes=[96]",
        "data.test_size=96",
        "train.iters=4",
        "train.eval_every=4",
        "train.batch_size=2",
        "sched.warmup=1",
        "sched.milestones=[3]",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "davit", "det", "train", "--config", str(DEMO), "--out", str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 and "segm_ap" in summary
    capsys.readouterr()
    ckpt = out / "best.safetensors"
    assert main(["det", "eval", "--config", str(out / "config.yaml"), "--checkpoint", str(ckpt)]) == 0
    single = json.loads(capsys.readouterr().out)
    # 7 validation images over 2 ranks (4 + 3): a shard lost or counted twice would change the figures.
    for k in ("bbox_ap", "bbox_ap50", "segm_ap"):
        assert single[k] == pytest.approx(summary[k], abs=1e-6), k
