"""Golden regression: outputs of a fixed micro DaViT must not drift (file written by tests/golden/make_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from davit.models import DaViT, DaViTConfig

GOLDEN = Path(__file__).parent / "golden" / "micro_davit.safetensors"


def test_micro_davit_outputs_unchanged() -> None:
    with safe_open(str(GOLDEN), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
    tensors = load_file(str(GOLDEN))
    model = DaViT(DaViTConfig.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})).eval()
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    with torch.no_grad():
        logits = model(tensors["input"])
        feats = model.forward_features(tensors["input"])
    torch.testing.assert_close(logits, tensors["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, tensors["features"], atol=1e-5, rtol=1e-5)
