"""Image encoder: a timm or open_clip ViT with Llama 3 multi-layer features.

Llama 3 (paper §7.2) feeds the cross-attention adapters with the final ViT
output concatenated, along the feature dim, with the outputs of several
intermediate blocks (layers 4, 8, 16, 24, 31 of ViT-H/14, 7680 dims per
patch), after 8 extra gated self-attention "global" blocks. This module builds
the same thing around a backbone chosen by name (``"timm:<model>"`` or
``"open_clip:<model>"``), always randomly initialised unless a local
checkpoint is given; nothing is ever downloaded.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import open_clip.model
import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.layers.norm_act import LayerNormAct2d
from timm.layers.padding import get_same_padding
from timm.layers.pool2d_same import MaxPool2dSame
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor, nn

from encoders.base import EncoderOutput, MediaEncoder
from mm_llama.recompute import call_block, make_recomputable


PATCH_ATTENTION: tuple[str, ...] = ("global", "self")
"""Values of :attr:`ImageEncoderConfig.patch_attention`."""
STEM_NORMS: tuple[str, ...] = ("group", "layer")
"""Norms of a hybrid ViT's convolutional stem (:attr:`ImageEncoderConfig.stem_norm`)."""


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Shape and source of the image encoder.

    The defaults are a CPU-sized hybrid ViT (the ViT paper's "R+ViT": a ResNet stem,
    a 7x7 stride-2 convolution and a stride-2 max-pool, then 8x8 patches of its
    stride-4 feature map, i.e. 32x32 pixels, 4 blocks of width 192): a 64x64 image
    gives 4 tokens of 576 dims, one per cell of the built-in 2x2 scenes; ``patch_size=4``
    (16 tokens) suits finer layouts such as ``make-shards --grid 3``. On the built-in
    scenes it learns far faster than a plain ViT with 8x8-pixel patches (benchmarks/RESULTS.md,
    "Learning dynamics"). The paper's encoder is
    ``backbone="open_clip:ViT-H-14"``, ``image_size=224`` with every override
    ``None``, ``intermediate_layers=(3, 7, 15, 23, 30)``, ``n_global_layers=8``.

    Attributes:
        backbone: ``"<library>:<model name>"``; library is a key of :data:`BACKBONES`
            (``timm`` or ``open_clip``).
        image_size: side of the square input image in pixels.
        patch_size: ViT patch side; ``None`` keeps the backbone's. For a hybrid backbone
            (``timm:vit_*_r_*``) it counts pixels of the stem's feature map, not of the image.
        depth: number of ViT blocks; ``None`` keeps the backbone's.
        width: ViT width ``w``; ``None`` keeps the backbone's.
        heads: attention heads; ``None`` keeps the backbone's.
        intermediate_layers: strictly increasing 0-based block indices whose
            (un-normalised) outputs are concatenated after the final output;
            ``()`` = final output only.
        n_global_layers: gated self-attention blocks run on the final output
            before the concatenation (Llama 3.2 Vision's "global" encoder).
        global_gate_init: initial value of the tanh gates of those blocks.
            ``pi/4`` (tanh = 0.66) as in Llama 3.2 Vision, so the new blocks
            contribute from the first step; ``0.0`` makes them start as identity.
        checkpoint: local ``state_dict`` of the headless backbone module
            (``ImageEncoder.backbone.model``: the timm model without classifier
            or pooling, or the open_clip ``.visual`` tower without ``proj`` and
            without a ``visual.`` key prefix), ``.safetensors`` or ``torch.save``
            file; loaded strictly.
        drop_cls: return patch tokens only, without class/register tokens.
        pos_embed_init: how a randomly initialised backbone's patch position
            embedding starts: ``"sincos"`` (2-D sine-cosine, as in MAE; as large as the
            patch embedding, so that patches differ by place from the first step) or
            ``"library"`` (default; the library's own: std 0.02 in timm, ``width ** -0.5``
            in open_clip, a few percent of the patch signal). Ignored when a
            ``checkpoint`` is loaded. Measured on the built-in scenes, sincos did *not*
            help (benchmarks/RESULTS.md, "Learning dynamics").
        patch_attention: what the backbone's self-attention lets a token see: ``"global"``
            (default; every token, as in every ViT) or ``"self"`` (only itself, so the blocks act
            on each patch alone: a token then describes its own patch and nothing of the others,
            and a cross-attention query can find an object by its content). timm backbones only.
            It does not stop every leak: a hybrid backbone's stem normalises with whole-image statistics.
        tiles: tiles per side. ``1`` (default) encodes the whole image. ``t > 1`` cuts it into
            ``t x t`` square tiles of ``image_size / t`` pixels, each encoded alone like a separate
            image, as Llama 3's encoder treats the tiles of a large image. No token then holds
            anything of another tile, the stem's norm included. A fixed 2-D sine-cosine table of the
            tile's row and column (centred over the tiles, unit RMS) is added to its final-block output,
            because every tile gets the same patch position embedding. Tokens come tile by tile in
            reading order, then patch by patch; with one patch per tile that is the untiled order. The
            global layers, if any, still see every tile. Measured on the built-in scenes with ``2``:
            76.6 % against 89.3 % (benchmarks/RESULTS.md, "Image runs", stop 21).
        stem_norm: the norm after a hybrid backbone's stem convolution (``timm:vit_*_r_*``):
            ``"group"`` (default; timm's GroupNorm, whose statistics span the whole image, so every
            cell's features carry something of the others') or ``"layer"`` (a LayerNorm over the
            channels of each pixel: a stem feature then depends on its receptive field alone). The
            parameters have the same names and shapes, so a checkpoint loads into either: keep the
            value it was trained with. Measured on the built-in scenes (benchmarks/RESULTS.md,
            "Image runs", stop 22): stage 1's decoder answers "where is the <colour> <shape>?"
            about two-object scenes 71 % right with ``"layer"`` against 37 % with ``"group"``.
    """

    backbone: str = "timm:vit_tiny_r_s16_p8_224"
    image_size: int = 64
    patch_size: int | None = 8
    depth: int | None = 4
    width: int | None = 192
    heads: int | None = 3
    intermediate_layers: tuple[int, ...] = (1, 2)
    n_global_layers: int = 0
    global_gate_init: float = math.pi / 4
    checkpoint: str | None = None
    drop_cls: bool = True
    pos_embed_init: str = "library"
    patch_attention: str = "global"
    tiles: int = 1
    stem_norm: str = "group"

    def __post_init__(self) -> None:
        # YAML / jsonargparse hand over lists; the field is hashable and immutable.
        object.__setattr__(self, "intermediate_layers", tuple(self.intermediate_layers))
        library, sep, name = self.backbone.partition(":")
        if not sep or not name:
            raise ValueError(f"backbone must be '<library>:<model name>', got {self.backbone!r}")
        if library not in BACKBONES:
            raise ValueError(
                f"backbone library must be one of {sorted(BACKBONES)}, got {library!r} (from {self.backbone!r})"
            )
        if self.image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {self.image_size}")
        for field_name in ("patch_size", "depth", "width", "heads"):
            value = getattr(self, field_name)
            if value is not None and value <= 0:
                raise ValueError(f"{field_name} must be > 0 or None, got {value}")
        if self.patch_size is not None and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width is not None and self.heads is not None and self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        layers = self.intermediate_layers
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"intermediate_layers must be strictly increasing, got {layers}")
        if self.depth is not None:
            check_layer_indices(layers, self.depth)
        if self.n_global_layers < 0:
            raise ValueError(f"n_global_layers must be >= 0, got {self.n_global_layers}")
        if self.pos_embed_init not in ("sincos", "library"):
            raise ValueError(f"pos_embed_init must be 'sincos' or 'library', got {self.pos_embed_init!r}")
        if self.patch_attention not in PATCH_ATTENTION:
            raise ValueError(f"patch_attention must be one of {PATCH_ATTENTION}, got {self.patch_attention!r}")
        if self.tiles <= 0:
            raise ValueError(f"tiles must be > 0, got {self.tiles}")
        if self.image_size % self.tiles:
            raise ValueError(f"image_size {self.image_size} is not a multiple of tiles {self.tiles}")
        if self.stem_norm not in STEM_NORMS:
            raise ValueError(f"stem_norm must be one of {STEM_NORMS}, got {self.stem_norm!r}")
        if self.stem_norm != "group" and self.library != "timm":
            raise ValueError(f"stem_norm={self.stem_norm!r} needs a hybrid timm backbone, got {self.backbone!r}")
        if self.patch_attention != "global" and self.library != "timm":
            raise ValueError(f"patch_attention={self.patch_attention!r} needs a timm backbone, got {self.backbone!r}")

    @property
    def library(self) -> str:
        """The part of :attr:`backbone` before the first ``:``."""
        return self.backbone.partition(":")[0]

    @property
    def tile_size(self) -> int:
        """Side of one tile in pixels: the image size the backbone is built for."""
        return self.image_size // self.tiles

    @property
    def model_name(self) -> str:
        """The part of :attr:`backbone` after the first ``:``."""
        return self.backbone.partition(":")[2]


def sincos_position_embedding(g_h: int, g_w: int, dim: int) -> Tensor:
    """2-D sine-cosine position table ``[g_h * g_w, dim]`` in row-major patch order.

    Half of the channels encode the row, half the column; each half is
    ``sin`` and ``cos`` of the coordinate at ``dim / 4`` geometric frequencies
    (periods from ``2 pi`` to ``2 pi * 10^4``; MAE's table).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {dim}")
    freqs = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(g_h, dtype=torch.float64), torch.arange(g_w, dtype=torch.float64),
                                indexing="ij")  # [g_h, g_w] each

    def encode(coord: Tensor) -> Tensor:
        angles = coord.reshape(-1, 1) * freqs  # [g, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [g, dim/2]

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # [g, dim]


def check_layer_indices(layers: tuple[int, ...], depth: int) -> None:
    """Raise ``ValueError`` naming the first block index outside ``[0, depth)``."""
    for index in layers:
        if not 0 <= index < depth:
            raise ValueError(f"intermediate layer index {index} is out of range for a ViT of depth {depth}")


class ViTBackbone(nn.Module, ABC):
    """A library ViT reduced to what :class:`ImageEncoder` needs.

    Attributes:
        model: the library module itself; its ``state_dict`` is the checkpoint format.
        width: ``w``. depth: number of blocks. heads: attention heads.
        num_prefix_tokens: ``p``, class/register tokens before the patches.
        grid_size: patches per side ``(g_h, g_w)``.
    """

    model: nn.Module
    width: int
    depth: int
    heads: int
    num_prefix_tokens: int
    grid_size: tuple[int, int]

    @abstractmethod
    def forward(self, images: Tensor, layers: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
        """Run the ViT once.

        Shapes: ``b`` batch, ``p`` prefix tokens, ``g`` = ``g_h * g_w`` patches, ``w`` width.

        Args:
            images: ``[b, 3, H, W]``.
            layers: block indices to return, increasing.

        Returns:
            The final output after the backbone's last norm, ``[b, p + g, w]``,
            and the raw output of each block in ``layers``, each ``[b, p + g, w]``.
        """

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.model.set_grad_checkpointing(enabled)

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The library's transformer blocks, in order (``depth`` of them)."""

    @abstractmethod
    def patch_position_embedding(self) -> Tensor:
        """The rows of the position-embedding parameter that belong to patches, ``[g, w]`` (a view)."""

    def load_checkpoint(self, path: str) -> None:
        """Load a local state dict into :attr:`model`, strictly."""
        if Path(path).suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=True)


def check_stem_norm(config: ImageEncoderConfig) -> None:
    """Refuse a ``.safetensors`` checkpoint whose metadata says it was trained with another ``stem_norm``.

    GroupNorm and LayerNorm stems have the same parameter names, so such a file would load strictly
    and compute something else. Stage 1 writes the metadata; files without it are not checked.
    """
    path = Path(config.checkpoint)
    if path.suffix != ".safetensors" or not path.is_file():
        return
    with safetensors.safe_open(str(path), framework="pt") as f:
        saved = (f.metadata() or {}).get("stem_norm")
    if saved is not None and saved != config.stem_norm:
        raise ValueError(
            f"{path} was trained with stem_norm={saved!r} but this encoder has stem_norm={config.stem_norm!r}; "
            f"the parameter names match, so it would load and compute something else: set "
            f"ImageEncoderConfig.stem_norm={saved!r}"
        )


class _MaxPool2dSameNoCopy(MaxPool2dSame):
    """timm's TF-"SAME" max-pool without the padded copy of its input where that padding is one
    row and one column of -inf at the bottom and right (a 3x3, stride-2 pool of an even-sized map,
    as in the hybrid stem): ``ceil_mode`` pools the same windows. Same values and the same argmax
    (so gradients); any other size takes timm's padded path."""

    def forward(self, x: Tensor) -> Tensor:
        pads = [get_same_padding(n, k, s, d) for n, k, s, d in
                zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)]
        if pads == [1, 1] and min(self.stride) >= 2:
            return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation, ceil_mode=True)
        return super().forward(x)


