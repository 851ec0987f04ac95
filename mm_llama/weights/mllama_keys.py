"""Key tables between Llama 3.2 Vision ("Mllama") HF checkpoints and :class:`MultimodalLlama`.

An HF ``MllamaForConditionalGeneration`` text model is one list of layers in which the
indices ``text_config.cross_attention_layers`` are gated cross-attention layers and the rest
are Llama self-attention layers. The self-attention layers are the frozen
:class:`~mm_llama.llama.LlamaLM`; each cross-attention layer becomes the
:class:`~adapters.GatedCrossAttention` block run *before* the next self-attention layer:
HF list index ``j`` → our block key ``j - (cross layers before j)`` (:class:`TextLayout`).
A cross layer after the last self layer, or two adjacent cross layers, cannot be
represented and raise.

The embedding ``[v + 8, d]`` is split into the frozen vocabulary (``lm.embed_tokens``)
and the 8 learnable special embeddings (``fusion_embed``; ``<|image|>`` is id ``v``).

Two key layouts exist (:data:`LAYOUTS`): ``"original"``, that of the checkpoints published
on the Hub and of what ``save_pretrained`` writes (``transformers`` 5 converts back on save):
``language_model.model.``, ``language_model.lm_head.``, ``vision_model.``,
``multi_modal_projector.``; and ``"modules"``, ``transformers``' in-memory module names
(a raw ``state_dict()`` dump): ``model.language_model.``, ``lm_head.``, ``model.vision_model.``,
``model.multi_modal_projector.``. Every key goes through a table; :func:`hf_to_native`
raises on a key no table knows, naming it.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from mm_llama.weights.keys import convert_key, invert

MLLAMA_SPECIAL_ROWS = 8
"""Rows the Mllama text embedding has beyond the vocabulary (``<|image|>`` is the first)."""

LAYOUTS: dict[str, dict[str, str]] = {
    "original": {
        "text": "language_model.model.",
        "lm_head": "language_model.lm_head.",
        "vision": "vision_model.",
        "projector": "multi_modal_projector.",
    },
    "modules": {
        "text": "model.language_model.",
        "lm_head": "lm_head.",
        "vision": "model.vision_model.",
        "projector": "model.multi_modal_projector.",
    },
}
"""Key prefixes of each section, per checkpoint layout (see the module docstring)."""

SELF_LAYER: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
"""HF self-attention layer key (after ``layers.{j}.``) → ``lm.layers.{k}.`` key."""

CROSS_LAYER: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "cross_attn.q_proj.weight": "q_proj.weight",
    "cross_attn.k_proj.weight": "k_proj.weight",
    "cross_attn.v_proj.weight": "v_proj.weight",
    "cross_attn.o_proj.weight": "o_proj.weight",
    "cross_attn.q_norm.weight": "q_norm.weight",
    "cross_attn.k_norm.weight": "k_norm.weight",
    "cross_attn_attn_gate": "attn_gate",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "cross_attn_mlp_gate": "mlp_gate",
}
"""HF cross-attention layer key (after ``layers.{j}.``) → ``cross_attn.{k}.`` key."""

_VISION_BLOCK: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "input_layernorm.bias": "attn_norm.bias",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "post_attention_layernorm.bias": "mlp_norm.bias",
    "mlp.fc1.weight": "fc1.weight",
    "mlp.fc1.bias": "fc1.bias",
    "mlp.fc2.weight": "fc2.weight",
    "mlp.fc2.bias": "fc2.bias",
}

VISION: dict[str, str] = {
    "patch_embedding.weight": "patch_embed.weight",
    "class_embedding": "class_embedding",
    "gated_positional_embedding.embedding": "position_embed.embedding",
    "gated_positional_embedding.tile_embedding.weight": "position_embed.tile_embedding.weight",
    "gated_positional_embedding.gate": "position_embed.gate",
    "pre_tile_positional_embedding.embedding.weight": "pre_tile_embed.embedding.weight",
    "pre_tile_positional_embedding.gate": "pre_tile_embed.gate",
    "post_tile_positional_embedding.embedding.weight": "post_tile_embed.embedding.weight",
    "post_tile_positional_embedding.gate": "post_tile_embed.gate",
    "layernorm_pre.weight": "norm_pre.weight",
    "layernorm_pre.bias": "norm_pre.bias",
    "layernorm_post.weight": "norm_post.weight",
    "layernorm_post.bias": "norm_post.bias",
    **{f"transformer.layers.{{}}.{src}": f"local_layers.{{}}.{dst}" for src, dst in _VISION_BLOCK.items()},
    **{f"global_transformer.layers.{{}}.{src}": f"global_layers.{{}}.{dst}" for src, dst in _VISION_BLOCK.items()},
    "global_transformer.layers.{}.gate_attn": "global_layers.{}.attn_gate",
    "global_transformer.layers.{}.gate_ffn": "global_layers.{}.mlp_gate",
}
"""HF vision-model key (after the vision prefix) → ``image_encoder.`` key."""

EMBEDDING = "<lm.embed_tokens.weight + fusion_embed.new.weight>"
"""Placeholder native name of the HF text embedding, which is split in two (:func:`split_embedding`)."""

EMBEDDING_PARTS = ("lm.embed_tokens.weight", "fusion_embed.new.weight")

SECTIONS: dict[str, dict[str, str]] = {
    "vision": {k: f"image_encoder.{v}" for k, v in VISION.items()},
    "projector": {"weight": "image_projection.proj.weight", "bias": "image_projection.proj.bias"},
    "lm_head": {"weight": "lm.lm_head.weight"},
    "text": {"norm.weight": "lm.norm.weight", "embed_tokens.weight": EMBEDDING},
}
"""Non-layer keys of each section (after its prefix in :data:`LAYOUTS`) → native keys."""


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """Where the cross-attention layers sit in the HF text layer list.

    Attributes:
        n_layers: length of the HF list (self + cross layers).
        cross: HF list indices of the cross-attention layers, increasing.
    """

    n_layers: int
    cross: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(not 0 <= j < self.n_layers for j in self.cross) or len(set(self.cross)) != len(self.cross):
            raise ValueError(
                f"cross_attention_layers {list(self.cross)} must be distinct indices in [0, {self.n_layers})"
            )
        object.__setattr__(self, "cross", tuple(sorted(self.cross)))
        positions = self.positions
        n_self = self.n_layers - len(self.cross)
        for j, k in zip(self.cross, positions):
            if k >= n_self:
                raise ValueError(
                    f"cross-attention layer {j} comes after the last self-attention layer; MultimodalLlama runs "
                    "cross-attention only before a decoder layer, so this layout cannot be represented"
                )
        if len(set(positions)) != len(positions):
            raise ValueError(
                f"cross_attention_layers {list(self.cross)} has adjacent cross-attention layers; MultimodalLlama "
                "holds at most one block between two decoder layers, so this layout cannot be represented"
            )

    @property
    def n_self(self) -> int:
        """Self-attention (LM) layers."""
        return self.n_layers - len(self.cross)

    @property
    def positions(self) -> tuple[int, ...]:
        """Our block key of each cross layer: the number of self layers before it."""
        return tuple(j - i for i, j in enumerate(self.cross))

    def to_native(self, j: int) -> tuple[str, int]:
        """HF list index → ``("self", LM layer)`` or ``("cross", block key)``."""
        before = sum(c < j for c in self.cross)
        return ("cross" if j in self.cross else "self"), j - before

    def to_hf(self, kind: str, k: int) -> int:
        """Inverse of :meth:`to_native`."""
        positions = self.positions
        return k + sum(p < k for p in positions) if kind == "cross" else k + sum(p <= k for p in positions)

    @classmethod
    def from_positions(cls, n_self: int, positions: tuple[int, ...]) -> TextLayout:
        """The layout of a model with ``n_self`` LM layers and cross blocks before ``positions``."""
        positions = tuple(sorted(positions))
        return cls(n_self + len(positions), tuple(k + i for i, k in enumerate(positions)))


def detect_layout(keys: list[str]) -> str:
    """The name in :data:`LAYOUTS` whose text prefix the checkpoint ``keys`` use."""
    for name, prefixes in LAYOUTS.items():
        if any(k.startswith(prefixes["text"]) for k in keys):
            return name
    raise ValueError(
        "no Mllama text-model keys found (expected a 'model.language_model.' or 'language_model.model.' prefix); "
        f"first keys: {sorted(keys)[:5]}"
    )


def hf_to_native(key: str, layout: TextLayout, prefixes: dict[str, str]) -> str:
    """One HF key → its native name (the embedding maps to a placeholder, split later).

    Raises:
        KeyError: naming ``key`` when no table knows it.
    """
    layer = re.fullmatch(re.escape(prefixes["text"]) + r"layers\.(\d+)\.(.+)", key)
    if layer:
        j = int(layer.group(1))
        if j >= layout.n_layers:
            raise KeyError(f"checkpoint key {key!r} names text layer {j}, but the config has {layout.n_layers}")
        kind, k = layout.to_native(j)
        table, prefix = (CROSS_LAYER, f"cross_attn.{k}.") if kind == "cross" else (SELF_LAYER, f"lm.layers.{k}.")
        try:
            return prefix + convert_key(layer.group(2), table)
        except KeyError:
            raise KeyError(f"unknown checkpoint key {key!r}: not a key of a {kind}-attention layer") from None
    for section, prefix in prefixes.items():
        if key.startswith(prefix):
            try:
                return convert_key(key[len(prefix) :], SECTIONS[section])
            except KeyError:
                break
    raise KeyError(f"unknown checkpoint key {key!r}: no entry in the Mllama key tables")


def native_to_hf(name: str, layout: TextLayout, prefixes: dict[str, str]) -> str:
    """Inverse of :func:`hf_to_native` (both halves of the split embedding give the HF embedding)."""
    if name in EMBEDDING_PARTS:
        return prefixes["text"] + "embed_tokens.weight"
    for pattern, kind, table in (
        (r"lm\.layers\.(\d+)\.(.+)", "self", SELF_LAYER),
        (r"cross_attn\.(\d+)\.(.+)", "cross", CROSS_LAYER),
    ):
        m = re.fullmatch(pattern, name)
        if m:
            j = layout.to_hf(kind, int(m.group(1)))
            return f"{prefixes['text']}layers.{j}." + convert_key(m.group(2), invert(table))
    for section, table in SECTIONS.items():
        try:
            return prefixes[section] + convert_key(name, invert(table))
        except KeyError:
            continue
    raise KeyError(f"parameter {name!r} has no place in an Mllama checkpoint")


def split_embedding(weight: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """HF embedding ``[v + 8, d]`` → the frozen ``[v, d]`` rows and the 8 fusion rows (views)."""
    rows = weight.shape[0] - vocab_size
    if rows != MLLAMA_SPECIAL_ROWS:
        raise ValueError(
            f"Mllama embedding has {weight.shape[0]} rows = vocab {vocab_size} + {rows}; "
            f"expected + {MLLAMA_SPECIAL_ROWS}"
        )
    return {"lm.embed_tokens.weight": weight[:vocab_size], "fusion_embed.new.weight": weight[vocab_size:]}
