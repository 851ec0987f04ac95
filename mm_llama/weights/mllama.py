"""Llama 3.2 Vision ("Mllama") checkpoints in Hugging Face layout ⇄ :class:`MultimodalLlama`.

An HF ``MllamaForConditionalGeneration`` directory holds ``config.json`` and safetensors
(single or sharded). Its text model is one list of layers in which the indices
``text_config.cross_attention_layers`` are gated cross-attention layers and the rest are
Llama self-attention layers. Here the self-attention layers become the frozen
:class:`~mm_llama.llama.LlamaLM` and each cross-attention layer becomes the
:class:`~adapters.GatedCrossAttention` block run *before* the next self-attention layer:
HF list index ``j`` → our block key ``j - (cross layers before j)``. A cross layer after
the last self layer, or two adjacent cross layers, cannot be represented and raise.

The embedding ``[v + 8, d]`` is split into the frozen vocabulary (``lm.embed_tokens``)
and the 8 learnable special embeddings (``fusion_embed``; ``<|image|>`` is id ``v``).

Two key layouts are read: ``"original"``, that of the checkpoints published on the Hub and
of what ``save_pretrained`` writes (``transformers`` 5 converts back on save):
``language_model.model.``, ``language_model.lm_head.``, ``vision_model.``,
``multi_modal_projector.``; and ``"modules"``, ``transformers``' in-memory module names
(a raw ``state_dict()`` dump): ``model.language_model.``, ``lm_head.``, ``model.vision_model.``,
``model.multi_modal_projector.``. :func:`save_mllama` writes ``"original"`` unless told
otherwise. Every key goes through a declarative table; an unknown or a missing key raises,
naming it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from encoders.mllama_vision import MllamaVisionEncoderConfig
from mm_llama.config import LlamaConfig
from mm_llama.llama import LlamaLM
from mm_llama.lm import build_lm, file_digest
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama
from mm_llama.weights.hf import config_from_hf, weight_files
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
"""Placeholder native name of the HF text embedding, which is split in two (:func:`_split_embedding`)."""

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


# --- configs ---------------------------------------------------------------------------


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
    hf = json.loads(path.read_text())
    if hf.get("model_type") != "mllama":
        raise ValueError(
            f"{path} is model_type={hf.get('model_type')!r}, not 'mllama' (MllamaForConditionalGeneration); "
            "load plain Llama checkpoints with mm_llama.lm.load_language_model"
        )
    return hf


def text_config_from_hf(hf: dict) -> tuple[LlamaConfig, TextLayout]:
    """``config.json`` of an Mllama → the frozen LM's config and the cross-layer layout."""
    text = hf["text_config"]
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"text_config.hidden_act {text['hidden_act']!r} is not supported (only 'silu')")
    layout = TextLayout(text["num_hidden_layers"], tuple(text["cross_attention_layers"]))
    as_llama = {
        **text,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layout.n_self,
        "tie_word_embeddings": False,  # lm_head is its own [v, d] matrix; the embedding has v + 8 rows
        "head_dim": None,  # Mllama always uses hidden_size // num_attention_heads
    }
    cfg = config_from_hf(as_llama)
    image_token = hf.get("image_token_index", cfg.vocab_size)
    if image_token != cfg.vocab_size:
        raise ValueError(
            f"image_token_index {image_token} != text vocab_size {cfg.vocab_size}: MultimodalLlama's "
            "<|image|> is the first id after the vocabulary"
        )
    special = {k: text.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return dataclasses.replace(cfg, extra={**cfg.extra, "mllama_special_token_ids": special}), layout


def vision_config_from_hf(vision: dict) -> MllamaVisionEncoderConfig:
    """``config.json["vision_config"]`` → :class:`MllamaVisionEncoderConfig`."""
    if vision.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"vision_config.hidden_act {vision['hidden_act']!r} is not supported (only 'gelu')")
    sizes = {}
    for name in ("image_size", "patch_size"):
        value = vision[name]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"vision_config.{name} {value} is not square")
            value = value[0]
        sizes[name] = int(value)
    cfg = MllamaVisionEncoderConfig(
        tile_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        width=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        n_global_layers=vision["num_global_layers"],
        heads=vision["attention_heads"],
        mlp_dim=vision["intermediate_size"],
        intermediate_layers=tuple(vision["intermediate_layers_indices"]),
        max_num_tiles=vision["max_num_tiles"],
        supported_aspect_ratios=tuple(tuple(r) for r in vision["supported_aspect_ratios"]),
        norm_eps=vision.get("norm_eps", 1e-5),
        channels=vision.get("num_channels", 3),
    )
    if vision.get("vision_output_dim", cfg.out_dim) != cfg.out_dim:
        raise ValueError(
            f"vision_output_dim {vision['vision_output_dim']} != "
            f"hidden_size * (1 + intermediate layers) = {cfg.out_dim}"
        )
    return cfg


