"""The ImageNet-22K pre-training and 22K -> 1K fine-tuning recipes for DaViT-Large: what they build and read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import davit
from davit.engine.run import load_run_config
from davit.models.flops import count_macs

CLS = Path(__file__).resolve().parents[1] / "configs" / "cls"


def _model(cfg, device: str = "meta") -> davit.DaViT:
    m = cfg.model
    return davit.create_model(m.name, num_classes=m.num_classes or 1000, device=device, **m.overrides)


def test_in22k_pretraining_recipe() -> None:
    name, cfg = load_run_config(CLS / "davit_large_in22k.yaml", ["data.root=/data/imagenet22k"])
    assert name == "cls" and cfg.model.name == "davit_large" and cfg.model.num_classes == 21841
    assert cfg.data.img_size == 224 and cfg.model.overrides["window_size"] == 7
    assert (cfg.data.train_dir, cfg.data.val_dir) == ("", "")  # synset folders directly under data.root
    assert cfg.optim.lr == 1e-3 and cfg.optim.lr_base_batch == 4096 and cfg.train.epochs == 90
    model = _model(cfg)
    # L's official 196,811,752 with a 21,841-way head instead of 1,000: + 1537 x 20,841
    assert sum(p.numel() for p in model.parameters()) == 196_811_752 + 1537 * 20_841
    assert model.cfg.window_size == 7


def test_in22k_to_in1k_384_finetune_recipe() -> None:
    _, cfg = load_run_config(CLS / "davit_large_in22k_ft_in1k_384.yaml", ["data.root=/data/imagenet"])
    assert cfg.model.reset_head and cfg.data.img_size == 384 and cfg.data.crop_pct == 1.0
    model = _model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 196_811_752  # the official DaViT_large_window12_384
    assert count_macs(model.cfg, 384) / 1e9 == pytest.approx(102.97, abs=0.005)  # the official 102,966,676,992


def test_the_22k_folder_layout_reads_with_the_pretraining_data_settings(tmp_path: Path) -> None:
    # root/<wnid>/*.JPEG, no train/ or val/ level: the recipe's train_dir="" reads the synset folders in place
    for wnid in ("n00004475", "n00005787", "n00006024"):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / wnid / f"{wnid}_1.JPEG")
    over = [f"data.root={tmp_path}", "model.num_classes=3", "data.img_size=32", "data.auto_augment="]
    _, cfg = load_run_config(CLS / "davit_large_in22k.yaml", over)
    from davit.data import build_classification_datasets

    train, val, classes = build_classification_datasets(cfg.data)
    assert classes == ["n00004475", "n00005787", "n00006024"] and val is None and len(train) == 3
    x, y = train[0]
    assert x.shape == (3, 32, 32) and int(y) == 0
    assert torch.isfinite(x).all()
