"""``load_language_model``: the public entry point for the frozen LM."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from mm_llama.config import LlamaConfig
from mm_llama.llama import LlamaLM
from mm_llama.rope import rope_inv_freq


def load_language_model(source: str, dtype: torch.dtype = torch.float32) -> LlamaLM:
    """Load a Llama-family LM with its tokenizer, frozen.

    Args:
        source: a registered name (e.g. ``"smollm2-135m-instruct"``), a Hugging
            Face-format directory, or a ``.gguf`` file.
        dtype: parameter dtype (GGUF tensors are dequantized to it).

    Returns:
        A :class:`LlamaLM` in eval mode with ``requires_grad=False`` everywhere,
        ``.tokenizer`` set, and ``.source`` / ``.source_digest`` identifying the weights.
        ``forward(input_ids [b, s]) -> logits [b, s, v]``.
    """
    from mm_llama.registry import resolve_lm_source
    from mm_llama.tokenizer import Tokenizer

    path = resolve_lm_source(source)
    if path.is_dir():
        from mm_llama.weights.hf import load_hf_config, load_hf_state_dict

        cfg, state = load_hf_config(path), load_hf_state_dict(path, dtype)
        tokenizer = Tokenizer.from_hf_dir(path)
    elif path.suffix == ".gguf":
        from mm_llama.weights.gguf import load_gguf

        cfg, state, tokenizer = load_gguf(path)
    else:
        raise ValueError(f"LM source {source!r} resolved to {path}, which is neither a directory nor a .gguf file")
    lm = build_lm(cfg, state, dtype)
    lm.tokenizer = tokenizer
    lm.source = str(path)
    lm.source_digest = file_digest(path)
    return freeze(lm)


def build_lm(cfg: LlamaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> LlamaLM:
    """Instantiate :class:`LlamaLM` directly from a native-named state dict (strict, frozen)."""
    # A tied checkpoint may still carry a copy of the unembedding; it is the same matrix.
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with torch.device("meta"):
        lm = LlamaLM(cfg)
    lm.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    # inv_freq is a non-persistent buffer: rebuild it off the meta device.
    lm.inv_freq = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    return freeze(lm)


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with no parameter requiring grad."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a weights file, or of every file (sorted) in a weights directory."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        if path.is_dir() and f.suffix not in (".safetensors", ".json"):
            continue
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def parameters_digest(module: nn.Module) -> str:
    """sha256 over every named parameter's bytes (for "frozen means frozen" checks)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
