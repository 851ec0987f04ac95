"""MultimodalLlama on a tiny random LM: identity at init, masking, gradients, trainable set."""

import pytest
import torch

from encoders import ImageEncoderConfig
from mm_llama.config import LlamaConfig
from mm_llama.llama import KVCache, LlamaLM
from mm_llama.lm import freeze
from mm_llama.model import (
    CrossAttentionConfig, ModelConfig, MultimodalLlama, labeled_cross_entropy, shared_prefix_length,
)
from mm_llama.saved_tensors import saved_for_backward

VOCAB = 97


def tiny_lm(tie=True) -> LlamaLM:
    cfg = LlamaConfig(vocab_size=VOCAB, dim=48, n_layers=8, n_heads=4, n_kv_heads=2, hidden_dim=64, tie_embeddings=tie)
    return freeze(LlamaLM(cfg))


def tiny_model(gate_init=0.0, **xattn) -> MultimodalLlama:
    enc = ImageEncoderConfig(
        backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8, depth=2, width=32, heads=2,
        intermediate_layers=(0,))
    return MultimodalLlama(tiny_lm(), ModelConfig(enc, CrossAttentionConfig(gate_init=gate_init, **xattn)))


def batch(model, b=2, s=12, image_at=3):
    ids = torch.randint(0, VOCAB, (b, s))
    ids[:, image_at] = model.media_token_id("image")
    return ids, torch.randn(b, 3, 16, 16)


def test_default_placement_is_every_fourth_layer():
    assert list(tiny_model().cross_attn) == ["3", "7"]


def test_gates_at_zero_equal_the_plain_lm_exactly():
    model = tiny_model().eval()
    ids, images = batch(model)
    text_ids = ids.clone()
    with torch.no_grad():
        fused = model.lm.logits(model.hidden_states(ids, model.media_context(images)))
        plain = model.lm.logits(model.hidden_states(text_ids, None))
    assert torch.equal(fused, plain)
    # and without any media token, the fused model is the stock LM on stock ids
    plain_ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(plain_ids, torch.randn(2, 3, 16, 16)), model.lm(plain_ids))


def test_rows_before_the_image_are_untouched_and_rows_after_change():
    model = tiny_model(gate_init=0.7).eval()
    ids, images = batch(model, image_at=5)
    with torch.no_grad():
        fused = model(ids, images)
        text_only = model.lm.logits(model.hidden_states(ids, None))
    assert torch.equal(fused[:, :5], text_only[:, :5])
    assert (fused[:, 5:] - text_only[:, 5:]).abs().max() > 1e-3


def test_sample_without_media_is_text_only_in_a_mixed_batch():
    model = tiny_model(gate_init=0.7).eval()
    ids, images = batch(model)
    ids[1] = torch.randint(0, VOCAB, (ids.shape[1],))  # second sample has no <|image|>
    with torch.no_grad():
        fused = model(ids, images)
        plain = model.lm(ids[1:])
    assert torch.allclose(fused[1:], plain, atol=1e-6)


def test_gradients_reach_every_trainable_and_no_frozen_parameter():
    model = tiny_model(gate_init=0.5).train()
    ids, images = batch(model)
    labels = ids.clone()
    labels[:, :6] = -100
    model.loss(ids, labels, images).backward()
    for name, p in model.named_parameters():
        if name.startswith("lm."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
            if not name.startswith("fusion_embed"):  # unused <|video|>/<|speech|> rows are zero
                assert p.grad.abs().sum() > 0, name


def test_trainable_parameter_names_exactly():
    model = tiny_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_prefixes = ("image_encoder.", "image_projection.", "cross_attn.", "fusion_embed.")
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(expected_prefixes)}
    xattn = {n.split(".", 2)[2] for n in trainable if n.startswith("cross_attn.3.")}
    assert xattn == {
        "attn_norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
        "q_norm.weight", "k_norm.weight", "attn_gate", "mlp_norm.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight", "mlp_gate",
    }
    assert {n for n in trainable if n.startswith("fusion_embed")} == {"fusion_embed.new.weight"}
    assert not any(n.startswith("lm.") for n in model.trainable_state_dict())
    # stage control: freezing the encoder group changes requires_grad and nothing else
    frozen_enc = MultimodalLlama(tiny_lm(), ModelConfig(model.cfg.image_encoder, trainable=("cross_attention",)))
    assert {n for n, p in frozen_enc.named_parameters() if p.requires_grad} == {
        n for n in trainable if n.startswith("cross_attn.")
    }


