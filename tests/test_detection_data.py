"""COCO-format detection data: the synthetic generator, targets, the recipe augmentation, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from davit.data.coco import CocoDetection, DetrCrop, build_det_transforms, detection_collate
from davit.data.synthetic_det import CLASSES, make_synthetic_coco, make_synthetic_det


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_synthetic_det(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=4, img_size=96, seed=3)


def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_synthetic_json_is_coco_and_masks_match_boxes(shapes: dict[str, Path]) -> None:
    data = json.loads(shapes["train_ann"].read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    assert len(data["images"]) == 12 and all(
        (shapes["train_images"] / i["file_name"]).is_file() for i in data["images"]
    )
    kinds = {type(a["segmentation"]).__name__ for a in data["annotations"]}
    assert kinds == {"list", "dict"}  # polygons for squares/triangles, RLE for discs
    for ann in data["annotations"]:
        h = w = 96
        seg = ann["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        x, y, bw, bh = mask_utils.toBbox(rle)
        assert [x, y, bw, bh] == ann["bbox"]  # the stored box is the tight box of the decoded mask
        assert ann["area"] > 0 and 1 <= ann["category_id"] <= 3


def test_same_seed_same_files(tmp_path: Path) -> None:
    a = make_synthetic_coco(tmp_path / "a", tmp_path / "a.json", n=3, img_size=64, seed=7)
    b = make_synthetic_coco(tmp_path / "b", tmp_path / "b.json", n=3, img_size=64, seed=7)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a" / "000002.png").read_bytes() == (tmp_path / "b" / "000002.png").read_bytes()


def test_dataset_targets(shapes: dict[str, Path]) -> None:
    ds = CocoDetection(shapes["val_images"], shapes["val_ann"], train=False)
    data = json.loads(shapes["val_ann"].read_text())
    assert len(ds) == 4 and ds.classes == list(CLASSES) and ds.cat_ids == [1, 2, 3]
    img, t = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, 96, 96) and 0 <= img.min() and img.max() <= 1
    anns = [a for a in data["annotations"] if a["image_id"] == int(t["image_id"])]
    assert t["boxes"].shape == (len(anns), 4) and t["labels"].tolist() == [a["category_id"] for a in anns]
    x, y, w, h = anns[0]["bbox"]
    assert t["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h])
    assert t["masks"].shape == (len(anns), 96, 96) and t["masks"].dtype == torch.uint8
    for box, mask in zip(t["boxes"], t["masks"]):
        assert _mask_box(mask) == pytest.approx(box.tolist(), abs=1.0)
    boxes_only = CocoDetection(shapes["val_images"], shapes["val_ann"], with_masks=False)
    assert "masks" not in boxes_only[0][1]


def test_noncontiguous_category_ids_map_to_labels(tmp_path: Path, shapes: dict[str, Path]) -> None:
    data = json.loads(shapes["val_ann"].read_text())
    remap = {1: 7, 2: 30, 3: 90}  # COCO's own ids have gaps (1..90 for 80 classes)
    for c in data["categories"]:
        c["id"] = remap[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    ann = tmp_path / "gaps.json"
    ann.write_text(json.dumps(data))
    ds = CocoDetection(shapes["val_images"], ann)
    assert ds.cat_ids == [7, 30, 90]
    first = [a["category_id"] for a in data["annotations"] if a["image_id"] == 1]
    assert [ds.cat_ids[k - 1] for k in ds[0][1]["labels"].tolist()] == first


@pytest.mark.parametrize("allow_empty", [True, False])
def test_detr_crop_keeps_boxes_and_masks_consistent(shapes: dict[str, Path], allow_empty: bool) -> None:
    crop = DetrCrop(scales=(80, 96), crop_range=(24, 40), max_size=200, allow_empty=allow_empty)
    base = CocoDetection(shapes["train_images"], shapes["train_ann"], train=True, transforms=crop)
    seen_sizes, empties = set(), 0
    for i in range(24):
        torch.manual_seed(i)
        img, t = base[i % len(base)]
        h, w = img.shape[-2:]
        seen_sizes.add((h, w))
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        empties += len(t["boxes"]) == 0
        assert t["masks"].shape[-2:] == (h, w)
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        assert (t["boxes"][:, 0::2] <= w).all() and (t["boxes"][:, 1::2] <= h).all()
        for box, mask in zip(t["boxes"], t["masks"]):
            if mask.any():
                mb = _mask_box(mask)
                # The clipped original box contains the cropped mask.
                assert box[0] - 1 <= mb[0] and box[1] - 1 <= mb[1] and mb[2] <= box[2] + 1 and mb[3] <= box[3] + 1
    assert len(seen_sizes) > 1 and all(24 <= min(s) and max(s) <= 40 for s in seen_sizes)
    # The official configs keep crops without boxes; allow_empty=False redraws them.
    assert (empties > 0) if allow_empty else (empties == 0)


def test_flip_moves_boxes(shapes: dict[str, Path]) -> None:
    plain = CocoDetection(shapes["val_images"], shapes["val_ann"])
    flipped = CocoDetection(
        shapes["val_images"], shapes["val_ann"], transforms=build_det_transforms(True, "flip", flip=1.0)
    )
    (img, t), (fimg, ft) = plain[1], flipped[1]
    assert torch.equal(fimg, img.flip(-1))
    expected = t["boxes"].clone()
    expected[:, [0, 2]] = 96 - t["boxes"][:, [2, 0]]
    assert torch.allclose(ft["boxes"], expected) and torch.equal(ft["masks"], t["masks"].flip(-1))
    assert build_det_transforms(False) is None
    with pytest.raises(ValueError, match="data.aug"):
        build_det_transforms(True, "mosaic")


def test_collate_keeps_lists(shapes: dict[str, Path]) -> None:
    ds = CocoDetection(shapes["val_images"], shapes["val_ann"])
    images, targets = detection_collate([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and isinstance(targets[0], dict)


# ------------------------------------------------------------------------------------------------ bad input
def _broken_copy(tmp_path: Path, shapes: dict[str, Path]) -> tuple[Path, Path]:
    """Train json + images with every kind of damage the field meets."""
    data = json.loads(shapes["train_ann"].read_text())
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for info in data["images"]:
        (img_dir / info["file_name"]).write_bytes((shapes["train_images"] / info["file_name"]).read_bytes())
    (img_dir / data["images"][0]["file_name"]).unlink()  # missing file
    (img_dir / data["images"][1]["file_name"]).write_bytes(b"not a png at all")  # unreadable
    anns = data["annotations"]
    third = [a for a in anns if a["image_id"] == data["images"][2]["id"]]
    third[0]["bbox"][2] = 0.0  # zero width
    for a in third[1:]:
        a["bbox"][3] = -5.0  # negative height: image 3 is left without a valid box
    # image 4: all its annotations removed -> an image without annotations
    data["annotations"] = [a for a in anns if a["image_id"] != data["images"][3]["id"]]
    ann = tmp_path / "broken.json"
    ann.write_text(json.dumps(data))
    return img_dir, ann


def test_bad_input_is_skipped_with_counts(
    tmp_path: Path, shapes: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    img_dir, ann = _broken_copy(tmp_path, shapes)
    with caplog.at_level(logging.WARNING):
        train = CocoDetection(img_dir, ann, train=True)
    assert train.skipped["missing image files"] == 1
    assert train.skipped["unreadable images"] == 1
    assert train.skipped["boxes of zero or negative size"] == len(
        [a for a in json.loads(shapes["train_ann"].read_text())["annotations"] if a["image_id"] == 3]
    )
    assert train.skipped["training images without annotations"] == 2  # images 3 and 4
    assert len(train) == 12 - 4
    assert "000000.png" in caplog.text and "missing image files" in caplog.text
    for i in range(len(train)):  # every kept sample loads and has valid boxes
        _, t = train[i]
        assert len(t["boxes"]) and (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
    # Evaluation keeps images without annotations (they count as true negatives).
    val = CocoDetection(img_dir, ann, train=False)
    assert len(val) == 12 - 2 and "training images without annotations" not in val.skipped
    assert 4 in val.image_ids and len(val[val.image_ids.index(4)][1]["boxes"]) == 0
    gt = val.coco_gt()
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in gt.dataset["annotations"])


def test_image_broken_after_start_names_the_file(tmp_path: Path, shapes: dict[str, Path]) -> None:
    img_dir, ann = _broken_copy(tmp_path, shapes)
    ds = CocoDetection(img_dir, ann, train=False)
    path = ds.records[0].path
    path.write_bytes(path.read_bytes()[:60])  # truncated after the start-up check
    with pytest.raises(ValueError, match=path.name):
        ds[0]


def test_bad_files_raise_clear_errors(tmp_path: Path, shapes: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetection(shapes["val_images"], tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoDetection(tmp_path / "nope", shapes["val_ann"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(shapes["val_images"], bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        CocoDetection(shapes["val_images"], bad)
    # The wrong image folder: nothing usable, and the message says what to check.
    with pytest.raises(ValueError, match="no usable image"):
        CocoDetection(tmp_path, shapes["val_ann"])


def test_polygon_too_short_falls_back_without_crash(tmp_path: Path, shapes: dict[str, Path]) -> None:
    data = json.loads(shapes["val_ann"].read_text())
    target = data["annotations"][0]
    target["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # two points: not a polygon
    ann = tmp_path / "short.json"
    ann.write_text(json.dumps(data))
    ds = CocoDetection(shapes["val_images"], ann)
    idx = ds.image_ids.index(target["image_id"])
    _, t = ds[idx]
    x, y, w, h = (round(v) for v in target["bbox"])
    assert int(t["masks"][0].sum()) == w * h  # the box as its mask


def test_image_size_from_file_when_json_lacks_it(tmp_path: Path) -> None:
    img_dir = tmp_path / "im"
    img_dir.mkdir()
    Image.new("RGB", (50, 40), (10, 200, 30)).save(img_dir / "a.png")
    data = {
        "images": [{"id": 5, "file_name": "a.png"}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [40, 30, 30, 30], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = CocoDetection(img_dir, tmp_path / "a.json", train=True)
    _, t = ds[0]
    assert t["boxes"].tolist() == [[40.0, 30.0, 50.0, 40.0]]  # clipped to the 50x40 image
    assert t["masks"].shape == (1, 40, 50)


def test_task_config_errors(shapes: dict[str, Path]) -> None:
    import dataclasses

    from davit.config import ConfigError, ModelConfig
    from davit.tasks.detection.task import DetConfig, DetDataConfig, DetTask

    with pytest.raises(ConfigError, match="data.train_ann"):
        DetTask(DetConfig()).build_datasets()
    data = DetDataConfig(train_images=str(shapes["train_images"]), train_ann=str(shapes["train_ann"]))
    cfg = DetConfig(data=data, model=ModelConfig(num_classes=5))
    with pytest.raises(ConfigError, match="3 categories"):
        DetTask(cfg).build_datasets()
    task = DetTask(dataclasses.replace(cfg, model=ModelConfig()))
    train, val = task.build_datasets()
    assert val is None and task.class_names == list(CLASSES) and len(train) == 12
    with pytest.raises(ValueError, match="detector.arch"):
        from davit.tasks.detection.task import DetectorConfig

        DetectorConfig(arch="fcos")