def _stem_layer_norm(model: TimmVisionTransformer, config: ImageEncoderConfig) -> None:
    """Swap a hybrid stem's GroupNorm (+ activation) for a per-pixel LayerNorm with the same activation
    and parameter names (``...stem.norm.weight`` / ``.bias``), and its max-pool for
    :class:`_MaxPool2dSameNoCopy` (same values, no parameters)."""
    stem = getattr(model.patch_embed, "backbone", None)
    norm = getattr(stem, "norm", None)
    if not isinstance(norm, nn.GroupNorm):
        raise ValueError(
            f"stem_norm='layer' needs a hybrid timm ViT whose stem has a GroupNorm (timm:vit_*_r_*); "
            f"{config.backbone!r} has none"
        )
    act = getattr(norm, "act", None)
    # inplace=False: an in-place activation on the norm's permuted output makes autograd copy
    # the whole feature map back through a CopySlices node in backward.
    stem.norm = LayerNormAct2d(norm.num_channels, eps=norm.eps, affine=norm.affine,
                               apply_act=act is not None and not isinstance(act, nn.Identity),
                               act_layer=type(act) if act is not None else nn.ReLU, inplace=False)
    pool = getattr(stem, "pool", None)
    if type(pool) is MaxPool2dSame and not pool.ceil_mode:
        stem.pool = _MaxPool2dSameNoCopy(pool.kernel_size, pool.stride, dilation=pool.dilation)


