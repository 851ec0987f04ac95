"""Cached, batched generation equals step-by-step full forwards (media K/V computed once)."""

import pytest
import torch

from mm_llama.generation import generate
from tests.test_model import VOCAB, tiny_model

LOGITS_TOL = 1e-5
"""Max |cached - full| over the logits, relative to max |full logit| (floored at 1).

The tiny random LM's logits reach ~40, where one fp32 ulp is 3.8e-6, so an absolute 1e-5 would
test rounding order (padded/masked vs plain causal attention kernels), not correctness;
measured relative error is ~3e-7.
"""


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    scale = max(1.0, float(ref.abs().max()))
    diff = float((got - ref).abs().max())
    assert diff <= LOGITS_TOL * scale, f"{what} max |diff| {diff:.2e} > {LOGITS_TOL:.0e} x {scale:.1f}"


def naive_greedy(model, prompt, image, n):
    """Greedy tokens and per-step logits ``[n, v]`` from full forwards over the growing sequence."""
    ids = torch.tensor([prompt])
    out, logits = [], []
    for _ in range(n):
        with torch.no_grad():
            step = (model(ids, image[None]) if image is not None else model.lm(ids))[0, -1]
        nxt = int(step.argmax())
        out.append(nxt)
        logits.append(step)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, torch.stack(logits)


def cached(model, prompts, images, n, **kwargs):
    """Generated ids and the per-step logits ``[t, b, v]`` of :func:`generate`."""
    logits = []
    got = generate(model, prompts, images, max_new_tokens=n, on_logits=logits.append, **kwargs)
    return got, torch.stack(logits)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    return tiny_model(gate_init=0.8).eval()


def test_cached_batched_greedy_equals_full_forward_per_prompt(model):
    img = model.media_token_id("image")
    prompts = [[5, img, 7, 8, 9, 10], [img, 3, 4]]  # different lengths: left padding
    images = torch.randn(2, 3, 16, 16)
    got, logits = cached(model, prompts, images, 6, pad_id=0)
    for row, (p, image, g) in enumerate(zip(prompts, images, got)):
        ref_ids, ref_logits = naive_greedy(model, p, image, 6)
        assert g == ref_ids
        assert_logits_close(logits[:, row], ref_logits, f"row {row}:")


def test_media_matter_in_the_cached_path(model):
    """Guards the equivalence tests above against passing vacuously (media ignored)."""
    img = model.media_token_id("image")
    _, a = cached(model, [[img, 3, 4]], torch.randn(1, 3, 16, 16), 3)
    _, b = cached(model, [[img, 3, 4]], torch.randn(1, 3, 16, 16), 3)
    assert (a - b).abs().max() > 1e-3


def test_recomputing_media_kv_every_step_gives_the_same_decode(model):
    img = model.media_token_id("image")
    prompts = [[5, img, 7, 8], [img, 3]]
    images = torch.randn(2, 3, 16, 16)
    ids_cached, logits_cached = cached(model, prompts, images, 5)
    ids_plain, logits_plain = cached(model, prompts, images, 5, cache_media_kv=False)
    assert ids_cached == ids_plain
    assert_logits_close(logits_cached, logits_plain)


def test_stop_token_ends_a_sequence(model):
    img = model.media_token_id("image")
    images = torch.randn(1, 3, 16, 16)
    free = generate(model, [[img, 4, 5]], images, max_new_tokens=5)[0]
    stopped = generate(model, [[img, 4, 5]], images, max_new_tokens=5, stop_ids=[free[2]])[0]
    assert stopped == free[: free.index(free[2])]


def test_streaming_callback_sees_every_step_and_pads_finished_rows(model):
    img = model.media_token_id("image")
    images = torch.randn(2, 3, 16, 16)
    free = generate(model, [[img, 4, 5], [img, 6]], images, max_new_tokens=4)
    steps = []
    got = generate(model, [[img, 4, 5], [img, 6]], images, max_new_tokens=4, stop_ids=[free[0][0]], pad_id=0,
                   on_token=lambda ids: steps.append(ids.tolist()))
    assert got[0] == [] and steps[0][0] == free[0][0]  # row 0 stops at once
    if free[1][0] != free[0][0]:
        assert all(s[0] == 0 for s in steps[1:])  # then it is padded while row 1 goes on
        assert [s[1] for s in steps][: len(got[1])] == got[1]


def test_text_only_prompt_matches_plain_lm(model):
    prompt = [1, 2, 3, 4]
    got, logits = cached(model, [prompt], None, 4)
    ref_ids, ref_logits = naive_greedy(model, prompt, None, 4)
    assert got[0] == ref_ids and all(t < VOCAB for t in got[0])
    assert_logits_close(logits[:, 0], ref_logits)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
    img = model.media_token_id("image")
    images = torch.randn(1, 3, 16, 16)
    prompt = [[img, 4, 5]]
    kwargs = dict(max_new_tokens=8, temperature=10.0)  # the random LM is peaked (logit std ~7)
    first = generate(model, prompt, images, seed=3, **kwargs)
    assert first == generate(model, prompt, images, seed=3, **kwargs)
    others = {tuple(generate(model, prompt, images, seed=s, **kwargs)[0]) for s in range(4, 8)}
    assert len(others | {tuple(first[0])}) > 1  # a flattened distribution: not all equal
    greedy = generate(model, prompt, images, max_new_tokens=8)
    assert generate(model, prompt, images, seed=3, max_new_tokens=8, temperature=1.0, top_p=1e-6) == greedy


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1)])
def test_bad_settings_are_rejected_with_their_name(model, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate(model, [[1, 2]], None, **bad)


def test_prompt_and_image_counts_must_agree(model):
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        generate(model, [[1, 2], [3]], torch.randn(1, 3, 16, 16))
