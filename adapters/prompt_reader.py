"""The prompt reader: stage 1's small caption decoder, kept to read each prompt against its image.

Cross-attention asks the image what the frozen LM's residual stream asks it, and at the answer's
row that stream barely depends on the question (measured, stop 22: its normed state moves by
0.7-7 % of its norm between "where is the red circle?" and "where is the blue square?"). A
lookup by content ("the red one: where?") then has almost nothing to key on. The caption decoder
that stage 1 trains alongside the image encoder has read the whole prompt, and the image, to
predict the answer's first token; its state at the prompt's last row is exactly the question
asked of this image. :class:`PromptReader` keeps that decoder (frozen) and returns the state; the
model projects it and appends it to the image's media tokens (``ModelConfig.prompt_reader``).
This is the same idea as an instruction-aware query (InstructBLIP's Q-Former), built from parts
stage 1 trains anyway.

Shape legend: ``b`` batch, ``s`` text tokens, ``s_e`` media tokens, ``d_e`` encoder width,
``w`` decoder width, ``V`` compact vocabulary size, ``L`` lookup length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from mm_llama.checkpoint_files import atomic_write
from mm_llama.static import must_stay_static


class CaptionDecoder(nn.Module):
    """A small causal Transformer decoder reading an image encoder's tokens.

    Args:
        vocab_size: ``V``, compact vocabulary (see
            :func:`mm_llama.training.encoder_pretrain.compact_vocabulary`).
        media_dim: ``d_e``. width: ``w``. depth: blocks. heads: attention heads.
        max_len: longest text it embeds positions for.
    """

    def __init__(self, vocab_size: int, media_dim: int, width: int, depth: int, heads: int, max_len: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.media_in = nn.Sequential(nn.LayerNorm(media_dim), nn.Linear(media_dim, width))
        block = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(block, depth)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab_size))

    def states(self, ids: Tensor, media: Tensor, media_mask: Tensor) -> Tensor:
        """``ids [b, s]`` (compact), ``media [b, s_e, d_e]``, ``media_mask [b, s_e]`` → the normed
        states the head reads, ``[b, s, w]``. Causal: row ``j`` depends on ``ids[:, :j + 1]`` only."""
        s = ids.shape[1]
        if s > self.position.shape[0]:
            raise ValueError(f"CaptionDecoder takes at most {self.position.shape[0]} tokens, got {s}")
        h = self.embed(ids) + self.position[:s]  # [b, s, w]
        causal = nn.Transformer.generate_square_subsequent_mask(s, device=ids.device, dtype=h.dtype)
        h = self.blocks(h, self.media_in(media), tgt_mask=causal, tgt_is_causal=True,
                        memory_key_padding_mask=~media_mask)  # [b, s, w]
        return self.head[0](h)

    def forward(self, ids: Tensor, media: Tensor, media_mask: Tensor) -> Tensor:
        """``ids [b, s]`` (compact), ``media [b, s_e, d_e]``, ``media_mask [b, s_e]`` → logits ``[b, s, V]``."""
        return self.head[1](self.states(ids, media, media_mask))


@dataclass
class PromptReaderConfig:
    """Shape of a :class:`PromptReader` (what stage 1's decoder was built with), and its weights.

    The shape is stored so a model can be rebuilt from a checkpoint that holds the weights
    itself, without the file (``mm_llama.model.without_weight_files`` drops ``checkpoint``).

    Attributes:
        vocab_size: ``V``, the decoder's compact vocabulary.
        lookup_size: ``L``, length of the LM id → compact id table (ids past it are unknown).
        width, depth, heads, max_len: the decoder's (``EncoderPretrainConfig``'s).
        checkpoint: a ``prompt_reader.safetensors`` written by stage 1 (``decoder.*`` and
            ``lookup``); ``None``: random weights, to be loaded from a model checkpoint.
        every_row: how the model uses the reading. ``False``: the state at the prompt's last
            row joins the image's media tokens, once (:meth:`PromptReader.forward`). ``True``:
            every text row also sees the state at its own row, the decoder having read the
            text up to and including that row (:meth:`PromptReader.rows`): answer rows then
            see what the decoder reads after each answer token, not only before the first.
    """

    vocab_size: int
    lookup_size: int
    width: int = 192
    depth: int = 2
    heads: int = 4
    max_len: int = 256
    checkpoint: str | None = None
    every_row: bool = False

    @classmethod
    def from_checkpoint(cls, path: str, heads: int) -> PromptReaderConfig:
        """The config of the reader saved at ``path`` (the shapes are read from the file; ``heads``
        cannot be, it is stage 1's ``EncoderPretrainConfig.heads``)."""
        with safetensors.safe_open(path, framework="pt") as f:
            shape = {k: f.get_slice(k).get_shape() for k in f.keys()}
        depth = len({k.split(".")[3] for k in shape if k.startswith("decoder.blocks.layers.")})
        vocab_size, width = shape["decoder.embed.weight"]
        return cls(vocab_size=vocab_size, lookup_size=shape["lookup"][0], width=width, depth=depth, heads=heads,
                   max_len=shape["decoder.position"][0], checkpoint=path)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "lookup_size", "width", "depth", "heads", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"PromptReaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"PromptReaderConfig.width {self.width} is not a multiple of heads {self.heads}")


class PromptReader(nn.Module):
    """Each prompt's question, read against its image: the caption decoder's state at the prompt's
    last row.

    Args:
        cfg: the decoder's shape, and optionally the file to load it from.
        media_dim: ``d_e``, the image encoder's token width (the tokens it reads are the
            encoder's own, before any projection into the LM).
    """

    def __init__(self, cfg: PromptReaderConfig, media_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = CaptionDecoder(cfg.vocab_size, media_dim, cfg.width, cfg.depth, cfg.heads, cfg.max_len)
        self.register_buffer("lookup", torch.zeros(cfg.lookup_size, dtype=torch.long))  # LM id -> compact id
        self.out_dim = cfg.width
        if cfg.checkpoint is not None:
            self.load_state_dict(safetensors.torch.load_file(cfg.checkpoint), strict=True)

    def forward(self, ids: Tensor, lengths: Tensor, media: Tensor, media_mask: Tensor) -> Tensor:
        """The state at row ``lengths - 1`` of each prompt: ``[b, w]``.

        Args:
            ids: ``[b, s]`` LM token ids, each prompt from column 0; what follows a prompt's
                ``lengths`` columns is never read (the decoder is causal).
            lengths: ``[b]`` prompt lengths, each in ``1..s``.
            media: ``[b, s_e, d_e]`` the image encoder's tokens; ``media_mask`` ``[b, s_e]``.
        """
        static = must_stay_static(lengths)  # a captured step: fixed shapes, no host reads
        if not static and (bool((lengths < 1).any()) or bool((lengths > ids.shape[1]).any())):
            raise ValueError(f"prompt lengths must be in 1..{ids.shape[1]}, got {lengths.tolist()}")
        # The decoder is causal: columns past the longest prompt change no state read here.
        upto = ids.shape[1] if static else int(lengths.max())
        states = self.rows(ids[:, :upto], media, media_mask)  # [b, s, w]
        return states[torch.arange(len(ids), device=ids.device), lengths.to(ids.device) - 1]

    def rows(self, ids: Tensor, media: Tensor, media_mask: Tensor) -> Tensor:
        """The state at every row: ``[b, s, w]``; row ``j`` has read ``ids[:, :j + 1]`` only.

        Args:
            ids: ``[b, s]`` LM token ids, each text from column 0 (right padding reads as text
                but changes no earlier row).
            media: ``[b, s_e, d_e]`` the image encoder's tokens; ``media_mask`` ``[b, s_e]``.
        """
        compact = self.lookup[ids.clamp(0, len(self.lookup) - 1)]  # [b, s]; unknown and media ids -> UNK
        return self.decoder.states(compact, media, media_mask)


def save_prompt_reader(decoder: CaptionDecoder, lookup: Tensor, path: str | Path) -> str:
    """Write stage 1's ``decoder`` and ``lookup`` (atomically) as :class:`PromptReader` loads them;
    returns the path."""
    state = {f"decoder.{k}": v.detach().contiguous() for k, v in decoder.state_dict().items()}
    state["lookup"] = lookup.detach().contiguous()
    with atomic_write(path, "wb") as file:
        file.write(safetensors.torch.save(state))
    return str(path)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Prompts as :meth:`PromptReader.forward` reads them: right-padded ids ``[b, s]`` and lengths ``[b]``."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return ids, lengths
