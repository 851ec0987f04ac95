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
    assert opt.defaults["fused"]  # every parameter a float tensor on the CPU
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


def test_fused_adamw_follows_the_per_tensor_update():
    """The fused AdamW that :func:`build_optimizer` picks moves the parameters as torch's per-tensor
    AdamW does (same groups, decay and schedule), to float rounding, over 20 steps."""
    torch.manual_seed(0)
    models = [tiny_model(), tiny_model()]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=20, weight_decay=0.1)
    opts = [build_optimizer([(n, p) for n, p in m.named_parameters() if p.requires_grad], m.group_of, cfg)
            for m in models]
    per_tensor = opts[1][0]
    for group in per_tensor.param_groups:
        group["fused"] = None
    assert opts[0][0].defaults["fused"]
    trainable = [[p for p in m.parameters() if p.requires_grad] for m in models]
    start = [p.detach().clone() for p in trainable[0]]
    for _ in range(20):
        for p, q in zip(*trainable):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for opt, sched in opts:
            opt.step()
            sched.step()
    moved = max((p - p0).abs().max().item() for p, p0 in zip(trainable[0], start))
    assert moved > 1e-3
    for p, q in zip(*trainable):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_gradients_are_clipped_by_norm_without_loss_scaling(precision):
    """Lightning's mixed-precision plugin refuses to clip for a fused AdamW even under bf16-mixed
    (nothing to unscale); :func:`clip_grad_norm` clips it instead, to the global norm asked for."""
    import lightning as L

    from mm_llama.training.scale import clip_grad_norm
    from mm_llama.training.optim import uses_loss_scaling

    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False)
    assert not uses_loss_scaling(trainer)
    model = tiny_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, _ = build_optimizer(named, model.group_of, OptimConfig(), fused=not uses_loss_scaling(trainer))
    assert opt.defaults["fused"]
    for _, p in named:
        p.grad = torch.full_like(p, 3.0)
    assert clip_grad_norm(trainer, opt, 0.5)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for _, p in named]))
    assert norm.item() == pytest.approx(0.5, rel=1e-4)
    opt, _ = build_optimizer(named, model.group_of, OptimConfig(), fused=False)
    assert not clip_grad_norm(trainer, opt, 0.5)  # an unfused AdamW: Lightning's own clipping


def test_loss_scaling_turns_fusing_off():
    """Under 16-mixed's GradScaler Lightning must unscale before clipping, so AdamW is not fused
    (the modules pass ``fused=not uses_loss_scaling(trainer)``) and Lightning clips."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from mm_llama.training.optim import uses_loss_scaling
    from mm_llama.training.scale import clip_grad_norm

    assert not uses_loss_scaling(None)  # a module used outside a Trainer
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(accelerator="cpu", plugins=[scaled], logger=False, enable_progress_bar=False)
    assert uses_loss_scaling(trainer)
    model = tiny_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, _ = build_optimizer(named, model.group_of, OptimConfig(), fused=not uses_loss_scaling(trainer))
    assert not opt.defaults["fused"]
    assert not clip_grad_norm(trainer, opt, 1.0)


def test_gradients_are_dropped_after_each_optimizer_step_and_kept_while_accumulating():
    """Lightning zeroes gradients between the next forward and its backward; the modules drop them
    right after the step instead (``ClipsGradients.optimizer_step``), so they are not alive during
    the forward's activation peak. Accumulated micro-batches keep theirs."""
    import lightning as L

    from mm_llama.training.scale import ClipsGradients

    class Probe(ClipsGradients, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.grad_at_forward: list[bool] = []

        def training_step(self, batch, batch_idx):
            self.grad_at_forward.append(self.lin.weight.grad is not None)
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=2)
    probe = Probe()
    L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=1.0, logger=False,
              enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False).fit(probe, data)
    assert probe.grad_at_forward == [False, True] * 3  # after a step: none; mid-accumulation: kept
