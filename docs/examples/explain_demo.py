"""Train the micro DaViT that the README's attention and CAM pictures explain (CPU, a few minutes, no download).

Four photos scikit-image ships are the classes (cat = ``chelsea``, ``coffee``, ``rocket``, ``astronaut``); the model
learns to name the photo a random crop comes from. Then it writes two test images: ``chelsea.png`` itself and
``coffee_cat.png``, the coffee cup (left half) beside the cat's face (right half), where a class-activation map for
"cat" must light up the right half and one for "coffee" the left.

    python docs/examples/explain_demo.py --out runs/explain_demo
    davit explain runs/explain_demo/chelsea.png --checkpoint runs/explain_demo/model.safetensors --point 0.37 0.38
    davit explain runs/explain_demo/coffee_cat.png --checkpoint runs/explain_demo/model.safetensors --target cat
    davit explain runs/explain_demo/coffee_cat.png --checkpoint runs/explain_demo/model.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

import davit
from davit.weights import save_safetensors

CLASSES = ["cat", "coffee", "rocket", "astronaut"]
SIZE = 112
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def photos() -> list[torch.Tensor]:
    out = []
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        out.append(torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255)  # (3, H, W)
    return out


def crops(images: list[torch.Tensor], n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random square crops (10-60% of the shorter side squared), resized to SIZE, random flip; labels = photo."""
    y = torch.randint(0, len(images), (n,), generator=g)
    xs = []
    for k in y.tolist():
        img = images[k]
        h, w = img.shape[1:]
        side = int(min(h, w) * float(torch.empty(1).uniform_(0.3, 0.8, generator=g)))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        c = img[:, top : top + side, left : left + side][None]
        c = F.interpolate(c, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)[0]
        if torch.rand(1, generator=g) < 0.5:
            c = c.flip(-1)
        xs.append(c)
    x = torch.stack(xs)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/explain_demo")
    ap.add_argument("--steps", type=int, default=120)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    images = photos()
    model = davit.create_model(
        "davit_tiny", embed_dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=7,
        num_classes=len(CLASSES), drop_path_rate=0.0,
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=a.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(a.steps):
        x, y = crops(images, 32, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    model.eval()
    x, y = crops(images, 256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"held-out crops: {100 * acc:.1f}% correct; {time.time() - start:.0f} s in all")
    pp = {"img_size": SIZE, "crop_pct": 1.0, "interpolation": "bicubic", "mean": list(MEAN), "std": list(STD)}
    meta = {"davit_config": model.cfg.to_dict(), "model_name": "davit_tiny", "class_names": CLASSES,
            "preprocessing": pp}  # fmt: skip
    save_safetensors(model.state_dict(), out / "model.safetensors", meta)
    cat = data.chelsea()
    Image.fromarray(cat).save(out / "chelsea.png")
    # side by side: the coffee cup (left) and the cat's face (right), each squeezed to 200x400
    composite = Image.new("RGB", (400, 400))
    composite.paste(Image.fromarray(data.coffee()[0:400, 100:500]).resize((200, 400)), (0, 0))
    composite.paste(Image.fromarray(cat[0:300, 75:375]).resize((200, 400)), (200, 0))
    composite.save(out / "coffee_cat.png")
    print(f"wrote {out / 'model.safetensors'}, {out / 'chelsea.png'}, {out / 'coffee_cat.png'}")


if __name__ == "__main__":
    main()
