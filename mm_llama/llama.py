"""Native Llama-3-family decoder: RMSNorm, RoPE (+ ``llama3`` scaling), GQA, SwiGLU.

Shape legend: ``b`` batch, ``s`` query tokens, ``s_k`` key tokens (cache + new),
``d`` model width, ``h`` query heads, ``h_kv`` key/value heads, ``h_d`` head width,
``v`` vocabulary.

The decoder offers a ``before_layer`` hook so that a multimodal wrapper can add
cross-attention between blocks without forking or renaming the LM's modules:
a stock checkpoint loads into :class:`LlamaLM` with its own keys, always.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm_llama.config import LlamaConfig
from mm_llama.layers import RMSNorm, SwiGLU
from mm_llama.rope import apply_rope, rope_cos_sin, rope_inv_freq

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


class KVCache:
    """Pre-allocated per-layer key/value buffers for incremental decoding.

    Each layer holds ``k, v [b, h_kv, max_len, h_d]``; ``length`` is how many
    positions are filled. Call :meth:`advance` once per forward, after all layers.

    With ``offset`` set (a device-side ``[1]`` long tensor, :class:`mm_llama.generation.StaticStep`)
    the cache has static shapes: a one-token update writes at ``offset`` and returns the whole
    buffers, and the caller masks the positions not yet written and moves ``offset`` on. No host
    value changes between steps, so the step can be captured as a CUDA graph.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32) -> None:
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.resolved_head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0
        self.offset: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [b, h_kv, s, h_d]`` at the current offset; return the filled prefix
        (with ``offset`` set: ``s == 1``, and the whole ``[b, h_kv, max_len, h_d]`` buffers)."""
        if self.offset is not None:
            if k.shape[2] != 1:
                raise ValueError(f"a static-shape cache takes one position a step, got {k.shape[2]}")
            self.k[layer].index_copy_(2, self.offset, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.offset, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class SharedPrefix:
    """Keys/values of a prompt prefix that every row of a batch shares, computed once.

    Training batches begin with the same chat header (``<|im_start|>system ... user\\n``)
    before their media; those rows see no media, so their keys and values are the frozen
    LM's alone. :meth:`compute` runs the prefix for one row without autograd; passed as the
    ``cache`` of :meth:`LlamaLM.decode` for the rest of the batch, :meth:`update` prepends it
    (broadcast over the batch, never written in place, so activation checkpointing and
    autograd see plain tensors). Duck-types the :class:`KVCache` interface.

    Attributes:
        k, v: per layer ``[1, h_kv, p, h_d]``. length: ``p``.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        self.k, self.v = k, v
        self.length = k[0].shape[2]

    @classmethod
    @torch.no_grad()
    def compute(cls, lm: LlamaLM, prefix_embeds: torch.Tensor) -> SharedPrefix:
        """The frozen LM's K/V of ``prefix_embeds [1, p, d]`` (a text-only prefix)."""
        cache = KVCache(lm.cfg, 1, prefix_embeds.shape[1], device=prefix_embeds.device,
                        dtype=lm.embed_tokens.weight.dtype)
        lm.decode(prefix_embeds.to(cache.k[0].dtype), cache=cache)
        return cls(cache.k, cache.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v [b, h_kv, s, h_d]`` → ``[b, h_kv, p + s, h_d]`` with the prefix in front."""
        b = k.shape[0]
        pk = self.k[layer].expand(b, -1, -1, -1).to(k.dtype)
        pv = self.v[layer].expand(b, -1, -1, -1).to(v.dtype)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def advance(self, n: int) -> None:
        """Nothing to do: the prefix is read-only and ``length`` stays ``p``."""


class Attention(nn.Module):
    """Causal grouped-query self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | SharedPrefix | None = None,
    ) -> torch.Tensor:
        """``x [b, s, d]`` → ``[b, s, d]``; ``mask [b, 1, s, s_k]`` bool (True = attend) or None = causal."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [b, h, s, h_d]
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [b, h_kv, s, h_d]
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [b, h_kv, s, h_d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [b, h_kv, s_k, h_d]
        # enable_gqa broadcasts KV heads inside the kernel: no materialised repeat of K/V.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )  # [b, h, s, h_d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x, cos, sin, mask, cache=None) -> torch.Tensor:
        """``x [b, s, d]`` → ``[b, s, d]``."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class LlamaLM(nn.Module):
    """A Llama-3-family causal language model.

    ``forward(input_ids [b, s]) -> logits [b, s, v]`` is the public contract; the
    finer-grained :meth:`embed`, :meth:`decode` and :meth:`logits` let callers
    insert fused inputs, hook layers and avoid full-vocabulary logits.

    Attributes:
        grad_checkpointing: under autograd, keep only each block's input and recompute the
            block in backward (a frozen LM too: gradients still flow through it to the adapters).
        checkpoint_every: with ``grad_checkpointing``, recompute blocks ``0, n, 2n, ...`` only
            (``1``: every block); the others keep their activations.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.grad_checkpointing = False
        self.checkpoint_every = 1
        self.tokenizer = None  # set by the loaders
        self.source: str | None = None  # identity of the weights (path), set by the loaders

    @property
    def output_weight(self) -> torch.Tensor:
        """``[v, d]`` unembedding matrix (the input embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [b, s]`` → ``[b, s, d]``."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed ``hidden [..., d]`` → ``[..., v]``."""
        return F.linear(hidden, self.output_weight)

    def decode(
        self,
        hidden: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | SharedPrefix | None = None,
        before_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        """Run all blocks and the final norm.

        Args:
            hidden: ``[b, s, d]`` input embeddings.
            positions: ``[b, s]`` RoPE positions; default ``cache.length + arange(s)``.
            key_padding_mask: ``[b, s_k]`` bool, True for real tokens (left padding in
                batched generation). ``None`` means every key is real.
            attn_mask: bool ``[b, 1, s, s_k]`` (True = attend), replacing the causal mask
                that ``key_padding_mask`` would give (packed rows, :mod:`mm_llama.packing`).
            cache: KV cache to read from and append to (advanced by ``s``), or a
                :class:`SharedPrefix` that ``hidden`` continues.
            before_layer: ``hook(layer_idx, hidden [b, s, d]) -> hidden`` called before each block.

        Returns:
            ``[b, s, d]`` final-normed hidden states.
        """
        b, s, _ = hidden.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + s, device=hidden.device).expand(b, s)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        if attn_mask is not None and key_padding_mask is not None:
            raise ValueError("give attn_mask or key_padding_mask, not both")
        mask = attn_mask if attn_mask is not None else self._mask(b, s, past, key_padding_mask, hidden.device)
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                hidden = before_layer(i, hidden)
            if self.grad_checkpointing and i % self.checkpoint_every == 0 and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, cos, sin, mask, cache, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(s)
        return self.norm(hidden)

    @staticmethod
    def _mask(b: int, s: int, past: int, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """Bool ``[b, 1, s, past + s]`` (True = attend), or None when plain causal suffices."""
        if key_padding_mask is None and past == 0:
            return None
        causal = torch.ones(s, past + s, dtype=torch.bool, device=device).tril(diagonal=past)
        mask = causal.expand(b, 1, s, past + s)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :].bool()
            # A fully masked row (a left-pad query) would give NaN; let it see itself.
            diagonal = torch.ones(s, past + s, dtype=torch.bool, device=device).tril(past).triu(past)
            mask = mask | diagonal
        return mask

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [b, s]`` → logits ``[b, s, v]``."""
        return self.logits(self.decode(self.embed(input_ids)))
