"""davit.integrations.florence2: the vision-tower swap keeps transformers' image features and generations, and the
image encoder exports to ONNX and OpenVINO with a dynamic batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
fl2 = pytest.importorskip("davit.integrations.florence2")

IMAGE_TOKEN = 110


def _tiny_florence2() -> torch.nn.Module:
    """A randomly initialised Florence-2 with a tiny tower (dims 16..128, window 4) and a one-layer BART."""
    vc = transformers.Florence2VisionConfig(
        embed_dim=[16, 32, 64, 128],
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        num_groups=[1, 2, 4, 8],
        window_size=4,
        projection_dim=32,
        drop_path_rate=0.0,
    )
    tc = transformers.BartConfig(
        vocab_size=120,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
    )
    cfg = transformers.Florence2Config(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_id=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = transformers.Florence2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a wrongly mapped weight shows
        for name, p in model.model.vision_tower.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_swap_gives_identical_image_features_and_generation() -> None:
    model = _tiny_florence2()
    x = torch.randn(2, 3, 128, 96)
    ids = torch.tensor([[0] + [IMAGE_TOKEN] * (4 * 3 + 1) + [5, 6, 2]] * 2)
    with torch.no_grad():
        ref = model.get_image_features(x)
        gen_ref = model.generate(input_ids=ids, pixel_values=x, max_new_tokens=6, do_sample=False)
    assert fl2.accelerate_florence2(model) is model
    assert isinstance(model.model.vision_tower, fl2.DaViTVisionTower)
    with torch.no_grad():
        new = model.get_image_features(x)
        gen_new = model.generate(input_ids=ids, pixel_values=x, max_new_tokens=6, do_sample=False)
    assert new.last_hidden_state.shape == ref.last_hidden_state.shape
    assert _rel(new.last_hidden_state, ref.last_hidden_state) <= 1e-5
    assert _rel(new.pooler_output, ref.pooler_output) <= 1e-5
    assert torch.equal(gen_new, gen_ref)
    with pytest.raises(ValueError, match="already davit's"):
        fl2.accelerate_florence2(model)


@pytest.mark.slow
def test_swap_in_openvino_and_bf16_stay_close() -> None:
    pytest.importorskip("openvino")
    model = _tiny_florence2()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = model.get_image_features(x).pooler_output
    fl2.accelerate_florence2(model, backend="openvino", example_input=x)
    with torch.no_grad():
        assert _rel(model.get_image_features(x).pooler_output, ref) <= 1e-5
    bf = _tiny_florence2()
    fl2.accelerate_florence2(bf, dtype="bf16")
    with torch.no_grad():
        assert _rel(bf.get_image_features(x).pooler_output, ref) <= 5e-2


def test_unsupported_layouts_are_named() -> None:
    vc = transformers.Florence2VisionConfig(patch_size=[4, 2, 2, 2])
    with pytest.raises(ValueError, match="patch_size"):
        fl2.davit_config_from_florence2(vc)
    with pytest.raises(ValueError, match="backend"):
        fl2.accelerate_florence2(_tiny_florence2(), backend="tensorrt")
    with pytest.raises(ValueError, match="Florence-2 model"):
        fl2.davit_from_florence2(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_image_encoder_export_round_trip(suffix: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    if suffix == ".xml":
        pytest.importorskip("openvino")
    model = _tiny_florence2()
    path = tmp_path / f"enc{suffix}"
    info = fl2.export_image_encoder(model, path, img_size=128)
    assert path.is_file() and info["max_rel_err"] <= 1e-4
    # Independently of the built-in check: another batch size against transformers' own get_image_features.
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        ref = model.get_image_features(x).pooler_output
    got = torch.from_numpy(fl2.run_exported(path, x.numpy()))
    assert got.shape == ref.shape and _rel(got, ref) <= 1e-4
    with pytest.raises(ValueError, match="NAME.onnx or NAME.xml"):
        fl2.export_image_encoder(model, tmp_path / "enc.pt")
