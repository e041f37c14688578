"""Shared fixtures: a tiny DaViT config (dims 16/32/64/128) for behaviour tests, quiet threads, fixed seeds."""

from __future__ import annotations

import pytest
import torch

import davit


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))


TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4)


@pytest.fixture
def tiny_cfg() -> davit.DaViTConfig:
    return davit.DaViTConfig(**TINY, num_classes=10)


@pytest.fixture
def tiny_model(tiny_cfg: davit.DaViTConfig) -> davit.DaViT:
    return davit.DaViT(tiny_cfg).eval()


@pytest.fixture
def one_thread():
    """Run a test on one thread: two threads per process oversubscribe a shared 2-core machine (~5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
