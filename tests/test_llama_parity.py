"""Logits parity of the native decoder against transformers' LlamaForCausalLM.

Tiny random configs are saved in HF format (single and sharded safetensors) and
loaded back through our loader; fp32 logits must agree to < 1e-4.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mm_llama.lm import build_lm
from mm_llama.weights.hf import load_hf_config, load_hf_state_dict

CASES = {
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama3_rope_scaling": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
}


def _tiny_hf(**overrides):
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        max_position_embeddings=256, rms_norm_eps=1e-5, **overrides,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits nothing here, but make norms non-trivial too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shard", [False, True])
def test_logits_match_transformers(tmp_path, case, shard):
    ref = _tiny_hf(**CASES[case])
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "10GB")
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = build_lm(load_hf_config(tmp_path), load_hf_state_dict(tmp_path))
    ids = torch.randint(0, 101, (2, 40))  # 40 > original ctx 16: the scaled band matters
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_rope_scaling_is_parsed(tmp_path):
    _tiny_hf(**CASES["llama3_rope_scaling"]).save_pretrained(tmp_path)
    cfg = load_hf_config(tmp_path)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert cfg.n_kv_heads == 1 and not cfg.tie_embeddings


def test_unknown_key_raises(tmp_path):
    from safetensors.torch import save_file

    ref = _tiny_hf(**CASES["gqa_tied"])
    ref.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["model.layers.0.self_attn.q_bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="q_bias"):
        load_hf_state_dict(tmp_path)


def test_non_llama_config_rejected(tmp_path):
    from mm_llama.weights.hf import config_from_hf

    with pytest.raises(ValueError, match="mistral"):
        config_from_hf({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
