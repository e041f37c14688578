"""Classification data: digits split, ImageFolder robustness (formats, corrupt files, clear errors), mixup targets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from davit.config import ConfigError, from_dict
from davit.data import (
    ClsDataConfig,
    DigitsDataset,
    ImageFolderDataset,
    ImageReadError,
    build_classification_datasets,
    build_eval_transform,
    build_mixup,
    build_train_transform,
    digits_split,
    imagenet_class_names,
    load_rgb,
    scan_image_folder,
    skipped_images,
)

DIGITS = ClsDataConfig(kind="digits", img_size=32, crop_pct=1.0, auto_augment="", hflip=0.0, reprob=0.0)


def _save(path: Path, img: Image.Image, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _rgb(color: tuple[int, int, int], size: int = 20) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def _folder(root: Path, classes: dict[str, int]) -> Path:
    for name, n in classes.items():
        for i in range(n):
            _save(root / name / f"{i}.png", _rgb((40 * i % 255, 100, 200)))
    return root


# ----------------------------------------------------------------------------------------------------------- digits
def test_digits_split_sizes_disjoint_stratified_and_deterministic() -> None:
    tr, va = digits_split(0.2, seed=0)
    assert (len(tr), len(va)) == (1437, 360)  # 20% of 1797, rounded up by scikit-learn
    assert not set(tr) & set(va) and len(set(tr) | set(va)) == 1797
    tr2, va2 = digits_split(0.2, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    _, va3 = digits_split(0.2, seed=1)
    assert not np.array_equal(va, va3)
    from sklearn.datasets import load_digits

    y = load_digits().target
    counts = np.bincount(y[va], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 of each digit


def test_digits_dataset_images_match_the_source() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    ds = DigitsDataset([5, 100], img_size=32)
    img, label = ds[1]
    assert img.mode == "RGB" and img.size == (32, 32) and label == d.target[100]
    a = np.asarray(img).astype(int)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # grey in 3 channels
    # upscaling keeps the picture: the 4x4 block means follow the 8x8 source (grey level 16 -> 255)
    blocks = a[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))  # (8, 8)
    assert np.corrcoef(blocks.ravel(), d.images[100].ravel())[0, 1] > 0.95


def test_build_digits_datasets() -> None:
    train, val, names = build_classification_datasets(DIGITS)
    assert names == [str(i) for i in range(10)]
    assert (len(train), len(val)) == (1437, 360)
    x, y = val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    xt, _ = train[0]
    assert xt.shape == (3, 32, 32)
    batch = next(iter(DataLoader(val, batch_size=8)))
    assert batch[0].shape == (8, 3, 32, 32) and batch[1].shape == (8,)


def test_config_from_yaml_types_and_validation() -> None:
    cfg = from_dict(ClsDataConfig, {"kind": "digits", "mean": [0.5, 0.5, 0.5], "scale": [0.5, 1.0]})
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="data.kind"):
        from_dict(ClsDataConfig, {"kind": "mnist"})
    with pytest.raises(ValueError, match="crop_pct"):
        ClsDataConfig(crop_pct=1.5)
    assert ClsDataConfig().preprocessing() == {
        "img_size": 224,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }


# ----------------------------------------------------------------------------------------------------------- mixing
def _batch(n: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % num_classes


def test_mixup_soft_targets_sum_to_one_with_smoothing() -> None:
    mix = build_mixup(ClsDataConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), num_classes=10)
    for n in (2, 6, 8):
        x, y = _batch(n)
        xm, t = mix(x.clone(), y)
        assert xm.shape == x.shape and t.shape == (n, 10)
        assert torch.allclose(t.sum(1), torch.ones(n), atol=1e-6)
        assert t.min() >= 0.1 / 10 - 1e-7  # smoothing leaves every class at least eps / C


def test_mixup_images_and_targets_agree() -> None:
    eps, c = 0.1, 10
    mix = build_mixup(ClsDataConfig(mixup=0.8, cutmix=0.0, label_smoothing=eps), num_classes=c)
    x, y = _batch(6, c)  # classes 0..5, each sample paired with its mirror (5..0)
    xm, t = mix(x.clone(), y)
    lam = (t[0, y[0]] - eps / c) / (1 - eps)  # the weight of sample 0's own class
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    assert torch.allclose(t[0, y[-1]], (1 - lam) * (1 - eps) + eps / c, atol=1e-6)

    cut = build_mixup(ClsDataConfig(mixup=0.0, cutmix=1.0, label_smoothing=0.0), num_classes=c)
    x, y = _batch(4, c)
    xc, t = cut(x.clone(), y)
    own = (xc == x).all(1)  # (B, H, W): pixels still from the sample itself
    other = (xc == x.flip(0)).all(1)
    assert (own | other).all()
    lam = t[0, y[0]].item()
    assert own[0].float().mean().item() == pytest.approx(lam, abs=1e-6)  # box area matches the target weight


def test_mixup_odd_batch_keeps_last_sample_smoothed() -> None:
    mix = build_mixup(ClsDataConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), num_classes=10)
    x, y = _batch(7)
    xm, t = mix(x.clone(), y)
    assert torch.equal(xm[-1], x[-1])
    expected = torch.full((10,), 0.01)
    expected[y[-1]] = 0.91
    assert torch.allclose(t[-1], expected) and torch.allclose(t.sum(1), torch.ones(7), atol=1e-6)


def test_mixing_off_gives_none() -> None:
    assert build_mixup(ClsDataConfig(mixup=0.0, cutmix=0.0), 10) is None
    assert build_mixup(ClsDataConfig(mixup_prob=0.0), 10) is None


# ---------------------------------------------------------------------------------------------------- image formats
def test_image_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    grey = _save(tmp_path / "grey.png", Image.new("L", (9, 7), 77))
    im = load_rgb(grey)
    assert im.mode == "RGB" and im.size == (9, 7) and im.getpixel((0, 0)) == (77, 77, 77)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> the white background
    im = load_rgb(_save(tmp_path / "rgba.png", rgba))
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (255, 0, 0)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_rgb(_save(tmp_path / "pal.gif", pal)).getpixel((2, 2)) == (10, 200, 30)

    cmyk = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    r, g, b = load_rgb(cmyk).getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red

    a16 = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    im16 = Image.fromarray(a16)
    assert im16.mode.startswith("I")
    im = load_rgb(_save(tmp_path / "deep.png", im16))
    assert [im.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 127, 255, 3]

    bilevel = _save(tmp_path / "bw.png", Image.new("1", (5, 5), 1))
    assert load_rgb(bilevel).getpixel((0, 0)) == (255, 255, 255)


def test_tiny_images_go_through_both_transforms(tmp_path: Path) -> None:
    im = load_rgb(_save(tmp_path / "dot.png", Image.new("RGB", (1, 1), (9, 99, 199))))
    train_tf = build_train_transform(ClsDataConfig(img_size=32))  # RandAugment, erasing: the full recipe
    eval_tf = build_eval_transform(32, 0.9)
    assert train_tf(im).shape == (3, 32, 32) and eval_tf(im).shape == (3, 32, 32)
    assert eval_tf(load_rgb(_save(tmp_path / "thin.png", Image.new("RGB", (300, 2))))).shape == (3, 32, 32)


def test_default_train_transform_is_the_official_recipe() -> None:
    from sklearn.datasets import load_sample_image

    tf = build_train_transform(ClsDataConfig())
    crop, flip, ra, _, norm, erase = tf.transforms
    assert crop.scale == (0.08, 1.0) and crop.ratio == (0.75, 1.333) and crop.interpolation.value == "bicubic"
    assert flip.p == 0.5
    assert ra.num_layers == 2 and all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    assert {"PosterizeIncreasing", "SolarizeIncreasing"} <= {op.name for op in ra.ops}  # the "inc1" op set
    assert torch.allclose(norm.mean, torch.tensor([0.485, 0.456, 0.406]))
    assert erase.probability == 0.25 and erase.mode == "pixel" and erase.max_count == 1
    x = tf(Image.fromarray(load_sample_image("china.jpg")))
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()


def test_eval_transform_resizes_then_centre_crops() -> None:
    # a 200x100 image: short side 100 -> floor(64 / 0.8) = 80, so 160x80, centre 64x64 crop
    a = np.zeros((100, 200, 3), dtype=np.uint8)
    a[:, 100:] = 255  # right half white: the centre crop straddles the boundary in the middle
    x = build_eval_transform(64, 0.8, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(a))
    assert x.shape == (3, 64, 64)
    assert x[:, :, :30].max() < 0.05 and x[:, :, 34:].min() > 0.95


def test_unreadable_files_raise_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageReadError, match="x.jpg"):
        load_rgb(bad)
    with pytest.raises(ImageReadError, match="not found"):
        load_rgb(tmp_path / "missing.png")


# ----------------------------------------------------------------------------------------------------- ImageFolder
def _corrupt_folder(root: Path) -> Path:
    _folder(root, {"a": 3, "b": 3})
    _save(root / "a" / "x_cmyk.jpg", Image.new("CMYK", (8, 8), (10, 20, 30, 0)))
    full = _save(root / "b" / "x_full.jpg", Image.effect_noise((64, 64), 40).convert("RGB"), quality=90)
    data = full.read_bytes()
    (root / "b" / "y_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "b" / "z_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = ImageFolderDataset(_corrupt_folder(tmp_path / "train"), build_eval_transform(16, 1.0))
    assert ds.classes == ["a", "b"] and len(ds) == 10
    with caplog.at_level(logging.WARNING, logger="davit.data.classification"):
        items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) for x, _ in items)
    # item 8 steps over both bad files, item 9 over the last one: every encounter counts
    assert ds.num_skipped == 3 and skipped_images(ds) == 3
    assert "y_truncated.jpg" in caplog.text and "z_garbage.png" in caplog.text
    # the truncated file's item is replaced by the next readable one (wrapping around to the first)
    names = [Path(p).name for p, _ in ds.samples]
    assert names[-2:] == ["y_truncated.jpg", "z_garbage.png"]
    assert torch.equal(items[-1][0], items[0][0])


def test_an_all_corrupt_folder_stops_with_a_message(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "t" / name).mkdir(parents=True)
        (tmp_path / "t" / name / "x.jpg").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path / "t")
    with pytest.raises(ImageReadError, match="2 consecutive unreadable images"):
        ds[0]


def test_skips_are_counted_across_loader_workers(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_corrupt_folder(tmp_path / "train"), build_eval_transform(16, 1.0))
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    for _ in range(2):  # two epochs: the count accumulates
        n = sum(len(y) for _, y in loader)
        assert n == 10  # the epoch goes on with full batches
    assert skipped_images(ds) == 6


def test_imagefolder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_image_folder(tmp_path / "nowhere")
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(ValueError, match="noclasses holds no class folders"):
        scan_image_folder(tmp_path / "noclasses")

    empty = _folder(tmp_path / "empty", {"cat": 2})
    (empty / "dog").mkdir()
    (empty / "dog" / ".DS_Store").write_bytes(b"")  # hidden junk does not count as an image
    with pytest.raises(ValueError, match=r"class folder .*dog is empty"):
        scan_image_folder(empty)

    notes = _folder(tmp_path / "notes", {"cat": 2})
    (notes / "cat" / "labels.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"cat holds 1 non-image file.*labels.csv"):
        scan_image_folder(notes)

    loose = _folder(tmp_path / "loose", {"cat": 1})
    _save(loose / "stray.png", _rgb((1, 2, 3)))
    with pytest.raises(ValueError, match="stray.png"):
        scan_image_folder(loose)


def test_val_classes_must_match_train(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"cat": 2, "dog": 2})
    _folder(tmp_path / "val", {"cat": 1, "fox": 1})
    cfg = ClsDataConfig(root=str(tmp_path), img_size=16)
    with pytest.raises(ValueError, match=r"val differ.*only in train: dog; only in val: fox"):
        build_classification_datasets(cfg)
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        build_classification_datasets(ClsDataConfig(root=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="data.root is empty"):
        build_classification_datasets(ClsDataConfig())


def test_imagefolder_datasets_train_and_val(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"cat": 3, "dog": 2})
    _folder(tmp_path / "val", {"cat": 1, "dog": 1})
    train, val, names = build_classification_datasets(ClsDataConfig(root=str(tmp_path), img_size=24))
    assert names == ["cat", "dog"] and (len(train), len(val)) == (5, 2)
    assert train.targets == [0, 0, 0, 1, 1] and val.targets == [0, 1]
    x, _ = train[4]
    assert x.shape == (3, 24, 24)
    _, none_val, _ = build_classification_datasets(ClsDataConfig(root=str(tmp_path), val_dir="", img_size=24))
    assert none_val is None


def test_imagefolder_indexes_by_given_class_names(tmp_path: Path) -> None:
    root = _folder(tmp_path / "val", {"dog": 1, "owl": 1})
    ds = ImageFolderDataset(root, class_names=["cat", "dog", "owl"])
    assert ds.targets == [1, 2] and ds.classes == ["cat", "dog", "owl"]
    with pytest.raises(ValueError, match="does not know: owl"):
        ImageFolderDataset(root, class_names=["cat", "dog"])


def test_imagenet_class_names() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