def test_train_mode_leaves_the_lm_and_every_frozen_part_in_eval():
    model = tiny_model()
    assert model.frozen_parts() == {}
    model.train()
    assert model.image_encoder.training and model.cross_attn.training and not model.lm.training
    stage2 = MultimodalLlama(tiny_lm(), ModelConfig(model.cfg.image_encoder, trainable=("cross_attention",)))
    assert set(stage2.frozen_parts()) == {"image_encoder", "image_projection", "fusion_embed"}
    stage2.train()
    for part in [stage2.lm, *stage2.frozen_parts().values()]:
        assert not any(m.training for m in part.modules())
    assert all(m.training for m in stage2.cross_attn.modules())
    stage2.eval()
    assert not any(m.training for m in stage2.modules())


def test_residual_rms_scale_is_measured_per_layer():
    model = tiny_model(output_scale="residual_rms")
    scales = {i: float(b.output_scale) for i, b in model.cross_attn.items()}
    assert all(s > 0 for s in scales.values())
    assert tiny_model(output_scale="none").cross_attn["3"].output_scale.item() == 1.0


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="'sometimes'"):
        CrossAttentionConfig(output_scale="sometimes")
    with pytest.raises(ValueError, match=r"\[9\]"):
        MultimodalLlama(tiny_lm(), ModelConfig(cross_attention=CrossAttentionConfig(layers=(1, 9))))
    with pytest.raises(ValueError, match="decoder"):
        ModelConfig(trainable=("decoder",))