def _overrides(config: ImageEncoderConfig, names: dict[str, str]) -> dict[str, int]:
    """Map the non-``None`` size overrides of ``config`` onto a library's argument names."""
    return {arg: getattr(config, field) for field, arg in names.items() if getattr(config, field) is not None}


class TimmViT(ViTBackbone):
    """A ``timm.models.vision_transformer.VisionTransformer`` (vit_*, deit_*, ...)."""

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        sizes = _overrides(
            config, {"patch_size": "patch_size", "depth": "depth", "width": "embed_dim", "heads": "num_heads"}
        )
        try:
            model = timm.create_model(
                config.model_name, pretrained=False, num_classes=0, img_size=config.tile_size, **sizes
            )
        except AssertionError as exn:  # timm asserts on shapes (e.g. a hybrid's stem grid vs patch)
            raise ValueError(
                f"timm cannot build {config.model_name!r} for {config.tile_size}x{config.tile_size} images "
                f"with {sizes}: the image (or, for a hybrid ViT, its stem's feature map) must be a multiple "
                f"of the patch size ({exn or 'shape assertion'})"
            ) from exn
        if not isinstance(model, TimmVisionTransformer):
            raise ValueError(
                f"timm model {config.model_name!r} is a {type(model).__name__}, not a VisionTransformer"
            )
        # Keeps every block and the final norm; drops pooling and classifier,
        # whose parameters would never receive a gradient.
        model.prune_intermediate_layers(indices=len(model.blocks), prune_head=True)
        if config.stem_norm == "layer":
            _stem_layer_norm(model, config)
        self.model = model
        self.width = model.embed_dim
        self.depth = len(model.blocks)
        self.heads = model.blocks[0].attn.num_heads
        self.num_prefix_tokens = model.num_prefix_tokens
        self.grid_size = tuple(model.patch_embed.grid_size)
        self.self_only = config.patch_attention == "self"
        # The per-pixel LayerNorm normalises over channels: on an NHWC (channels-last) feature map
        # its permutes are views, not copies. Same values and gradients (tests/test_image_encoder.py);
        # with the out-of-place ReLU, the stem's forward + backward at batch 64 takes 72 ms instead
        # of 110 on this project's CPU (benchmarks/RESULTS.md, "Speed").
        self.channels_last = config.stem_norm == "layer"
        # A hybrid's stem saves most of a trained encoder's activations once its blocks are recomputed
        # (64.6 of 65.7 MiB at batch 64 for the default): recomputed with them.
        self.hybrid = hasattr(model.patch_embed, "backbone")
        if self.hybrid:
            make_recomputable(model.patch_embed)  # same module, same parameter names

    def set_grad_checkpointing(self, enabled: bool) -> None:
        super().set_grad_checkpointing(enabled)
        if self.hybrid:
            self.model.patch_embed.recompute = enabled

    def attention_mask(self, images: Tensor) -> Tensor | None:
        """``None`` for global attention; for ``patch_attention="self"`` an additive ``[n, n]`` mask
        (``n = p + g``): 0 on the diagonal, -inf elsewhere, so each token attends to itself alone."""
        if not self.self_only:
            return None
        n = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        blocked = ~torch.eye(n, dtype=torch.bool, device=images.device)
        return torch.zeros(n, n, dtype=images.dtype, device=images.device).masked_fill_(blocked, float("-inf"))

    def forward(self, images: Tensor, layers: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
        """Run the ViT; see :meth:`ViTBackbone.forward`.

        Shapes: ``b`` batch, ``p`` prefix tokens, ``g`` patches, ``w`` width.
        ``images`` ``[b, 3, H, W]`` -> final ``[b, p + g, w]``, each intermediate ``[b, p + g, w]``.
        """
        mask = self.attention_mask(images)  # [p + g, p + g] or None
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if not layers:  # timm's forward_intermediates needs at least one index
            return self.model.forward_features(images, attn_mask=mask), []
        has_prefix = self.num_prefix_tokens > 0
        final, intermediates = self.model.forward_intermediates(
            images, indices=list(layers), output_fmt="NLC", return_prefix_tokens=has_prefix, attn_mask=mask
        )
        if has_prefix:  # timm hands back (patches [b, g, w], prefix [b, p, w]) pairs
            intermediates = [torch.cat([prefix, patches], dim=1) for patches, prefix in intermediates]
        return final, intermediates  # [b, p + g, w], each [b, p + g, w]

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def patch_position_embedding(self) -> Tensor:
        g_h, g_w = self.grid_size
        return self.model.pos_embed[0, -g_h * g_w :]  # [g, w]; timm puts prefix rows first, if any


class OpenClipViT(ViTBackbone):
    """The ``.visual`` tower of an open_clip model whose vision config is a plain ViT."""

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        model_cfg = open_clip.get_model_config(config.model_name)  # a fresh copy
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {config.model_name!r}")
        vision_cfg = model_cfg["vision_cfg"]
        defaults = open_clip.model.CLIPVisionCfg
        if "timm_model_name" in vision_cfg or not isinstance(vision_cfg.get("layers", defaults.layers), int):
            raise ValueError(
                f"open_clip model {config.model_name!r} has no plain ViT vision tower "
                "(timm- or ResNet-based); use a 'timm:' backbone"
            )
        vision_cfg.update(image_size=config.tile_size)
        vision_cfg.update(_overrides(config, {"patch_size": "patch_size", "depth": "layers", "width": "width"}))
        width = vision_cfg.get("width", defaults.width)
        if config.heads is not None:  # open_clip sizes heads by their width
            if width % config.heads:
                raise ValueError(f"open_clip width {width} is not a multiple of heads {config.heads}")
            vision_cfg["head_width"] = width // config.heads
        # open_clip's own tower builder (private, but exactly what create_model
        # calls): create_model would also build, and we would throw away, a
        # text tower of ~38M parameters (1.7 s on CPU vs 0.06 s).
        visual = open_clip.model._build_vision_tower(
            model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False)
        )
        if not isinstance(visual, OpenClipVisionTransformer) or visual.attn_pool is not None:
            raise ValueError(f"open_clip model {config.model_name!r} has an attention-pooled vision tower")
        # Drops the CLIP projection of the pooled token, unused here (no gradient).
        visual.prune_intermediate_layers(indices=len(visual.transformer.resblocks), prune_head=True)
        self.model = visual
        self.width = width
        self.depth = len(visual.transformer.resblocks)
        self.heads = width // vision_cfg.get("head_width", defaults.head_width)
        self.num_prefix_tokens = 1  # open_clip ViTs always carry one class token
        self.grid_size = tuple(visual.grid_size)

    def forward(self, images: Tensor, layers: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
        """Run the ViT; see :meth:`ViTBackbone.forward`.

        Shapes: ``b`` batch, ``p`` prefix tokens, ``g`` patches, ``w`` width.
        ``images`` ``[b, 3, H, W]`` -> final ``[b, p + g, w]``, each intermediate ``[b, p + g, w]``.
        """
        last = self.depth - 1
        # open_clip returns only the pooled embedding as its final output, so
        # the last block is taken as an intermediate and normed here.
        take = sorted({*layers, last})
        out = self.model.forward_intermediates(
            images, indices=take, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        blocks = {
            index: torch.cat([prefix, patches], dim=1)  # [b, p + g, w]
            for index, prefix, patches in zip(take, out["image_intermediates_prefix"], out["image_intermediates"])
        }
        final = self.model.ln_post(blocks[last])  # [b, p + g, w]
        return final, [blocks[index] for index in layers]

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def patch_position_embedding(self) -> Tensor:
        return self.model.positional_embedding[self.num_prefix_tokens :]  # [g, w]


BACKBONES: dict[str, Callable[[ImageEncoderConfig], ViTBackbone]] = {
    "timm": TimmViT,
    "open_clip": OpenClipViT,
}
"""Backbone builders by library prefix of :attr:`ImageEncoderConfig.backbone`."""


class GatedSelfAttentionBlock(nn.Module):
    """Pre-norm transformer block with tanh-gated residual branches.

    ``x + tanh(g_attn) * attn(norm(x))`` then ``x + tanh(g_mlp) * mlp(norm(x))``;
    the "global" layers of Llama 3 / Llama 3.2 Vision. One scalar gate per branch.
    """

    def __init__(self, dim: int, heads: int, gate_init: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.mlp_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: ``b`` batch, ``s_e`` tokens, ``d_e`` width, ``h`` heads, ``h_d`` head dim.

        Args:
            x: ``[b, s_e, d_e]``.

        Returns:
            ``[b, s_e, d_e]``.
        """
        b, s_e, d_e = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, s_e, 3, self.heads, d_e // self.heads)  # [b, s_e, 3, h, h_d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, h, s_e, h_d]
        attn = F.scaled_dot_product_attention(q, k, v)  # [b, h, s_e, h_d]
        attn = attn.transpose(1, 2).reshape(b, s_e, d_e)  # [b, s_e, d_e]
        x = x + self.attn_gate.tanh() * self.out_proj(attn)
        return x + self.mlp_gate.tanh() * self.mlp(self.mlp_norm(x))


class ImageEncoder(MediaEncoder):
    """ViT image encoder returning final + intermediate features per patch.

    Attributes:
        config: the resolved :class:`ImageEncoderConfig`.
        backbone: the wrapped library ViT.
        global_layers: ``n_global_layers`` :class:`GatedSelfAttentionBlock` s.
        out_dim: ``d_e = w * (1 + len(intermediate_layers))``.
        num_tokens: ``s_e``, patches per image (plus prefix tokens if ``drop_cls`` is off).
    """

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = BACKBONES[config.library](config)
        check_layer_indices(config.intermediate_layers, self.backbone.depth)
        if config.checkpoint is not None:
            check_stem_norm(config)
            self.backbone.load_checkpoint(config.checkpoint)
        elif config.pos_embed_init == "sincos":
            with torch.no_grad():
                table = self.backbone.patch_position_embedding()
                table.copy_(sincos_position_embedding(*self.backbone.grid_size, table.shape[-1]))
        self.global_layers = nn.ModuleList(
            GatedSelfAttentionBlock(self.backbone.width, self.backbone.heads, config.global_gate_init)
            for _ in range(config.n_global_layers)
        )
        self.out_dim = self.backbone.width * (1 + len(config.intermediate_layers))
        g_h, g_w = self.backbone.grid_size
        self.num_tokens = config.tiles**2 * (g_h * g_w + (0 if config.drop_cls else self.backbone.num_prefix_tokens))
        if config.tiles > 1:  # fixed, so the backbone's state dict stays the checkpoint format
            table = sincos_position_embedding(config.tiles, config.tiles, self.backbone.width)  # [t*t, w]
            # Only what differs between tiles, at unit RMS: as loud as the normed final output. (The raw
            # table is nearly constant over 2-3 coordinates; measured, tiles then lost their places.)
            table = table - table.mean(0)
            table = table / table.pow(2).mean().sqrt()
            self.register_buffer("tile_position", table.unsqueeze(1), persistent=False)  # [t*t, 1, w]
        else:
            self.tile_position = None
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.grad_checkpointing = enabled
        self.backbone.set_grad_checkpointing(enabled)

    def blocks(self) -> list[nn.Module]:
        """The ViT's blocks, then the gated global blocks."""
        return [*self.backbone.blocks(), *self.global_layers]

    def forward(self, images: Tensor) -> EncoderOutput:
        """Encode a batch of square images.

        Shapes: ``b`` batch, ``s_e`` media tokens (``g`` patches, plus ``p``
        prefix tokens when ``drop_cls`` is off), ``w`` ViT width,
        ``d_e = w * (1 + len(intermediate_layers))``.

        Args:
            images: ``[b, 3, image_size, image_size]``, normalised as
                :func:`encoders.preprocess.image_transform` does.

        Returns:
            Tokens ``[b, s_e, d_e]`` laid out as ``[final | layer i_0 | layer i_1 | ...]``
            along ``d_e``, and an all-``True`` mask ``[b, s_e]`` (images are never padded).
        """
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be [b, 3, {size}, {size}], got {tuple(images.shape)}")
        b, t = images.shape[0], self.config.tiles
        if t > 1:  # [b, 3, t*z, t*z] -> [b*t*t, 3, z, z], tiles in reading order
            z = self.config.tile_size
            images = images.unflatten(2, (t, z)).unflatten(4, (t, z)).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        final, intermediates = self.backbone(images, self.config.intermediate_layers)  # [b*t*t, p + g, w] each
        if t > 1:  # every tile gets its place; then [b*t*t, p + g, w] -> [b, t*t*(p + g), w]
            final = (final.unflatten(0, (b, t * t)) + self.tile_position.to(final.dtype)).flatten(1, 2)
            intermediates = [x.unflatten(0, (b, t * t)).flatten(1, 2) for x in intermediates]
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.global_layers:
            final = call_block(block, final, recompute=recompute)
        tokens = torch.cat([final, *intermediates], dim=-1)  # [b, t*t*(p + g), d_e]
        if self.config.drop_cls:  # each tile's prefix tokens
            p = self.backbone.num_prefix_tokens
            tokens = tokens.unflatten(1, (t * t, -1))[:, :, p:].flatten(1, 2)  # [b, t*t*g, d_e]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # [b, s_e]
        return EncoderOutput(tokens=tokens, mask=mask)
