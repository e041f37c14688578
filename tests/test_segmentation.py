"""Segmentation: UperNet model, losses, metrics, inference modes, checkpoint loading (official mmseg layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from official_layout import to_official
from sklearn.metrics import confusion_matrix, jaccard_score

import davit
from davit.tasks.segmentation import (
    ConfusionMatrix,
    SegTask,
    build_seg_model,
    infer_probs,
    load_seg_config,
    load_segmentation_checkpoint,
    metrics_from_confusion,
    slide_logits,
    whole_logits,
)

MICRO = [
    "model.overrides={embed_dims: [32, 64, 128, 256], depths: [1, 1, 1, 1], num_heads: [1, 2, 4, 8], window_size: 4}",
    "head.channels=16",
    "head.aux_channels=8",
    "data.num_classes=5",
]


def micro_cfg(*extra: str):
    return load_seg_config(None, [*MICRO, *extra])


@pytest.fixture
def micro_model():
    return build_seg_model(micro_cfg(), 5)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


# ------------------------------------------------------------------------------------------------ model and loss
def test_forward_shapes_train_and_eval(micro_model):
    x = torch.randn(2, 3, 70, 90)  # not a multiple of 32: the backbone pads, the head resizes back
    micro_model.train()
    out = micro_model(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 5, 70, 90)
    micro_model.eval()
    with torch.no_grad():
        out = micro_model(x)
    assert set(out) == {"out"} and out["out"].shape == (2, 5, 70, 90)


def test_loss_dict_combines_aux_with_weight_and_ignores_255(micro_model):
    task = SegTask(micro_cfg())
    x = torch.randn(2, 3, 64, 64)
    mask = torch.randint(0, 5, (2, 64, 64))
    mask[:, :10] = 255
    micro_model.train()
    torch.manual_seed(1)
    out = task.loss_fn(micro_model, {"img": x, "mask": mask})
    assert {"loss", "loss_seg", "loss_aux", "acc_seg"} <= set(out)
    assert torch.allclose(out["loss"], out["loss_seg"] + 0.4 * out["loss_aux"])
    out["loss"].backward()
    assert micro_model.decode_head.conv_seg.weight.grad is not None
    assert micro_model.auxiliary_head.conv_seg.weight.grad is not None
    # The ignored rows contribute nothing: changing their logits' targets to other ignored values changes nothing.
    micro_model.eval()
    with torch.no_grad():
        logits = micro_model(x)["out"]
    from davit.tasks.segmentation.task import seg_loss

    full = torch.nn.functional.cross_entropy(logits[:, :, 10:], mask[:, 10:], reduction="sum")
    assert torch.allclose(seg_loss(logits, mask), full / mask.numel(), rtol=1e-5)  # mmseg 0.11: mean over all pixels
    assert torch.allclose(seg_loss(logits, mask, avg_non_ignore=True), full / (2 * 54 * 64), rtol=1e-5)


def test_loss_rejects_labels_outside_class_range(micro_model):
    task = SegTask(micro_cfg())
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    mask[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels \[7\] are outside 0..4"):
        task.loss_fn(micro_model.train(), {"img": torch.randn(2, 3, 32, 32), "mask": mask})
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        task.loss_fn(micro_model.train(), {"img": torch.randn(1, 3, 32, 32), "mask": mask[:1] * 0})


def test_grad_checkpointing_gives_the_same_gradients():
    cfg = micro_cfg("head.dropout=0.0", "model.overrides.drop_path_rate=0.0")  # deterministic forward
    task = SegTask(cfg)
    model = build_seg_model(cfg, 5).train()
    batch = {"img": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 5, (2, 32, 32))}
    task.loss_fn(model, batch)["loss"].backward()
    plain = model.backbone.stem.conv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    task.loss_fn(model, batch)["loss"].backward()
    assert model.backbone.stages[0].grad_checkpointing
    torch.testing.assert_close(model.backbone.stem.conv.weight.grad, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "params_m"), [("tiny", 60.0), ("small", 81.4), ("base", 121.5)])
def test_official_recipes_build_the_reported_sizes(name, params_m):
    # README: UperNet-DaViT T/S/B = 60M / 81M / 121M parameters (150 classes, aux head included).
    cfg = load_seg_config(f"configs/seg/upernet_davit_{name}_ade20k.yaml", ["model.pretrained="])
    with torch.device("meta"):
        model = build_seg_model(cfg, 150)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) < 0.1
    assert model.auxiliary_head.convs[0][0].in_channels == model.backbone.feature_info[2]["num_chs"]
    assert len(model.decode_head.psp_modules) == 4 and model.decode_head.conv_seg.in_channels == 512
    assert isinstance(model.decode_head.bottleneck[1], torch.nn.BatchNorm2d)


# ------------------------------------------------------------------------------------------------------- metrics
def test_metrics_match_an_independent_computation():
    rng = np.random.default_rng(0)
    k = 4
    target = rng.integers(0, k, size=(3, 20, 20))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, k, size=target.shape))
    target[0, :5] = 255  # ignored pixels
    pred[pred == 3] = 2  # class 3 never predicted: IoU 0, still in the mean
    cm = ConfusionMatrix(k)
    for p, t in zip(pred, target):
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
    m = cm.compute(["a", "b", "c", "d"])

    keep = target != 255
    t, p = target[keep], pred[keep]
    ious = jaccard_score(t, p, labels=list(range(k)), average=None)
    ref_cm = confusion_matrix(t, p, labels=list(range(k)))
    assert torch.equal(cm.mat, torch.from_numpy(ref_cm))
    assert m["miou"] == pytest.approx(100 * ious.mean())
    assert m["iou.d"] == 0.0
    assert m["aacc"] == pytest.approx(100 * (t == p).mean())
    per_class_acc = [((p == c) & (t == c)).sum() / (t == c).sum() for c in range(k)]
    assert m["macc"] == pytest.approx(100 * np.mean(per_class_acc))


def test_metrics_hand_made_confusion_matrix():
    # rows = truth, cols = prediction. IoU: 8/(10+9-8)=8/11, 5/(6+7-5)=5/8, class 2 absent everywhere -> left out.
    mat = torch.tensor([[8, 2, 0], [1, 5, 0], [0, 0, 0]])
    m = metrics_from_confusion(mat, ["x", "y", "z"])
    assert m["miou"] == pytest.approx(100 * (8 / 11 + 5 / 8) / 2)
    assert m["macc"] == pytest.approx(100 * (8 / 10 + 5 / 6) / 2)
    assert m["aacc"] == pytest.approx(100 * 13 / 16)
    assert "iou.z" not in m


# ----------------------------------------------------------------------------------------------------- inference
def test_sliding_window_equals_whole_when_the_image_fits_one_window(micro_model):
    micro_model.eval()
    x = torch.randn(1, 3, 48, 56)
    with torch.no_grad():
        whole = whole_logits(micro_model, x)
        slide = slide_logits(micro_model, x, crop=(64, 64), stride=(40, 40))
        exact = slide_logits(micro_model, x, crop=(48, 56), stride=(32, 32))
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(exact, whole)


def test_sliding_window_covers_large_images_with_averaged_overlaps(micro_model):
    micro_model.eval()
    x = torch.randn(1, 3, 96, 130)
    with torch.no_grad():
        slide = slide_logits(micro_model, x, crop=(64, 64), stride=(40, 40))
        # windows start at rows 0, 32 (the last one is shifted back inside the image) and columns 0, 40, 66: the
        # top-left window alone covers rows < 32 and columns < 40
        first = whole_logits(micro_model, x[:, :, :64, :64])
    assert slide.shape == (1, 5, 96, 130) and torch.isfinite(slide).all()
    torch.testing.assert_close(slide[:, :, :32, :40], first[:, :, :32, :40])
    second = whole_logits(micro_model, x[:, :, :64, 40:104])
    overlap = (first[:, :, :32, 40:64] + second[:, :, :32, :24]) / 2
    torch.testing.assert_close(slide[:, :, :32, 40:64], overlap)


def test_multiscale_flip_probabilities(micro_model):
    micro_model.eval()
    x = torch.randn(1, 3, 40, 60)
    single = infer_probs(micro_model, x)
    aug = infer_probs(micro_model, x, ratios=(0.5, 1.0, 1.5), flip=True, out_size=(20, 30))
    assert single.shape == (1, 5, 40, 60) and aug.shape == (1, 5, 20, 30)
    torch.testing.assert_close(aug.sum(1), torch.ones(1, 20, 30))
    # flip averaging makes the prediction of a mirrored image the mirror of the prediction
    mirrored = infer_probs(micro_model, x.flip(-1), ratios=(1.0,), flip=True)
    torch.testing.assert_close(mirrored.flip(-1), infer_probs(micro_model, x, ratios=(1.0,), flip=True))
    # the test scale rescales the input (keeping the aspect ratio) and maps the result back to out_size
    scaled = infer_probs(micro_model, x, scale=(120, 80))
    assert scaled.shape == (1, 5, 40, 60)


# ----------------------------------------------------------------------------------------------- checkpoints
def _to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our segmentation model's keys -> the official mmseg layout (facts 4.4 and mmcv ConvModule names)."""
    heads = [
        (r"^((?:decode|auxiliary)_head\.(?!conv_seg).*)\.0\.weight$", r"\1.conv.weight"),
        (r"^((?:decode|auxiliary)_head\..*)\.1\.(weight|bias|running_\w+|num_batches_tracked)$", r"\1.bn.\2"),
    ]
    return to_official(sd, prefix="backbone.", extra_rules=heads)


