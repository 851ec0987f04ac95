"""Typed configuration of the frozen Llama-3-family language model.

Every loader (Hugging Face directory, GGUF file) produces a :class:`LlamaConfig`;
the native decoder in :mod:`mm_llama.llama` is built from nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """The ``llama3`` RoPE frequency scaling of Llama 3.1 / 3.2.

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor``
    are divided by ``factor``; shorter than ``... / high_freq_factor`` are kept;
    the band between is interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                "RopeScaling.high_freq_factor must exceed low_freq_factor, got "
                f"high={self.high_freq_factor} low={self.low_freq_factor}"
            )


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-3-family decoder.

    Attributes:
        vocab_size: rows of the (frozen) token embedding.
        dim: model width ``d``.
        n_layers: number of decoder blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention when < ``n_heads``).
        hidden_dim: SwiGLU inner width.
        head_dim: per-head width; ``dim // n_heads`` when ``None``.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: ``llama3`` frequency scaling, or ``None``.
        max_seq_len: longest sequence the KV cache is sized for.
        tie_embeddings: output projection shares the input embedding matrix.
    """

    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of "
                f"n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); "
                "set head_dim explicitly"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads
