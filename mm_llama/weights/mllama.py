"""Import and export of Llama 3.2 Vision ("Mllama") checkpoints in Hugging Face layout.

:func:`load_mllama` reads an ``MllamaForConditionalGeneration`` directory (``config.json``
and safetensors, single or sharded) into a :class:`MultimodalLlama`; :func:`save_mllama`
writes one back (``"original"`` key layout unless told otherwise). The key tables and the
layer placement live in :mod:`mm_llama.weights.mllama_keys`; an unknown or a missing key
raises, naming it.
"""

from __future__ import annotations

import dataclasses
import json
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
from mm_llama.weights.mllama_keys import (
    EMBEDDING,
    LAYOUTS,
    MLLAMA_SPECIAL_ROWS,
    TextLayout,
    detect_layout,
    hf_to_native,
    native_to_hf,
    split_embedding,
)

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
    prefixes = LAYOUTS[detect_layout(list(keys))]
    names = {key: hf_to_native(key, layout, prefixes) for key in keys}  # raises on unknown keys
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key).to(dtype)
                if names[key] == EMBEDDING:
                    state.update(split_embedding(tensor, lm_cfg.vocab_size))
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
