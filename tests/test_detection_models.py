"""Mask R-CNN / RetinaNet on DaViT + FPN: feature pyramids, loss dicts, outputs, transforms, weights loading."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from official_layout import to_official

import davit
from davit.tasks.detection.backbone import DaViTFPN, build_davit_backbone
from davit.tasks.detection.models import MultiScaleTransform, build_detector
from davit.weights import CheckpointError, save_safetensors

# The last stage is as wide as the FPN, the case where torchvision's P6/P7 would silently switch to P5.
MICRO = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
SMALL_HEADS = dict(
    fpn_channels=64,
    representation_size=64,
    mask_channels=32,
    box_batch_size_per_image=32,
    rpn_batch_size_per_image=32,
    train_sizes=(96,),
    test_size=96,
    max_size=160,
)


def _detector(arch: str, num_classes: int = 3, **kw: object) -> torch.nn.Module:
    return build_detector(
        arch, num_classes, backbone_overrides={**MICRO, "drop_path_rate": 0.0}, **{**SMALL_HEADS, **kw}
    )


def _targets(with_masks: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g), torch.rand(3, 80, 112, generator=g)]
    t0 = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 5.0, 90.0, 40.0]]), "labels": torch.tensor([1, 3])}
    t1 = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # an image without objects
    if with_masks:
        m = torch.zeros(2, 96, 96, dtype=torch.uint8)
        m[0, 12:60, 10:50] = 1
        m[1, 5:40, 60:90] = 1
        t0["masks"] = m
        t1["masks"] = torch.zeros(0, 80, 112, dtype=torch.uint8)
    return images, [t0, t1]


@pytest.mark.parametrize(
    ("extra", "names", "strides"),
    [
        ("pool", ["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64]),
        ("p6p7", ["1", "2", "3", "p6", "p7"], [8, 16, 32, 64, 128]),
    ],
)
def test_fpn_levels_and_strides(extra: str, names: list[str], strides: list[int]) -> None:
    out_indices = (0, 1, 2, 3) if extra == "pool" else (1, 2, 3)
    fpn = build_davit_backbone("davit_tiny", out_indices=out_indices, fpn_channels=64, extra=extra, **MICRO).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        feats = fpn(x)
    assert list(feats) == names and fpn.out_channels == 64
    for f, s in zip(feats.values(), strides):
        assert f.shape == (1, 64, 128 // s, 128 // s)
    if extra == "p6p7":
        # mmdet 'on_input': P6 comes from the backbone's C5, even though C5 is as wide as the FPN here.
        assert "0" not in fpn.body.out_norms  # stage 1's norm is not built when its map is unused
        with torch.no_grad():
            c5 = fpn.body(x)[-1]
            p6 = fpn.fpn.extra_blocks.p6(c5)
        assert torch.allclose(feats["p6"], p6)


def test_fpn_needs_features_only() -> None:
    with pytest.raises(ValueError, match="features_only"):
        DaViTFPN(davit.create_model("davit_tiny", **MICRO))


@pytest.mark.parametrize("arch", ["mask_rcnn", "faster_rcnn", "retinanet"])
def test_losses_and_outputs(arch: str) -> None:
    model = _detector(arch)
    images, targets = _targets(with_masks=arch == "mask_rcnn")  # faster_rcnn: box-only targets
    model.train()
    losses = model(images, targets)
    two_stage = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    expected = {
        "mask_rcnn": two_stage | {"loss_mask"},
        "faster_rcnn": two_stage,
        "retinanet": {"classification", "bbox_regression"},
    }[arch]
    assert set(losses) == expected
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    body_grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert all(g is not None for g in body_grads) and any(g.abs().sum() > 0 for g in body_grads)
    model.eval()
    with torch.no_grad():
        outs = model(images)
    assert len(outs) == 2
    for out, img in zip(outs, images):
        n = len(out["boxes"])
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
        if n:
            # boxes come back in the input image's pixels, labels in 1..K
            assert out["boxes"][:, 2].max() <= img.shape[2] and out["boxes"][:, 3].max() <= img.shape[1]
            assert 1 <= out["labels"].min() and out["labels"].max() <= 3
        if arch == "mask_rcnn":
            assert out["masks"].shape == (n, 1, *img.shape[1:])
        else:
            assert "masks" not in out


def test_multiscale_transform_sizes() -> None:
    tf = MultiScaleTransform(train_sizes=(64, 96), test_size=80, max_size=120)
    img = torch.rand(3, 50, 100)
    tf.train()
    seen = set()
    for i in range(20):
        torch.manual_seed(i)
        batch, _ = tf([img])
        seen.add(batch.image_sizes[0])
    # short side 64 (long 128 > 120: capped to 120 -> short 60) or 96 (long 192 -> capped, short 60)
    assert seen == {(60, 120)}
    tf2 = MultiScaleTransform(train_sizes=(32, 48), test_size=40, max_size=1000)
    tf2.train()
    sizes = set()
    for i in range(30):
        torch.manual_seed(i)
        sizes.add(tf2([img])[0].image_sizes[0])
    assert sizes == {(32, 64), (48, 96)}
    tf2.eval()
    batch, _ = tf2([img])
    assert batch.image_sizes[0] == (40, 80) and batch.tensors.shape[-2] % 32 == 0 and batch.tensors.shape[-1] % 32 == 0


def test_tiny_parameter_counts_match_the_paper() -> None:
    # Paper/README: Mask R-CNN DaViT-T 47.8M, RetinaNet DaViT-T 38.5M (80 COCO classes).
    mask = sum(p.numel() for p in build_detector("mask_rcnn", 80).parameters())
    retina = sum(p.numel() for p in build_detector("retinanet", 80).parameters())
    assert abs(mask / 1e6 - 47.8) < 0.15
    assert abs(retina / 1e6 - 38.5) < 0.15


def test_bad_arch_and_classes() -> None:
    with pytest.raises(ValueError, match="arch"):
        build_detector("yolo", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("retinanet", 0)


# ------------------------------------------------------------------------------------------------ weights
def _randomise(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_official_mmdet_checkpoint_gives_identical_backbone(
    tmp_path: Path, arch: str, caplog: pytest.LogCaptureFixture
) -> None:
    src = davit.create_model("davit_tiny", features_only=True, **MICRO).eval()
    _randomise(src)  # every tensor differs from a fresh init, the per-stage norms included
    sd = {f"backbone.{k}": v for k, v in to_official(src.state_dict()).items()}
    assert "backbone.norm0.weight" in sd and "backbone.patch_embeds.1.proj.weight" in sd
    # an mmdet file also holds the neck and heads, which do not map onto torchvision's and are left aside
    sd["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 16, 1, 1)
    sd["rpn_head.rpn_conv.weight"] = torch.randn(256, 256, 3, 3)
    path = tmp_path / "mask_rcnn_davit_official.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 12}}, path)
    with caplog.at_level(logging.INFO):
        det = build_detector(arch, 3, pretrained=str(path), backbone_overrides=MICRO, **SMALL_HEADS).eval()
    assert "loaded" in caplog.text and "not loaded" in caplog.text  # the report line and the heads note
    x = torch.randn(2, 3, 70, 90)  # not a multiple of the window: the padding paths too
    with torch.no_grad():
        ref = src(x)
        got = det.backbone.body(x)
    start = 0 if arch == "mask_rcnn" else 1  # RetinaNet's FPN starts at stage 2
    assert len(got) == 4 - start
    for a, b in zip(ref[start:], got):
        assert torch.equal(a, b)


def test_classification_checkpoint_initialises_backbone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cls = davit.create_model("davit_tiny", num_classes=5, **MICRO).eval()
    _randomise(cls)
    files = {"ours.safetensors": cls.state_dict(), "official.pth": to_official(cls.state_dict())}
    for name, sd in files.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_safetensors(dict(sd), path)
        else:
            torch.save({"state_dict": sd}, path)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            det = build_detector("mask_rcnn", 3, pretrained=str(path), backbone_overrides=MICRO, **SMALL_HEADS)
        assert re.search(r"loaded \d+ tensors", caplog.text)
        body = det.backbone.body.state_dict()
        for k, v in cls.state_dict().items():
            if not k.startswith("head."):
                assert torch.equal(body[k], v), k
        # the per-stage norms are not in a classification checkpoint: freshly initialised (LayerNorm 1 / 0)
        assert torch.equal(body["out_norms.2.weight"], torch.ones(48))


def test_wrong_size_checkpoint_is_refused(tmp_path: Path) -> None:
    other = davit.create_model("davit_tiny", features_only=True, **{**MICRO, "embed_dims": (8, 16, 32, 64)})
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in to_official(other.state_dict()).items()}}, path)
    with pytest.raises(CheckpointError, match="another size"):
        build_detector("retinanet", 3, pretrained=str(path), backbone_overrides=MICRO, **SMALL_HEADS)


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_autocast_reaches_only_the_backbone_and_checkpointing_is_exact(arch: str) -> None:
    model = _detector(arch)
    images, targets = _targets(with_masks=arch == "mask_rcnn")
    seen: list[torch.dtype] = []
    model.backbone.body.stages[2].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.train()
    torch.manual_seed(1)
    plain = model(images, targets)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    ckpt = model(images, targets)
    assert all(torch.allclose(plain[k], ckpt[k]) for k in plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
        model.eval()
        with torch.no_grad():
            outs = model(images)
    assert seen[-2:] == [torch.bfloat16, torch.bfloat16] and seen[0] == torch.float32
    # heads, box coding and losses in float32: bf16 would round a 1333-px box to 4-8 px
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert all(o["boxes"].dtype == torch.float32 and o["scores"].dtype == torch.float32 for o in outs)
