"""Two small ImageFolders cut from the photos scikit-image and scikit-learn ship (no download), for the fine-tuning
demo in the README: which photo does a crop come from?

- ``pretrain``: 8 colour photos (astronaut, coffee, rocket, Hubble deep field, immunohistochemistry, retina, and
  scikit-learn's china and flower), 200 training crops each, turned grey-level like the fine-tuning set
  (``--colour`` keeps their colours);
- ``finetune``: 6 other, grey-level pictures (brick, grass, gravel, camera man, moon, cells), only ``--shots``
  training crops each: the small labelled set a fine-tuning user has.

Training crops come from the left 70% of each picture and validation crops from the right 30%, so no validation
pixel is ever seen in training.

    python examples/photo_folders.py data/photos
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PRETRAIN = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "china", "flower")
FINETUNE = ("brick", "grass", "gravel", "camera", "moon", "cell")


def _picture(name: str, gray: bool) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = Image.fromarray(img[..., :3].astype(np.uint8))
    if gray:
        img = img.convert("L").convert("RGB")
    scale = 320 / min(img.size)  # every picture at the same scale, so crops show comparable detail
    return np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC))


def _crops(img: np.ndarray, n: int, x0: int, x1: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    h = img.shape[0]
    out = []
    for _ in range(n):
        x = int(rng.integers(x0, max(x0 + 1, x1 - size)))
        y = int(rng.integers(0, h - size))
        out.append(img[y : y + size, x : x + size])
    return out


def make(root: Path, shots: int = 8, size: int = 64, seed: int = 0, colour: bool = False) -> None:
    rng = np.random.default_rng(seed)
    for split, names, n_train in (("pretrain", PRETRAIN, 200), ("finetune", FINETUNE, shots)):
        for name in names:
            img = _picture(name, gray=not colour)
            cut = int(img.shape[1] * 0.7)
            for part, (n, x0, x1) in {"train": (n_train, 0, cut), "val": (40, cut, img.shape[1])}.items():
                folder = root / split / part / name
                folder.mkdir(parents=True, exist_ok=True)
                for i, c in enumerate(_crops(img, n, x0, x1, size, rng)):
                    Image.fromarray(c).save(folder / f"{i:03d}.png")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--shots", type=int, default=8, help="training crops per class in the fine-tuning set")
    ap.add_argument("--colour", action="store_true", help="keep the pre-training photos' colours")
    a = ap.parse_args()
    make(a.root, a.shots, colour=a.colour)
    print(f"wrote {a.root}/pretrain and {a.root}/finetune")
