"""mm-llama: the Llama 3 multimodal recipe on a frozen Llama-family LM."""

from mm_llama.config import LlamaConfig, RopeScaling
from mm_llama.llama import KVCache, LlamaLM
from mm_llama.lm import load_language_model

__all__ = ["KVCache", "LlamaConfig", "LlamaLM", "RopeScaling", "load_language_model"]
