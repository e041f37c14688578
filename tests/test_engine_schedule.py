"""The lr schedule: warmup, cosine with min_lr and cooldown, step, poly, constant; lr scaling with the global batch."""

from __future__ import annotations

import math

import pytest
import torch

from davit.config import OptimConfig, SchedConfig
from davit.engine.optim import build_optimizer, scaled_lr
from davit.engine.schedule import build_schedule


def test_warmup_is_linear_from_warmup_lr() -> None:
    s = build_schedule(SchedConfig(warmup=5, warmup_lr=1e-6, min_lr=1e-5), base_lr=1e-3, total_steps=100)
    assert s.lr_at(0) == pytest.approx(1e-6)
    for t in range(5):
        assert s.lr_at(t) == pytest.approx(1e-6 + (1e-3 - 1e-6) * t / 5)
    assert s.lr_at(2) < s.lr_at(3) < s.lr_at(4) < 1e-3


def test_cosine_values_min_lr_and_cooldown() -> None:
    # timm's CosineLRScheduler (warmup_prefix=False): cosine over total - cooldown steps from t=0, then min_lr.
    base, lo, total, cool = 1e-3, 1e-5, 310, 10
    s = build_schedule(SchedConfig(warmup=5, min_lr=lo, cooldown=cool), base_lr=base, total_steps=total)
    for t in (5, 50, 150, 299):
        expect = lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * t / 300))
        assert s.lr_at(t) == pytest.approx(expect, rel=1e-12)
    assert s.lr_at(150) == pytest.approx((base + lo) / 2)
    assert all(s.lr_at(t) == lo for t in range(300, 310))
    lrs = [s.lr_at(t) for t in range(5, 300)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_epoch_units_become_steps() -> None:
    # warmup and cooldown count epochs in epoch-based runs: 2 epochs x 10 steps = 20 warmup steps.
    cfg = SchedConfig(warmup=2, warmup_lr=0.0, cooldown=1)
    s = build_schedule(cfg, base_lr=1.0, total_steps=100, steps_per_unit=10)
    assert s.lr_at(10) == pytest.approx(0.5)
    assert s.lr_at(20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 90)) * (1 - 1e-5) + 1e-5)
    assert s.lr_at(95) == pytest.approx(1e-5)


def test_step_poly_constant() -> None:
    step = build_schedule(SchedConfig(name="step", milestones=(8, 11), gamma=0.1), base_lr=1e-4, total_steps=12)
    assert [step.lr_at(t) for t in (0, 7, 8, 10, 11)] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5, 1e-6])
    poly = build_schedule(SchedConfig(name="poly", power=1.0, min_lr=0.0), base_lr=6e-5, total_steps=100)
    assert poly.lr_at(0) == pytest.approx(6e-5)
    assert poly.lr_at(25) == pytest.approx(6e-5 * 0.75)
    # mmcv-style multiplicative warmup on poly/step: ratio warmup_lr / lr at t=0
    pw = build_schedule(SchedConfig(name="poly", warmup=10, warmup_lr=6e-11, min_lr=0.0), base_lr=6e-5, total_steps=100)
    assert pw.lr_at(0) == pytest.approx(6e-11)
    assert pw.lr_at(5) == pytest.approx(6e-5 * 0.95 * (1e-6 + (1 - 1e-6) * 0.5))
    const = build_schedule(SchedConfig(name="constant", warmup=2, warmup_lr=0.0), base_lr=0.1, total_steps=10)
    assert [const.lr_at(t) for t in (0, 1, 2, 9)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_apply_sets_groups_with_lr_scale_and_state_roundtrip() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], OptimConfig(), lr=1.0)
    s = build_schedule(SchedConfig(name="constant"), base_lr=1.0, total_steps=4)
    s.step()
    s.apply(opt)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    s2 = build_schedule(SchedConfig(name="constant"), base_lr=1.0, total_steps=4)
    s2.load_state_dict(s.state_dict())
    assert s2.step_count == 1


def test_lr_scales_linearly_with_global_batch() -> None:
    cfg = OptimConfig(lr=1e-3, lr_base_batch=1024)
    assert scaled_lr(cfg, 1024) == pytest.approx(1e-3)
    assert scaled_lr(cfg, 2048) == pytest.approx(2e-3)  # the official two-node example: 16 x 128 at lr 2e-3
    assert scaled_lr(cfg, 128) == pytest.approx(1.25e-4)
    assert scaled_lr(OptimConfig(lr=1e-3, lr_base_batch=0), 4096) == pytest.approx(1e-3)


def test_bad_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="exceed the run length"):
        build_schedule(SchedConfig(warmup=8, cooldown=5), base_lr=1.0, total_steps=10)
    with pytest.raises(ValueError, match="sched.name"):
        SchedConfig(name="linear")
