"""mm-llama: the Llama 3 multimodal recipe on a frozen Llama-family LM."""

from typing import Any

from mm_llama.config import LlamaConfig, RopeScaling
from mm_llama.llama import KVCache, LlamaLM
from mm_llama.lm import load_language_model

# Loaded on first use: they pull in the encoders and adapters (open_clip, timm), which
# themselves import from this package, and `import mm_llama` should stay light.
_LAZY = {
    "generate": "mm_llama.generation",
    "Assistant": "mm_llama.inference",
    "GenerationSettings": "mm_llama.inference",
    "MultimodalLlama": "mm_llama.model",
    "load_mllama": "mm_llama.weights.mllama",
    "save_mllama": "mm_llama.weights.mllama",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mm_llama' has no attribute {name!r}")


__all__ = ["KVCache", "LlamaConfig", "LlamaLM", "RopeScaling", "load_language_model", *_LAZY]
