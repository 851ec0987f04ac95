"""Load a Llama-architecture ``.gguf`` file (llama.cpp's format) as fp32 native tensors.

Three things differ from a Hugging Face checkpoint:

* Names: ``GGUF_TO_NATIVE`` maps llama.cpp's tensor names to ours; an unknown name raises.
* Layout: GGUF lists a tensor's dims fastest-first (``[d_in, d_out]`` for a linear
  weight); the data is row-major in the reversed order, i.e. torch's ``[d_out, d_in]``.
  Quantized tensors (Q4_1, Q8_0, ...) are dequantized with ``gguf.quants.dequantize``.
* RoPE: llama.cpp's converter reorders the output rows of ``q``/``k`` so that its
  rotary kernel can rotate *adjacent* pairs ``(2i, 2i+1)``; Hugging Face (and our
  decoder) rotate *halves* ``(i, i + h_d/2)``. :func:`unpermute_rope` undoes it.

Llama 3.1/3.2 store their ``llama3`` RoPE scaling not as metadata but as the tensor
``rope_freqs.weight`` (one divisor per frequency); we recover :class:`RopeScaling` from
it and check the fit exactly, so a file with other scaling parameters fails loudly.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from mm_llama.config import LlamaConfig, RopeScaling
from mm_llama.tokenizer import Tokenizer
from mm_llama.weights.keys import convert_key

GGUF_TO_NATIVE: dict[str, str] = {
    "token_embd.weight": "embed_tokens.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attn_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.attn.v_proj.weight",
    "blk.{}.attn_output.weight": "layers.{}.attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.mlp_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down_proj.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}

# Not a weight: the llama3 RoPE frequency divisors, folded into LlamaConfig.rope_scaling.
ROPE_FREQS = "rope_freqs.weight"


class GGUFMetadata:
    """Typed access to the key/value fields of a ``gguf.GGUFReader``."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (str, number, bool or list), or ``default`` if absent."""
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        """The value of ``key``; raises ``ValueError`` naming it if absent."""
        if key not in self._fields:
            raise ValueError(f"GGUF file has no {key!r} metadata")
        return self._fields[key].contents()


def permute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half (HF) q/k rows -> llama.cpp's interleaved rows.

    Within each head, row ``j * h_d/2 + i`` (half ``j``, pair ``i``) moves to ``2i + j``,
    as llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) does.

    Args:
        weight: ``[n_heads * h_d, d_in]`` projection weight.
        n_heads: heads in this projection (``n_kv_heads`` for ``k``).
    """
    rows, d_in = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, d_in).transpose(1, 2).reshape(rows, d_in)  # [n_heads*h_d, d_in]


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rope`: llama.cpp's interleaved q/k rows -> rotate-half rows."""
    rows, d_in = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, d_in).transpose(1, 2).reshape(rows, d_in)  # [n_heads*h_d, d_in]


