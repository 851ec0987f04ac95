"""Optimizer and schedule: AdamW with linear warm-up and cosine decay (Llama 3 §7.4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import lightning as L


@dataclass
class OptimConfig:
    """AdamW settings.

    Attributes:
        lr: peak learning rate of every trainable group, scaled by ``lr_multipliers``.
        lr_multipliers: per trainable group (see ``mm_llama.model.TRAINABLE_GROUPS``)
            factor on ``lr``; missing groups use 1.
        gate_lr_multiplier: extra factor on the lr of the scalar tanh gates (parameters
            named ``*_gate``). Adam moves every parameter by about ``lr`` per step
            whatever its gradient's size, so a gate that starts at 0 needs a few hundred
            steps to open at the adapters' lr; the measured effect is in
            benchmarks/RESULTS.md ("Learning dynamics"). 1 disables it.
        weight_decay: decoupled decay on matrices only (not on norms, gates, biases, embeddings).
        betas: AdamW betas.
        warmup_steps: linear warm-up from 0.
        total_steps: length of the cosine decay (to ``min_lr_ratio * lr``).
        min_lr_ratio: final lr as a fraction of the peak.
    """

    lr: float = 1e-3
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    gate_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    total_steps: int = 1000
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.gate_lr_multiplier <= 0:
            raise ValueError(f"gate_lr_multiplier must be > 0, got {self.gate_lr_multiplier}")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got {self.warmup_steps}, {self.total_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.betas = tuple(self.betas)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier on the peak lr at optimizer step ``step``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(
    named: list[tuple[str, nn.Parameter]], group_of, cfg: OptimConfig, ndims: dict[str, int] | None = None
) -> list[dict]:
    """AdamW groups keyed by (trainable group, kind); ``group_of(name) -> group name``.

    ``ndims`` gives parameters' dimensions by name where ``p.ndim`` no longer tells them (FSDP
    turns every parameter into a 1-D shard); by default ``p.ndim``.

    ``kind`` is ``decay`` (matrices), ``no_decay`` (norms, biases, embeddings) or
    ``gate`` (the scalar tanh gates: no decay, lr times ``cfg.gate_lr_multiplier``).
    """
    unknown = set(cfg.lr_multipliers) - {group_of(n) for n, _ in named}
    if unknown:
        raise ValueError(f"lr_multipliers name group(s) {sorted(unknown)} with no trainable parameter")
    groups: dict[tuple[str, str], list[nn.Parameter]] = {}
    for name, p in named:
        if name.endswith("_gate"):
            kind = "gate"
        else:
            ndim = p.ndim if ndims is None else ndims[name]
            kind = "decay" if ndim >= 2 and "embed" not in name else "no_decay"
        groups.setdefault((group_of(name), kind), []).append(p)
    return [
        {
            "params": params,
            "lr": cfg.lr * cfg.lr_multipliers.get(group, 1.0) * (cfg.gate_lr_multiplier if kind == "gate" else 1.0),
            "weight_decay": cfg.weight_decay if kind == "decay" else 0.0,
            "name": group if kind == "decay" else f"{group}/{kind}",
        }
        for (group, kind), params in sorted(groups.items())
    ]


FUSED_DEVICES: tuple[str, ...] = ("cpu", "cuda")
"""Device types on which :func:`build_optimizer` runs AdamW fused."""


def uses_loss_scaling(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer``'s precision scales the loss (``16-mixed``'s GradScaler). Lightning then
    unscales the gradients before clipping them, which a fused AdamW would do inside its step, so
    :func:`build_optimizer` is told not to fuse (``fused=not uses_loss_scaling(trainer)``)."""
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None


def build_optimizer(named, group_of, cfg: OptimConfig, ndims: dict[str, int] | None = None, *, fused: bool = True):
    """AdamW over ``named`` trainable parameters plus its LambdaLR schedule (``ndims``: see :func:`param_groups`).

    AdamW runs fused (``fused=True``: one kernel over all parameters instead of a chain of
    per-tensor ops) when every parameter is a float tensor on a CPU or a GPU, which is also what
    ``transformers``' Trainer picks by default. In the profile of an H100 training step torch's
    multi-tensor AdamW took 23 % of the GPU's time (benchmarks/RESULTS.md, "GPU path"); on this
    project's 2-core CPU the fused step over 25M parameters takes ~21 ms against 60-88 ms for the
    per-tensor one. Parameters equal the unfused update's to float rounding (``tests/test_optim.py``).
    ``fused=False`` never fuses (under loss scaling: :func:`uses_loss_scaling`). Clipping a fused
    AdamW's gradients goes through :class:`~mm_llama.training.scale.ClipsGradients`.
    """
    named = list(named)
    fused = fused and bool(named) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for _, p in named)
    opt = torch.optim.AdamW(param_groups(named, group_of, cfg, ndims), betas=cfg.betas, fused=True if fused else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, sched
