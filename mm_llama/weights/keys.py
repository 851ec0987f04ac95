"""Key tables between external checkpoint formats and our native module names.

Native names (see :mod:`mm_llama.llama`)::

    embed_tokens.weight                       [vocab, d]
    layers.{i}.attn_norm.weight               [d]
    layers.{i}.attn.{q,k,v,o}_proj.weight     q/k in rotate-half (HF) layout
    layers.{i}.mlp_norm.weight                [d]
    layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                               [d]
    lm_head.weight                            [vocab, d]   (absent when tied)

A table maps a source pattern (with ``{}`` for the layer index) to a native
pattern. :func:`convert_key` raises on any key the table does not know, so a
checkpoint with an unexpected layout fails loudly instead of loading half-way.
"""

from __future__ import annotations

import re

HF_TO_NATIVE: dict[str, str] = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# Buffers some exporters write that carry no learned state.
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_LAYER = re.compile(r"\.(\d+)\.")


def _compile(table: dict[str, str]) -> dict[re.Pattern, str]:
    return {re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"): dst for src, dst in table.items()}


def convert_key(key: str, table: dict[str, str]) -> str:
    """Map one source key to its native name, raising ``KeyError`` if unknown."""
    for pattern, dst in _compile(table).items():
        m = pattern.match(key)
        if m:
            return dst.format(*m.groups())
    raise KeyError(f"unknown checkpoint key {key!r}: no entry in the key table")


def invert(table: dict[str, str]) -> dict[str, str]:
    """The reverse table (native -> source); tables are one-to-one by construction."""
    inverse = {dst: src for src, dst in table.items()}
    if len(inverse) != len(table):
        raise ValueError("key table is not one-to-one, it cannot be inverted")
    return inverse
