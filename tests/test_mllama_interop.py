"""Llama 3.2 Vision (Mllama) checkpoints: import, logits parity with ``transformers``, export.

A tiny random ``MllamaForConditionalGeneration`` (fp32, eager attention, every gate set
non-zero so that no branch hides behind tanh(0) = 0) is saved with ``save_pretrained`` and
imported with :func:`load_mllama`. Inputs are built with our own tiling, including an image
whose aspect ratio leaves a padding tile, and the HF ``cross_attention_mask`` is derived
from the same rows our model uses (at or after the ``<|image|>`` token).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from encoders.tiling import collate_tiled, tile_image  # noqa: E402
from mm_llama.weights.mllama import load_mllama, save_mllama  # noqa: E402
from mm_llama.weights.mllama_keys import TextLayout  # noqa: E402

VOCAB, IMAGE = 101, 101
TILE, MAX_TILES = 16, 4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  vision_output_dim=96, image_size=TILE, patch_size=4, max_num_tiles=MAX_TILES,
                  intermediate_layers_indices=[0, 2])
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16)
    text = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, cross_attention_layers=[1, 4], max_position_embeddings=256,
                rope_parameters=rope, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    cfg = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    cfg._attn_implementation = "eager"
    ref = transformers.MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "gate" in name:  # HF initialises these at (or near) zero
                p.uniform_(0.3, 1.0)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("mllama")
    ref.save_pretrained(path)
    return path, ref


@pytest.fixture(scope="module")
def imported(hf_dir):
    """The checkpoint imported in each row-mask mode."""
    return {mode: load_mllama(hf_dir[0], row_mask_mode=mode) for mode in ("both", "mlp_only")}


def _images(samples):
    """Tiled batch from per-sample image sizes (``None`` = a text-only sample)."""
    g = torch.Generator().manual_seed(1)
    batch = [[] if hw is None else [tile_image(torch.rand(3, *hw, generator=g), TILE, MAX_TILES)] for hw in samples]
    return collate_tiled(batch, MAX_TILES)


def _hf_logits(ref, ids, images):
    """HF logits; a row sees the tiles of an image iff it is at/after the sample's first image token."""
    rows = (ids == IMAGE).cumsum(1) > 0  # [b, s]
    tiles = images.aspect_ratio_mask.bool() & (images.aspect_ratio_ids > 0)[..., None]  # [b, m, t]
    cross = (rows[:, :, None, None] & tiles[:, None]).long()  # [b, s, m, t]
    with torch.no_grad():
        return ref(input_ids=ids, pixel_values=images.pixel_values, aspect_ratio_ids=images.aspect_ratio_ids,
                   aspect_ratio_mask=images.aspect_ratio_mask, cross_attention_mask=cross).logits


def _ids(b, s, image_at):
    ids = torch.randint(3, VOCAB, (b, s), generator=torch.Generator().manual_seed(2))
    for i, pos in enumerate(image_at):
        if pos is not None:
            ids[i, pos] = IMAGE
    return ids


@pytest.mark.parametrize("mode", ["both", "mlp_only"])
def test_image_first_logits_match(hf_dir, imported, mode):
    ref, ours = hf_dir[1], imported[mode]
    images = _images([(16, 48), (40, 37)])  # grid 1x3 (one padding tile) and 2x2
    assert images.aspect_ratio_ids.tolist() == [[3], [6]]
    assert images.aspect_ratio_mask[0, 0].tolist() == [1, 1, 1, 0]
    ids = _ids(2, 12, [0, 0])
    with torch.no_grad():
        got = ours(ids, images)
    assert (got - _hf_logits(ref, ids, images)).abs().max() < 1e-4
    with torch.no_grad():  # the image matters: without it the logits are different
        assert (got - ours(ids)).abs().max() > 1e-2


def test_mixed_batch_and_row_modes(hf_dir, imported):
    """Text-only sample beside an image sample; a sample with text before its image."""
    ref = hf_dir[1]
    images = _images([(16, 48), None, (20, 20)])
    assert images.aspect_ratio_ids[1].tolist() == [0]
    ids = _ids(3, 12, [0, None, 4])
    expected = _hf_logits(ref, ids, images)
    seen = (ids == IMAGE).cumsum(1) > 0  # [b, s]

    with torch.no_grad():
        assert (imported["mlp_only"](ids, images) - expected).abs().max() < 1e-4

    ours = imported["both"]
    with torch.no_grad():
        got = ours(ids, images)
        plain = ours.lm(ids.clamp(max=VOCAB - 1))
    assert (got[0] - expected[0]).abs().max() < 1e-4  # image first: both modes agree with HF
    # rows that see no image pass through unchanged: the text-only sample and sample 2's first 4 rows
    assert (got[~seen] - plain[~seen]).abs().max() < 1e-5
    # ... where HF's attention branch still adds an (unmasked) image read-out: the documented difference
    assert (expected[~seen] - plain[~seen]).abs().max() > 1e-3


