"""Regenerate the golden regression file (only when a numerics change is intended and verified against timm).

    .venv/bin/python tests/golden/make_golden.py

The file holds a micro DaViT's weights, an input and the logits/features the model produced when it was written:
a regression guard, not a correctness oracle (correctness is checked against timm and transformers in other tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from davit.models import DaViT, DaViTConfig

CFG = DaViTConfig(
    embed_dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4, num_classes=10
)


def main() -> None:
    torch.manual_seed(1234)
    model = DaViT(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x = torch.randn(2, 3, 40, 56)
        logits = model(x)
        feats = model.forward_features(x)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({"input": x, "logits": logits, "features": feats.contiguous()})
    out = Path(__file__).with_name("micro_davit.safetensors")
    save_file(tensors, out, metadata={"config": json.dumps(CFG.to_dict())})


if __name__ == "__main__":
    main()
