"""The static training step: the fixed-shape loss, its freedom from host reads, and GraphedTrainStep.

A CUDA graph cannot be captured on this CPU, so the capture's preconditions are checked
here instead: the captured code (the static loss, its backward, clipping) runs under
``FakeTensorMode``, where any host read of a device value or value-dependent shape raises,
and the step's eager path (warm-up undone, then the steps) follows a plain loop bit for bit.
The replay itself is compared on CUDA only.
"""

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from mm_llama.model import MultimodalLlama, labeled_cross_entropy
from mm_llama.static import must_stay_static, static_shapes
from mm_llama.training.graphed_step import GraphedTrainStep, check_graph_safe
from tests.test_model import VOCAB, batch, tiny_lm, tiny_model

READERS = ["no-reader", "every-row-reader", "prompt-reader"]


def _model(reader: str = "no-reader"):
    """The tiny fused model, plain or with stage 1's caption decoder reading the prompt
    (``every_row``: the default image recipe's form)."""
    if reader == "no-reader":
        return tiny_model(gate_init=0.2)
    from adapters.prompt_reader import PromptReaderConfig
    from encoders import ImageEncoderConfig
    from mm_llama.model import CrossAttentionConfig, ModelConfig

    enc = ImageEncoderConfig(backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8, depth=2, width=32,
                             heads=2, intermediate_layers=(0,))
    pr = PromptReaderConfig(vocab_size=50, lookup_size=VOCAB + 3, width=32, heads=2,
                            every_row=reader == "every-row-reader")
    return MultimodalLlama(tiny_lm(), ModelConfig(enc, CrossAttentionConfig(gate_init=0.2), prompt_reader=pr))


def _labeled_batch(model, b=3, s=12, seed=0):
    torch.manual_seed(seed)
    ids, images = batch(model, b=b, s=s)
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 9:] = -100  # a shorter answer
    return ids, labels, images


def _n_labeled(labels):
    return int((labels[:, 1:] != -100).sum())


def test_static_cross_entropy_takes_the_same_rows_as_the_gather():
    hidden = torch.randn(3, 10, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    labels = torch.randint(0, 20, (3, 10))
    labels[:, :4] = -100
    labels[2, 7:] = -100
    n = _n_labeled(labels)
    ref = labeled_cross_entropy(hidden, labels, weight, chunk=4)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    for max_labeled in (n, n + 5, 27):
        got = labeled_cross_entropy(hidden, labels, weight, chunk=4, max_labeled=max_labeled)
        (g,) = torch.autograd.grad(got, hidden)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-7)


def test_static_cross_entropy_rejects_a_batch_it_would_truncate():
    hidden, weight = torch.randn(2, 6, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (2, 6))
    with pytest.raises(ValueError, match="10 labeled positions, more than max_labeled=7"):
        labeled_cross_entropy(hidden, labels, weight, max_labeled=7)
    with pytest.raises(ValueError, match="max_labeled must be in 1..10"):
        labeled_cross_entropy(hidden, labels, weight, max_labeled=11)
    with pytest.raises(ValueError, match="no labeled positions"):
        labeled_cross_entropy(hidden, torch.full_like(labels, -100), weight, max_labeled=3)


