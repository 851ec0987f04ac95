"""Load a Hugging Face-format Llama directory (``config.json`` + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mm_llama.config import LlamaConfig, RopeScaling
from mm_llama.weights.keys import HF_IGNORED, HF_TO_NATIVE, convert_key

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def config_from_hf(hf: dict) -> LlamaConfig:
    """Translate a ``config.json`` dict into a :class:`LlamaConfig`."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"unsupported checkpoint: model_type={hf.get('model_type')!r} architectures={archs}; "
            f"only Llama-family decoders ({', '.join(SUPPORTED_ARCHITECTURES)}) are supported"
        )
    scaling = None
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        scaling = RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {rs.get('rope_type', rs.get('type'))!r}")
    theta = hf.get("rope_theta", (rs or {}).get("rope_theta", 10000.0))
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        hidden_dim=hf["intermediate_size"],
        head_dim=hf.get("head_dim"),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 8192),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory: the shards its index names, or ``model.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {missing}")
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {directory}"
    )


def load_hf_state_dict(directory: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read every tensor of an HF Llama directory under native names."""
    directory = Path(directory)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if HF_IGNORED.fullmatch(key):
                    continue
                state[convert_key(key, HF_TO_NATIVE)] = f.get_tensor(key).to(dtype)
    return state


def load_hf_config(directory: str | Path) -> LlamaConfig:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
    return config_from_hf(json.loads(path.read_text()))
