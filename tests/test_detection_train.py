"""End to end on the synthetic shapes: ``davit det train`` (loss falls, AP rises above an untrained model), then
``davit det eval`` and ``davit det predict`` on the run it wrote."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from davit.cli import main
from davit.tasks.detection.task import DetTask, load_det_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "det" / "synthetic_demo.yaml"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Small detectors on a shared CPU: OpenMP threads spin-wait for each other; one thread is several times faster.
    torch.set_num_threads(1)


def _overrides(data: Path) -> list[str]:
    return [
        f"data.train_images={data / 'train'}",
        f"data.train_ann={data / 'annotations' / 'train.json'}",
        f"data.val_images={data / 'val'}",
        f"data.val_ann={data / 'annotations' / 'val.json'}",
        "model.overrides={embed_dims: [16, 32, 64, 128], depths: [1, 1, 1, 1], num_heads: [1, 2, 4, 8], "
        "window_size: 4, drop_path_rate: 0.0}",
        "detector.fpn_channels=48",
        "detector.mask_channels=32",
        "data.train_sizes=[112]",
        "data.test_size=112",
        "data.max_size=200",
        "data.crop_scales=[112,128]",
        "data.crop_range=[80,128]",
        "train.iters=40",
        "train.eval_every=40",
        "train.log_every=10",
        "sched.warmup=5",
        "sched.milestones=[35]",
        "optim.lr=2e-3",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("det_e2e")
    assert main(["det", "make-synthetic", str(root / "data"), "--n", "48", "--n-val", "8", "--size", "128"]) == 0
    overrides = _overrides(root / "data")
    # The metric of the same (seeded) network before training: what "above chance" is measured against.
    cfg = load_det_config(DEMO, overrides)
    task = DetTask(cfg)
    torch.manual_seed(cfg.train.seed)
    untrained = task.build_model()
    _, val = task.build_datasets()
    from torch.utils.data import DataLoader

    before = task.evaluate(untrained, DataLoader(val, batch_size=4, collate_fn=task.collate_fn()))
    out = root / "run"
    assert main(["det", "train", "--config", str(DEMO), "--out", str(out), *overrides]) == 0
    return {"root": root, "out": out, "before": before, "overrides": overrides}


def test_training_lowers_loss_and_raises_ap(run: dict[str, Any]) -> None:
    out = run["out"]
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "summary.json", "last.pt", "best.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary_metric"] == "bbox_ap" and summary["steps"] == 40
    log = (out / "log.txt").read_text()
    losses = [
        float(line.split(" loss ")[1].split()[0]) for line in log.splitlines() if "step" in line and " loss " in line
    ]
    assert len(losses) == 4 and sum(losses[-2:]) / 2 < 0.8 * losses[0], losses
    before, after = run["before"], summary
    # 40 steps from scratch on a CPU: far from converged, but many times the untrained network's AP.
    assert after["bbox_ap50"] > max(1.0, 5 * before["bbox_ap50"]), (before, after)
    assert after["bbox_ap"] > before["bbox_ap"] and after["segm_ap"] > before["segm_ap"]


def test_eval_cli_reproduces_the_run(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out = run["out"]
    capsys.readouterr()
    # no --config: the checkpoint records the run's config
    assert main(["det", "eval", "--checkpoint", str(out / "best.safetensors"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert metrics["bbox_ap"] == pytest.approx(summary["bbox_ap"], abs=1e-6)
    assert metrics["segm_ap"] == pytest.approx(summary["segm_ap"], abs=1e-6)


def test_predict_cli_draws_png(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    img = run["root"] / "data" / "val" / "000000.png"
    dst = run["root"] / "pred"
    args = ["det", "predict", str(img), "--checkpoint", str(run["out"] / "best.safetensors"), "--out", str(dst)]
    assert main([*args, "--score-thr", "0.05"]) == 0
    drawn = dst / "000000_det.png"
    assert drawn.is_file() and "000000_det.png" in capsys.readouterr().out
    a, b = Image.open(img).convert("RGB"), Image.open(drawn).convert("RGB")
    assert a.size == b.size and a.tobytes() != b.tobytes()  # something was drawn
    # With the highest threshold (1: a score is a probability) this barely trained model draws nothing: the PNG is
    # the image itself. Above 1 is a mistake (it would silently draw nothing), refused in one line.
    assert main([*args, "--score-thr", "1"]) == 0
    assert Image.open(drawn).convert("RGB").tobytes() == a.tobytes()
    with pytest.raises(SystemExit) as e:
        main([*args, "--score-thr", "1.01"])
    assert e.value.code == 2 and "between 0 and 1" in capsys.readouterr().err


def test_cli_user_errors_are_one_line(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(run["out"] / "best.safetensors")
    assert main(["det", "predict", str(tmp_path / "missing.png"), "--checkpoint", ckpt]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["det", "eval", "--config", str(DEMO), "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes((run["out"] / "best.safetensors").read_bytes())
    # a checkpoint away from its run folder still works: its header records the run's config
    img = str(run["root"] / "data" / "val" / "000000.png")
    assert main(["det", "predict", img, "--checkpoint", str(lonely), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "000000_det.png").is_file()
    capsys.readouterr()
    assert main(["det", "train", "--config", str(DEMO), "--out", str(tmp_path / "r"), "data.train_ann="]) == 2
    assert "data.train_ann" in capsys.readouterr().err


class _InterruptAt(DetTask):
    """Sends SIGINT to itself at micro-batch ``at``: the engine saves and stops, as on a pre-empted node."""

    def __init__(self, cfg: Any, at: int) -> None:
        super().__init__(cfg)
        self.at, self.calls = at, 0

    def loss_fn(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().loss_fn(model, batch)


def test_interrupted_detection_run_resumes_bit_exactly(run: dict[str, Any], tmp_path: Path) -> None:
    from davit.engine.checkpoint import load_training_state
    from davit.engine.fit import fit

    # RetinaNet (fast), multi-scale sizes and the crop branch on: every random draw must be replayed on resume.
    extra = [
        "detector.arch=retinanet",
        "data.aug=detr",
        "data.train_sizes=[96,112,128]",
        "train.iters=6",
        "train.eval_every=6",
        "sched.milestones=[4]",
        "sched.warmup=2",
    ]
    overrides = [*run["overrides"], *extra]
    ref_cfg = load_det_config(DEMO, [*overrides, f"out={tmp_path / 'ref'}"])
    cut_cfg = load_det_config(DEMO, [*overrides, f"out={tmp_path / 'cut'}"])
    fit(ref_cfg, DetTask(ref_cfg))
    cut = fit(cut_cfg, _InterruptAt(cut_cfg, at=3))
    assert cut["interrupted"] and cut["steps"] == 3
    resumed = fit(dataclasses.replace(cut_cfg, resume="auto"), DetTask(cut_cfg))
    assert not resumed["interrupted"] and resumed["steps"] == 6
    a = load_training_state(tmp_path / "ref" / "last.pt")["model"]
    b = load_training_state(tmp_path / "cut" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loaded_detector_runs_the_accelerated_backbone_with_reference_outputs(run: dict[str, Any]) -> None:
    from davit.accelerate import installed
    from davit.tasks.detection.task import load_detector

    ckpt = run["out"] / "best.safetensors"
    fast, _, _ = load_detector(ckpt)
    ref, _, _ = load_detector(ckpt, accelerate=False)
    assert installed(fast) is not None and installed(ref) is None
    img = torch.rand(3, 112, 136)
    with torch.no_grad():
        a, b = fast([img])[0], ref([img])[0]
    assert a["boxes"].shape == b["boxes"].shape and len(a["boxes"]) > 0
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
