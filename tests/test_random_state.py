"""Generator states in checkpoints (mm_llama.training.random_state): saved, loaded with
``weights_only=True``, put back exactly; checkpoints of another world size or without them resume."""

import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mm_llama.training.random_state import RandomStateCheckpoint, generator_states


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_states_survive_a_weights_only_checkpoint_and_replay_every_generator():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    _draws()  # somewhere in a run
    callback = RandomStateCheckpoint()
    buffer = io.BytesIO()
    torch.save({"callbacks": {callback.state_key: callback.state_dict()}}, buffer)
    expected = _draws()
    _draws()  # the generators move on (the crash)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # Lightning's default: tensors, numbers, strings only
    resumed = RandomStateCheckpoint()
    resumed.load_state_dict(loaded["callbacks"][callback.state_key])
    resumed.on_train_batch_start(SimpleNamespace(world_size=1, global_rank=0), None, None, 0)
    assert _draws() == expected
    resumed.on_train_batch_start(SimpleNamespace(world_size=1, global_rank=0), None, None, 1)  # once only
    assert _draws() != expected


def test_each_rank_gets_its_own_states_and_another_world_size_resumes_with_a_warning():
    states = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        states.append(generator_states())
    callback = RandomStateCheckpoint()
    callback.load_state_dict({"ranks": states})
    torch.manual_seed(4)
    rank1_draws = torch.rand(2)
    torch.manual_seed(0)
    callback.on_train_batch_start(SimpleNamespace(world_size=2, global_rank=1), None, None, 0)
    assert torch.equal(torch.rand(2), rank1_draws)  # rank 1's, not rank 0's nor the current ones
    callback.load_state_dict({"ranks": states})
    torch.manual_seed(0)
    untouched = torch.rand(2)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"random states of 2 rank\(s\), this run has 1"):
        callback.on_train_batch_start(SimpleNamespace(world_size=1, global_rank=0), None, None, 0)
    assert torch.equal(torch.rand(2), untouched)  # left as they were


def test_each_rank_gets_its_own_streams_the_same_in_every_run():
    """:func:`seed_rank_streams`: from the same ``seed_everything`` seed, ranks draw differently, and a
    rank draws the same in every run."""
    from mm_llama.training.random_state import seed_rank_streams

    def draws(rank: int) -> tuple:
        torch.manual_seed(7)
        seed_rank_streams(rank)
        return torch.rand(3).tolist(), np.random.rand(), random.random()

    assert draws(0) == draws(0) and draws(1) == draws(1)
    assert all(a != b for a, b in zip(draws(0), draws(1)))
    torch.manual_seed(8)
    seed_rank_streams(0)
    assert torch.rand(3).tolist() != draws(0)[0]  # another run seed: other streams