def _randomise(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g) * 0.1
                t.copy_(r.abs() + 0.5 if "running_var" in name else r)


def test_official_mmseg_checkpoint_loads_backbone_and_heads(tmp_path, micro_model):
    _randomise(micro_model)
    official = _to_official(micro_model.state_dict())
    assert "backbone.main_blocks.0.0.0.cpe.0.proj.weight" in official and "backbone.norm3.weight" in official
    assert "decode_head.psp_modules.0.1.conv.weight" in official and "decode_head.fpn_bottleneck.bn.weight" in official
    assert "auxiliary_head.convs.0.conv.weight" in official and "decode_head.conv_seg.weight" in official
    path = tmp_path / "upernet_davit_official.pth"
    torch.save({"meta": {"mmseg_version": "0.11.0"}, "state_dict": official}, path)

    fresh = build_seg_model(micro_cfg(), 5)
    report = load_segmentation_checkpoint(fresh, path, strict=True)
    assert report["source"] == "official_dense" and not report["heads_skipped"]
    assert report["heads_loaded"] == sum(1 for k in official if not k.startswith("backbone."))
    micro_model.eval()
    fresh.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)["out"], micro_model(x)["out"], rtol=0, atol=0)

    # The same file through the config path (model.pretrained=FILE).
    via_cfg = build_seg_model(micro_cfg(f"model.pretrained={path}"), 5).eval()
    with torch.no_grad():
        torch.testing.assert_close(via_cfg(x)["out"], micro_model(x)["out"], rtol=0, atol=0)