def llama3_rope_freqs(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """The per-frequency divisors llama.cpp writes as ``rope_freqs.weight``.

    Args:
        head_dim: per-head width ``h_d``.
        theta: RoPE base.
        scaling: the ``llama3`` scaling parameters.

    Returns:
        ``[h_d / 2]`` float32 divisors (1 for short wavelengths, ``factor`` for long).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    old = scaling.original_max_position_embeddings
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    divisor = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    divisor = torch.where(wavelen < old / scaling.high_freq_factor, torch.ones_like(divisor), divisor)
    divisor = torch.where(wavelen > old / scaling.low_freq_factor, torch.full_like(divisor, scaling.factor), divisor)
    return divisor.float()


def load_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a Llama ``.gguf`` file.

    Args:
        path: the ``.gguf`` file.

    Returns:
        ``(config, state_dict, tokenizer)``: fp32 tensors under native names (no
        ``lm_head.weight`` when the embeddings are tied), q/k in rotate-half layout.

    Raises:
        ValueError: the architecture is not ``llama``, or metadata is missing/unsupported.
        KeyError: a tensor name is not in :data:`GGUF_TO_NATIVE`.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    meta = GGUFMetadata(reader)
    arch = meta.require("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {path}: only 'llama' is supported")

    sources = {t.name: t for t in reader.tensors}
    rope_freqs = sources.pop(ROPE_FREQS, None)
    native_names = {name: convert_key(name, GGUF_TO_NATIVE) for name in sources}  # raises on unknown
    config = _config_from_metadata(
        meta,
        tied="output.weight" not in sources,
        rope_freqs=None if rope_freqs is None else _dequantize(rope_freqs),
    )

    state: dict[str, torch.Tensor] = {}
    for name, tensor in sources.items():
        native = native_names[name]
        weight = _dequantize(tensor)
        if native.endswith("attn.q_proj.weight"):
            weight = unpermute_rope(weight, config.n_heads)
        elif native.endswith("attn.k_proj.weight"):
            weight = unpermute_rope(weight, config.n_kv_heads)
        state[native] = weight
    if state["embed_tokens.weight"].shape[0] != config.vocab_size:
        raise ValueError(
            f"{path}: token_embd has {state['embed_tokens.weight'].shape[0]} rows but the "
            f"tokenizer lists {config.vocab_size} tokens"
        )
    return config, state, Tokenizer.from_gguf(reader)


def _dequantize(tensor: Any) -> torch.Tensor:
    """One GGUF tensor as a contiguous fp32 torch tensor in torch's dim order."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # Copy: unquantized tensors are read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).reshape(shape)


def _f32(value: float) -> float:
    # GGUF stores floats as float32 (1e-5 becomes 9.99999974e-06); the shortest float32
    # repr (``str``) recovers the decimal the exporter wrote.
    return float(str(np.float32(value)))


def _config_from_metadata(meta: GGUFMetadata, *, tied: bool, rope_freqs: torch.Tensor | None) -> LlamaConfig:
    n_heads = meta.require("llama.attention.head_count")
    n_kv_heads = meta.get("llama.attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):
        raise ValueError(f"per-layer llama.attention.head_count_kv {n_kv_heads} is not supported")
    dim = meta.require("llama.embedding_length")
    head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", dim // n_heads))
    theta = _f32(meta.get("llama.rope.freq_base", 10000.0))

    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ValueError(
            f"unsupported GGUF llama.rope.scaling.type {scaling_type!r}; only llama3 scaling (rope_freqs) is supported"
        )
    rope_scaling = None if rope_freqs is None else _fit_llama3_scaling(rope_freqs, head_dim, theta)

    return LlamaConfig(
        vocab_size=len(meta.require("tokenizer.ggml.tokens")),
        dim=dim,
        n_layers=meta.require("llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=meta.require("llama.feed_forward_length"),
        head_dim=None if head_dim == dim // n_heads else head_dim,
        norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_seq_len=meta.get("llama.context_length", LlamaConfig.max_seq_len),
        tie_embeddings=tied,
    )


def _fit_llama3_scaling(rope_freqs: torch.Tensor, head_dim: int, theta: float) -> RopeScaling | None:
    """Recover llama3 scaling from the divisors; ``factor`` is the largest divisor.

    The divisors depend only on ``factor`` and the two wavelength thresholds
    ``original / low_freq_factor`` and ``original / high_freq_factor``, so every Llama
    3.1/3.2 release fits the defaults (low 1, high 4, original 8192) with its factor.
    """
    factor = float(rope_freqs.max())
    if factor == 1.0 and bool((rope_freqs == 1.0).all()):
        return None
    scaling = RopeScaling(factor=round(factor, 6))
    expected = llama3_rope_freqs(head_dim, theta, scaling)
    if expected.shape != rope_freqs.shape or not torch.allclose(expected, rope_freqs, rtol=1e-5, atol=1e-6):
        raise ValueError(
            f"GGUF {ROPE_FREQS} does not match llama3 RoPE scaling with factor {factor} and the Llama 3.1 "
            f"defaults (low_freq_factor 1, high_freq_factor 4, original context 8192): {rope_freqs.tolist()}"
        )
    return scaling
