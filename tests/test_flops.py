"""MAC counts: the official figures, and the analytic formula against torch's FLOP counter on real forwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import davit
from davit.models import DaViT, get_config
from davit.models.flops import count_macs

# Official fvcore counts printed in the official code (multiply-adds, attention matmuls and LayerNorms included).
OFFICIAL = [
    ("davit_tiny", {}, 224, 4_540_244_736),
    ("davit_small", {}, 224, 8_800_488_192),
    ("davit_base", {}, 224, 15_510_430_720),
    ("davit_large", {"window_size": 12}, 384, 102_966_676_992),
]


@pytest.mark.parametrize(("name", "over", "size", "macs"), OFFICIAL)
def test_official_counts(name: str, over: dict, size: int, macs: int) -> None:
    assert count_macs(get_config(name).replace(**over), size) == macs


def test_base_384_window12() -> None:
    assert round(count_macs(get_config("davit_base").replace(window_size=12), 384) / 1e9, 2) == 46.45


def _measured_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """torch's FLOP counter on the reference model, plus 5 per LayerNorm element (fvcore's rule)."""
    ln_elems = 0

    def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal ln_elems
        ln_elems += inp[0].numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]

    # The reference model: every matmul, Linear and conv is an op the counter knows.
    with FlopCounterMode(display=False) as counter:
        model(x)
    for h in hooks:
        h.remove()
    return counter.get_total_flops() // 2 + 5 * ln_elems


@pytest.mark.parametrize("size", [(64, 64), (57, 71), (96, 160)])
@pytest.mark.parametrize("kernel", [2, 3])
def test_formula_matches_a_real_forward(size: tuple[int, int], kernel: int) -> None:
    cfg = get_config("davit_tiny").replace(
        embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), downsample_kernel=kernel, window_size=5
    )
    model = DaViT(cfg).eval()
    assert _measured_macs(model, torch.randn(1, 3, *size)) == count_macs(cfg, size)


def test_davit_models_json() -> None:
    r = subprocess.run([sys.executable, "-m", "davit", "models", "--json"], capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(davit.list_models())
    assert set(rows["davit_tiny"]) >= {"name", "params", "gmacs", "img_size", "top1"}
    assert rows["davit_tiny"]["gmacs"] == 4.54 and rows["davit_tiny"]["top1"] == 82.8
    assert rows["davit_giant"]["params"] == 1_437_435_880
