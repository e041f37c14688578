"""Medical classification: MedMNIST ``.npz`` reading (MedMNIST's exact layout, written here), 16-bit and grey
input, one-channel stems from RGB weights, MedMNIST's AUC/ACC, a fine-tune run end to end, DICOM via pydicom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import davit
from davit.cli import main
from davit.data.medical import (
    MedMNISTDataset,
    infer_task,
    load_dicom,
    medmnist_metrics,
    read_medmnist,
    to_unit_range,
)
from davit.tasks.medical import evaluate_medmnist
from davit.weights import save_safetensors

MICRO = {"embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 2}


def _quadrant_set(n: int, rng: np.random.Generator, rgb: bool, dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """28x28 noise images with one bright quadrant; the class is the quadrant (MedMNIST shapes and dtypes)."""
    top = 255 if dtype == np.uint8 else 4095  # 12-bit data in a 16-bit array, as CT/X-ray files hold it
    labels = rng.integers(0, 4, size=(n, 1))
    images = rng.integers(0, top // 3, size=(n, 28, 28, 3) if rgb else (n, 28, 28)).astype(dtype)
    for img, (k,) in zip(images, labels):
        r, c = divmod(int(k), 2)
        img[r * 14 : r * 14 + 14, c * 14 : c * 14 + 14] = top
    return images, labels.astype(np.uint8)


def _write_npz(path: Path, rng: np.random.Generator, rgb: bool = True, dtype=np.uint8, sizes=(96, 32, 32)) -> Path:
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _quadrant_set(n, rng, rgb, dtype)
    np.savez_compressed(path, **arrays)
    return path


def _write_chest_like(path: Path, rng: np.random.Generator) -> Path:
    """ChestMNIST's layout: grey (N, 28, 28) uint8, (N, 14) 0/1 labels."""
    arrays = {}
    for split, n in (("train", 24), ("val", 12), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 14)).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------------------ reading
def test_read_and_infer_tasks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    splits = read_medmnist(_write_npz(tmp_path / "path.npz", rng))
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"][0].shape == (96, 28, 28, 3) and splits["train"][1].shape == (96, 1)
    assert infer_task([lab for _, lab in splits.values()]) == ("multi-class", 4)
    chest = read_medmnist(_write_chest_like(tmp_path / "chest.npz", rng))
    assert infer_task([lab for _, lab in chest.values()]) == ("multi-label", 14)
    assert infer_task([np.array([[0], [1], [1]])]) == ("binary-class", 2)


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="medmnist.com"):
        read_medmnist(tmp_path / "missing.npz")
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no train_images/train_labels .*keys: images"):
        read_medmnist(tmp_path / "wrong.npz")
    np.savez(tmp_path / "half.npz", train_images=np.zeros((2, 4, 4)), train_labels=np.zeros((2, 1)), val_images=[1])
    with pytest.raises(ValueError, match="val_images but not val_labels"):
        read_medmnist(tmp_path / "half.npz")
    np.savez(tmp_path / "obj.npz", train_images=np.array([{"a": 1}], dtype=object), train_labels=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="not a readable .npz"):  # object arrays need pickle: refused
        read_medmnist(tmp_path / "obj.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        read_medmnist(tmp_path / "text.npz")


def test_intensity_modes_for_8_and_16_bit() -> None:
    u8 = np.array([[0, 255]], np.uint8)
    assert to_unit_range(u8).tolist() == [[0.0, 1.0]]
    u16 = np.array([[[100, 4095], [100, 100]]], np.uint16)  # 12-bit values in a 16-bit array
    assert to_unit_range(u16, "dtype").max() == pytest.approx(4095 / 65535)
    assert to_unit_range(u16).max() == 1.0 and to_unit_range(u16).min() == 0.0  # auto: per-image min-max
    with pytest.raises(ValueError, match="intensity"):
        to_unit_range(u8, "log")


def test_dataset_channels_sizes_and_targets(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images, labels = _quadrant_set(4, rng, rgb=False, dtype=np.uint16)
    rgb_ds = MedMNISTDataset(images, labels, "multi-class", img_size=32)
    x, y = rgb_ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 and int(y) == labels[0, 0]
    assert torch.equal(rgb_ds.image(0)[0], rgb_ds.image(0)[2])  # grey replicated to RGB
    assert float(rgb_ds.image(0).max()) == 1.0  # 16-bit: stretched per image
    one = MedMNISTDataset(images, labels, "multi-class", img_size=28, in_chans=1, mean=(0.5,), std=(0.25,))
    x1, _ = one[0]
    assert x1.shape == (1, 28, 28) and torch.allclose(x1, (one.image(0) - 0.5) / 0.25)
    rgb_images, _ = _quadrant_set(2, rng, rgb=True)
    luma = MedMNISTDataset(rgb_images, labels[:2], "multi-class", img_size=28, in_chans=1, mean=(0,), std=(1,))
    expect = torch.from_numpy(rgb_images[0].astype(np.float32) / 255) @ torch.tensor([0.299, 0.587, 0.114])
    assert torch.allclose(luma.image(0)[0], expect, atol=1e-6)
    multi = MedMNISTDataset(images, rng.integers(0, 2, (4, 14)), "multi-label", img_size=28)
    assert multi[1][1].dtype == torch.float32 and multi[1][1].shape == (14,)


def test_one_channel_stem_from_rgb_weights_sums_the_kernels(tmp_path: Path) -> None:
    rgb = davit.create_model("davit_tiny", num_classes=3, **MICRO).eval()
    save_safetensors(rgb.state_dict(), tmp_path / "rgb.safetensors", {"davit_config": rgb.cfg.to_dict()})
    grey = davit.create_model("davit_tiny", pretrained=str(tmp_path / "rgb.safetensors"), in_chans=1).eval()
    assert grey.cfg.in_chans == 1
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5)
    # six channels: RGB twice at half weight, so an RGB image given twice gives the RGB model's answer
    six = davit.create_model("davit_tiny", pretrained=str(tmp_path / "rgb.safetensors"), in_chans=6).eval()
    x3 = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(six(torch.cat([x3, x3], 1)), rgb(x3), atol=1e-5)


# ------------------------------------------------------------------------------------------------------ metrics
def test_metrics_follow_medmnist_conventions() -> None:
    from sklearn.metrics import roc_auc_score

    # multi-class: AUC = mean over classes of one-vs-rest; ACC = argmax
    y = np.array([0, 1, 2, 2])
    s = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.1, 0.5, 0.4], [0.1, 0.1, 0.8]])
    m = medmnist_metrics(y, s, "multi-class")
    ovr = np.mean([roc_auc_score(y == k, s[:, k]) for k in range(3)])
    assert m["auc"] == pytest.approx(100 * ovr) and m["acc"] == pytest.approx(75.0)
    # binary: the positive column, threshold 0.5
    m = medmnist_metrics(
        np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]]), "binary-class"
    )
    assert m["auc"] == pytest.approx(100 * 0.5) and m["acc"] == pytest.approx(50.0)
    # multi-label: per-label AUC averaged; accuracy averaged over labels at 0.5
    yl = np.array([[1, 0], [0, 1], [1, 1]])
    sl = np.array([[0.9, 0.2], [0.1, 0.4], [0.6, 0.7]])
    m = medmnist_metrics(yl, sl, "multi-label")
    assert m["auc"] == pytest.approx(100.0)  # both labels perfectly ranked
    assert m["acc"] == pytest.approx(100 * (3 / 3 + 2 / 3) / 2)  # label 2: 0.4 < 0.5 is a miss


