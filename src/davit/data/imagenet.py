"""ImageNet-1K class names (``imagenet_classes.txt``, in class-index order, from torchvision's weight metadata)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

__all__ = ["imagenet_class_names"]


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names; index i is the name of logit i of an ImageNet-1K classifier."""
    names = (Path(__file__).with_name("imagenet_classes.txt")).read_text().splitlines()
    return tuple(n for n in names if n)
