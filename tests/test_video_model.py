"""The video branch: temporal aggregator shapes and masking, video blocks at gate 0 leave the
image model unchanged, the video stage trains exactly the video parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapters.temporal import TemporalAggregator
from encoders import ImageEncoderConfig
from mm_llama.lm import load_language_model
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama
from mm_llama.training.video_stage import check_video_stage_trainable, load_stage_weights, video_stage_config
from mm_llama.video_adapter import VIDEO_GROUPS, VideoConfig, video_layer_positions

ENCODER = ImageEncoderConfig(backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8, depth=2,
                             width=32, heads=2, intermediate_layers=(0,))  # 4 tokens of 64 dims per frame
VIDEO = VideoConfig(frames=6, frames_per_group=4, depth=1, heads=2, every=1)


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_language_model(str(tiny_lm_dir))


def image_config(**kw) -> ModelConfig:
    return ModelConfig(image_encoder=ENCODER, cross_attention=CrossAttentionConfig(every=2), **kw)


def prompt_ids(model: MultimodalLlama, b: int = 2, s: int = 7) -> torch.Tensor:
    ids = torch.randint(0, model.lm.cfg.vocab_size, (b, s))
    ids[:, 2] = model.media_token_id("video")
    return ids


# ----------------------------------------------------------------------------- aggregator


def test_aggregator_pads_frames_not_divisible_by_k():
    agg = TemporalAggregator(dim=16, frames_per_group=4, n_latents=3, max_groups=3, depth=2, heads=2)
    frames = torch.randn(2, 10, 5, 16)  # f=10, k=4: 3 groups, the last with 2 real slots + 2 padding
    mask = torch.tensor([[True] * 10, [True] * 5 + [False] * 5])
    tokens, out_mask = agg(frames, mask)
    assert tokens.shape == (2, 3 * 3, 16) and out_mask.shape == (2, 9)
    assert out_mask[0].all()
    assert out_mask[1].tolist() == [True] * 6 + [False] * 3  # clip 2: group 3 holds no real frame
    # Padding frames are never read: changing them changes nothing.
    changed = frames.clone()
    changed[1, 5:] = torch.randn(5, 5, 16)
    assert torch.allclose(agg(changed, mask)[0], tokens, atol=1e-6)
    # Real frames are read, in order: swapping two frames of one group changes that group's output.
    swapped = frames.clone()
    swapped[0, [0, 1]] = frames[0, [1, 0]]
    assert not torch.allclose(agg(swapped, mask)[0][0, :3], tokens[0, :3], atol=1e-4)
    with pytest.raises(ValueError, match="max_groups"):
        agg(torch.randn(1, 13, 5, 16), torch.ones(1, 13, dtype=torch.bool))


def test_video_blocks_sit_before_every_nth_image_block():
    assert video_layer_positions((3, 7, 11, 15, 19, 23, 27), 4) == (3, 19)
    assert video_layer_positions((1, 3), 1) == (1, 3)


# ----------------------------------------------------------------------------- fused model


def test_video_gates_at_zero_leave_the_image_model_unchanged(lm):
    torch.manual_seed(0)
    image_model = MultimodalLlama(lm, image_config())
    video_model = MultimodalLlama(lm, image_config(video=VIDEO))
    missing, unexpected = video_model.load_state_dict(image_model.state_dict(), strict=False)
    assert not unexpected and {video_model.group_of(k) for k in missing} == set(VIDEO_GROUPS)
    for blk in [*image_model.cross_attn.values(), *video_model.cross_attn.values()]:
        blk.attn_gate.data.fill_(0.5)
        blk.mlp_gate.data.fill_(0.5)  # the image model reads its media
    ids = prompt_ids(video_model)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(video_model(ids, images), image_model(ids, images), atol=1e-5)
        videos, frame_mask = torch.randn(2, 6, 3, 16, 16), torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
        context = video_model.video_context(videos, frame_mask)
        image_only = dataclasses.replace(context, video_kv=None, video_mask=None)
        expected = image_model.lm.logits(image_model.hidden_states(ids, image_only))
        assert torch.allclose(video_model(ids, videos=videos, frame_mask=frame_mask), expected, atol=1e-5)
        for blk in video_model.video.cross_attn.values():
            blk.attn_gate.data.fill_(0.5)
        assert not torch.allclose(video_model(ids, videos=videos, frame_mask=frame_mask), expected, atol=1e-3)


def test_video_stage_gives_gradients_to_video_parameters_only(lm):
    model = MultimodalLlama(lm, image_config(video=dataclasses.replace(VIDEO, gate_init=0.5), trainable=VIDEO_GROUPS))
    check_video_stage_trainable(model)
    ids = prompt_ids(model)
    labels = ids.clone()
    labels[:, :3] = -100
    loss = model.loss(ids, labels, videos=torch.randn(2, 6, 3, 16, 16),
                      frame_mask=torch.tensor([[True] * 6, [True] * 2 + [False] * 4]))
    loss.backward()
    for name, p in model.named_parameters():
        if model.group_of(name) in VIDEO_GROUPS:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    next(model.image_encoder.parameters()).requires_grad_(True)
    with pytest.raises(RuntimeError, match="exactly the video branch"):
        check_video_stage_trainable(model)


def test_video_blocks_recompute_under_activation_checkpointing_with_the_same_gradients(lm):
    torch.manual_seed(0)
    model = MultimodalLlama(lm, ModelConfig(image_encoder=ENCODER, cross_attention=CrossAttentionConfig(every=2, gate_init=0.5),
                                            video=dataclasses.replace(VIDEO, gate_init=0.5))).train()
    ids = prompt_ids(model)
    labels = ids.clone()
    labels[:, :3] = -100
    videos, frame_mask = torch.randn(2, 6, 3, 16, 16), torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    runs = []
    block = next(iter(model.video.cross_attn.values()))
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        calls = []
        handle = block.register_forward_pre_hook(lambda *_: calls.append(1))
        model.loss(ids, labels, videos=videos, frame_mask=frame_mask).backward()
        handle.remove()
        runs.append((len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_calls, plain), (ckpt_calls, ckpt) = runs
    assert (plain_calls, ckpt_calls) == (1, 2)  # the video block ran again in backward
    assert plain.keys() == ckpt.keys() and any(n.startswith("video.") for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_video_stage_starts_from_the_image_checkpoint(tiny_checkpoint):
    from mm_llama.training.module import AdapterModule

    lm_dir = tiny_checkpoint.parent / "lm"
    cfg = video_stage_config(VIDEO, tiny_checkpoint)
    assert cfg.trainable == VIDEO_GROUPS and cfg.video == VIDEO and cfg.image_encoder.checkpoint is None
    module = AdapterModule(lm=str(lm_dir), model=cfg, init_from=str(tiny_checkpoint))
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    loaded = module.model.state_dict()
    for key, value in state.items():
        if key != "model.fusion_embed.new.weight":
            assert torch.equal(loaded[key.removeprefix("model.")], value), key
    table, trained = loaded["fusion_embed.new.weight"], state["model.fusion_embed.new.weight"]
    assert torch.equal(table[[0, 2]], trained[[0, 2]])  # <|image|>, <|speech|> as trained
    assert torch.equal(table[1], trained[0])  # <|video|> starts as the trained <|image|>
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == {
        n for n, _ in module.model.named_parameters() if module.model.group_of(n) in VIDEO_GROUPS
    }
    other = MultimodalLlama(module.model.lm, ModelConfig(image_encoder=ENCODER, video=VIDEO,  # more image blocks
                                                         cross_attention=CrossAttentionConfig(every=1)))
    with pytest.raises(ValueError, match="does not fit"):
        load_stage_weights(other, tiny_checkpoint)