# ----------------------------------------------------------------------------------------------- fine-tuning
def _train(tmp_path: Path, npz: Path, *extra: str) -> dict:
    overrides = [f"data.path={npz}", "model.pretrained=", f"model.overrides={json.dumps(MICRO)}", "data.img_size=28",
                 "train.amp=none", "train.batch_size=16", "train.workers=0", "train.threads=1", "train.device=cpu",
                 "optim.lr=2e-3", "optim.lr_base_batch=0", "sched.warmup=0", *extra]  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/med/medmnist_davit_tiny.yaml", "--out", str(out), *overrides]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_fine_tune_learns_a_quadrant_task_and_scores_the_test_split(tmp_path: Path) -> None:
    npz = _write_npz(tmp_path / "quad.npz", np.random.default_rng(2), rgb=False, dtype=np.uint16)
    summary = _train(tmp_path, npz, "train.epochs=6", "data.in_chans=1")
    assert summary["auc"] > 90 and summary["test_auc"] > 90 and summary["test_acc"] > 60, summary
    # the checkpoint alone reproduces the test figures (its metadata carries task and preprocessing)
    m = evaluate_medmnist(tmp_path / "run" / "last.safetensors", npz, split="test")
    assert m["task"] == "multi-class" and m["images"] == 32
    assert m["auc"] == pytest.approx(summary["test_auc"], abs=1e-6)


def test_multi_label_set_trains_with_bce_and_reports_auc(tmp_path: Path) -> None:
    npz = _write_chest_like(tmp_path / "chest.npz", np.random.default_rng(3))
    summary = _train(tmp_path, npz, "train.epochs=1", "data.in_chans=1")
    assert 0 <= summary["auc"] <= 100 and 0 <= summary["acc"] <= 100 and np.isfinite(summary["test_auc"])
    m = evaluate_medmnist(tmp_path / "run" / "last.safetensors", npz, split="test")
    assert m["task"] == "multi-label" and m["images"] == 12
    assert (m["auc"], m["acc"]) == (pytest.approx(summary["test_auc"]), pytest.approx(summary["test_acc"]))


# ------------------------------------------------------------------------------------------------------ DICOM
def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_rescale_window_and_monochrome1(tmp_path: Path) -> None:
    pixels = np.array([[0, 1000], [2000, 4000]], np.uint16)
    # CT-like: HU = 1 * value - 1024; a window centred at 0 HU, 2000 wide: [-1000, 1000] -> [0, 1]
    f = _write_dicom(tmp_path / "ct.dcm", pixels, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0,
                     WindowWidth=2000)  # fmt: skip
    img = load_dicom(f)
    hu = pixels.astype(np.float32) - 1024
    assert img.dtype == np.float32 and img.shape == (2, 2)
    assert np.allclose(img, np.clip((hu + 1000) / 2000, 0, 1))
    plain = load_dicom(_write_dicom(tmp_path / "plain.dcm", pixels))  # no window: min-max
    assert plain.min() == 0.0 and plain.max() == 1.0 and plain[1, 1] == 1.0
    inverted = load_dicom(_write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))
    assert np.allclose(inverted, 1.0 - plain)  # MONOCHROME1: low values are bright
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom")
    with pytest.raises(ValueError, match="not a readable DICOM"):
        load_dicom(tmp_path / "bad.dcm")