@pytest.mark.parametrize("reader", READERS)
def test_static_loss_equals_the_packed_loss_in_value_and_gradients(reader):
    model = _model(reader)
    ids, labels, images = _labeled_batch(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref = model.loss(ids, labels, images)  # shared prefix / packing where they pay
    g_ref = torch.autograd.grad(ref, trainable, allow_unused=True)  # a reader's LM head is unused
    got = model.loss(ids, labels, images, max_labeled=_n_labeled(labels) + 4)
    g = torch.autograd.grad(got, trainable, allow_unused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert [a is None for a in g] == [b is None for b in g_ref]
    for a, b in zip(g, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reader", READERS)
def test_the_captured_code_reads_no_device_value_on_the_host(reader):
    """Under FakeTensorMode a host read of a device value (``bool(t)``, ``.item()``) or a shape
    that depends on values (boolean indexing) raises: what a CUDA capture would reject."""
    model = _model(reader)
    ids, labels, images = _labeled_batch(model)
    n = _n_labeled(labels)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with FakeTensorMode(allow_non_fake_inputs=True), static_shapes():
        loss = model.loss(ids, labels, images, max_labeled=n)
        grads = [g for g in torch.autograd.grad(loss, trainable, allow_unused=True) if g is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = (1.0 / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s arithmetic, no host read
        torch._foreach_mul_(list(grads), scale)
    # The check can fail: the default loss gathers the labelled rows by value, and so does the
    # fusion embedding's early exit outside static_shapes.
    with pytest.raises(DataDependentOutputException), FakeTensorMode(allow_non_fake_inputs=True), static_shapes():
        model.loss(ids, labels, images)
    with pytest.raises(DataDependentOutputException), FakeTensorMode(allow_non_fake_inputs=True):
        model.loss(ids, labels, images, max_labeled=n)


def test_the_video_models_static_loss_reads_nothing_on_the_host_either():
    import dataclasses

    from tests.test_video_model import VIDEO, image_config

    model = MultimodalLlama(tiny_lm(), image_config(video=dataclasses.replace(VIDEO, gate_init=0.5)))
    ids = torch.randint(0, VOCAB, (2, 7))
    ids[:, 2] = model.media_token_id("video")
    labels = ids.clone()
    labels[:, :3] = -100
    clips = dict(videos=torch.randn(2, 6, 3, 16, 16), frame_mask=torch.tensor([[True] * 6, [True] * 2 + [False] * 4]))
    n = _n_labeled(labels)
    torch.testing.assert_close(model.loss(ids, labels, **clips, max_labeled=n), model.loss(ids, labels, **clips))
    with FakeTensorMode(allow_non_fake_inputs=True), static_shapes():
        model.loss(ids, labels, **clips, max_labeled=n).backward()


def test_static_shapes_is_scoped_and_nestable():
    t = torch.zeros(1)
    assert not must_stay_static(t)
    with static_shapes():
        with static_shapes():
            assert must_stay_static(t)
        assert must_stay_static(t)
    assert not must_stay_static(t)


def _plain_step(model, opt, ids, labels, images, n, max_norm):
    opt.zero_grad(set_to_none=True)
    loss = model.loss(ids, labels, images, max_labeled=n)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm, foreach=True)
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("stepped_before", [False, True], ids=["fresh-optimizer", "optimizer-with-state"])
def test_graphed_step_undoes_its_warmup_and_then_follows_a_plain_loop_exactly(stepped_before):
    model = tiny_model(gate_init=0.2)
    reference = copy.deepcopy(model)
    batches = [_labeled_batch(model, seed=s) for s in range(4)]
    n = max(_n_labeled(lb) for _, lb, _ in batches)

    def adamw(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01)

    opt, ref_opt = adamw(model), adamw(reference)
    if stepped_before:  # the warm-up then has existing optimizer state to put back, not zeros
        _plain_step(model, opt, *batches[0], n, 0.5)
        _plain_step(reference, ref_opt, *batches[0], n, 0.5)

    def loss_fn(ids, labels, images):
        return model.loss(ids, labels, images, max_labeled=n)

    ids, labels, images = batches[1]
    step = GraphedTrainStep(loss_fn, opt, dict(ids=ids, labels=labels, images=images), max_grad_norm=0.5,
                            warmup_steps=2)
    for ids, labels, images in batches[1:]:
        got = step(ids=ids, labels=labels, images=images)
        want = _plain_step(reference, ref_opt, ids, labels, images, n, 0.5)
        assert torch.equal(got, want)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    for s, r in zip(opt.state.values(), ref_opt.state.values()):
        assert all(torch.equal(s[k], r[k]) for k in r)


def test_graphed_step_names_a_batch_that_does_not_fit_the_graph():
    model = tiny_model()
    ids, labels, images = _labeled_batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    step = GraphedTrainStep(lambda **b: model.loss(**b, max_labeled=20), opt,
                            dict(input_ids=ids, labels=labels, images=images))
    with pytest.raises(ValueError, match=r"batch\['labels'\] is \(3, 11\).*built for \(3, 12\).*pad to them"):
        step(input_ids=ids, labels=labels[:, :-1], images=images)
    with pytest.raises(ValueError, match="batch has keys"):
        step(ids=ids, labels=labels, images=images)


def test_only_graph_safe_optimizers_are_accepted_and_their_lr_becomes_a_tensor():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="capturable=True or fused=True"):
        check_graph_safe(torch.optim.AdamW([p]), torch.device("cpu"))
    with pytest.raises(ValueError, match="supports.*AdamW.*got SGD"):
        check_graph_safe(torch.optim.SGD([p], lr=0.1), torch.device("cpu"))
    opt = torch.optim.AdamW([p], lr=2e-4, capturable=True)
    check_graph_safe(opt, torch.device("cpu"))
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and opt.param_groups[0]["lr"].item() == pytest.approx(2e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replayed_step_equals_the_eager_step_on_cuda():
    model = tiny_model(gate_init=0.2).cuda()
    reference = copy.deepcopy(model)
    batches = [[t.cuda() for t in _labeled_batch(model, seed=s)] for s in range(3)]
    n = max(_n_labeled(lb) for _, lb, _ in batches)

    def adamw(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3, capturable=True)

    opt, ref_opt = adamw(model), adamw(reference)
    ids, labels, images = batches[0]
    step = GraphedTrainStep(lambda ids, labels, images: model.loss(ids, labels, images, max_labeled=n), opt,
                            dict(ids=ids, labels=labels, images=images), max_grad_norm=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda i: 1.0 / (1 + i))
    for ids, labels, images in batches:
        got = step(ids=ids, labels=labels, images=images)
        want = _plain_step(reference, ref_opt, ids, labels, images, n, 0.5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        sched.step()
        ref_sched.step()
    assert step.graph is not None
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
