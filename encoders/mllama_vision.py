"""Tiled image encoder of Llama 3.2 Vision ("Mllama"), written natively.

Shape legend: ``b`` batch, ``m`` images per sample, ``t`` tiles per image (``max_num_tiles``),
``n = b * m`` images, ``g`` patches per tile, ``L`` tokens per tile after padding,
``w`` encoder width, ``k`` intermediate layers, ``s_e`` media tokens, ``d_e`` output width.

An image is resized onto a canvas of up to ``max_num_tiles`` square tiles (see
:mod:`encoders.tiling`); its arrangement is one of ``supported_aspect_ratios`` and its
1-based index there is the image's *aspect-ratio id* (0 = no image). Each tile goes
through a patch convolution, gets a class token, a learned position embedding blended
(by a tanh gate) with a per-aspect-ratio tile-position embedding, and per-tile
aspect-ratio embeddings before the local layers and before the global ones. The local
layers attend across all tiles of one image; the final output of the gated global
layers is concatenated with the outputs of some local layers (paper §7.2: 7680 dims
per token for ViT-H/14 with five intermediate layers).

Two details of Meta's reference (and of ``transformers``) are reproduced on purpose so
that imported checkpoints behave identically: each tile is zero-padded to a multiple of
8 tokens, and the attention mask removes only *padding-to-padding* pairs, so real tokens
also attend to padding tokens and to the padding tiles of their image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import EncoderOutput, MediaEncoder
from mm_llama.recompute import call_block

TOKEN_ALIGN = 8
"""Tiles are padded to a multiple of this many tokens (as in the reference)."""


def tile_arrangements(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every ``(rows, cols)`` tile grid with at most ``max_num_tiles`` tiles.

    Ordered by rows, then columns, the order the reference numbers aspect-ratio ids in:
    ``4 -> ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))``.
    """
    if max_num_tiles <= 0:
        raise ValueError(f"max_num_tiles must be > 0, got {max_num_tiles}")
    return tuple(
        (rows, cols)
        for rows in range(1, max_num_tiles + 1)
        for cols in range(1, max_num_tiles + 1)
        if rows * cols <= max_num_tiles
    )