def test_export_round_trip(hf_dir, imported, tmp_path):
    path, ref = hf_dir
    save_mllama(imported["both"], tmp_path / "out")
    original, exported = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)

    reloaded = transformers.MllamaForConditionalGeneration.from_pretrained(
        tmp_path / "out", attn_implementation="eager")
    images, ids = _images([(16, 48), (20, 20)]), _ids(2, 10, [0, 3])
    assert torch.equal(_hf_logits(reloaded.eval(), ids, images), _hf_logits(ref, ids, images))
    text = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert text["cross_attention_layers"] == [1, 4] and text["num_hidden_layers"] == 6


def test_modules_layout_and_shards_load_the_same(hf_dir, imported, tmp_path):
    ref, ours = hf_dir[1], imported["both"]
    save_mllama(ours, tmp_path / "modules", layout="modules")
    assert "model.language_model.embed_tokens.weight" in load_file(tmp_path / "modules" / "model.safetensors")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for other in (load_mllama(tmp_path / "modules"), load_mllama(tmp_path / "sharded")):
        a, b = ours.state_dict(), other.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_and_missing_keys_raise(hf_dir, tmp_path):
    path, _ = hf_dir
    state = load_file(path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file({**state, "vision_model.transformer.layers.0.self_attn.q_proj.bias": torch.zeros(32)},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"vision_model\.transformer\.layers\.0\.self_attn\.q_proj\.bias"):
        load_mllama(tmp_path)
    for gone in ("language_model.model.layers.4.cross_attn_mlp_gate",
                 "language_model.model.layers.2.mlp.up_proj.weight"):
        save_file({k: v for k, v in state.items() if k != gone}, str(tmp_path / "model.safetensors"),
                  metadata={"format": "pt"})
        with pytest.raises(KeyError, match=gone.replace(".", r"\.")):
            load_mllama(tmp_path)


def test_layer_placement_and_unrepresentable_layouts():
    layout = TextLayout(40, (3, 8, 13, 18, 23, 28, 33, 38))  # Llama 3.2 11B Vision
    assert layout.positions == (3, 7, 11, 15, 19, 23, 27, 31) and layout.n_self == 32
    for j in range(40):
        kind, k = layout.to_native(j)
        assert layout.to_hf(kind, k) == j
    assert TextLayout.from_positions(32, layout.positions) == layout
    with pytest.raises(ValueError, match="after the last self-attention layer"):
        TextLayout(6, (1, 5))
    with pytest.raises(ValueError, match="adjacent"):
        TextLayout(6, (1, 2))


def test_export_refuses_what_mllama_cannot_hold(hf_dir, tmp_path):
    ours = load_mllama(hf_dir[0])  # a fresh copy: this test changes it
    ours.cross_attn["1"].output_scale.fill_(2.0)
    with pytest.raises(ValueError, match="output_scale"):
        save_mllama(ours, tmp_path)


def test_greedy_generation_matches_transformers(hf_dir, imported):
    """KV-cache decoding with cached media K/V follows HF's ``generate`` token for token."""
    from mm_llama.generation import generate

    ref = hf_dir[1]
    images, ids = _images([(16, 48), (20, 20)]), _ids(2, 6, [0, 0])
    tiles = images.aspect_ratio_mask.bool() & (images.aspect_ratio_ids > 0)[..., None]
    cross = tiles[:, None].expand(2, 6, 1, MAX_TILES).long()  # [b, s, m, t]: every row after <|image|>
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, pixel_values=images.pixel_values,
                                aspect_ratio_ids=images.aspect_ratio_ids, aspect_ratio_mask=images.aspect_ratio_mask,
                                cross_attention_mask=cross, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                eos_token_id=None, pad_token_id=0)[:, 6:]
    got = generate(imported["mlp_only"], ids.tolist(), images, max_new_tokens=6)
    assert got == expected.tolist()


def test_published_11b_config_translates():
    """The config.json of Llama-3.2-11B-Vision as published (``rope_scaling`` spelling, no weights needed)."""
    from mm_llama.weights.mllama import text_config_from_hf, vision_config_from_hf

    hf = {
        "model_type": "mllama", "image_token_index": 128256,
        "text_config": {
            "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
            "pad_token_id": 128004,
        },
        "vision_config": {
            "hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32, "num_global_layers": 8,
            "attention_heads": 16, "num_channels": 3, "intermediate_size": 5120, "vision_output_dim": 7680,
            "image_size": 560, "patch_size": 14, "norm_eps": 1e-5, "max_num_tiles": 4,
            "intermediate_layers_indices": [3, 7, 15, 23, 30],
            "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        },
    }
    lm, layout = text_config_from_hf(hf)
    assert (lm.n_layers, lm.dim, lm.n_kv_heads, lm.vocab_size, lm.tie_embeddings) == (32, 4096, 8, 128256, False)
    assert lm.rope_scaling is not None and lm.rope_scaling.factor == 8.0 and lm.rope_theta == 500000.0
    assert layout.positions == (3, 7, 11, 15, 19, 23, 27, 31)
    vision = vision_config_from_hf(hf["vision_config"])
    assert vision.out_dim == 7680 and vision.tokens_per_tile == 1601 and vision.n_aspect_ratio_ids == 9
    with pytest.raises(ValueError, match="image_token_index 5"):
        text_config_from_hf({**hf, "image_token_index": 5})