def _rope_to_hf(cfg: LlamaConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(rope_type="llama3", **dataclasses.asdict(cfg.rope_scaling))
    return rope


def config_to_hf(model: MultimodalLlama, layout: TextLayout) -> dict:
    """The ``config.json`` of ``model`` as an ``MllamaForConditionalGeneration``."""
    lm, vis = model.lm.cfg, model.cfg.image_encoder
    text = {
        "model_type": "mllama_text_model",
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.dim,
        "hidden_act": "silu",
        "num_hidden_layers": layout.n_layers,
        "num_attention_heads": lm.n_heads,
        "num_key_value_heads": lm.n_kv_heads,
        "intermediate_size": lm.hidden_dim,
        "rope_parameters": _rope_to_hf(lm),
        "rms_norm_eps": lm.norm_eps,
        "max_position_embeddings": lm.max_seq_len,
        "tie_word_embeddings": False,
        "cross_attention_layers": list(layout.cross),
        **{k: v for k, v in lm.extra.get("mllama_special_token_ids", {}).items()},
    }
    text.setdefault("pad_token_id", None)  # HF's default (128004) is out of range for small vocabularies
    vision = {
        "model_type": "mllama_vision_model",
        "hidden_size": vis.width,
        "hidden_act": "gelu",
        "num_hidden_layers": vis.depth,
        "num_global_layers": vis.n_global_layers,
        "attention_heads": vis.heads,
        "num_channels": vis.channels,
        "intermediate_size": vis.mlp_dim,
        "vision_output_dim": vis.out_dim,
        "image_size": vis.tile_size,
        "patch_size": vis.patch_size,
        "norm_eps": vis.norm_eps,
        "max_num_tiles": vis.max_num_tiles,
        "intermediate_layers_indices": list(vis.intermediate_layers),
        "supported_aspect_ratios": [list(r) for r in vis.supported_aspect_ratios],
    }
    dtype = str(model.lm.embed_tokens.weight.dtype).removeprefix("torch.")
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": "mllama",
        "image_token_index": lm.vocab_size,
        "dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }


# --- keys ------------------------------------------------------------------------------


def _detect_layout(keys: list[str]) -> str:
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


def _split_embedding(weight: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    rows = weight.shape[0] - vocab_size
    if rows != MLLAMA_SPECIAL_ROWS:
        raise ValueError(
            f"Mllama embedding has {weight.shape[0]} rows = vocab {vocab_size} + {rows}; "
            f"expected + {MLLAMA_SPECIAL_ROWS}"
        )
    return {"lm.embed_tokens.weight": weight[:vocab_size], "fusion_embed.new.weight": weight[vocab_size:]}


# --- public API ------------------------------------------------------------------------


def load_mllama(
    directory: str | Path, dtype: torch.dtype = torch.float32, *, row_mask_mode: str = "both"
) -> MultimodalLlama:
    """Import an HF ``MllamaForConditionalGeneration`` directory as a :class:`MultimodalLlama`.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` (or shards with
            ``model.safetensors.index.json``); ``tokenizer.json`` is loaded when present.
        dtype: parameter dtype.
        row_mask_mode: ``"both"`` (default; Meta's reference, our design): text rows that
            see no image skip cross-attention entirely. ``"mlp_only"``: as ``transformers``,
            for bit-for-bit parity with it (see ``GatedCrossAttention``).

    Returns:
        The model in eval mode, LM frozen, the other groups trainable; feed it
        :class:`~encoders.mllama_vision.TiledImages` (see :func:`encoders.tiling.tile_image`).

    Raises:
        KeyError: a checkpoint key no table knows, or a tensor the model needs is missing.
        ValueError: a config or layer layout ``MultimodalLlama`` cannot represent.
    """
    directory = Path(directory)
    hf = _read_config(directory)
    lm_cfg, layout = text_config_from_hf(hf)
    vision_cfg = vision_config_from_hf(hf["vision_config"])

    files = weight_files(directory)
    keys: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.update({k: file for k in f.keys()})
    prefixes = LAYOUTS[_detect_layout(list(keys))]
    names = {key: hf_to_native(key, layout, prefixes) for key in keys}  # raises on unknown keys
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key).to(dtype)
                if names[key] == EMBEDDING:
                    state.update(_split_embedding(tensor, lm_cfg.vocab_size))
                else:
                    state[names[key]] = tensor

    lm_state = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
    model_cfg = ModelConfig(
        image_encoder=vision_cfg,
        cross_attention=CrossAttentionConfig(
            layers=layout.positions, gate_init=0.0, output_scale="none", row_mask_mode=row_mask_mode
        ),
        projection="linear",
        fusion_rows=MLLAMA_SPECIAL_ROWS,
    )
    with torch.device("meta"):
        lm_keys = {f"lm.{k}" for k in LlamaLM(lm_cfg).state_dict()}
    _raise_missing(lm_keys - state.keys(), directory, layout, prefixes)
    lm = build_lm(lm_cfg, lm_state, dtype)
    model = MultimodalLlama(lm, model_cfg).to(dtype)
    fused = {k: v for k, v in state.items() if not k.startswith("lm.")}
    needed = {k for k in model.state_dict() if not k.startswith("lm.") and not k.endswith(".output_scale")}
    _raise_missing(needed - fused.keys(), directory, layout, prefixes)
    unexpected = model.load_state_dict(fused, strict=False).unexpected_keys
    if unexpected:  # the tables name a parameter the model lacks: they drifted apart
        raise KeyError(f"key tables map to names MultimodalLlama does not have: {sorted(unexpected)}")

    tokenizer_file = directory / "tokenizer.json"
    if tokenizer_file.exists():
        from mm_llama.tokenizer import Tokenizer

        lm.tokenizer = Tokenizer.from_hf_dir(directory)
    lm.source = str(directory)
    lm.source_digest = file_digest(directory)
    model.apply_trainable()
    return model.eval()


def _raise_missing(missing: set[str], directory: Path, layout: TextLayout, prefixes: dict[str, str]) -> None:
    if missing:
        names = sorted({native_to_hf(k, layout, prefixes) for k in missing})
        raise KeyError(f"checkpoint {directory} lacks {len(names)} tensor(s): {names[:10]}")


def save_mllama(model: MultimodalLlama, directory: str | Path, *, layout: str = "original") -> Path:
    """Export ``model`` as an HF ``MllamaForConditionalGeneration`` directory.

    Writes ``config.json`` and ``model.safetensors``; ``transformers``'
    ``from_pretrained`` loads the result.

    Args:
        model: a :class:`MultimodalLlama` with a :class:`MllamaVisionEncoderConfig` encoder, a
            ``"linear"`` projection, 8 fusion rows and no output scale (what :func:`load_mllama`
            builds).
        directory: created if needed.
        layout: ``"original"`` (default; as published and as ``save_pretrained`` writes) or
            ``"modules"`` key prefixes (see :data:`LAYOUTS`).

    Raises:
        ValueError: the model has parts an Mllama checkpoint cannot hold.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    _check_exportable(model)
    prefixes = LAYOUTS[layout]
    text_layout = TextLayout.from_positions(model.lm.cfg.n_layers, tuple(int(k) for k in model.cross_attn))
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(".output_scale") or name in ("lm.embed_tokens.weight", "fusion_embed.new.weight"):
            continue
        out[native_to_hf(name, text_layout, prefixes)] = tensor
    out[prefixes["text"] + "embed_tokens.weight"] = torch.cat(
        [state["lm.embed_tokens.weight"], state["fusion_embed.new.weight"]]
    )
    if model.lm.lm_head is None:  # a tied LM: Mllama always stores its own lm_head
        out[prefixes["lm_head"] + "weight"] = state["lm.embed_tokens.weight"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in out.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_to_hf(model, text_layout), indent=2) + "\n")
    return directory


def _check_exportable(model: MultimodalLlama) -> None:
    cfg, lm = model.cfg, model.lm.cfg
    problems = []
    if not isinstance(cfg.image_encoder, MllamaVisionEncoderConfig):
        problems.append(f"image encoder is {type(cfg.image_encoder).__name__}, not MllamaVisionEncoderConfig")
    if cfg.projection != "linear":
        problems.append(f"projection is {cfg.projection!r}, Mllama's is 'linear'")
    if cfg.fusion_rows != MLLAMA_SPECIAL_ROWS:
        problems.append(f"{cfg.fusion_rows} fusion rows, Mllama has {MLLAMA_SPECIAL_ROWS}")
    if lm.head_dim not in (None, lm.dim // lm.n_heads):
        problems.append(f"head_dim {lm.head_dim} != dim // n_heads; Mllama derives it")
    for key, block in model.cross_attn.items():
        if float(block.output_scale) != 1.0:
            problems.append(f"cross_attn.{key} has output_scale {float(block.output_scale):.4g} (Mllama has none)")
        if block.mlp.gate_proj.out_features != lm.hidden_dim:
            problems.append(f"cross_attn.{key} MLP width {block.mlp.gate_proj.out_features} != LM's {lm.hidden_dim}")
    if problems:
        raise ValueError("model cannot be exported as an Mllama checkpoint: " + "; ".join(problems))
