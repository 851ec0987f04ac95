"""Cached, batched generation equals step-by-step full forwards (media K/V computed once)."""

import torch

from mm_llama.generation import generate
from tests.test_model import VOCAB, tiny_model


def naive_greedy(model, prompt, image, n):
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(ids, image[None]).argmax(-1)[0, -1])
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_cached_batched_greedy_equals_full_forward_per_prompt():
    model = tiny_model(gate_init=0.8).eval()
    img = model.media_token_id("image")
    prompts = [[5, img, 7, 8, 9, 10], [img, 3, 4]]  # different lengths: left padding
    images = torch.randn(2, 3, 16, 16)
    got = generate(model, prompts, images, max_new_tokens=6, pad_id=0)
    for p, image, g in zip(prompts, images, got):
        assert g == naive_greedy(model, p, image, 6)


def test_stop_token_ends_a_sequence():
    model = tiny_model(gate_init=0.8).eval()
    img = model.media_token_id("image")
    images = torch.randn(1, 3, 16, 16)
    free = generate(model, [[img, 4, 5]], images, max_new_tokens=5)[0]
    stopped = generate(model, [[img, 4, 5]], images, max_new_tokens=5, stop_ids=[free[2]])[0]
    assert stopped == free[: free.index(free[2])]


def test_text_only_prompt_matches_plain_lm():
    model = tiny_model(gate_init=0.8).eval()
    prompt = [1, 2, 3, 4]
    got = generate(model, [prompt], None, max_new_tokens=4)[0]
    ids = torch.tensor([prompt])
    ref = []
    for _ in range(4):
        nxt = int(model.lm(ids)[0, -1].argmax())
        ref.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert got == ref and all(t < VOCAB for t in got)