@dataclass(frozen=True)
class MllamaVisionEncoderConfig:
    """Shape of the tiled Mllama vision encoder; defaults are Llama 3.2 11B Vision's.

    Attributes:
        tile_size: side of one square tile in pixels (HF ``image_size``).
        patch_size: ViT patch side.
        width: ``w`` (HF ``hidden_size``).
        depth: local (ungated) layers (HF ``num_hidden_layers``).
        n_global_layers: gated global layers run after the local ones.
        heads: attention heads.
        mlp_dim: inner width of the GELU MLP (HF ``intermediate_size``).
        intermediate_layers: 0-based local-layer indices whose outputs are concatenated
            after the final output, in the reference's interleaved layout.
        max_num_tiles: ``t``, tiles per image (padding tiles included).
        supported_aspect_ratios: allowed ``(rows, cols)`` tile grids; an image's aspect-ratio
            id is its grid's 1-based index here. ``None``: :func:`tile_arrangements`.
        norm_eps: LayerNorm epsilon of the transformer layers (the pre/post norms use 1e-5).
        global_gate_init: initial value of the global layers' tanh gates (reference: pi/4).
        channels: input channels.
    """

    tile_size: int = 560
    patch_size: int = 14
    width: int = 1280
    depth: int = 32
    n_global_layers: int = 8
    heads: int = 16
    mlp_dim: int = 5120
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    max_num_tiles: int = 4
    supported_aspect_ratios: tuple[tuple[int, int], ...] | None = None
    norm_eps: float = 1e-5
    global_gate_init: float = math.pi / 4
    channels: int = 3

    def __post_init__(self) -> None:
        # YAML / JSON hand over lists; keep the fields hashable.
        object.__setattr__(self, "intermediate_layers", tuple(self.intermediate_layers))
        ratios = self.supported_aspect_ratios or tile_arrangements(self.max_num_tiles)
        object.__setattr__(self, "supported_aspect_ratios", tuple(tuple(int(v) for v in r) for r in ratios))
        for name in ("tile_size", "patch_size", "width", "depth", "heads", "mlp_dim", "max_num_tiles", "channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MllamaVisionEncoderConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.n_global_layers < 0:
            raise ValueError(f"n_global_layers must be >= 0, got {self.n_global_layers}")
        if self.tile_size % self.patch_size:
            raise ValueError(f"tile_size {self.tile_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        layers = self.intermediate_layers
        if any(b <= a for a, b in zip(layers, layers[1:])) or any(not 0 <= i < self.depth for i in layers):
            raise ValueError(f"intermediate_layers must be strictly increasing in [0, {self.depth}), got {layers}")
        for rows, cols in self.supported_aspect_ratios:
            if rows <= 0 or cols <= 0 or rows * cols > self.max_num_tiles:
                raise ValueError(
                    f"supported aspect ratio {(rows, cols)} does not fit max_num_tiles={self.max_num_tiles}"
                )

    @property
    def patches_per_tile(self) -> int:
        """``g``: patches of one tile (without the class token)."""
        return (self.tile_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """``g + 1``: patch tokens plus the class token, as the encoder outputs them."""
        return self.patches_per_tile + 1

    @property
    def out_dim(self) -> int:
        """``d_e = w * (1 + k)``."""
        return self.width * (1 + len(self.intermediate_layers))

    @property
    def n_aspect_ratio_ids(self) -> int:
        """Rows of the aspect-ratio tables: one per supported grid plus id 0 (no image)."""
        return len(self.supported_aspect_ratios) + 1


@dataclass
class TiledImages:
    """A batch of tiled images, the input of :class:`MllamaVisionEncoder`.

    Attributes:
        pixel_values: ``[b, m, t, c, tile, tile]`` normalised tiles; padding tiles are zeros.
        aspect_ratio_ids: ``[b, m]`` long, 1-based grid index; 0 = no image in this slot.
        aspect_ratio_mask: ``[b, m, t]``, 1 for real tiles, 0 for padding tiles (the
            reference keeps tile 0 at 1 even for empty slots).
    """

    pixel_values: Tensor
    aspect_ratio_ids: Tensor
    aspect_ratio_mask: Tensor

    def __post_init__(self) -> None:
        if self.pixel_values.dim() != 6:
            raise ValueError(
                f"pixel_values must be [b, m, t, c, H, W], got shape {tuple(self.pixel_values.shape)}"
            )
        b, m, t = self.pixel_values.shape[:3]
        if tuple(self.aspect_ratio_ids.shape) != (b, m):
            raise ValueError(f"aspect_ratio_ids must be [b, m] = {(b, m)}, got {tuple(self.aspect_ratio_ids.shape)}")
        if tuple(self.aspect_ratio_mask.shape) != (b, m, t):
            raise ValueError(
                f"aspect_ratio_mask must be [b, m, t] = {(b, m, t)}, got {tuple(self.aspect_ratio_mask.shape)}"
            )

    def __len__(self) -> int:
        """``b``, as ``len`` of an image tensor."""
        return self.pixel_values.shape[0]

    def to(self, *args, **kwargs) -> TiledImages:
        """Move the pixels (dtype and device) and the ids/mask (device only)."""
        pixels = self.pixel_values.to(*args, **kwargs)
        return TiledImages(pixels, self.aspect_ratio_ids.to(pixels.device), self.aspect_ratio_mask.to(pixels.device))


class AspectRatioEmbedding(nn.Module):
    """One tanh-gated vector per tile, looked up by the image's aspect-ratio id."""

    def __init__(self, n_ids: int, max_num_tiles: int, width: int) -> None:
        super().__init__()
        self.max_num_tiles, self.width = max_num_tiles, width
        self.embedding = nn.Embedding(n_ids, max_num_tiles * width)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        """``x [n, t, L, w]``, ``ids [n]`` → ``[n, t, L, w]``."""
        table = self.embedding(ids).view(-1, self.max_num_tiles, 1, self.width)  # [n, t, 1, w]
        return x + self.gate.tanh() * table


class TilePositionEmbedding(nn.Module):
    """Patch positions within a tile, blended with positions of the tile in its grid.

    ``x + (1 - tanh g) * pos + tanh g * tile_pos[id]``: ``pos [g+1, w]`` is shared by all
    tiles, ``tile_pos[id]`` holds one ``[t, g+1, w]`` table per aspect-ratio id.
    """

    def __init__(self, n_ids: int, max_num_tiles: int, tokens: int, width: int) -> None:
        super().__init__()
        self.max_num_tiles, self.tokens, self.width = max_num_tiles, tokens, width
        self.embedding = nn.Parameter(torch.randn(tokens, width) * width**-0.5)
        self.tile_embedding = nn.Embedding(n_ids, max_num_tiles * tokens * width)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        """``x [n, t, g+1, w]``, ``ids [n]`` → ``[n, t, g+1, w]``."""
        gate = self.gate.tanh()
        tiles = self.tile_embedding(ids).view(-1, self.max_num_tiles, self.tokens, self.width)  # [n, t, g+1, w]
        return x + (1 - gate) * self.embedding + gate * tiles


class VisionBlock(nn.Module):
    """Pre-LayerNorm transformer block (bias-free attention, GELU MLP), optionally tanh-gated."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, gate_init: float | None) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width, eps=eps)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.mlp_norm = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.gated = gate_init is not None
        if self.gated:
            self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
            self.mlp_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x [n, s, w]``, ``mask [n, 1, s, s]`` bool (True = attend) → ``[n, s, w]``."""
        n, s, w = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(n, s, self.heads, w // self.heads).transpose(1, 2)  # [n, heads, s, h_d]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [n, heads, s, h_d]
        attn = self.o_proj(attn.transpose(1, 2).reshape(n, s, w))  # [n, s, w]
        x = x + (self.attn_gate.tanh() * attn if self.gated else attn)
        mlp = self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))
        return x + (self.mlp_gate.tanh() * mlp if self.gated else mlp)


class MllamaVisionEncoder(MediaEncoder):
    """Llama 3.2 Vision's tiled encoder: local layers, gated global layers, multi-layer features.

    Attributes:
        config: the :class:`MllamaVisionEncoderConfig`.
        out_dim: ``d_e``.
    """

    def __init__(self, config: MllamaVisionEncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        n_ids, tokens = c.n_aspect_ratio_ids, c.tokens_per_tile
        self.patch_embed = nn.Conv2d(c.channels, c.width, c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(c.width) * c.width**-0.5)
        self.pre_tile_embed = AspectRatioEmbedding(n_ids, c.max_num_tiles, c.width)
        self.position_embed = TilePositionEmbedding(n_ids, c.max_num_tiles, tokens, c.width)
        self.post_tile_embed = AspectRatioEmbedding(n_ids, c.max_num_tiles, c.width)
        self.norm_pre = nn.LayerNorm(c.width)
        self.norm_post = nn.LayerNorm(c.width)
        self.local_layers = nn.ModuleList(
            VisionBlock(c.width, c.heads, c.mlp_dim, c.norm_eps, gate_init=None) for _ in range(c.depth)
        )
        self.global_layers = nn.ModuleList(
            VisionBlock(c.width, c.heads, c.mlp_dim, c.norm_eps, gate_init=c.global_gate_init)
            for _ in range(c.n_global_layers)
        )
        self.out_dim = c.out_dim
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.grad_checkpointing = enabled

    def blocks(self) -> list[nn.Module]:
        """The local layers, then the gated global layers."""
        return [*self.local_layers, *self.global_layers]

    def _run(self, block: VisionBlock, x: Tensor, mask: Tensor) -> Tensor:
        return call_block(block, x, mask, recompute=self.grad_checkpointing and torch.is_grad_enabled())

    def forward(self, images: TiledImages) -> EncoderOutput:
        """Encode tiled images.

        Args:
            images: :class:`TiledImages` with ``pixel_values [b, m, t, c, tile, tile]``.

        Returns:
            Tokens ``[b, s_e, d_e]`` with ``s_e = m * t * (g + 1)`` (image-major, then tile,
            then class token followed by patches), features laid out as
            ``[final | interleaved intermediates]``; mask ``[b, s_e]``, False for the tokens of
            padding tiles and of empty image slots (aspect-ratio id 0).
        """
        if not isinstance(images, TiledImages):
            raise TypeError(f"MllamaVisionEncoder expects TiledImages, got {type(images).__name__}")
        c = self.config
        b, m, t, ch, height, width = images.pixel_values.shape
        if (t, ch, height, width) != (c.max_num_tiles, c.channels, c.tile_size, c.tile_size):
            raise ValueError(
                f"pixel_values must be [b, m, {c.max_num_tiles}, {c.channels}, {c.tile_size}, {c.tile_size}], "
                f"got {tuple(images.pixel_values.shape)}"
            )
        ids = images.aspect_ratio_ids.reshape(b * m).long()  # [n]
        if int(ids.min()) < 0 or int(ids.max()) >= c.n_aspect_ratio_ids:
            raise ValueError(f"aspect_ratio_ids must lie in [0, {c.n_aspect_ratio_ids - 1}], got {ids.tolist()}")
        n, g, tokens = b * m, c.patches_per_tile, c.tokens_per_tile
        pixels = images.pixel_values.reshape(n * t, ch, height, width).to(self.patch_embed.weight.dtype)
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [n * t, g, w]
        x = self.pre_tile_embed(x.reshape(n, t, g, c.width), ids)  # [n, t, g, w]
        cls = self.class_embedding.to(x.dtype).expand(n, t, 1, c.width)  # [n, t, 1, w]
        x = self.position_embed(torch.cat([cls, x], dim=2), ids)  # [n, t, g+1, w]
        x = self.norm_pre(x)
        pad = -tokens % TOKEN_ALIGN
        x = F.pad(x, (0, 0, 0, pad))  # [n, t, L, w]
        length = tokens + pad
        real = images.aspect_ratio_mask.reshape(n, t, 1).bool() & (
            torch.arange(length, device=x.device) < tokens
        )  # [n, t, L]
        real = real.reshape(n, t * length)  # [n, t*L]
        # The reference masks only padding-to-padding pairs (see the module docstring).
        allowed = real[:, :, None] | real[:, None, :]  # [n, t*L, t*L]
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # an all-padding image sees itself
        mask = allowed[:, None]  # [n, 1, t*L, t*L]

        x = x.reshape(n, t * length, c.width)  # [n, t*L, w]
        kept: list[Tensor] = []
        for i, block in enumerate(self.local_layers):
            x = self._run(block, x, mask)
            if i in c.intermediate_layers:
                kept.append(x)
        x = self.norm_post(x)
        x = self.post_tile_embed(x.reshape(n, t, length, c.width), ids).reshape(n, t * length, c.width)
        for block in self.global_layers:
            x = self._run(block, x, mask)
        # stack on the last dim, then flatten: the reference interleaves the layers per channel
        features = torch.stack(kept, dim=-1).reshape(n, t * length, -1) if kept else x[..., :0]  # [n, t*L, w*k]
        out = torch.cat([x, features], dim=-1).reshape(n, t, length, c.out_dim)[:, :, :tokens]  # [n, t, g+1, d_e]
        out = out.reshape(b, m * t * tokens, c.out_dim)  # [b, s_e, d_e]

        tile_ok = images.aspect_ratio_mask.bool() & (images.aspect_ratio_ids > 0)[..., None]  # [b, m, t]
        token_mask = tile_ok[..., None].expand(b, m, t, tokens).reshape(b, m * t * tokens)  # [b, s_e]
        return EncoderOutput(tokens=out, mask=token_mask)
