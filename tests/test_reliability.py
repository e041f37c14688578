"""Issue 14: nothing lost, nothing silently wrong, one clear line (faults and bad inputs)."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from davit.config import ConfigError, read_yaml
from davit.errors import DiskFullError, UserError, user_message
from davit.weights import CheckpointError, atomic_write, read_checkpoint, remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]
MICRO = f"""
_base_: {ROOT / "configs/cls/digits.yaml"}
model:
  overrides: {{embed_dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], window_size: 4}}
data: {{img_size: 16, val_split: 0.6}}
train: {{epochs: 2, batch_size: 32, workers: 1, threads: 1, log_every: 5}}
sched: {{warmup: 1}}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _davit(*args: str) -> list[str]:
    return [sys.executable, "-m", "davit", *args]


def _one_line_error(stderr: str) -> bool:
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    return "Traceback" not in stderr and len(errors) == 1


# ------------------------------------------------------------------------------------- 11: errors from workers
class _Bad(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        from davit.data import ImageReadError

        raise ImageReadError(f"cannot read image /data/x{i}.jpg: truncated")


def test_user_error_from_a_loader_worker_keeps_its_one_line_message() -> None:
    with pytest.raises(UserError) as info:
        next(iter(DataLoader(_Bad(), num_workers=1)))
    assert str(info.value) == "cannot read image /data/x0.jpg: truncated"
    assert user_message("plain") == "plain"


# ------------------------------------------------------------------------------ 7, 8, 14: saves and their files
def test_atomic_write_honours_the_umask_and_stale_temps_are_removed(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    stale = tmp_path / ".last.pt.ab3_xYz9.tmp"
    stale.write_bytes(b"0" * 100)
    keep = tmp_path / ".hidden.tmp"
    keep.write_text("not ours")
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and keep.exists()


def test_disk_full_is_one_clear_error_and_the_previous_file_survives(tmp_path: Path) -> None:
    dst = tmp_path / "last.pt"
    dst.write_text("previous")

    def full(tmp: str) -> None:
        Path(tmp).write_bytes(b"1234")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(DiskFullError, match=r"the disk is full: saving .*last.pt needed 1.0 MiB"):
        atomic_write(dst, full, size_hint=1 << 20)
    with pytest.raises(DiskFullError):
        atomic_write(dst, lambda tmp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert dst.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ---------------------------------------------------------------------------------------- 3, 13: weight files
def _tiny():
    from davit import create_model

    return create_model("davit_tiny", num_classes=3, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                        num_heads=(1, 2, 2, 4), window_size=4)  # fmt: skip


@pytest.mark.parametrize("kind", ["nan", "int"])
def test_nan_or_integer_weights_are_refused(tmp_path: Path, kind: str) -> None:
    from davit.weights import load_checkpoint, save_safetensors

    model = _tiny()
    sd = model.state_dict()
    if kind == "nan":
        sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
    else:
        sd = {k: v.long() for k, v in sd.items()}
    save_safetensors(sd, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite" if kind == "nan" else "int64 tensors"):
        load_checkpoint(_tiny(), tmp_path / "w.safetensors")


def test_transposed_head_and_non_checkpoints_get_their_own_message(tmp_path: Path) -> None:
    from davit.weights import load_checkpoint

    sd = _tiny().state_dict()
    sd["head.fc.weight"] = sd["head.fc.weight"].T.contiguous()
    with pytest.raises(CheckpointError, match="transposed"):
        load_checkpoint(_tiny(), sd)
    (tmp_path / "j.pth").write_text(json.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="is a JSON file, not a checkpoint"):
        read_checkpoint(tmp_path / "j.pth")
    (tmp_path / "g.pth").write_bytes(
        b"\x01\x02\x03 not a checkpoint \xfe\xff" * 4
    )  # fixed: random bytes can open like JSON
    with pytest.raises(CheckpointError, match="unknown format"):
        read_checkpoint(tmp_path / "g.pth")


# ------------------------------------------------------------------------------------------- 2, 9: folders
def test_eval_dataset_drops_unreadable_images_instead_of_counting_a_neighbour(tmp_path: Path) -> None:
    from davit.data.classification import ImageFolderDataset, collate_readable

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(tmp_path, lambda im: torch.zeros(1), substitute_unreadable=False)
    batches = [b for b in DataLoader(ds, batch_size=4, collate_fn=collate_readable) if b is not None]
    assert sum(len(t) for _, t in batches) == 6
    assert ds.num_skipped == 1


def test_symlink_loops_are_walked_once_and_other_classes_never_leak_in(tmp_path: Path) -> None:
    from davit.data.classification import scan_image_folder

    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
        (tmp_path / c / "loop").symlink_to("..")
    t0 = time.monotonic()
    classes, samples = scan_image_folder(tmp_path)
    assert time.monotonic() - t0 < 5
    assert classes == ["a", "b", "c"] and len(samples) == 3


# ------------------------------------------------------------------------------------ 10, 12: plain bad input
def test_base_cycle_bogus_device_and_unknown_model_override(tmp_path: Path) -> None:
    from davit import create_model
    from davit.engine.evaluate import check_device

    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_yaml(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="unknown device"):
        check_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no usable CUDA"):
            check_device("cuda")
    with pytest.raises(UserError, match="unknown DaViT config field bogus"):
        create_model("davit_tiny", bogus=1)


def test_decompression_bombs_are_image_read_errors_in_seg_and_det(tmp_path: Path, monkeypatch) -> None:
    from davit.data import ImageReadError
    from davit.data.segmentation import load_image
    from davit.tasks.detection.predict import _read

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 = 4096 > 2 x 100: PIL's bomb error
    for read in (load_image, _read):
        with pytest.raises(ImageReadError, match="big.png"):
            read(tmp_path / "big.png")


def _coco(tmp_path: Path, **changes) -> Path:
    Image.new("RGB", (32, 32)).save(tmp_path / "1.png")
    data = {
        "images": [{"id": 1, "file_name": "1.png", "width": 32, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 1, 10, 10]},
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    data.update(changes)
    (tmp_path / "a.json").write_text(json.dumps(data))
    return tmp_path / "a.json"


def test_coco_validation(tmp_path: Path) -> None:
    from davit.data.coco import CocoDetection

    ds = CocoDetection(tmp_path, _coco(tmp_path), train=True)
    assert ds.skipped == {"boxes with NaN or infinite coordinates": 1}
    assert not ds.has_masks
    with pytest.raises(ValueError, match="'images' is a dict"):
        CocoDetection(tmp_path, _coco(tmp_path, images={}))
    ds = CocoDetection(tmp_path, _coco(tmp_path, annotations=[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]))
    assert ds.records[0].anns[0]["id"] == 1
    bad = _coco(tmp_path, annotations=[{"id": 3, "image_id": 1, "category_id": 1, "bbox": "1,1,5,5"}])
    with pytest.raises(ValueError, match=r"a.json: annotation 3 .* has bbox '1,1,5,5'"):
        CocoDetection(tmp_path, bad)


def test_predict_refuses_a_nonpositive_img_size(tmp_path: Path) -> None:
    from davit.engine.evaluate import LoadedClassifier
    from davit.engine.predict import predict_loaded

    loaded = LoadedClassifier(_tiny().eval(), {"img_size": 16, "crop_pct": 1.0, "interpolation": "bicubic",
                              "mean": (0.5,) * 3, "std": (0.5,) * 3}, ["a", "b", "c"], "test")  # fmt: skip
    with pytest.raises(UserError, match="img_size must be a positive"):
        predict_loaded(loaded, [Image.new("RGB", (8, 8))], img_size=0)
    out = predict_loaded(loaded, [Image.new("RGB", (8, 8))] * 5, batch_size=2, optimize=False)
    assert len(out) == 5


# ------------------------------------------------------------------------------- 1, 5, 13: real CLI runs
def test_diverged_weights_are_never_saved_nor_best(tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(MICRO)
    out = tmp_path / "run"
    r = subprocess.run(
        _davit("train", "--config", str(cfg), "--out", str(out), "train.epochs=0", "train.iters=6",
               "train.eval_every=1", "optim.lr=1e30", "optim.grad_clip=0"),
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr[-2000:]
    assert _one_line_error(r.stderr), r.stderr[-2000:]
    for name in ("best.safetensors", "last.safetensors"):
        if (out / name).exists():
            w = read_checkpoint(out / name)
            assert all(bool(torch.isfinite(v).all()) for v in w.values() if v.is_floating_point())
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            assert all(math.isfinite(v) for k, v in json.loads(line).items() if "loss" in k)


def test_unreadable_random_numpy_is_not_a_pickle_payload_path(tmp_path: Path) -> None:
    """A pickle payload in a .pth never runs: torch.load(weights_only=True) refuses it with one clear error."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Payload(), "x": np.zeros(1)}, f)
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


# ---------------------------------------------------------------------------- 12, 13: the CLI, one line each
@pytest.fixture(scope="module")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step micro classification run (its last.pt and best.safetensors), shared by the CLI tests below."""
    d = tmp_path_factory.mktemp("micro")
    (d / "m.yaml").write_text(MICRO)
    r = subprocess.run(_davit("train", "--config", str(d / "m.yaml"), "--out", str(d / "run"), "train.epochs=0",
                              "train.iters=2", "train.workers=0"), env=_env(), capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return d


def test_train_out_pointing_at_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(MICRO)
    (tmp_path / "afile").write_text("x")
    r = subprocess.run(_davit("train", "--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "afile")),
                       env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and _one_line_error(r.stderr), r.stderr[-2000:]
    assert "afile is a file" in r.stderr and (tmp_path / "afile").read_text() == "x"


@pytest.mark.slow  # two CLI runs (the fixture's training, the resume): ~15 s
def test_resume_after_changing_the_architecture_names_the_mismatch(micro_run: Path) -> None:
    r = subprocess.run(_davit("train", "--config", str(micro_run / "m.yaml"), "--out", str(micro_run / "run"),
                              "--resume", "train.epochs=0", "train.iters=2",
                              "model.overrides.embed_dims=[8,16,32,128]"),
                       env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and _one_line_error(r.stderr), r.stderr[-2000:]
    line = next(ln for ln in r.stderr.splitlines() if ": error: " in ln)
    assert "in the checkpoint but" in line and "in this model" in line, line  # names the tensor and both shapes
    assert "config.yaml" in line and "no --resume" in line  # and the fix


@pytest.mark.slow  # the fixture's training and two CLI evaluations: ~15 s
def test_cli_eval_scores_a_folder_with_a_broken_image_like_the_clean_folder(micro_run: Path, tmp_path: Path) -> None:
    """24 good images + 1 garbage: the readable 24 are each scored once (the broken one is skipped, not replaced)."""
    rng = np.random.default_rng(0)
    for i in range(24):
        c = tmp_path / "clean" / str(i % 10)
        c.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(c / f"{i}.png")
    import shutil

    shutil.copytree(tmp_path / "clean", tmp_path / "broken")
    (tmp_path / "broken" / "3" / "broken.jpg").write_bytes(b"\x00garbage" * 10)
    got = {}
    for name in ("clean", "broken"):
        r = subprocess.run(_davit("eval", "--checkpoint", str(micro_run / "run/best.safetensors"), "--data",
                                  str(tmp_path / name), "--workers", "1", "--json"),
                           env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        got[name] = json.loads(r.stdout)
    assert got["broken"]["images"] == 24 and got["broken"]["skipped"] == 1
    for k in ("top1", "top5", "loss"):
        assert got["broken"][k] == pytest.approx(got["clean"][k], abs=1e-9), k


def test_seg_train_resume_followed_by_an_override_is_not_a_resume_path(tmp_path: Path) -> None:
    r = subprocess.run(_davit("seg", "train", "--config", "seg/synthetic_demo", "--out", str(tmp_path / "run"),
                              "--resume", f"data.root={tmp_path / 'nowhere'}"),
                       env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and _one_line_error(r.stderr), r.stderr[-2000:]
    assert "resume checkpoint not found" not in r.stderr  # it used to look for a file called "data.root=..."
    assert "nowhere" in r.stderr  # the override was applied: the missing data root is what is reported


@pytest.mark.parametrize("kind", ["nan", "int"])
def test_segmentation_checkpoints_with_nan_or_integer_weights_are_refused(tmp_path: Path, kind: str) -> None:
    from davit.tasks.segmentation import build_seg_model, load_seg_config, load_segmentation_checkpoint
    from davit.weights import save_safetensors

    cfg = load_seg_config(None, ["model.overrides={embed_dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], "
                                 "num_heads: [1, 2, 2, 4], window_size: 4}", "head.channels=8", "head.aux_channels=8",
                                 "data.num_classes=3"])  # fmt: skip
    sd = build_seg_model(cfg, 3).state_dict()
    if kind == "nan":
        sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
    else:
        sd = {k: v.long() for k, v in sd.items()}
    save_safetensors(sd, tmp_path / "seg.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite" if kind == "nan" else "int64 tensors") as info:
        load_segmentation_checkpoint(build_seg_model(cfg, 3), tmp_path / "seg.safetensors")
    assert "seg.safetensors" in str(info.value)


def test_a_fifo_named_like_a_checkpoint_is_refused_not_read_forever(tmp_path: Path) -> None:
    """Found by scripts/reliability_battery.py: `davit predict/eval --checkpoint FIFO` blocked for ever."""
    from davit.weights import read_safetensors_metadata

    os.mkfifo(tmp_path / "w.safetensors")
    for read in (read_checkpoint, read_safetensors_metadata):
        with pytest.raises(CheckpointError, match="not a regular file"):
            read(tmp_path / "w.safetensors")


def test_det_predict_refuses_an_image_too_elongated_to_detect_in(tmp_path: Path) -> None:
    """Found by the battery: a 4000x3 image shrank to 0 rows inside torchvision (a RuntimeError traceback)."""
    from davit.data import ImageReadError
    from davit.tasks.detection.models import build_detector
    from davit.tasks.detection.predict import predict_files

    micro = dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
    model = build_detector("retinanet", 2, backbone_overrides=micro, fpn_channels=16, test_size=64, max_size=128)
    Image.new("RGB", (4000, 3)).save(tmp_path / "strip.png")
    with pytest.raises(ImageReadError, match="strip.png is 4000x3 pixels: too elongated"):
        predict_files([tmp_path / "strip.png"], None, model=model, classes=["a", "b"], out_dir=tmp_path)


# -------------------------------------------- 12: numbers and --out kinds refused in one line (predict/eval/export)
def _cli_error(capsys, argv: list[str]) -> str:
    from davit.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses a bad value with exit 2
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc not in (0, None), err
    # One error line (argparse prints its usage above it, as for every other bad option).
    assert "Traceback" not in err and err.splitlines()[-1].startswith("davit ") and err.count("error:") == 1, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("cmd", [["predict", "x.png", "--checkpoint", "c.safetensors"],
                                 ["eval", "--checkpoint", "c.safetensors", "--data", "d"],
                                 ["export", "c.safetensors", "--out", "m.onnx"]])  # fmt: skip
@pytest.mark.parametrize("size", ["0", "-5", "100000"])
def test_absurd_img_sizes_are_refused_by_predict_eval_and_export(capsys, cmd: list[str], size: str) -> None:
    from davit.data.transforms import MAX_IMG_SIDE, check_img_size

    err = _cli_error(capsys, [*cmd, "--img-size", size])
    assert f"up to {MAX_IMG_SIDE}" in err and size in err
    assert check_img_size(MAX_IMG_SIDE) == MAX_IMG_SIDE and check_img_size(None) is None
    with pytest.raises(UserError, match="up to"):
        check_img_size(int(size))


def test_predict_and_eval_out_must_be_a_json_file(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "x.json"
    folder.mkdir()
    assert "is a folder" in _cli_error(capsys, ["predict", "x.png", "--checkpoint", "c", "--out", str(folder)])
    assert "NAME.json" in _cli_error(capsys, ["eval", "--checkpoint", "c", "--data", "d", "--out", "r.txt"])


@pytest.mark.parametrize("opset", ["0", "9", "999"])
def test_export_opset_outside_the_supported_range_names_the_range(capsys, tmp_path: Path, opset: str) -> None:
    from davit.export import opset_range

    lo, hi = opset_range()
    err = _cli_error(capsys, ["export", "--model", "davit_tiny", "--random-weights", "--out",
                              str(tmp_path / "m.onnx"), "--opset", opset])  # fmt: skip
    assert f"opsets {lo}..{hi}" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_out_an_existing_folder_is_refused(capsys, tmp_path: Path) -> None:
    (tmp_path / "m.onnx").mkdir()
    err = _cli_error(capsys, ["export", "--model", "davit_tiny", "--random-weights", "--out", str(tmp_path / "m.onnx")])
    assert "is a folder" in err and "model.onnx" in err


@pytest.mark.parametrize("thr", ["nan", "2", "-0.1"])
def test_det_predict_score_threshold_must_be_a_probability(capsys, thr: str) -> None:
    err = _cli_error(capsys, ["det", "predict", "x.png", "--checkpoint", "c.safetensors", "--score-thr", thr])
    assert "between 0 and 1" in err


def test_export_of_a_headless_checkpoint_is_refused(capsys, tmp_path: Path) -> None:
    from davit.export import export_onnx
    from davit.weights import save_safetensors

    model = _tiny()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    meta = {"model_name": "davit_tiny", "davit_config": json.dumps({**vars(model.cfg), "num_classes": 0})}
    save_safetensors(sd, tmp_path / "headless.safetensors", metadata=meta)
    err = _cli_error(capsys, ["export", str(tmp_path / "headless.safetensors"), "--out", str(tmp_path / "m.onnx")])
    assert "no classification head" in err
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(UserError, match="no classification head"):
        export_onnx(_tiny_headless(), tmp_path / "n.onnx")


def _tiny_headless():
    from davit import create_model

    return create_model("davit_tiny", num_classes=0, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                        num_heads=(1, 2, 2, 4), window_size=4)  # fmt: skip


def test_a_folder_named_like_an_image_is_skipped_with_one_warning(tmp_path: Path, caplog) -> None:
    from davit.data.classification import scan_image_folder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "ok.png")
    clean = scan_image_folder(tmp_path)
    (tmp_path / "a" / "x.png").mkdir()
    (tmp_path / "a" / "y.jpg").mkdir()
    (tmp_path / "a" / "x.png" / "inner.png").write_bytes((tmp_path / "a" / "ok.png").read_bytes())
    with caplog.at_level("WARNING"):
        assert scan_image_folder(tmp_path) == clean
    assert sum("named like an image" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------- training and config input (issue 14)
def _train_cli(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    from davit.cli import main

    (tmp_path / "m.yaml").write_text(MICRO)
    rc = main(["train", "--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "run"), *args])
    return rc, capsys.readouterr().err


def test_resuming_a_finished_run_rewrites_exported_weights_a_kill_left_behind(tmp_path: Path, capsys) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    rc, err = _train_cli(tmp_path, capsys, "train.workers=0")
    assert rc == 0, err
    last = tmp_path / "run/last.safetensors"
    want = read_checkpoint(last)
    with safe_open(str(last), "pt") as h:
        meta = h.metadata()
    # What a SIGKILL inside the final last.safetensors save leaves: last.pt final, the export one save behind.
    save_file({k: torch.zeros_like(v) for k, v in want.items()}, str(last), metadata={**meta, "step": "1"})
    rc, err = _train_cli(tmp_path, capsys, "train.workers=0", "--resume")
    assert rc == 0, err
    got = read_checkpoint(last)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with safe_open(str(last), "pt") as h:
        assert h.metadata()["step"] == meta["step"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "bogus"], "train.device must be one of cpu, cuda, cuda:N, mps, auto; got 'bogus'"),
        (["train.device=tpu"], "train.device must be one of cpu, cuda, cuda:N, mps, auto; got 'tpu'"),
        (["model.overrides.depths=[-1,1,1,1]"], "depths must be whole numbers >= 1"),
        (["model.overrides.embed_dims=[8,16,32,0]"], "embed_dims must be whole numbers >= 1"),
        (["data.img_size=100000"], "data.img_size must be at most 8192 pixels"),
        (["out=/elsewhere"], "--out"),
        (["train.device=cpu", "--device", "cuda"], "--device cuda contradicts the override train.device=cpu"),
    ],
)
def test_bad_training_config_values_are_one_line(tmp_path: Path, capsys, args: list[str], needle: str) -> None:
    rc, err = _train_cli(tmp_path, capsys, *args)
    assert rc == 2 and _one_line_error(err), err
    assert needle in err, err
    assert not (tmp_path / "run/last.pt").exists()  # refused before any training


def test_recipe_device_is_not_overridden_by_an_unset_device_option(tmp_path: Path, capsys) -> None:
    # --device used to default to auto and silently replace the recipe's train.device (tpu trained on CPU).
    from davit.cli import main

    (tmp_path / "m.yaml").write_text(MICRO)

    cfg = tmp_path / "m2.yaml"
    cfg.write_text(f"_base_: {tmp_path / 'm.yaml'}\n" + "train: {device: tpu}\n")
    rc = main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "got 'tpu'" in err, err


def test_duplicate_yaml_keys_are_refused_naming_key_and_file(tmp_path: Path) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text("train: {epochs: 1}\nmodel: {name: davit_tiny}\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'train' is given twice \(lines 1 and 3\)"):
        read_yaml(p)
    p.write_text("train: {epochs: 1, epochs: 3}\n")
    with pytest.raises(ConfigError, match="key 'epochs' is given twice"):
        read_yaml(p)
    # YAML merge keys may legitimately be overridden by the mapping's own keys.
    p.write_text("a: &x {b: 1, c: 2}\nd:\n  <<: *x\n  b: 5\n")
    assert read_yaml(p) == {"a": {"b": 1, "c": 2}, "d": {"b": 5, "c": 2}}


def test_data_root_ignored_by_a_digits_recipe_is_warned_about(tmp_path: Path, capsys, caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING):
        rc, err = _train_cli(tmp_path, capsys, "train.workers=0", "train.epochs=1", "data.root=/my/images")
    assert rc == 0, err
    line = next(r.getMessage() for r in caplog.records if "data.root" in r.getMessage())
    assert "data.root=/my/images is ignored" in line and "data.kind=imagefolder" in line, line


def test_info_on_weights_without_davit_metadata_says_so(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    from davit import create_model
    from davit.cli import main

    m = create_model("davit_tiny", embed_dims=[8, 16, 32, 64], num_heads=[1, 2, 2, 4], num_classes=3)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert main(["info", str(tmp_path / "w.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "metadata: none from davit" in out and "num_classes: 3" in out, out
