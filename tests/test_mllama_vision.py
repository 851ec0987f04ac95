"""The native Mllama tiled vision encoder and MultimodalLlama built around it (no transformers needed)."""

import pytest
import torch

from adapters import GatedCrossAttention
from encoders.mllama_vision import MllamaVisionEncoder, MllamaVisionEncoderConfig, TiledImages
from encoders.tiling import collate_tiled, tile_image
from mm_llama.config import LlamaConfig
from mm_llama.llama import LlamaLM
from mm_llama.lm import freeze
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama

VOCAB = 97


def tiny_config(**overrides) -> MllamaVisionEncoderConfig:
    return MllamaVisionEncoderConfig(**{
        **dict(tile_size=16, patch_size=4, width=32, depth=3, n_global_layers=2, heads=4, mlp_dim=48,
               intermediate_layers=(0, 2), max_num_tiles=4),
        **overrides,
    })


def tiled_batch() -> TiledImages:
    g = torch.Generator().manual_seed(0)
    return collate_tiled([[tile_image(torch.rand(3, 16, 48, generator=g), 16, 4)], []], 4)  # 1x3 grid; no image


def test_output_shape_and_mask():
    enc = MllamaVisionEncoder(tiny_config()).eval()
    images = tiled_batch()
    with torch.no_grad():
        out = enc(images)
    tokens = 17  # 4x4 patches + class token per tile
    assert enc.out_dim == 32 * 3
    assert out.tokens.shape == (2, 4 * tokens, 96) and out.mask.shape == (2, 4 * tokens)
    assert out.mask[0, : 3 * tokens].all() and not out.mask[0, 3 * tokens :].any()  # padding tile hidden
    assert not out.mask[1].any()  # empty slot (aspect-ratio id 0) hidden, though tile 0 is marked real
    assert torch.isfinite(out.tokens).all()


def test_intermediate_features_are_interleaved_per_channel():
    """The reference stacks kept layers on a last axis before flattening: channel-major."""
    enc = MllamaVisionEncoder(tiny_config(n_global_layers=0)).eval()
    kept = []
    hooks = [enc.local_layers[i].register_forward_hook(lambda m, a, out: kept.append(out)) for i in (0, 2)]
    with torch.no_grad():
        out = enc(tiled_batch()).tokens
    for h in hooks:
        h.remove()
    layer0 = kept[0].view(2, 4, 24, 32)[:, :, :17].reshape(2, 68, 32)  # drop the 7 alignment-padding tokens
    assert torch.equal(out[..., 32::2], layer0)  # channel c of layer 0 sits at 32 + 2c


def test_gradient_checkpointing_changes_nothing():
    enc = MllamaVisionEncoder(tiny_config(global_gate_init=0.5)).train()
    images = tiled_batch()
    blocks = enc.blocks()  # the local layers, then the global ones: what FSDP shards and recomputes
    assert len(blocks) == len(enc.local_layers) + len(enc.global_layers) and blocks[-1] is enc.global_layers[-1]
    grads, runs = [], []
    for enabled in (False, True):
        enc.zero_grad()
        enc.set_grad_checkpointing(enabled)
        ran = []
        hooks = [b.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(blocks)]
        out = enc(images).tokens
        out.square().mean().backward()
        for hook in hooks:
            hook.remove()
        grads.append([p.grad.clone() for p in enc.parameters()])
        runs.append(ran)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert runs[0] == list(range(len(blocks))) and sorted(runs[1]) == sorted(runs[0] * 2)


def test_bad_inputs_and_configs_are_named():
    enc = MllamaVisionEncoder(tiny_config())
    with pytest.raises(TypeError, match="TiledImages"):
        enc(torch.zeros(1, 3, 16, 16))
    images = tiled_batch()
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must lie in \[0, 8\]"):
        enc(TiledImages(images.pixel_values, torch.tensor([[9], [0]]), images.aspect_ratio_mask))
    with pytest.raises(ValueError, match="aspect_ratio_mask must be"):
        TiledImages(images.pixel_values, images.aspect_ratio_ids, images.aspect_ratio_mask[..., :2])
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        tiny_config(tile_size=18)
    with pytest.raises(ValueError, match=r"\(2, 3\) does not fit max_num_tiles=4"):
        tiny_config(supported_aspect_ratios=((1, 1), (2, 3)))


def tiny_model(mode: str = "both") -> MultimodalLlama:
    lm = freeze(LlamaLM(LlamaConfig(vocab_size=VOCAB, dim=48, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=64)))
    cfg = ModelConfig(
        image_encoder=tiny_config(),
        cross_attention=CrossAttentionConfig(every=2, gate_init=0.5, output_scale="none", row_mask_mode=mode),
        projection="linear",
        fusion_rows=8,
    )
    return MultimodalLlama(lm, cfg)


def test_multimodal_llama_holds_the_tiled_encoder_and_trains_it():
    model = tiny_model().train()
    assert model.fusion_embed.new.weight.shape == (8, 48)
    assert not hasattr(model.image_projection.norm, "weight")  # "linear": Linear + bias only
    ids = torch.randint(0, VOCAB, (2, 10))
    ids[:, 2] = model.media_token_id("image")
    labels = ids.clone()
    labels[:, :3] = -100
    model.loss(ids, labels, tiled_batch()).backward()
    for name, p in model.named_parameters():
        if name.startswith("lm."):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    assert model.image_encoder.local_layers[0].q_proj.weight.grad.abs().sum() > 0


def test_row_mask_modes_differ_only_on_rows_that_see_no_media():
    torch.manual_seed(0)
    blocks = {mode: GatedCrossAttention(48, 4, 2, 12, 64, gate_init=0.5, row_mask_mode=mode)
              for mode in ("both", "mlp_only")}
    blocks["mlp_only"].load_state_dict(blocks["both"].state_dict())
    hidden, media = torch.randn(2, 6, 48), torch.randn(2, 5, 48)
    media_mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    rows = torch.tensor([[False, False, True, True, True, True]] * 2)
    with torch.no_grad():
        kv = blocks["both"].media_kv(media)
        out = {mode: blk(hidden, kv, media_mask, rows) for mode, blk in blocks.items()}
    assert torch.equal(out["both"][~rows], hidden[~rows])  # ours: untouched
    assert (out["mlp_only"][~rows] - hidden[~rows]).abs().min() > 0  # HF: the attention branch is added
    assert torch.allclose(out["both"][rows], out["mlp_only"][rows], atol=1e-6)
    with pytest.raises(ValueError, match="row_mask_mode"):
        GatedCrossAttention(48, 4, 2, 12, 64, row_mask_mode="attention")
