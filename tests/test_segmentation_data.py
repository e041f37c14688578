"""Segmentation data (layouts, label conventions, bad input, transforms) and an end-to-end run on synthetic shapes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from davit.cli import main
from davit.data.segmentation import SegmentationDataset, SegTrainTransform, rescale_size, seg_collate
from davit.data.synthetic_seg import SYNTHETIC_CLASSES, make_synthetic_seg
from davit.tasks.segmentation import SegTask, load_seg_config, train_segmentation
from davit.tasks.segmentation.task import class_names


def _write_pair(root, name, img_hw=(40, 50), mask=None, split="training"):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    h, w = img_hw
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / "images" / split / f"{name}.jpg")
    if mask is None:
        mask = np.zeros((h, w), np.uint8)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "annotations" / split / f"{name}.png")


def _dataset(root, **kw):
    kw.setdefault("num_classes", 3)
    return SegmentationDataset(root / "images/training", root / "annotations/training", **kw)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


# ------------------------------------------------------------------------------------------------------ labels
def test_reduce_zero_label_maps_zero_to_ignore_and_shifts(tmp_path):
    mask = np.array([[0, 1, 2, 3, 255]] * 4, np.uint8)
    _write_pair(tmp_path, "a", (4, 5), mask)
    ds = _dataset(tmp_path, reduce_zero_label=True)
    got = ds[0]["mask"]
    assert got[0].tolist() == [255, 0, 1, 2, 255]
    plain = _dataset(tmp_path, num_classes=4, reduce_zero_label=False)
    assert plain[0]["mask"][0].tolist() == [0, 1, 2, 3, 255]


def test_out_of_range_labels_error_names_the_file_or_are_ignored(tmp_path, caplog):
    mask = np.array([[1, 2, 9, 255]] * 4, np.uint8)
    _write_pair(tmp_path, "bad", (4, 4), mask)
    ds = _dataset(tmp_path, reduce_zero_label=False)
    with pytest.raises(ValueError, match=r"bad\.png holds labels \[9\] outside 0..2"):
        ds[0]
    lenient = _dataset(tmp_path, reduce_zero_label=False, bad_labels="ignore")
    with caplog.at_level(logging.WARNING):
        assert lenient[0]["mask"][0].tolist() == [1, 2, 255, 255]
    assert "bad.png" in caplog.text


def test_size_mismatch_unreadable_and_missing_masks_are_skipped_with_counts(tmp_path, caplog):
    _write_pair(tmp_path, "good", (20, 30))
    _write_pair(tmp_path, "small_mask", (20, 30), np.zeros((10, 30), np.uint8))
    _write_pair(tmp_path, "broken", (20, 30))
    (tmp_path / "images/training/broken.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images/training/orphan.jpg")
    with caplog.at_level(logging.WARNING):
        ds = _dataset(tmp_path)
    assert [p[0].name for p in ds.pairs] == ["good.jpg"]
    assert len(ds.skipped["size"]) == 1 and "small_mask.jpg 30x20 vs mask 30x10" in ds.skipped["size"][0]
    assert ds.skipped["unreadable"] == [str(tmp_path / "images/training/broken.jpg")]
    assert ds.skipped["no_mask"] == [str(tmp_path / "images/training/orphan.jpg")]
    assert "mask size differs" in caplog.text and "unreadable" in caplog.text and "no mask file" in caplog.text


def test_truncated_image_that_passes_the_header_check_is_a_clear_error(tmp_path):
    _write_pair(tmp_path, "cut", (64, 64))
    path = tmp_path / "images/training/cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    ds = _dataset(tmp_path)
    assert len(ds) == 1
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.jpg"):
        ds[0]


def test_rgb_mask_and_empty_folder_are_clear_errors(tmp_path):
    _write_pair(tmp_path, "c", (6, 6))
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "annotations/training/c.png")
    with pytest.raises(ValueError, match="RGB image; masks must be single-channel"):
        _dataset(tmp_path)[0]
    with pytest.raises(FileNotFoundError, match="expected the ADE20K layout"):
        SegmentationDataset(tmp_path / "nope", tmp_path / "annotations/training", 3)


def test_generic_folder_with_class_list(tmp_path):
    root = tmp_path / "pairs"
    (root / "img").mkdir(parents=True)
    (root / "lbl").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "img" / "x.png")
    Image.fromarray(np.full((8, 8), 2, np.uint8), mode="L").save(root / "lbl" / "x_mask.png")
    (root / "names.txt").write_text("sky\nsea\nboat\n")
    cfg = load_seg_config(
        None,
        [f"data.root={root}", "data.img_dir=img", "data.ann_dir=lbl", "data.seg_suffix=_mask.png",
         f"data.classes_file={root / 'names.txt'}", "data.reduce_zero_label=false", "data.val_split="],
    )  # fmt: skip
    task = SegTask(cfg)
    assert task.class_names == ("sky", "sea", "boat")
    train, val = task.build_datasets()
    assert val is None and len(train) == 1


# -------------------------------------------------------------------------------------------------- transforms
def test_train_transform_crops_pads_and_normalises():
    torch.manual_seed(0)
    tf = SegTrainTransform(scale=(64, 48), ratio_range=(0.5, 0.5), crop_size=(40, 40))
    img = torch.full((3, 30, 60), 200, dtype=torch.uint8)
    mask = torch.zeros(30, 60, dtype=torch.long)
    mask[:, 30:] = 1
    x, m = tf(img, mask)
    # ratio 0.5 of (64, 48) -> long edge <= 32, short <= 24: 30x60 x min(32/60, 24/30) -> 16x32, padded to 40x40
    assert rescale_size((30, 60), (32, 24)) == (16, 32)
    assert x.shape == (3, 40, 40) and m.shape == (40, 40)
    assert (m[16:] == 255).all() and (m[:, 32:] == 255).all() and (m[:16, :32] != 255).all()
    assert (x[:, 16:] == 0).all() and (x[:, :16, :32] != 0).any()
    assert x.dtype == torch.float32


def test_cat_max_ratio_prefers_crops_with_several_classes():
    torch.manual_seed(0)
    mask = torch.zeros(100, 100, dtype=torch.long)
    mask[:, 90:] = 1  # a thin stripe of class 1 on the right
    img = torch.zeros(3, 100, 100, dtype=torch.uint8)
    strict = SegTrainTransform(scale=(100, 100), ratio_range=(1, 1), crop_size=(30, 30), flip=0, photometric=False)
    loose = SegTrainTransform(scale=(100, 100), ratio_range=(1, 1), crop_size=(30, 30), flip=0, photometric=False,
                              cat_max_ratio=1.0)  # fmt: skip
    with_two = sum(int(len(strict(img, mask)[1].unique()) > 1) for _ in range(30))
    baseline = sum(int(len(loose(img, mask)[1].unique()) > 1) for _ in range(30))
    assert with_two > baseline


def test_collate_stacks_same_sizes_and_lists_different_sizes():
    a = {"img": torch.zeros(3, 4, 4), "mask": torch.zeros(4, 4), "path": "a"}
    b = {"img": torch.zeros(3, 5, 4), "mask": torch.zeros(5, 4), "path": "b"}
    assert seg_collate([a, a])["img"].shape == (2, 3, 4, 4)
    mixed = seg_collate([a, b])
    assert isinstance(mixed["img"], list) and mixed["path"] == ["a", "b"]


def test_synthetic_generator_layout_and_labels(tmp_path):
    root = make_synthetic_seg(tmp_path / "s", n_train=3, n_val=2, size=48, seed=1)
    assert len(list((root / "images/training").glob("*.jpg"))) == 3
    assert len(list((root / "annotations/validation").glob("*.png"))) == 2
    values = np.unique(np.asarray(Image.open(next((root / "annotations/training").glob("*.png")))))
    assert set(values.tolist()) <= {0, 1, 2, 3, 4} and 1 in values  # 0 = unlabelled ring, 1 = background
    cfg = load_seg_config(None, [f"data.root={root}", "data.num_classes=4"])
    assert class_names(cfg.data) == SYNTHETIC_CLASSES
    again = make_synthetic_seg(tmp_path / "t", n_train=3, n_val=2, size=48, seed=1)
    a = np.asarray(Image.open(root / "annotations/training/synth_training_00002.png"))
    assert np.array_equal(a, np.asarray(Image.open(again / "annotations/training/synth_training_00002.png")))


# --------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    # One thread: on a shared 2-core machine two threads per process oversubscribe the cores and run ~5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("seg_e2e")
    root = make_synthetic_seg(base / "data", n_train=32, n_val=8, size=48, seed=0)
    cfg = load_seg_config(
        "configs/seg/synthetic_demo.yaml",
        [f"data.root={root}", "data.scale=[64, 48]", "data.crop_size=[48, 48]", "head.channels=32",
         "head.aux_channels=16", "train.iters=60", "train.eval_every=20", "train.batch_size=8", "train.log_every=20",
         "sched.warmup=4", "optim.lr=2e-3", f"out={base / 'run'}"],
    )  # fmt: skip
    try:
        summary = train_segmentation(cfg)
        yield root, base / "run", summary
    finally:
        torch.set_num_threads(threads)


def _majority_miou(root) -> float:
    """mIoU of predicting the most frequent class everywhere (computed from the masks, not by our code)."""
    masks = [np.asarray(Image.open(p)).astype(int) - 1 for p in sorted((root / "annotations/validation").glob("*.png"))]
    labels = np.concatenate([m[m >= 0] for m in masks])
    share = np.bincount(labels, minlength=4) / labels.size
    return 100 * share.max() / 4  # IoU of the majority class = its share; the other three classes score 0


def test_training_loss_falls_and_miou_beats_the_majority_baseline(trained_run):
    root, run, summary = trained_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["miou"] > _majority_miou(root) + 5
    assert {"miou", "macc", "aacc", "best_miou"} <= set(summary)
    for name in ("config.yaml", "summary.json", "last.pt", "best.safetensors", "curves.png", "log.txt"):
        assert (run / name).is_file(), name


def test_cli_eval_and_predict_on_the_trained_checkpoint(trained_run, tmp_path, capsys):
    root, run, summary = trained_run
    ckpt = run / "last.safetensors"
    assert main(["seg", "eval", "--config", str(run / "config.yaml"), "--checkpoint", str(ckpt), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["miou"] == pytest.approx(summary["miou"], abs=1e-6)  # same weights, same data: same figure
    assert main(["seg", "eval", "--config", str(run / "config.yaml"), "--checkpoint", str(ckpt), "--aug-test"]) == 0
    assert "mIoU" in capsys.readouterr().out

    image = next((root / "images/validation").glob("*.jpg"))
    assert main(["seg", "predict", str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "pred")]) == 0
    mask = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}_mask.png"))
    overlay = Image.open(tmp_path / "pred" / f"{image.stem}_overlay.png")
    assert mask.shape == (48, 48) and mask.max() < 4
    assert overlay.width > 48 and overlay.height >= 48 and overlay.mode == "RGB"  # the image, then a legend


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["seg", "predict", "x.jpg", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    args = ["seg", "train", "--config", "configs/seg/synthetic_demo.yaml", f"data.root={tmp_path / 'no'}"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert "expected the ADE20K layout" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_all_reduce_the_confusion_matrix(tmp_path):
    """Two gloo processes train a few steps; their mIoU (shards summed) equals a one-process evaluation."""
    import os
    import socket
    import subprocess
    import sys

    from davit.tasks.segmentation import evaluate_segmentation

    root = make_synthetic_seg(tmp_path / "data", n_train=16, n_val=5, size=48, seed=2)  # 5 val images: uneven shards
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "davit", "seg", "train", "--config", "configs/seg/synthetic_demo.yaml",
            f"data.root={root}", "data.scale=[64, 48]", "data.crop_size=[48, 48]", "train.iters=4",
            "train.eval_every=4", "train.batch_size=2", "sched.warmup=1", "train.distributed=ddp",
            "--out", str(tmp_path / "run")]  # fmt: skip
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    cfg = load_seg_config(tmp_path / "run" / "config.yaml", ["train.workers=0"])
    single = evaluate_segmentation(cfg, tmp_path / "run" / "last.safetensors", device="cpu")
    assert single["miou"] == pytest.approx(summary["miou"], abs=1e-6)
    assert single["aacc"] == pytest.approx(summary["aacc"], abs=1e-6)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Augmentation (crop, flip, photometric), drop path, dropout and BN statistics all replay exactly on resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from davit.engine.checkpoint import load_training_state
    from davit.weights import read_checkpoint

    root = make_synthetic_seg(tmp_path / "data", n_train=16, n_val=4, size=48, seed=3)
    base = [sys.executable, "-m", "davit", "seg", "train", "--config", "configs/seg/synthetic_demo.yaml",
            f"data.root={root}", "data.scale=[64, 48]", "data.crop_size=[48, 48]", "train.iters=24",
            "train.eval_every=6", "train.batch_size=4", "train.workers=1", "sched.warmup=2",
            "model.overrides.drop_path_rate=0.2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.Popen([*base, "--out", str(tmp_path / "ref")], env=env, stderr=subprocess.PIPE)
    cut = subprocess.Popen([*base, "--out", str(tmp_path / "cut")], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "cut" / "last.pt").exists():
            assert cut.poll() is None and time.monotonic() < deadline, "no checkpoint, or the run ended early"
            time.sleep(0.05)
        time.sleep(1.0)
        cut.send_signal(signal.SIGKILL)
        cut.wait()
    finally:
        if cut.poll() is None:
            cut.kill()
    assert not (tmp_path / "cut" / "summary.json").exists(), "the run finished before it was killed"
    assert 0 < load_training_state(tmp_path / "cut" / "last.pt")["progress"]["step"] < 24
    resumed = subprocess.run([*base, "--out", str(tmp_path / "cut"), "--resume"], env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert ref.wait(timeout=300) == 0
    a = read_checkpoint(tmp_path / "ref" / "last.safetensors")
    b = read_checkpoint(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_loaded_segmenter_runs_the_accelerated_backbone_with_reference_outputs(trained_run):
    from davit.accelerate import installed
    from davit.tasks.segmentation.task import load_seg_model

    _, run, _ = trained_run
    cfg = load_seg_config(str(run / "config.yaml"))
    fast, _ = load_seg_model(run / "last.safetensors", cfg)
    ref, _ = load_seg_model(run / "last.safetensors", cfg, accelerate=False)
    assert installed(fast) is not None and installed(ref) is None
    x = torch.rand(2, 3, 48, 56)  # not a multiple of the window: the padded path
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)
