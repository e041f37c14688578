"""Optimizer groups: no weight decay on norms, biases and 1-D parameters; decay on weight matrices and convs."""

from __future__ import annotations

import torch

import davit
from davit.config import OptimConfig
from davit.engine.optim import build_optimizer, default_param_groups


def _names_by_decay(model: torch.nn.Module, cfg: OptimConfig) -> dict[float, set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    out: dict[float, set[str]] = {}
    for g in default_param_groups(model, cfg):
        out.setdefault(g["weight_decay"], set()).update(ids[id(p)] for p in g["params"])
    return out


def test_no_decay_on_norms_and_biases(tiny_model: davit.DaViT) -> None:
    groups = _names_by_decay(tiny_model, OptimConfig(weight_decay=0.05))
    decay, no_decay = groups[0.05], groups[0.0]
    all_names = {n for n, _ in tiny_model.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay
    norm_names = {
        f"{mn}.{pn}".lstrip(".")
        for mn, m in tiny_model.named_modules()
        if isinstance(m, torch.nn.LayerNorm)
        for pn, _ in m.named_parameters(recurse=False)
    }
    biases = {n for n in all_names if n.endswith(".bias")}
    assert norm_names and biases
    assert norm_names <= no_decay
    assert biases <= no_decay
    # every weight matrix and conv kernel decays
    params = dict(tiny_model.named_parameters())
    assert {n for n in all_names if params[n].ndim >= 2} == decay
    assert "head.fc.weight" in decay


def test_decay_everything_when_switched_off(tiny_model: davit.DaViT) -> None:
    groups = _names_by_decay(tiny_model, OptimConfig(weight_decay=0.01, no_decay_norm_bias=False))
    assert set(groups) == {0.01}


def test_adamw_applies_no_decay_group(tiny_model: davit.DaViT) -> None:
    # With zero gradients AdamW's only update is decoupled decay: p -= lr * wd * p. No-decay params must not move.
    cfg = OptimConfig(weight_decay=0.5)
    opt = build_optimizer(default_param_groups(tiny_model, cfg), cfg, lr=0.1)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    for p in tiny_model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in tiny_model.named_parameters():
        if p.ndim >= 2:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p.detach(), before[n]), n
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_fused_adamw_makes_the_same_updates_as_the_reference(tiny_model: davit.DaViT) -> None:
    cfg = OptimConfig(weight_decay=0.05)
    ref_model = davit.DaViT(tiny_model.cfg)
    ref_model.load_state_dict(tiny_model.state_dict())
    opt = build_optimizer(default_param_groups(tiny_model, cfg), cfg, lr=1e-3)
    assert opt.defaults["fused"] is True  # plain CPU parameters: the single-kernel update
    ref = torch.optim.AdamW(  # PyTorch's per-parameter loop over the same groups
        [
            {**g, "params": [dict(ref_model.named_parameters())[n] for n in g["names"]]}
            for g in _groups(tiny_model, cfg)
        ],
        lr=1e-3,
    )
    for step in range(3):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in tiny_model.parameters()]
        for m in (tiny_model, ref_model):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        opt.step()
        ref.step()
    for (n, p), q in zip(tiny_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7, msg=n)


def _groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return [
        {"names": [ids[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
        for g in default_param_groups(model, cfg)
    ]
