"""Config: shared sections, recipe files with _base_, key=value overrides (full and bare keys), clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from davit.config import ConfigError, LoopConfig, ModelConfig, OptimConfig, SchedConfig, load_config, save_config
from davit.engine.run import load_run_config, resolve_overrides
from davit.tasks.classification import ClsConfig

ROOT = Path(__file__).resolve().parents[1]


def test_section_defaults_match_the_contract() -> None:
    assert ModelConfig() == ModelConfig("davit_tiny", "", None, False, {})
    o = OptimConfig()
    assert (o.name, o.lr, o.lr_base_batch, o.weight_decay) == ("adamw", 1e-3, 1024, 0.05)
    assert (o.betas, o.eps) == ((0.9, 0.999), 1e-8)
    assert o.no_decay_norm_bias and o.grad_clip == 0.0
    s = SchedConfig()
    assert (s.name, s.warmup, s.warmup_lr, s.min_lr, s.cooldown) == ("cosine", 0, 1e-6, 1e-5, 0)
    t = LoopConfig()
    assert (t.epochs, t.iters, t.batch_size, t.amp, t.distributed, t.seed) == (0, 0, 32, "none", "auto", 42)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (LoopConfig, {"amp": "fp8"}, "train.amp"),
        (LoopConfig, {"epochs": 2, "iters": 5}, "exactly one"),
        (LoopConfig, {"distributed": "horovod"}, "train.distributed"),
        (SchedConfig, {"name": "linear"}, "sched.name"),
        (OptimConfig, {"name": "lamb"}, "optim.name"),
    ],
)
def test_bad_values_name_the_field(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_recipe_base_overrides_and_roundtrip(tmp_path: Path) -> None:
    _, cfg = load_run_config(ROOT / "configs/cls/davit_small_in1k.yaml", ["optim.lr=2e-3", "train.batch_size=64"])
    assert cfg.model.name == "davit_small"
    assert cfg.optim.lr == 2e-3 and cfg.train.batch_size == 64
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.grad_clip == 1.0  # from _base_
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.mixup == 0.8 and cfg.data.cutmix == 1.0
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(ClsConfig, saved) == cfg  # a run's config.yaml is a complete recipe
    assert load_run_config(saved)[1] == cfg


def test_bare_keys_resolve_to_their_section() -> None:
    assert resolve_overrides(ClsConfig, ["epochs=4", "lr=5e-4", "out=x", "train.seed=1"]) == [
        "train.epochs=4",
        "optim.lr=5e-4",
        "out=x",
        "train.seed=1",
    ]
    with pytest.raises(ConfigError, match="ambiguous: model.name, optim.name, sched.name"):
        resolve_overrides(ClsConfig, ["name=x"])


def test_run_config_picks_the_task_and_rejects_typos() -> None:
    name, cfg = load_run_config(ROOT / "configs/cls/digits.yaml", ["epochs=2"])
    assert name == "cls" and isinstance(cfg, ClsConfig) and cfg.train.epochs == 2
    assert cfg.data.kind == "digits" and cfg.data.img_size == 32
    with pytest.raises(ConfigError, match="unknown config key train.epoch"):
        load_run_config(ROOT / "configs/cls/digits.yaml", ["train.epoch=2"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(ROOT / "configs/cls/nope.yaml")


@pytest.mark.parametrize(
    "recipe",
    sorted(p for p in (ROOT / "configs/cls").glob("*.yaml") if not p.name.startswith("_")),
    ids=lambda p: p.name,
)
def test_every_cls_recipe_loads(recipe: Path) -> None:
    _, cfg = load_run_config(recipe)
    assert (cfg.train.epochs > 0) != (cfg.train.iters > 0)


@pytest.mark.parametrize("recipe", sorted(ROOT.glob("configs/*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_davit_train_dispatches_every_recipe_to_its_task(recipe: Path) -> None:
    name, cfg = load_run_config(recipe)
    assert name == recipe.parent.name
    assert {"model", "optim", "sched", "train", "out", "resume"} <= set(vars(cfg))
