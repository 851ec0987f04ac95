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


def test_static_shape_decoding_gives_the_same_tokens_and_logits(model):
    """The step CUDA graphs replay (whole-cache attention under a growing key mask, writes at a
    device-side offset), run eagerly on CPU: same tokens and logits as the growing cache, with
    left padding, media, a stop token and the text-only path."""
    img = model.media_token_id("image")
    prompts = [[5, img, 7, 8, 9, 10], [img, 3, 4]]
    images = torch.randn(2, 3, 16, 16)
    ids_plain, logits_plain = cached(model, prompts, images, 7, static_cache=False)
    ids_static, logits_static = cached(model, prompts, images, 7, static_cache=True)
    assert ids_static == ids_plain
    assert_logits_close(logits_static, logits_plain, "static vs growing cache:")
    stop = ids_plain[0][3]
    assert (generate(model, prompts, images, max_new_tokens=7, stop_ids=[stop], static_cache=True)
            == generate(model, prompts, images, max_new_tokens=7, stop_ids=[stop], static_cache=False))
    text_plain, text_logits_plain = cached(model, [[1, 2, 3], [4, 5]], None, 5, static_cache=False)
    text_static, text_logits_static = cached(model, [[1, 2, 3], [4, 5]], None, 5, static_cache=True)
    assert text_static == text_plain
    assert_logits_close(text_logits_static, text_logits_plain, "text only:")


def test_static_shape_decoding_is_off_by_default_on_cpu_and_refuses_changing_media(model):
    from mm_llama.generation import use_static_step

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_static_step(None, cpu, every_row=False, cache_media_kv=True)
    assert use_static_step(None, cuda, every_row=False, cache_media_kv=True)
    assert not use_static_step(None, cuda, every_row=True, cache_media_kv=True)  # media change per token
    with pytest.raises(ValueError, match="static_cache=True needs media K/V that stay fixed"):
        generate(model, [[model.media_token_id("image"), 3]], torch.randn(1, 3, 16, 16), max_new_tokens=2,
                 cache_media_kv=False, static_cache=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decoding_equals_eager_decoding_on_cuda(model):
    """On a GPU (benchmarks/gpu_check.py runs this file there): the captured graph's tokens and
    logits equal the eager growing-cache decode's, in fp32 and under bf16 autocast."""
    import copy

    gpu = copy.deepcopy(model).cuda()
    img = gpu.media_token_id("image")
    prompts = [[5, img, 7, 8, 9, 10], [img, 3, 4]]
    images = torch.randn(2, 3, 16, 16, device="cuda")
    ids_eager, logits_eager = cached(gpu, prompts, images, 9, static_cache=False)
    ids_graph, logits_graph = cached(gpu, prompts, images, 9)  # the default on CUDA
    assert ids_graph == ids_eager
    assert_logits_close(logits_graph.cpu(), logits_eager.cpu(), "CUDA graph vs eager:")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16_eager = generate(gpu, prompts, images, max_new_tokens=9, static_cache=False)
        bf16_graph = generate(gpu, prompts, images, max_new_tokens=9)
    assert bf16_graph == bf16_eager