def test_labeled_cross_entropy_matches_full_logits():
    lm = tiny_lm(tie=False)
    ids = torch.randint(0, VOCAB, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    hidden = lm.decode(lm.embed(ids))
    full = torch.nn.functional.cross_entropy(lm.logits(hidden)[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert torch.allclose(labeled_cross_entropy(hidden, labels, lm.output_weight, chunk=4), full, atol=1e-6)


def test_kv_cache_decode_equals_full_forward():
    lm = tiny_lm()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        full = lm(ids)
        cache = KVCache(lm.cfg, 2, 10)
        steps = [lm.logits(lm.decode(lm.embed(ids[:, :6]), cache=cache))]
        for t in range(6, 10):
            steps.append(lm.logits(lm.decode(lm.embed(ids[:, t : t + 1]), cache=cache)))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def _prefixed_batch(model, b=3, s=14, prefix=4, image_at=5):
    """Rows that share ``prefix`` leading tokens, then differ; labels on the last 4 columns."""
    ids = torch.randint(0, VOCAB, (b, s))
    ids[:, :prefix] = ids[0, :prefix]
    ids[:, image_at] = model.media_token_id("image")
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    return ids, labels


def test_shared_prefix_length_stops_at_the_first_difference_media_or_label():
    model = tiny_model()
    ids, labels = _prefixed_batch(model, prefix=4, image_at=5)
    ids[1, 4] = (ids[0, 4] + 1) % VOCAB
    assert shared_prefix_length(ids, labels, VOCAB) == 4
    ids[:, 4] = ids[0, 4]  # column 4 now shared too; column 5 is the media token in every row
    assert shared_prefix_length(ids, labels, VOCAB) == 5
    labels[:, 3] = ids[:, 3]  # a label at column 3 is predicted from column 2: the prefix stops at 2
    assert shared_prefix_length(ids, labels, VOCAB) == 2
    assert shared_prefix_length(ids[:1], labels[:1], VOCAB) == 0  # one row: nothing to share


def test_loss_with_the_shared_prefix_equals_the_plain_forward_in_value_and_gradients():
    model = tiny_model(gate_init=0.5)
    ids, labels = _prefixed_batch(model)
    images = torch.randn(3, 3, 16, 16)
    assert shared_prefix_length(ids, labels, VOCAB) == 4

    def loss_and_grads(shared: bool):
        model.zero_grad(set_to_none=True)
        if shared:
            loss = model.loss(ids, labels, images)
        else:
            hidden = model.hidden_states(ids, model.media_context(images))
            loss = labeled_cross_entropy(hidden, labels, model.lm.output_weight)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (shared, g_shared), (plain, g_plain) = loss_and_grads(True), loss_and_grads(False)
    assert torch.allclose(shared, plain, atol=1e-6)
    assert g_shared.keys() == g_plain.keys() and g_shared
    for name in g_plain:
        assert torch.allclose(g_shared[name], g_plain[name], atol=1e-6), name
    assert all(p.grad is None for p in model.lm.parameters())


@pytest.mark.parametrize("share_prefix, bf16", [(True, False), (False, False), (True, True)])
def test_activation_checkpointing_keeps_loss_and_gradients_and_holds_a_fraction_of_the_activations(share_prefix, bf16):
    model = tiny_model(gate_init=0.5).train()
    if bf16:  # the GPU recipe's setting: LM in bf16, fp32 adapters under bf16 autocast (recomputed under it too)
        model.lm.to(torch.bfloat16)
    ids, labels = _prefixed_batch(model, b=3, s=40)
    images = torch.randn(3, 3, 16, 16)

    def run(enabled: bool):
        model.set_grad_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, saved = saved_for_backward(
                lambda: model.loss(ids, labels, images, share_prefix=share_prefix), exclude=model.parameters())
        loss.backward()
        return loss.detach(), saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (plain, saved_plain, g_plain), (ckpt, saved_ckpt, g_ckpt) = run(False), run(True)
    assert model.grad_checkpointing and model.lm.grad_checkpointing
    assert torch.allclose(ckpt, plain, atol=1e-6)
    assert g_ckpt.keys() == g_plain.keys() and len(g_plain) > 10
    for name in g_plain:
        assert torch.allclose(g_ckpt[name], g_plain[name], atol=1e-6), name
    assert all(p.grad is None for p in model.lm.parameters())  # the frozen LM still gets none
    # Per block only its input stays (plus the encoder's and the loss's own tensors).
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)
    with torch.no_grad():  # evaluation and generation never recompute: the same logits either way
        logits_ckpt = model(ids, images)
        model.set_grad_checkpointing(False)
        assert torch.equal(logits_ckpt, model(ids, images))


@pytest.mark.parametrize("encoder_trains", [True, False])
def test_checkpointing_recomputes_the_blocks_of_an_encoder_that_trains(encoder_trains):
    model = tiny_model(gate_init=0.5)
    if not encoder_trains:  # stage 2's setting: the encoder frozen
        model.cfg.trainable = tuple(g for g in model.cfg.trainable if g != "image_encoder")
        model.apply_trainable()
    model.train()
    ids, labels = _prefixed_batch(model, b=3, s=40)
    images = torch.randn(3, 3, 16, 16)
    blocks = model.image_encoder.blocks()
    runs, saved, grads = {}, {}, {}
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        ran = []
        hooks = [b.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(blocks)]
        encoder_loss = lambda: model.image_encoder(images).tokens.square().mean()  # noqa: E731
        _, saved[enabled] = saved_for_backward(encoder_loss, exclude=model.parameters())
        loss = model.loss(ids, labels, images, share_prefix=False)
        loss.backward()
        for hook in hooks:
            hook.remove()
        runs[enabled] = len(ran)
        grads[enabled] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert model.image_encoder.grad_checkpointing is encoder_trains
    # one forward of each block, twice for the encoder's own loss and the model's; again in backward if trained
    assert runs[False] == 2 * len(blocks) and runs[True] == (3 if encoder_trains else 2) * len(blocks)
    if encoder_trains:
        assert saved[True] < 0.5 * saved[False], saved
    else:
        assert saved[True] == saved[False] == 0
    assert any(n.startswith("image_encoder.") for n in grads[True]) is encoder_trains
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=0, atol=1e-6, msg=name)


def test_checkpointing_every_second_block_recomputes_those_and_holds_what_lies_between():
    model = tiny_model(gate_init=0.5).train()  # 8 decoder blocks
    ids, labels = _prefixed_batch(model, b=3, s=40)
    images = torch.randn(3, 3, 16, 16)
    saved, grads, calls = {}, {}, {}
    for every in (None, 2, 1):
        model.set_grad_checkpointing(every is not None, every=every or 1)
        model.zero_grad(set_to_none=True)
        ran = []
        hooks = [layer.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, layer in enumerate(model.lm.layers)]
        loss, saved[every] = saved_for_backward(lambda: model.loss(ids, labels, images, share_prefix=False),
                                                exclude=model.parameters())
        loss.backward()
        for hook in hooks:
            hook.remove()
        calls[every] = sorted(ran)
        grads[every] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls[None] == list(range(8))
    assert calls[2] == sorted([*range(8), 0, 2, 4, 6])  # blocks 0, 2, 4, 6 ran again in backward
    assert calls[1] == sorted([*range(8)] * 2)
    assert saved[1] < saved[2] < saved[None]
    for name in grads[None]:
        torch.testing.assert_close(grads[2][name], grads[None][name], rtol=0, atol=1e-6, msg=name)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="block interval >= 1"):
            model.set_grad_checkpointing(True, every=bad)


