"""Recomputation in backward that leaves BatchNorm's running statistics as one forward would."""

import copy

import pytest
import torch
from torch import nn

from mm_llama.recompute import checkpoint_wrapper_for, checkpointed_call, recompute_context_fn


def _block(momentum: float | None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=momentum), nn.GELU(), nn.Linear(8, 3)).train()


@pytest.mark.parametrize("momentum", [0.1, None])  # None: a cumulative average, weighted by the batch count
@pytest.mark.parametrize("how", ["call", "wrapper"])
def test_recomputed_block_updates_batchnorm_once_with_the_same_gradients(momentum, how):
    plain = _block(momentum)
    recomputed = copy.deepcopy(plain)
    run = (lambda x: checkpointed_call(recomputed, x)) if how == "call" else checkpoint_wrapper_for(recomputed)
    ran = []
    recomputed[1].register_forward_pre_hook(lambda *_: ran.append(1))
    for step in range(3):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        plain(x).square().sum().backward()
        run(x).square().sum().backward()
    assert len(ran) == 3 * 2  # the norm ran again in each backward
    norm, reference = recomputed[1], plain[1]
    assert int(norm.num_batches_tracked) == int(reference.num_batches_tracked) == 3
    torch.testing.assert_close(norm.running_mean, reference.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var, reference.running_var, rtol=0, atol=0)
    for p, q in zip(recomputed.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6)


def test_a_block_without_batchnorm_is_recomputed_as_torch_does():
    assert recompute_context_fn(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) is None
    assert recompute_context_fn(nn.BatchNorm1d(2, track_running_stats=False)) is None
