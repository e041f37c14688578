"""The classification task on the digits set: the CLI runs, weights carry their config and class names, a checkpoint
with another class count needs reset_head, and predictions on held-out digits are reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import davit
from davit.cli import main
from davit.engine.checkpoint import load_training_state
from davit.engine.run import load_run_config
from davit.tasks.classification import ClassificationTask
from davit.weights import CheckpointError, read_safetensors_metadata

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "model.overrides.embed_dims=[8,16,32,64]",
    "model.overrides.depths=[1,1,1,1]",
    "model.overrides.num_heads=[1,2,2,4]",
    "data.img_size=16",
    "epochs=0",
    "iters=6",
    "eval_every=6",
    "batch_size=32",
    "workers=0",
    "threads=1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "run"
    assert main(["train", "--config", str(ROOT / "configs/cls/digits.yaml"), "--out", str(out), *MICRO]) == 0
    return out


def test_cli_run_writes_summary_with_top1_top5_and_examples(run: Path) -> None:
    s = json.loads((run / "summary.json").read_text())
    for key in ("top1", "top5", "steps", "best_step", "seconds", "images_per_second", "best_top1"):
        assert key in s, key
    assert 0 <= s["top1"] <= s["top5"] <= 100
    assert len(s["examples"]) == 8 and {"true", "predicted", "probability"} <= set(s["examples"][0])
    assert "held-out image" in (run / "log.txt").read_text()


def test_weights_rebuild_the_model_from_the_file_alone(run: Path) -> None:
    meta = read_safetensors_metadata(run / "last.safetensors")
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert json.loads(meta["davit_config"])["embed_dims"] == [8, 16, 32, 64]
    assert json.loads(meta["preprocessing"])["img_size"] == 16
    model = davit.create_model("davit_tiny", pretrained=str(run / "last.safetensors")).eval()
    _, cfg = load_run_config(run / "config.yaml")
    ref = davit.create_model("davit_tiny", num_classes=10, **cfg.model.overrides).eval()
    ref.load_state_dict(load_training_state(run / "last.pt")["model"])
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_other_class_count_needs_reset_head(run: Path, tmp_path: Path) -> None:
    for c in ("cat", "dog", "fox"):
        (tmp_path / "imgs" / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / "train" / c / f"{i}.png")
    base = [
        "data.kind=imagefolder",
        f"data.root={tmp_path / 'imgs'}",
        "data.val_dir=",
        f"model.pretrained={run / 'last.safetensors'}",
        *MICRO,
    ]
    _, cfg = load_run_config(ROOT / "configs/cls/digits.yaml", base)
    with pytest.raises(CheckpointError, match="10-class head but the data has 3 classes.*model.reset_head=true"):
        ClassificationTask(cfg).build_model()
    _, cfg = load_run_config(ROOT / "configs/cls/digits.yaml", [*base, "model.reset_head=true"])
    model = ClassificationTask(cfg).build_model()
    assert model.cfg.num_classes == 3
    src = davit.create_model("davit_tiny", pretrained=str(run / "last.safetensors"))
    assert all(torch.equal(p, src.state_dict()[k]) for k, p in model.state_dict().items() if not k.startswith("head."))


def test_cli_reports_user_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(ROOT / "configs/cls/digits.yaml"), "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key train.epoch" in err and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "--config", str(ROOT / "configs/cls/digits.yaml"), "train.memory_saving=lots"]) == 2
    assert "train.memory_saving must be none, mlp or all" in capsys.readouterr().err
    assert main(["train", "--config", str(ROOT / "configs/cls/digits.yaml"), "train.cpu_allocator=lean"]) == 2
    assert "train.cpu_allocator must be auto, speed, memory or system" in capsys.readouterr().err


def test_bf16_autocast_channels_last_grad_checkpointing_and_memory_saving_train(tmp_path: Path) -> None:
    extra = [
        "amp=bf16",
        "channels_last=true",
        "grad_checkpointing=true",
        "memory_saving=all",
        "iters=2",
        "eval_every=2",
    ]
    recipe = str(ROOT / "configs/cls/digits.yaml")
    assert main(["train", "--config", recipe, "--out", str(tmp_path), *MICRO, *extra, "data.val_split=0.5"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"]) and np.isfinite(rows[0]["val_loss"])
    log = (tmp_path / "log.txt").read_text()
    assert "amp bf16" in log
    # With checkpointing the loop picks the memory-lean allocator and names the trade-off (where glibc allows it; asking
    # again for the policy in effect changes nothing).
    from davit.allocator import tune_cpu_allocator

    assert ("train.cpu_allocator=speed or system trades the other way" in log) == (
        tune_cpu_allocator("memory") == "memory"
    )


def test_corrupt_images_are_skipped_and_counted_in_the_log(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "imgs" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "imgs" / "val" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    extra = ["data.kind=imagefolder", f"data.root={tmp_path / 'imgs'}", "batch_size=4", "iters=4", "eval_every=4"]
    out = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs/cls/digits.yaml"), "--out", str(out), *MICRO, *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] >= 1
    log = (out / "log.txt").read_text()
    assert "unreadable images skipped so far" in log and "broken" in log


def _folder(root: Path, classes: tuple[str, ...], n: int = 6) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


MICRO_IMAGENET = [
    "model.overrides.embed_dims=[8,16,32,64]",
    "model.overrides.depths=[1,1,1,1]",
    "model.overrides.num_heads=[1,2,2,4]",
    "data.img_size=32",
    "epochs=0",
    "iters=2",
    "eval_every=2",
    "batch_size=4",
    "workers=0",
    "threads=1",
    "amp=none",
    "sched.warmup=1",
    "sched.cooldown=0",
]


def test_official_imagenet_recipe_runs_end_to_end_on_a_tiny_folder(tmp_path: Path) -> None:
    # RandAugment, random erasing, mixup/cutmix soft targets with label smoothing, grad clipping, the lr scaled
    # from 1e-3 per 1024 to the global batch of 4.
    root = _folder(tmp_path / "imgs", ("n01", "n02", "n03"))
    out = tmp_path / "run"
    recipe = str(ROOT / "configs/cls/davit_tiny_in1k.yaml")
    assert main(["train", "--config", recipe, "--out", str(out), f"data.root={root}", *MICRO_IMAGENET]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["lr"] == pytest.approx(1e-3 * 4 / 1024) and s["global_batch"] == 4
    _, cfg = load_run_config(out / "config.yaml")
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.reprob == 0.25 and cfg.data.mixup == 0.8
    assert json.loads(read_safetensors_metadata(out / "best.safetensors")["class_names"]) == ["n01", "n02", "n03"]


def test_finetune_recipe_from_local_weights_to_new_classes(run: Path, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", ("cat", "dog"))
    out = tmp_path / "ft"
    recipe = str(ROOT / "configs/cls/finetune_imagefolder.yaml")
    args = [f"data.root={root}", f"model.pretrained={run / 'last.safetensors'}", *MICRO_IMAGENET]
    assert main(["train", "--config", recipe, "--out", str(out), *args]) == 0
    assert "classifier re-initialised for 2 classes" in (out / "log.txt").read_text()
    model = davit.create_model("davit_tiny", pretrained=str(out / "last.safetensors"))
    assert model.cfg.num_classes == 2
