"""Optimizer groups: what decays, and the gates' own learning rate."""

from __future__ import annotations

import pytest
import torch

from mm_llama.training.optim import OptimConfig, build_optimizer, lr_factor, param_groups
from tests.test_model import tiny_model


def _groups(model, cfg: OptimConfig) -> dict[str, dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {g["name"]: g for g in param_groups(named, model.group_of, cfg)}


def test_gates_get_their_own_lr_and_no_decay():
    model = tiny_model()
    groups = _groups(model, OptimConfig(lr=1e-3, gate_lr_multiplier=10.0, weight_decay=0.1))
    gates = groups["cross_attention/gate"]
    assert gates["lr"] == pytest.approx(1e-2) and gates["weight_decay"] == 0.0
    n_gates = sum(p.numel() for n, p in model.named_parameters() if n.startswith("cross_attn.") and n.endswith("_gate"))
    assert sum(p.numel() for p in gates["params"]) == n_gates == 2 * len(model.cross_attn)
    assert groups["cross_attention"]["lr"] == pytest.approx(1e-3) and groups["cross_attention"]["weight_decay"] == 0.1
    assert groups["cross_attention/no_decay"]["weight_decay"] == 0.0  # the q/k/attn/mlp norms


def test_every_trainable_parameter_is_in_exactly_one_group():
    model = tiny_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, _ = build_optimizer(named, model.group_of, OptimConfig(lr_multipliers={"image_encoder": 0.5}))
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for _, p in named)
    enc = [g for g in opt.param_groups if g["name"] == "image_encoder"][0]
    assert enc["initial_lr"] == pytest.approx(0.5e-3)
    assert not opt.defaults["fused"]  # fused AdamW only when every parameter is on a GPU
    opt, _ = build_optimizer(iter(named), model.group_of, OptimConfig())  # a one-shot iterator is enough
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_bad_optim_settings_are_refused():
    with pytest.raises(ValueError, match="gate_lr_multiplier"):
        OptimConfig(gate_lr_multiplier=0)
    with pytest.raises(ValueError, match="no trainable parameter"):
        _groups(tiny_model(), OptimConfig(lr_multipliers={"speech_encoder": 2.0}))


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1) == lr_factor(500, cfg)
    torch.testing.assert_close(torch.tensor(lr_factor(10, cfg)), torch.tensor(1.0))