def test_classification_checkpoint_initialises_the_backbone_only(tmp_path):
    cfg = micro_cfg()
    clf = davit.create_model("davit_tiny", num_classes=7, **cfg.model.overrides)
    path = tmp_path / "clf.pth"
    torch.save({"state_dict": {k: v.clone() for k, v in clf.state_dict().items()}}, path)
    model = build_seg_model(micro_cfg(f"model.pretrained={path}"), 5)
    torch.testing.assert_close(model.backbone.stem.conv.weight, clf.stem.conv.weight)
    last = model.backbone.stages[3].blocks[0][1].mlp.fc2.weight
    torch.testing.assert_close(last, clf.stages[3].blocks[0][1].mlp.fc2.weight)
    report = load_segmentation_checkpoint(build_seg_model(cfg, 5), path)
    assert any(k.startswith("out_norms") for k in report["reinitialized"])  # stage norms start fresh
    assert any(k.startswith("head.") for k in report["unexpected"])  # classifier head dropped
    assert report["heads_loaded"] == 0


def test_checkpoint_of_another_size_is_a_clear_error(tmp_path):
    other = build_seg_model(micro_cfg("model.overrides.embed_dims=[16, 32, 64, 128]"), 5)
    path = tmp_path / "other.pth"
    torch.save(_to_official(other.state_dict()), path)
    with pytest.raises(davit.CheckpointError, match="another size"):
        load_segmentation_checkpoint(build_seg_model(micro_cfg(), 5), path)
