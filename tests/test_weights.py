"""Checkpoint formats: every public layout converts onto ours and gives the reference model's outputs; bad files give
clear errors; published weights resolve through the hub cache offline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from official_layout import to_official

import davit
from davit.weights import CheckpointError, convert_state_dict, read_checkpoint, save_safetensors

timm = pytest.importorskip("timm")

MICRO = dict(embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def timm_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturb(timm.create_model("davit_tiny", num_classes=1000))


def to_mmpretrain(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official -> mmpretrain names, following its published converter's rules (facts section 4.4)."""
    out = {}
    for k, v in official.items():
        if k.startswith("patch_embeds.0"):
            k = "backbone." + k.replace("patch_embeds.0", "patch_embed").replace("proj", "projection")
        elif k.startswith("patch_embeds."):
            i = int(k.split(".")[1])
            k = "backbone." + k.replace(f"patch_embeds.{i}", f"stages.{i - 1}.downsample").replace("proj", "projection")
        elif k.startswith("main_blocks."):
            s, b, j = k.split(".")[1:4]
            rest = ".".join(k.split(".")[4:])
            kind = "spatial_block" if j == "0" else "channel_block"
            rest = rest.replace("cpe.0", "cpe1").replace("cpe.1", "cpe2")
            rest = rest.replace("mlp.fc1", "ffn.layers.0.0").replace("mlp.fc2", "ffn.layers.1")
            if kind == "spatial_block":
                rest = rest.replace("attn.", "attn.w_msa.")
            k = f"backbone.stages.{s}.blocks.{b}.{kind}.{rest}"
        elif k.startswith("norms."):
            k = "backbone." + k.replace("norms", "norm3")
        elif k.startswith("head."):
            k = k.replace("head.", "head.fc.")
        out[k] = v
    return out