def test_configs_pickled_before_a_field_existed_load_with_its_default():
    """A checkpoint's pickled ModelConfig from before a field was added (e.g. ``video``) still loads."""
    import pickle

    from mm_llama.model import CrossAttentionConfig, ModelConfig

    cfg = ModelConfig(cross_attention=CrossAttentionConfig(every=2))
    old = pickle.loads(pickle.dumps(cfg))
    for obj, missing in ((old, ("video", "speech_adapter", "fusion_rows")), (old.cross_attention, ("row_mask_mode",)),
                         (old.image_encoder, ("tiles", "stem_norm"))):
        for name in missing:
            del obj.__dict__[name]
    restored = pickle.loads(pickle.dumps(old))
    assert restored == cfg
    assert restored.speech_adapter == ModelConfig().speech_adapter and restored.cross_attention.row_mask_mode == "both"
    assert restored.image_encoder.tiles == 1 and restored.image_encoder.stem_norm == "group"


def test_media_positions_give_each_token_slot_its_own_vector_and_keep_identity_at_init():
    enc = ImageEncoderConfig(backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8, depth=2, width=32,
                             heads=2, intermediate_layers=(0,))
    model = MultimodalLlama(tiny_lm(), ModelConfig(enc, media_positions=True)).eval()
    proj = model.image_projection
    assert proj.position_embed.shape == (4, 48)  # 2 x 2 patches, the LM's width
    assert "image_projection.position_embed" in model.trainable_state_dict()
    same = torch.randn(1, 4, model.image_encoder.out_dim).expand(1, 4, -1)  # one feature in every slot
    out = proj(same)
    assert torch.allclose(out - proj.position_embed, proj.norm(proj.proj(same)))
    assert (out[0, 0] - out[0, 1]).abs().max() > 0.1  # the slots differ by their position only
    with pytest.raises(ValueError, match="4 position embeddings but got 5 tokens"):
        proj(torch.randn(1, 5, model.image_encoder.out_dim))
    ids, images = batch(model)
    with torch.no_grad():  # gates at 0: still the text-only LM
        assert torch.equal(model.lm.logits(model.hidden_states(ids, model.media_context(images))),
                           model.lm.logits(model.hidden_states(ids, None)))
