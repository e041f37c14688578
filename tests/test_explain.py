"""``davit.explain``: raw attention tensors through the reference model's ``attn_probs`` hook points, their maps, and
a Grad-CAM that must find a bright object (a known answer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import davit
from davit.cli import main
from davit.explain import (
    attention_maps,
    capture_attention,
    channel_attention_summary,
    grad_cam,
    spatial_attention_for_point,
    spatial_attention_received,
)
from davit.weights import save_safetensors

MICRO = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=3)


def _model(**kw) -> davit.DaViT:
    return davit.create_model("davit_tiny", **{**MICRO, "num_classes": 5, **kw}).eval()


def _has_hook_points() -> bool:
    return any(n.endswith("attn_probs") for n, _ in _model().named_modules())


needs_hooks = pytest.mark.skipif(
    not _has_hook_points(), reason="the reference model has no attn_probs hook points yet (issue 13's refactor)"
)


@needs_hooks
def test_shapes_rows_sum_to_one_and_output_unchanged() -> None:
    model = _model()
    x = torch.randn(2, 3, 50, 70)  # maps 13x18, 7x9, 4x5, 2x3: every stage pads to the 3x3 windows
    with torch.no_grad():
        plain = model(x)
        out, maps = attention_maps(model, x, values=True)
    assert torch.equal(out, plain)  # capturing changes nothing
    spatial = [m for m in maps if m.kind == "spatial"]
    channel = [m for m in maps if m.kind == "channel"]
    assert len(spatial) == len(channel) == sum(MICRO["depths"])
    assert [m.stage for m in spatial] == [0, 1, 2, 2, 3] and [m.index for m in spatial] == [0, 1, 2, 3, 4]
    grids = [(13, 18), (7, 9), (4, 5), (4, 5), (2, 3)]
    for m, (h, w), heads in zip(spatial, grids, (1, 2, 4, 4, 8)):
        assert m.grid == (h, w) and m.window_size == 3
        windows = math.ceil(h / 3) * math.ceil(w / 3)
        assert m.probs.shape == (2 * windows, heads, 9, 9), m.name
        assert torch.allclose(m.probs.sum(-1), torch.ones(()), atol=1e-5) and (m.probs >= 0).all()
    for m, dim, groups in zip(channel, (16, 32, 64, 64, 128), (1, 2, 4, 4, 8)):
        assert m.probs.shape == (2, groups, dim // groups, dim // groups), m.name
        assert torch.allclose(m.probs.sum(-1), torch.ones(()), atol=1e-5)
        h, w = m.grid
        assert m.values is not None and m.values.shape == (2, h * w, dim)


@needs_hooks
def test_hooks_are_removed_and_no_grad_is_kept() -> None:
    model = _model()
    with capture_attention(model) as records, torch.no_grad():
        model(torch.randn(1, 3, 24, 24))
    n = len(records)
    assert n == 2 * sum(MICRO["depths"])
    with torch.no_grad():
        model(torch.randn(1, 3, 24, 24))
    assert len(records) == n  # nothing recorded after the block
    assert all(not r["probs"].requires_grad for r in records)


def test_a_model_without_hook_points_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="attn_probs hook points"):
        with capture_attention(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass


@needs_hooks
def test_point_and_window_maps() -> None:
    model = _model()
    x = torch.randn(1, 3, 48, 48)  # maps 12, 6, 3, 2 (stage 0: 4x4 windows of 3, no padding)
    with torch.no_grad():
        _, maps = attention_maps(model, x)
    a = maps[0]
    assert a.kind == "spatial" and a.grid == (12, 12)
    heat = spatial_attention_for_point(a, (0.5, 0.25))  # token (6, 3): window row 2, column 1
    assert heat.shape == (12, 12) and heat.sum() == pytest.approx(1.0, abs=1e-5)
    assert heat[6:9, 3:6].sum() == pytest.approx(1.0, abs=1e-5)  # all of it inside the query's window
    row = a.probs[2 * 4 + 1, 0, 0 * 3 + 0]  # window (2, 1), head 0, query token (0, 0) of that window
    assert torch.allclose(heat[6:9, 3:6].flatten(), row, atol=1e-6)
    recv = spatial_attention_received(a)
    assert recv.shape == (12, 12) and recv.mean() == pytest.approx(1 / 9, abs=1e-6)  # each window's queries sum to 9/9
    m = next(m for m in maps if m.kind == "channel")
    matrix, chans, weights, responses = channel_attention_summary(m, channel=5, top=3)
    assert matrix.shape == (16, 16) and chans[0] in range(16) and weights == sorted(weights, reverse=True)
    assert responses is None  # values were not captured
    with pytest.raises(ValueError, match="out of range"):
        channel_attention_summary(m, channel=16)


# ------------------------------------------------------------------------------------------------ Grad-CAM
def _bright_square_batch(n: int, g: torch.Generator, present: bool | None = None):
    """64x64 noise; class 1 images hold a 16x16 white square in one quadrant (returned), class 0 none."""
    x = torch.rand(n, 3, 64, 64, generator=g) * 0.4
    y = torch.randint(0, 2, (n,), generator=g) if present is None else torch.full((n,), int(present))
    quadrant = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        if y[i]:
            r, c = divmod(int(quadrant[i]), 2)
            oy = r * 32 + int(torch.randint(2, 14, (1,), generator=g))
            ox = c * 32 + int(torch.randint(2, 14, (1,), generator=g))
            x[i, :, oy : oy + 16, ox : ox + 16] = 1.0
    return (x - 0.3) / 0.3, y, quadrant


def test_grad_cam_peaks_on_the_bright_object(one_thread) -> None:
    # A micro DaViT with 1x1 windows: its only spatial mixing is local (convolutions), so the evidence for "there is a
    # bright square" must sit where the square is. 60 AdamW steps learn the task (seeded; ~5 s).
    torch.manual_seed(0)
    model = davit.create_model(
        "davit_tiny", embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=1,
        num_classes=2, drop_path_rate=0.0,
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y, _ = _bright_square_batch(16, g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, _ = _bright_square_batch(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9  # it learned the task
    x, _, quadrant = _bright_square_batch(16, torch.Generator().manual_seed(2), present=True)
    hits = 0
    for i in range(16):
        cam, cls, probs = grad_cam(model, x[i : i + 1], target=1)
        assert cam.shape == (2, 2) and float(cam.max()) == pytest.approx(1.0) and cls == 1
        assert probs.sum() == pytest.approx(1.0)
        r, c = divmod(int(cam.flatten().argmax()), 2)
        hits += r * 2 + c == int(quadrant[i])
    assert hits >= 14, hits  # chance: 4 of 16


def test_grad_cam_on_an_earlier_stage_has_its_grid() -> None:
    model = _model()
    cam, cls, _ = grad_cam(model, torch.randn(1, 3, 48, 48), stage=1)
    assert cam.shape == (6, 6) and 0 <= cls < 5 and float(cam.min()) >= 0


# ------------------------------------------------------------------------------------------------------ command
@needs_hooks
def test_cli_writes_the_three_pictures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model()
    pp = {"img_size": 48, "crop_pct": 1.0, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}
    meta = {"davit_config": model.cfg.to_dict(), "model_name": "davit_tiny", "preprocessing": pp,
            "class_names": ["a", "b", "c", "d", "e"]}  # fmt: skip
    save_safetensors(model.state_dict(), tmp_path / "w.safetensors", meta)
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(img)
    argv = ["explain", str(img), "--checkpoint", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "ex")]
    assert main([*argv, "--point", "0.5", "0.5", "--channel", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["class"] in "abcde" and set(r["files"]) == {"spatial", "channel", "cam"}
    for path in r["files"].values():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 200
    assert main([*argv, "--blocks", "0", "-1", "--target", "c", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cam_class"] == "c"
    assert main([*argv, "--target", "zebra"]) == 2
    assert "zebra" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.png"), "--checkpoint", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and len(err.strip().splitlines()) == 1