def to_florence_hub(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm named-block names -> the Florence-2 hub remote-code names (``vision_tower.`` prefix)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head."):
            continue
        k = k.replace("stem.conv.", "convs.0.proj.").replace("stem.norm.", "convs.0.norm.")
        k = re.sub(r"^stages\.(\d+)\.downsample\.conv\.", r"convs.\1.proj.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.norm\.", r"convs.\1.norm.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.", r"blocks.\1.", k)
        attn = "window_attn" if ".spatial_block." in k else "channel_attn"
        k = k.replace(".norm1.", f".{attn}.norm.").replace(".attn.", f".{attn}.fn.")
        k = k.replace(".norm2.", ".ffn.norm.").replace(".mlp.", ".ffn.fn.net.")
        k = k.replace(".cpe1.proj.", ".conv1.fn.dw.").replace(".cpe2.proj.", ".conv2.fn.dw.")
        out["vision_tower." + k] = v
    out["language_model.lm_head.weight"] = torch.zeros(3, 3)  # the rest of Florence-2 rides along
    return out


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_official_checkpoint_with_wrapper_and_module_prefix(timm_tiny: torch.nn.Module) -> None:
    official = {"module." + k: v for k, v in to_official(timm_tiny.state_dict()).items()}
    sd = convert_state_dict({"state_dict": official, "epoch": 300})
    assert sd.source == "official"
    model = davit.create_model("davit_tiny")
    report = davit.load_checkpoint(model, sd)
    assert report["loaded"] == 212 and not report["missing"]
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(_logits(timm_tiny, x), _logits(model, x), atol=1e-4, rtol=1e-4)


def test_davit_convert_cli_on_official_pth(timm_tiny: torch.nn.Module, tmp_path: Path) -> None:
    src, dst = tmp_path / "davit_tiny_official.pth.tar", tmp_path / "tiny.safetensors"
    torch.save({"state_dict": to_official(timm_tiny.state_dict()), "arch": "DaViT_tiny"}, src)
    r = subprocess.run(
        [sys.executable, "-m", "davit", "convert", str(src), str(dst), "--model", "davit_tiny"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "official" in r.stdout
    model = davit.create_model("davit_tiny", pretrained=str(dst))
    x = torch.randn(2, 3, 250, 333)
    assert torch.allclose(_logits(timm_tiny, x), _logits(model, x), atol=1e-4, rtol=1e-4)
    info = subprocess.run(
        [sys.executable, "-m", "davit", "info", str(dst), "--json"], capture_output=True, text=True, check=True
    )
    assert '"model": "davit_tiny"' in info.stdout and '"params": 28360168' in info.stdout


def test_mmpretrain_layout(timm_tiny: torch.nn.Module) -> None:
    sd = convert_state_dict({"meta": {}, "state_dict": to_mmpretrain(to_official(timm_tiny.state_dict()))})
    assert sd.source == "mmpretrain"
    model = davit.create_model("davit_tiny")
    davit.load_checkpoint(model, sd)
    x = torch.randn(1, 3, 96, 96)
    assert torch.allclose(_logits(timm_tiny, x), _logits(model, x), atol=1e-4, rtol=1e-4)


def test_official_dense_checkpoint_into_backbone_and_classifier(timm_tiny: torch.nn.Module) -> None:
    official = to_official(timm_tiny.state_dict())
    backbone = {k: v for k, v in official.items() if not k.startswith(("norms.", "head."))}
    for i, c in enumerate((96, 192, 384, 768)):
        backbone[f"norm{i}.weight"] = torch.rand(c) + 0.5
        backbone[f"norm{i}.bias"] = torch.randn(c)
    ckpt = {
        "meta": {"epoch": 12},
        "state_dict": {
            **{"backbone." + k: v for k, v in backbone.items()},
            "decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1),
        },
    }
    sd = convert_state_dict(ckpt)
    assert sd.source == "official_dense"
    assert list(sd.extra) == ["decode_head.conv_seg.weight"]
    dense = davit.create_model("davit_tiny", features_only=True)
    report = davit.load_checkpoint(dense, sd)
    assert not report["missing"]
    assert torch.equal(dense.out_norms["2"].bias, backbone["norm2.bias"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = timm_tiny.forward_intermediates(x, intermediates_only=True)[3]
        ref = torch.nn.functional.layer_norm(
            ref.permute(0, 2, 3, 1), (768,), backbone["norm3.weight"], backbone["norm3.bias"]
        ).permute(0, 3, 1, 2)
        assert torch.allclose(dense.eval()(x)[3], ref, atol=1e-4)
    # The same dense file into a classifier: backbone loads, head stays fresh and is reported.
    clf = davit.create_model("davit_tiny")
    report = davit.load_checkpoint(clf, sd)
    assert any(k.startswith("head.") for k in report["reinitialized"])
    assert any(k.startswith("out_norms") for k in report["unexpected"])


def test_classification_checkpoint_into_dense_backbone(timm_tiny: torch.nn.Module) -> None:
    dense = davit.create_model("davit_tiny", features_only=True, out_indices=(2, 3))
    report = davit.load_checkpoint(dense, timm_tiny.state_dict())
    assert report["loaded"] == 208  # 212 minus the head's 4 tensors
    assert sorted(report["reinitialized"]) == [f"out_norms.{i}.{p}" for i in (2, 3) for p in ("bias", "weight")]


def test_florence2_hub_layout_matches_timm_fl() -> None:
    torch.manual_seed(0)
    ref = _perturb(timm.create_model("davit_base_fl", num_classes=0, **MICRO))
    sd = convert_state_dict(to_florence_hub(ref.state_dict()))
    assert sd.source == "florence2"
    assert list(sd.extra) == ["language_model.lm_head.weight"]
    ours = davit.create_model("davit_base_fl", num_classes=0, **MICRO).eval()
    davit.load_checkpoint(ours, sd)
    x = torch.randn(1, 3, 100, 72)
    with torch.no_grad():
        assert torch.allclose(ref.forward_features(x), ours.forward_features(x), atol=1e-5)


def test_transformers_florence2_vision_backbone_matches() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Florence2VisionConfig(
        embed_dim=list(MICRO["embed_dims"]),
        depths=list(MICRO["depths"]),
        num_heads=list(MICRO["num_heads"]),
        num_groups=list(MICRO["num_heads"]),
        window_size=4,
        drop_path_rate=0.0,
    )
    hf = _perturb(transformers.Florence2VisionBackbone(cfg))
    state = {"model.vision_tower." + k: v for k, v in hf.state_dict().items()}
    sd = convert_state_dict(state)
    assert sd.source == "transformers"
    ours = davit.create_model("davit_base_fl", num_classes=0, window_size=4, **MICRO).eval()
    davit.load_checkpoint(ours, sd)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = hf(x)
        ref = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        assert torch.allclose(ref, ours.forward_features(x), atol=1e-5)


def test_safetensors_round_trip_carries_config(tmp_path: Path) -> None:
    model = davit.create_model("davit_tiny", num_classes=7, window_size=5, **{k: v for k, v in MICRO.items()})
    path = tmp_path / "m.safetensors"
    save_safetensors(model.state_dict(), path, {"davit_config": model.cfg.to_dict()})
    again = davit.create_model("davit_tiny", pretrained=str(path))
    assert again.cfg.window_size == 5 and again.num_classes == 7 and again.cfg.embed_dims == (32, 64, 128, 256)
    x = torch.randn(1, 3, 40, 40)
    assert torch.equal(_logits(model, x), _logits(again, x))


def test_class_count_mismatch_is_an_error_unless_head_reset(tmp_path: Path) -> None:
    src = davit.create_model("davit_tiny", **MICRO)
    path = tmp_path / "m.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(CheckpointError, match="1000-class head.*num_classes=1000.*reset_head"):
        davit.load_checkpoint(davit.create_model("davit_tiny", num_classes=5, **MICRO), path)
    tuned = davit.create_model("davit_tiny", pretrained=str(path), num_classes=5, **MICRO)
    assert tuned.head.fc.out_features == 5
    assert torch.equal(tuned.stem.conv.weight, src.stem.conv.weight)


def test_wrong_size_checkpoint_names_the_size(timm_tiny: torch.nn.Module) -> None:
    with pytest.raises(CheckpointError, match="davit_tiny checkpoint"):
        davit.load_checkpoint(davit.create_model("davit_small"), timm_tiny.state_dict())
    with pytest.raises(CheckpointError, match="another size|davit_tiny"):
        davit.load_checkpoint(davit.create_model("davit_base"), timm_tiny.state_dict())


def test_resnet_state_dict_is_rejected_clearly() -> None:
    import torchvision

    resnet = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(CheckpointError, match="not a DaViT checkpoint.*ResNet"):
        convert_state_dict(resnet)


def test_truncated_empty_and_unsafe_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save(davit.create_model("davit_tiny", **MICRO).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(truncated)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(empty)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(bad_st)
    # A pickle that would run code when unpickled: refused, and the code never runs.
    marker = tmp_path / "pwned"
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": _Evil(str(marker))}, unsafe)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_checkpoint(unsafe)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pth")


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.path),))


def test_published_weights_resolve_from_the_hub_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timm_tiny: torch.nn.Module
) -> None:
    # Lay out a huggingface_hub cache as a previous download would have, then load with the hub offline.
    snap = tmp_path / "models--timm--davit_tiny.msft_in1k" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "models--timm--davit_tiny.msft_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--davit_tiny.msft_in1k" / "refs" / "main").write_text("a" * 40)
    save_safetensors(timm_tiny.state_dict(), snap / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import importlib

    import huggingface_hub.constants as hc

    importlib.reload(hc)
    try:
        model = davit.create_model("davit_tiny", pretrained=True)
        assert model.pretrained_cfg["crop_pct"] == 0.95 and model.pretrained_cfg["top1"] == 82.694
        x = torch.randn(1, 3, 64, 64)
        assert torch.allclose(_logits(timm_tiny, x), _logits(model, x), atol=1e-4, rtol=1e-4)
        with pytest.raises(CheckpointError, match="could not get weights davit_small.msft_in1k.*offline"):
            davit.create_model("davit_small", pretrained=True)
    finally:
        monkeypatch.undo()
        importlib.reload(hc)


def test_unpublished_weights_say_so() -> None:
    with pytest.raises(CheckpointError, match="no published weights for davit_giant"):
        davit.create_model("davit_giant", pretrained=True)
    with pytest.raises(CheckpointError, match="unknown weights"):
        davit.create_model("davit_tiny", pretrained="in22k")
    assert davit.list_weights("davit_tiny") == ["davit_tiny.msft_in1k"]
