"""``MultimodalLlama``: media encoders + adapters + the frozen Llama LM.

Shape legend: ``b`` batch, ``s`` text tokens, ``s_e`` media tokens, ``d`` LM width,
``d_e`` encoder width, ``v`` vocabulary, ``n`` labeled positions.

The LM is wrapped, never forked: cross-attention blocks run through the LM's
``before_layer`` hook, so ``model.lm`` keeps the stock module names and loads any
checkpoint of its family. What trains is declared once, in :data:`TRAINABLE_GROUPS`,
and the same predicate drives ``requires_grad``, the optimizer and checkpoints.
"""

from __future__ import annotations

import dataclasses

from dataclasses import MISSING, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

import adapters as _adapters

if not getattr(_adapters, "__mm_llama__", False):  # AdapterHub's `adapters` shadows ours
    raise ImportError(
        f"the `adapters` package imported from {getattr(_adapters, '__file__', '?')} is not mm-llama's; "
        "AdapterHub (`pip install adapters`) uses the same top-level name. "
        "Uninstall it (`pip uninstall adapters`) in this environment."
    )

from adapters import FusionEmbedding, GatedCrossAttention, MediaProjection, default_layer_positions  # noqa: E402
from adapters.cross_attention import ROW_MASK_MODES, init_cross_attention_  # noqa: E402
from adapters.prompt_reader import PromptReader, PromptReaderConfig  # noqa: E402
from adapters.speech_adapter import SpeechAdapter, SpeechAdapterConfig  # noqa: E402
from adapters.speech_fusion import SplicedInputs, splice_speech  # noqa: E402
from encoders import EncoderOutput, ImageEncoder, ImageEncoderConfig, MediaEncoder  # noqa: E402
from encoders.mllama_vision import MllamaVisionEncoder, MllamaVisionEncoderConfig, TiledImages  # noqa: E402
from encoders.speech import SpeechEncoder, SpeechEncoderConfig  # noqa: E402
from mm_llama.llama import KVCache, LlamaLM, SharedPrefix  # noqa: E402
from mm_llama.lm import freeze  # noqa: E402
from mm_llama.packing import PackedRows, packing_pays  # noqa: E402
from mm_llama.recompute import call_block  # noqa: E402
from mm_llama.static import must_stay_static  # noqa: E402
from mm_llama.video_adapter import VideoAdapter, VideoConfig  # noqa: E402

MEDIA_TOKENS: tuple[str, ...] = ("image", "video", "speech")
"""Placeholder tokens, in fusion-table order: ``<|image|>`` is id ``v``, ``<|video|>`` ``v+1``, ..."""

TRAINABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "image_encoder": ("image_encoder.",),
    "prompt_reader": ("prompt_reader.",),
    "projection": ("image_projection.", "prompt_projection."),
    "cross_attention": ("cross_attn.",),
    "fusion_embedding": ("fusion_embed.",),
    # The video branch (mm_llama/video_adapter.py); VIDEO_GROUPS lists these three.
    "temporal_aggregator": ("video.aggregator.",),
    "video_projection": ("video.projection.",),
    "video_cross_attention": ("video.cross_attn.",),
    "speech_encoder": ("speech_encoder.",),
    "speech_adapter": ("speech_adapter.",),
}
"""Parameter-name prefixes of each trainable group. The LM (``lm.``) is in none of them."""

IMAGE_ENCODERS: dict[type, type[MediaEncoder]] = {
    ImageEncoderConfig: ImageEncoder,
    MllamaVisionEncoderConfig: MllamaVisionEncoder,
}
"""Image encoder class by the type of :attr:`ModelConfig.image_encoder`."""

BF16_CPU_PACK_MULTIPLE = 32
"""Packed rows are padded to a multiple of this many tokens when matmuls run in bf16 on a CPU:
oneDNN's bf16 path keeps memory per distinct matrix shape, and a packed row's length changes every
step (60 default stage-2 steps: +680 MB with exact lengths, +190 MB with multiples of 32; fp32
levels off. Stop 18, benchmarks/RESULTS.md, "Image runs")."""

PROJECTIONS: tuple[str, ...] = ("linear_norm", "linear")
"""``linear_norm``: Linear + RMSNorm (default); ``linear``: Linear + bias only (Llama 3.2 Vision)."""


def _fill_new_fields(self, state: dict) -> None:
    """``__setstate__`` of the config dataclasses: fields added after an object was pickled
    get their defaults.

    Checkpoints carry these configs as pickled objects; pickle restores the saved
    ``__dict__`` without calling ``__init__``, so a checkpoint written before a field
    existed would otherwise load as an object that lacks it. (A method set on the class,
    not a mixin: jsonargparse handles only dataclasses whose every base is a dataclass.)
    """
    for f in fields(self):
        if f.name not in state:
            state[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
    self.__dict__.update(state)


@dataclass
class CrossAttentionConfig:
    """Placement and initialisation of the gated cross-attention blocks.

    Attributes:
        every: insert one block after every ``every`` decoder blocks (Llama 3: 4).
        layers: explicit decoder-layer indices (block inserted *before* each); overrides ``every``.
        hidden_dim: MLP width; ``None`` uses the LM's.
        gate_init: initial value of both tanh gates; 0 keeps the model equal to the text-only LM.
        output_scale: ``"residual_rms"`` multiplies each block's output by the frozen LM's
            typical residual-stream RMS at that depth (measured once at build time);
            ``"none"`` leaves it at 1.
        row_mask_mode: text rows that see no media: ``"both"`` zeroes their attention and
            MLP outputs (Meta's reference, torchtune); ``"mlp_only"`` zeroes only the MLP
            output, as ``transformers``' Mllama does (see ``GatedCrossAttention``).
    """

    every: int = 4
    layers: tuple[int, ...] | None = None
    hidden_dim: int | None = None
    gate_init: float = 0.0
    output_scale: str = "residual_rms"
    row_mask_mode: str = "both"

    def __post_init__(self) -> None:
        if self.row_mask_mode not in ROW_MASK_MODES:
            raise ValueError(f"row_mask_mode must be one of {ROW_MASK_MODES}, got {self.row_mask_mode!r}")
        if self.output_scale not in ("residual_rms", "none"):
            raise ValueError(f"output_scale must be 'residual_rms' or 'none', got {self.output_scale!r}")
        if self.every <= 0:
            raise ValueError(f"every must be > 0, got {self.every}")


@dataclass
class ModelConfig:
    """What a :class:`MultimodalLlama` is built from (besides the frozen LM itself).

    Attributes:
        image_encoder: the ViT encoder's config, or a :class:`MllamaVisionEncoderConfig`
            for Llama 3.2 Vision's tiled encoder (input :class:`TiledImages`); ``None`` builds
            no image branch.
        cross_attention: placement and behaviour of the gated cross-attention blocks.
        trainable: the groups of :data:`TRAINABLE_GROUPS` that train.
        projection: one of :data:`PROJECTIONS`.
        media_positions: add a learned vector per image-token position to the projected tokens
            (:class:`~adapters.projection.MediaProjection`; needs an encoder with a fixed token
            count, ``num_tokens``). A video's frames share them.
        fusion_rows: rows of the trainable special-token table after the frozen vocabulary
            (at least one per media token; Llama 3.2 Vision has 8).
        video: the video branch (temporal aggregator + video cross-attention); ``None``: an
            image-only model.
        speech_encoder: the Conformer; ``None``: no speech branch.
        speech_adapter: the speech adapter, fused as its ``fusion`` says.
        prompt_reader: images only: stage 1's caption decoder, reading each prompt against its
            image (:mod:`adapters.prompt_reader`); its state at the prompt's last row, projected
            (``prompt_projection``, in the ``projection`` group), is appended to the image's media
            tokens; with ``prompt_reader.every_row`` each text row instead sees the projected state
            at its own row (:class:`MediaContext` ``row_tokens``). ``None`` (default): the paper's model,
            media tokens from the image alone.
    """

    image_encoder: ImageEncoderConfig | MllamaVisionEncoderConfig | None = field(default_factory=ImageEncoderConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    trainable: tuple[str, ...] = tuple(TRAINABLE_GROUPS)
    projection: str = "linear_norm"
    media_positions: bool = False
    fusion_rows: int = len(MEDIA_TOKENS)
    video: VideoConfig | None = None
    speech_encoder: SpeechEncoderConfig | None = None
    speech_adapter: SpeechAdapterConfig = field(default_factory=SpeechAdapterConfig)
    prompt_reader: PromptReaderConfig | None = None

    def __post_init__(self) -> None:
        self.trainable = tuple(self.trainable)
        if self.prompt_reader is not None and (self.video is not None or self.image_encoder is None):
            raise ValueError("prompt_reader reads prompts against images: it needs image_encoder and no video branch")
        if (self.prompt_reader is not None and self.prompt_reader.every_row
                and self.cross_attention.row_mask_mode != "both"):
            raise ValueError('prompt_reader.every_row needs cross_attention.row_mask_mode="both"')
        if self.video is not None and self.image_encoder is None:
            raise ValueError("the video branch reads frames through the image encoder: image_encoder must be set")
        if self.image_encoder is not None and type(self.image_encoder) not in IMAGE_ENCODERS:
            raise ValueError(
                f"image_encoder must be one of {[c.__name__ for c in IMAGE_ENCODERS]}, "
                f"got {type(self.image_encoder).__name__}"
            )
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.fusion_rows < len(MEDIA_TOKENS):
            raise ValueError(f"fusion_rows must be >= {len(MEDIA_TOKENS)} (one per media token), "
                             f"got {self.fusion_rows}")
        unknown = set(self.trainable) - set(TRAINABLE_GROUPS)
        if unknown:
            raise ValueError(f"unknown trainable group(s) {sorted(unknown)}; known: {sorted(TRAINABLE_GROUPS)}")


def without_weight_files(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every file a part would load its weights from dropped (image encoder, temporal
    aggregator, speech encoder and adapter, prompt reader checkpoints).

    For a model rebuilt from a checkpoint that holds those weights itself: the files of the
    earlier stages that made them may have moved or be gone.
    """
    parts: dict[str, object] = {}
    for name, attr in (("image_encoder", "checkpoint"), ("video", "aggregator_checkpoint"),
                       ("speech_encoder", "checkpoint"), ("speech_adapter", "checkpoint"),
                       ("prompt_reader", "checkpoint")):
        part = getattr(cfg, name)
        if getattr(part, attr, None) is not None:
            parts[name] = dataclasses.replace(part, **{attr: None})
    return dataclasses.replace(cfg, **parts) if parts else cfg


CrossAttentionConfig.__setstate__ = _fill_new_fields
ImageEncoderConfig.__setstate__ = _fill_new_fields
ModelConfig.__setstate__ = _fill_new_fields
VideoConfig.__setstate__ = _fill_new_fields
SpeechAdapterConfig.__setstate__ = _fill_new_fields
PromptReaderConfig.__setstate__ = _fill_new_fields


@dataclass
class MediaContext:
    """Media encoded once and turned into every cross-attention block's K/V.

    ``kv[i]`` is ``(k, v)``, each ``[b, h_kv, s_e, h_d]``, for the block before decoder layer ``i``;
    ``mask`` is ``[b, s_e]`` bool. A video adds ``video_kv`` / ``video_mask``, the same for the
    video blocks over the aggregated tokens (``kv`` then holds every frame's tokens).
    ``row_tokens`` ``[b, s, d]``: per-row media aligned with the text rows they are used with (the
    prompt reader's reading at each row, ``PromptReaderConfig.every_row``); row ``j`` sees
    ``row_tokens[:, j]`` as one more media token of its own.
    """

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    video_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    video_mask: torch.Tensor | None = None
    row_tokens: torch.Tensor | None = None

    def with_row_tokens(self, row_tokens: torch.Tensor | None) -> MediaContext:
        """The same media with other per-row tokens ``[b, s, d]`` (e.g. a slice of them)."""
        return dataclasses.replace(self, row_tokens=row_tokens)

    def packed(self, rows: PackedRows) -> MediaContext:
        """The same media for the packed row of ``rows``: K/V ``[1, h_kv, b * s_e, h_d]`` and
        per-token masks ``[1, n, b * s_e]`` (each token sees its own sample's media)."""
        video = self.video_kv is not None
        return MediaContext(
            {i: rows.media_kv(kv) for i, kv in self.kv.items()},
            rows.media_mask(self.mask),
            {i: rows.media_kv(kv) for i, kv in self.video_kv.items()} if video else None,
            rows.media_mask(self.video_mask) if video else None,
            None if self.row_tokens is None else rows.pack(self.row_tokens),
        )


class MultimodalLlama(nn.Module):
    """A frozen Llama LM that reads images through gated cross-attention."""

    def __init__(self, lm: LlamaLM, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        self.lm = freeze(lm)
        lm_cfg = lm.cfg
        if cfg.image_encoder is not None:
            self.image_encoder = IMAGE_ENCODERS[type(cfg.image_encoder)](cfg.image_encoder)
            positions = 0
            if cfg.media_positions:
                positions = getattr(self.image_encoder, "num_tokens", None)
                if not isinstance(positions, int):
                    raise ValueError(f"media_positions needs an image encoder with a fixed token count; "
                                     f"{type(self.image_encoder).__name__} has none")
            self.image_projection = MediaProjection(self.image_encoder.out_dim, lm_cfg.dim, lm_cfg.norm_eps,
                                                    norm=cfg.projection == "linear_norm", positions=positions)
        self.prompt_reader = None
        if cfg.prompt_reader is not None:
            self.prompt_reader = PromptReader(cfg.prompt_reader, self.image_encoder.out_dim)
            self.prompt_projection = MediaProjection(self.prompt_reader.out_dim, lm_cfg.dim, lm_cfg.norm_eps)
        if cfg.speech_encoder is not None:
            self.speech_encoder = SpeechEncoder(cfg.speech_encoder)
            # Embedding fusion: frames sit among token embeddings, so start them at the table's scale.
            embed_rms = float(lm.embed_tokens.weight.pow(2).mean().sqrt())
            output_rms = embed_rms if cfg.speech_adapter.fusion == "embedding" else 1.0
            self.speech_adapter = SpeechAdapter(self.speech_encoder.out_dim, lm_cfg.dim, cfg.speech_adapter,
                                                output_rms=output_rms)
        self.fusion_embed = FusionEmbedding(lm_cfg.vocab_size, cfg.fusion_rows, lm_cfg.dim,
                                            init_std=float(lm.embed_tokens.weight.std()))
        xcfg = cfg.cross_attention
        positions = xcfg.layers if xcfg.layers is not None else default_layer_positions(lm_cfg.n_layers, xcfg.every)
        bad = [i for i in positions if not 0 <= i < lm_cfg.n_layers]
        if bad:
            raise ValueError(f"cross-attention layer indices {bad} are outside the LM's 0..{lm_cfg.n_layers - 1}")
        scales = self._residual_rms(positions) if xcfg.output_scale == "residual_rms" else {}
        self.cross_attn = nn.ModuleDict()
        for i in positions:
            block = GatedCrossAttention(
                lm_cfg.dim, lm_cfg.n_heads, lm_cfg.n_kv_heads, lm_cfg.resolved_head_dim,
                xcfg.hidden_dim or lm_cfg.hidden_dim, norm_eps=lm_cfg.norm_eps,
                gate_init=xcfg.gate_init, output_scale=scales.get(i, 1.0), row_mask_mode=xcfg.row_mask_mode,
            )
            init_cross_attention_(block)
            self.cross_attn[str(i)] = block
        self.video = None
        if cfg.video is not None:
            self.video = VideoAdapter(cfg.video, self.image_encoder.out_dim, self.image_encoder.num_tokens,
                                      lm_cfg, tuple(positions), scales)
        self.apply_trainable()

    # --- what trains -------------------------------------------------------------------
    def group_of(self, name: str) -> str | None:
        """The trainable group a parameter name belongs to (``None`` for the frozen LM)."""
        return next((g for g, prefixes in TRAINABLE_GROUPS.items() if name.startswith(prefixes)), None)

    def is_trainable(self, name: str) -> bool:
        """The single trainable-parameter predicate (requires_grad, optimizer, checkpoints)."""
        return self.group_of(name) in self.cfg.trainable

    def apply_trainable(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable(name))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers outside the frozen LM that belong to a trainable group."""
        state = self.state_dict()
        return {k: v for k, v in state.items() if self.group_of(k) is not None}

    def frozen_parts(self) -> dict[str, nn.Module]:
        """The parts outside the LM whose group is not in ``cfg.trainable`` (stage 1's encoder in
        stage 2, a pre-trained prompt reader), by attribute path (``"image_encoder"``, ``"video.aggregator"``)."""
        parts = {}
        for group, prefixes in TRAINABLE_GROUPS.items():
            if group in self.cfg.trainable:
                continue
            for prefix in prefixes:
                try:
                    parts[prefix.rstrip(".")] = self.get_submodule(prefix.rstrip("."))
                except AttributeError:  # this model has no such part
                    pass
        return parts

    @property
    def grad_checkpointing(self) -> bool:
        """Whether training recomputes blocks in backward (:meth:`set_grad_checkpointing`)."""
        return self.lm.grad_checkpointing

    def set_grad_checkpointing(self, enabled: bool = True, every: int = 1) -> None:
        """Activation checkpointing of the LM's decoder blocks and of the cross-attention blocks.

        Under autograd each such block keeps only its inputs and runs again in backward: the
        frozen LM's activations, most of a step's memory, are no longer held (one more forward
        of every block per step). The same blocks as ``AdapterFSDPStrategy(activation_checkpointing=True)``
        (:func:`~mm_llama.training.scale.checkpointed_blocks`), without FSDP. Losses and gradients
        are unchanged; parameter names too (no wrapper modules).

        ``every=n`` recomputes only decoder blocks ``0, n, 2n, ...`` (and every cross-attention
        block): memory and time in between, roughly in proportion.

        Every block of a media encoder that trains (:meth:`media_encoders`, e.g. the ViT and its
        global blocks when ``image_encoder`` is in ``cfg.trainable``) is recomputed too, whatever
        ``every``; a frozen encoder keeps nothing for backward and is left alone.
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"set_grad_checkpointing(every=...) is a block interval >= 1, got {every!r}")
        self.lm.grad_checkpointing = enabled
        self.lm.checkpoint_every = every
        for encoder in self.media_encoders().values():
            encoder.set_grad_checkpointing(enabled and encoder.trains())

    def set_checkpoint_interval(self, interval: int) -> None:
        """:meth:`set_grad_checkpointing` from one integer, as the command-line flags give it:
        ``0`` off, ``n >= 1`` every n-th decoder block (``1``: all of them)."""
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f"a checkpoint interval is an integer >= 0, got {interval!r}")
        self.set_grad_checkpointing(interval > 0, every=max(interval, 1))

    def media_encoders(self) -> dict[str, MediaEncoder]:
        """This model's media encoders by attribute name (``image_encoder``, which the video branch
        shares, and ``speech_encoder``)."""
        names = ("image_encoder", "speech_encoder")
        return {name: getattr(self, name) for name in names if isinstance(getattr(self, name, None), MediaEncoder)}

    def train(self, mode: bool = True) -> MultimodalLlama:
        """Train mode for the trainable parts; the LM and :meth:`frozen_parts` stay in eval mode
        (no dropout, no SpecAugment: a frozen part computes what it will compute at test time)."""
        super().train(mode)
        self.lm.eval()
        for part in self.frozen_parts().values():
            part.eval()
        return self

    # --- ids ---------------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        """The media this model has a branch for, in :data:`MEDIA_TOKENS` order (e.g. ``("image", "video")``)."""
        has = {"image": self.cfg.image_encoder is not None, "video": self.video is not None,
               "speech": self.cfg.speech_encoder is not None}
        return tuple(m for m in MEDIA_TOKENS if has[m])

    def media_token_id(self, modality: str = "image") -> int:
        """Id of ``<|modality|>`` in the fusion table (just past the frozen vocabulary)."""
        if modality not in MEDIA_TOKENS:
            raise ValueError(f"unknown modality {modality!r}; known: {MEDIA_TOKENS}")
        return self.lm.cfg.vocab_size + MEDIA_TOKENS.index(modality)

    # --- forward -----------------------------------------------------------------------
    @torch.no_grad()
    def _residual_rms(self, positions) -> dict[int, float]:
        """Typical RMS of the frozen LM's residual stream entering each given layer.

        Measured on a fixed chat-formatted sentence (or random ids without a tokenizer);
        the median over tokens, so that attention-sink tokens do not dominate.
        """
        tok = self.lm.tokenizer
        if tok is not None:
            text = tok.apply_chat_template(
                [{"role": "user", "content": "Describe the image."},
                 {"role": "assistant", "content": "A red square in the top left and a blue circle."}]
            )
            ids = torch.tensor([tok.encode(text)], device="cpu")
        else:  # drawn on the CPU (also under a `torch.device("cuda")` context): the same ids everywhere
            ids = torch.randint(0, self.lm.cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0),
                                device="cpu")
        rms: dict[int, float] = {}

        def record(i: int, h: torch.Tensor) -> torch.Tensor:
            if i in positions:
                rms[i] = float(h[0, 1:].pow(2).mean(-1).sqrt().median())
            return h

        self.lm.decode(self.lm.embed(ids.to(self.lm.embed_tokens.weight.device)), before_layer=record)
        return rms

    def encode_images(self, images: torch.Tensor | TiledImages,
                      prompts: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [b, 3, H, W]`` (or :class:`TiledImages` for the tiled encoder) → media
        tokens ``[b, s_e, d]`` and mask ``[b, s_e]``.

        With a prompt reader (``ModelConfig.prompt_reader``) ``prompts`` is required: right-padded
        ids ``[b, s]`` and lengths ``[b]`` (:func:`~adapters.prompt_reader.pad_prompts`), each
        prompt ending where the answer starts; one more token, the reader's, follows the image's
        (``[b, s_e + 1, d]``).
        """
        out = self.image_encoder(images)
        tokens, mask = self.image_projection(out.tokens), out.mask
        if self.prompt_reader is None or self.reads_every_row:
            return tokens, mask
        if prompts is None:
            raise ValueError("this model reads each prompt against its image (ModelConfig.prompt_reader): "
                             "pass prompts=(ids [b, s], lengths [b])")
        ids, lengths = prompts
        read = self.prompt_projection(self.prompt_reader(ids, lengths, out.tokens, out.mask))  # [b, d]
        return torch.cat([tokens, read[:, None].to(tokens.dtype)], 1), torch.cat([mask, mask[:, :1]], 1)

    def encode_speech(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``audio [b, n]`` 16 kHz (``lengths [b]``) → speech frames ``[b, s_e, d]`` and mask ``[b, s_e]``."""
        if self.cfg.speech_encoder is None:
            raise ValueError("this model has no speech branch: build it with ModelConfig(speech_encoder=...)")
        out = self.speech_encoder(audio, lengths)
        return self.speech_adapter(out.tokens, out.mask)

    def splice_speech(
        self,
        input_ids: torch.Tensor,
        audio: torch.Tensor,
        lengths: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        left_pad: bool = False,
    ) -> SplicedInputs:
        """Embedding fusion: the LM input with each ``<|speech|>`` replaced by its speech frames."""
        frames, mask = self.encode_speech(audio, lengths)
        embeds = self.fusion_embed(input_ids, self.lm.embed_tokens)  # [b, s, d]
        return splice_speech(embeds, input_ids, self.media_token_id("speech"), frames, mask,
                             attention_mask=attention_mask, labels=labels, left_pad=left_pad)

    def speech_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, audio: torch.Tensor,
                    lengths: torch.Tensor, *, share_prefix: bool = True) -> torch.Tensor:
        """Response-token CE with speech fused as ``cfg.speech_adapter.fusion`` says.

        ``input_ids``/``labels`` ``[b, s]`` right-padded, one ``<|speech|>`` each; ``audio [b, n]``.
        """
        if self.cfg.speech_adapter.fusion == "embedding":
            spliced = self.splice_speech(input_ids, audio, lengths, labels=labels)
            # Right padding: causal attention keeps real positions from seeing pads, no mask needed.
            hidden = self.lm.decode(spliced.embeds, positions=spliced.positions)
            return labeled_cross_entropy(hidden, spliced.labels, self.lm.output_weight)
        return self.labeled_loss(input_ids, labels, self.media_kv(*self.encode_speech(audio, lengths)),
                                 share_prefix=share_prefix)

    def media_context(self, images: torch.Tensor | TiledImages,
                      prompts: tuple[torch.Tensor, torch.Tensor] | None = None) -> MediaContext:
        """Encode media once and compute every cross-attention block's K/V (``prompts``: see
        :meth:`encode_images`)."""
        return self.media_kv(*self.encode_images(images, prompts))

    @property
    def reads_every_row(self) -> bool:
        """Whether each text row sees the prompt reader's state at its own row (``every_row``)."""
        return self.prompt_reader is not None and self.prompt_reader.cfg.every_row

    def read_rows(self, ids: torch.Tensor, encoded: EncoderOutput) -> torch.Tensor:
        """The prompt reader's projected state at every row of ``ids [b, s]`` (each text from
        column 0), reading the image encoder's output ``encoded``: ``[b, s, d]``."""
        return self.prompt_projection(self.prompt_reader.rows(ids, encoded.tokens, encoded.mask))

    def reading_context(self, images: torch.Tensor, text: torch.Tensor) -> MediaContext:
        """:meth:`media_context` of ``images`` plus the reader's row tokens of ``text [b, s]`` (each
        from column 0), encoding the images once (``PromptReaderConfig.every_row``)."""
        out = self.image_encoder(images)
        context = self.media_kv(self.image_projection(out.tokens), out.mask)
        return context.with_row_tokens(self.read_rows(text, out))

    def video_context(self, videos: torch.Tensor, frame_mask: torch.Tensor | None = None) -> MediaContext:
        """Encode clips for both kinds of blocks.

        ``videos [b, f, 3, H, W]``, ``frame_mask [b, f]`` (True = real frame; ``None``: all real).
        The image blocks get every frame's tokens ``[b, f * s_f, d]`` as one set; the video
        blocks the aggregated tokens ``[b, g * n_l, d]``.
        """
        if self.video is None:
            raise ValueError("this model has no video branch (ModelConfig.video is None)")
        b, f = videos.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(b, f, dtype=torch.bool, device=videos.device)
        out = self.image_encoder(videos.flatten(0, 1))  # tokens [b * f, s_f, d_e]
        frames = out.tokens.view(b, f, *out.tokens.shape[1:])  # [b, f, s_f, d_e]
        s_f = frames.shape[2]
        image_tokens = self.image_projection(frames).flatten(1, 2)  # [b, f * s_f, d]
        image_mask = (out.mask.view(b, f, s_f) & frame_mask[:, :, None]).flatten(1)  # [b, f * s_f]
        video_tokens, video_mask = self.video(frames, frame_mask)  # [b, g * n_l, d], [b, g * n_l]
        context = self.media_kv(image_tokens, image_mask)
        context.video_kv, context.video_mask = self.video.media_kv(video_tokens), video_mask
        return context

    def media_kv(self, media: torch.Tensor, mask: torch.Tensor) -> MediaContext:
        """Every cross-attention block's K/V of encoded ``media [b, s_e, d]`` (``mask [b, s_e]``)."""
        return MediaContext({int(i): blk.media_kv(media) for i, blk in self.cross_attn.items()}, mask)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        media: MediaContext | None,
        *,
        row_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | SharedPrefix | None = None,
    ) -> torch.Tensor:
        """``input_ids [b, s]`` → final-normed hidden ``[b, s, d]``.

        ``row_mask [b, s]`` marks text rows that see media; by default, rows at or after
        the sample's first media placeholder. ``media=None`` is the text-only path.
        ``attn_mask`` replaces the causal self-attention mask (see :meth:`LlamaLM.decode`).
        """
        hidden = self.fusion_embed(input_ids, self.lm.embed_tokens)  # [b, s, d]
        hook = None
        if media is not None and len(self.cross_attn):
            if row_mask is None:
                row_mask = self.media_rows(input_ids)

            recompute = self.grad_checkpointing and torch.is_grad_enabled()

            def run(block: nn.Module, *args) -> torch.Tensor:
                return call_block(block, *args, recompute=recompute)

            def hook(i: int, h: torch.Tensor) -> torch.Tensor:
                if media.video_kv is not None and i in media.video_kv:  # a video block runs before the image one
                    h = run(self.video.cross_attn[str(i)], h, media.video_kv[i], media.video_mask, row_mask).to(h.dtype)
                blk = self.cross_attn[str(i)] if str(i) in self.cross_attn else None
                if blk is None:
                    return h
                row_kv = None if media.row_tokens is None else blk.media_kv(media.row_tokens)
                # The block computes in its own dtype (fp32 adapters); the frozen LM's residual
                # stream stays in the LM's (bf16 with AdapterModule(lm_dtype="bfloat16")).
                return run(blk, h, media.kv[i], media.mask, row_mask, row_kv).to(h.dtype)

        return self.lm.decode(hidden, positions=positions, key_padding_mask=key_padding_mask,
                              attn_mask=attn_mask, cache=cache, before_layer=hook)

    def media_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` bool: rows at or after the first media placeholder of their sample."""
        is_media = input_ids >= self.lm.cfg.vocab_size
        return is_media.long().cumsum(dim=1) > 0

    def _context(self, images: torch.Tensor | TiledImages | None, videos: torch.Tensor | None,
                 frame_mask: torch.Tensor | None, prompts: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> MediaContext | None:
        if images is not None and videos is not None:
            raise ValueError("give images or videos, not both")
        if videos is not None:
            return self.video_context(videos, frame_mask)
        return self.media_context(images, prompts) if images is not None else None

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | TiledImages | None = None, *,
                videos: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
                prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids [b, s]``, ``images [b, 3, H, W]`` or ``videos [b, f, 3, H, W]`` (with
        ``frame_mask [b, f]``) → logits ``[b, s, v]`` (all positions).

        ``prompt_lengths [b]``: with a prompt reader, how many leading columns of each row it
        reads (default: the whole row)."""
        prompts = None
        if self.reads_every_row and images is not None:
            return self.lm.logits(self.hidden_states(input_ids, self.reading_context(images, input_ids)))
        if self.prompt_reader is not None and images is not None:
            if prompt_lengths is None:
                prompt_lengths = torch.full((len(input_ids),), input_ids.shape[1], device=input_ids.device)
            prompts = (input_ids, prompt_lengths)
        return self.lm.logits(self.hidden_states(input_ids, self._context(images, videos, frame_mask, prompts)))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, images: torch.Tensor | None = None, *,
             videos: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
             share_prefix: bool = True, pack: bool = True, max_labeled: int | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over labeled positions (``labels [b, s]``, -100 = none).

        A prompt reader reads each row up to its first labeled column: the prompt, never the answer
        (with ``every_row``, each row reads up to itself: causal, as the LM).

        ``max_labeled``: the static form a CUDA graph can capture (:mod:`mm_llama.static`): no
        shared prefix, no packing, and the loss's rows gathered into exactly ``max_labeled``
        (at least the batch's labelled count; see :func:`labeled_cross_entropy`)."""
        kw = dict(share_prefix=share_prefix, pack=pack, max_labeled=max_labeled)
        prompts = None
        if self.reads_every_row and images is not None:
            return self.labeled_loss(input_ids, labels, self.reading_context(images, input_ids), **kw)
        if self.prompt_reader is not None and images is not None:
            prompts = (input_ids, prompt_lengths(labels))
        return self.labeled_loss(input_ids, labels, self._context(images, videos, frame_mask, prompts), **kw)

    def _pack_multiple(self, device: torch.device) -> int:
        """Length multiple of a packed row: :data:`BF16_CPU_PACK_MULTIPLE` where matmuls run in
        bf16 on a CPU (a bf16 LM, or autocast), whose memory grows with every new shape; else 1."""
        bf16 = self.lm.embed_tokens.weight.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return BF16_CPU_PACK_MULTIPLE if device.type == "cpu" and bf16 else 1

    @property
    def _packable(self) -> bool:
        """Packed rows need every block in ``row_mask_mode="both"``: in ``"mlp_only"`` (Mllama's)
        a row that sees no media still reads its own sample's media, which a packed row's
        per-token mask cannot single out."""
        return all(m.row_mask_mode == "both" for m in self.modules() if isinstance(m, GatedCrossAttention))

    def labeled_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, media: MediaContext | None, *,
                     share_prefix: bool = True, pack: bool = True, max_labeled: int | None = None) -> torch.Tensor:
        """:meth:`loss` on encoded ``media``, computing only what the loss reads.

        - The columns every row shares before its media (the chat header) go through the
          frozen LM once, for one row (:class:`SharedPrefix`): ~25 % less LM compute for the
          built-in prompts. ``share_prefix=False`` always runs the plain forward: under FSDP
          every rank must run the same module calls, and whether a batch shares a prefix
          depends on its data.
        - ``pack``: the rows, each cut after its last labelled column, run end to end as one
          row without padding (:mod:`mm_llama.packing`), when :func:`packing_pays`.

        Both give the plain forward's loss and gradients up to float rounding (tested).
        ``input_ids``/``labels`` ``[b, s]``, right-padded. ``max_labeled`` (the static form,
        :meth:`loss`) turns both off: their shapes depend on the batch's values.
        """
        if max_labeled is not None:
            share_prefix = pack = False
        p = shared_prefix_length(input_ids, labels, self.lm.cfg.vocab_size) if share_prefix else 0
        prefix = None
        if p:
            prefix = SharedPrefix.compute(self.lm, self.fusion_embed(input_ids[:1, :p], self.lm.embed_tokens))
        ids, labels, row_mask = input_ids[:, p:], labels[:, p:], self.media_rows(input_ids)[:, p:]
        if media is not None and media.row_tokens is not None:
            media = media.with_row_tokens(media.row_tokens[:, p:])
        rows = None
        if pack and ids.shape[0] > 1 and self._packable:
            rows = PackedRows.from_labels(labels, multiple=self._pack_multiple(ids.device))
        if rows is not None and packing_pays(self.lm.cfg, rows, past=p):
            hidden = self.hidden_states(rows.pack(ids), None if media is None else media.packed(rows),
                                        row_mask=rows.pack(row_mask), positions=rows.positions(p),
                                        attn_mask=rows.attention_mask(p), cache=prefix)
            return labeled_cross_entropy(hidden, rows.labels(labels), self.lm.output_weight)
        hidden = self.hidden_states(ids, media, row_mask=row_mask, cache=prefix)
        return labeled_cross_entropy(hidden, labels, self.lm.output_weight, max_labeled=max_labeled)


def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    """``[b]``: columns of each row of ``labels [b, s]`` before its first labeled one (the prompt).

    Raises ``ValueError`` for a row with no label, or one labeled from column 0 (no prompt),
    except under :func:`~mm_llama.static.static_shapes` or a capture, which cannot read the test.
    """
    labeled = labels != -100  # [b, s]
    first = labeled.long().argmax(1)  # [b]
    if must_stay_static(labels):
        return first
    if not bool(labeled.any(1).all()):
        raise ValueError("a row has no labeled position: the prompt reader cannot tell where its prompt ends")
    if bool((first == 0).any()):
        raise ValueError("a row is labeled from column 0: it has no prompt for the prompt reader")
    return first


def shared_prefix_length(input_ids: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> int:
    """Leading columns of ``input_ids [b, s]`` that are the same text token in every row,
    unlabeled, and followed by at least one more column: what :class:`SharedPrefix` can skip.

    Labels ``[b, s]`` are next-token targets read from the previous column, so the column
    after the prefix must be unlabeled too. Batches of one row share nothing worth caching.
    """
    b, s = input_ids.shape
    if b < 2 or s < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] < vocab_size)  # [s]
    unlabeled = (labels == -100).all(0)  # [s]
    ok = same[:-1] & unlabeled[:-1] & unlabeled[1:]  # column j can be prefix if j+1 is unlabeled too
    return int(ok.long().cumprod(0).sum())


def labeled_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, chunk: int = 4096,
    max_labeled: int | None = None,
) -> torch.Tensor:
    """Next-token CE computed only where a label exists.

    ``hidden [b, s, d]`` predicts ``labels[:, 1:]``; positions labeled -100 never get
    logits, and the labeled ones are projected ``chunk`` rows at a time, so peak memory
    is ``chunk x v`` instead of ``b x s x v``.

    ``max_labeled``: take exactly that many rows, the labelled positions first in order, then
    unlabelled ones, which the loss ignores: fixed shapes and no host read, the form a CUDA
    graph can capture (:mod:`mm_llama.static`). It must be at least the batch's labelled count;
    outside :func:`~mm_llama.static.static_shapes` and capture, a smaller one is rejected.
    """
    if max_labeled is not None:
        return _static_labeled_cross_entropy(hidden, labels, weight, chunk, max_labeled)
    targets = labels[:, 1:]
    keep = targets != -100  # [b, s-1]
    h = hidden[:, :-1][keep]  # [n, d]
    y = targets[keep]  # [n]
    if y.numel() == 0:
        raise ValueError("batch has no labeled positions: every label is -100")
    total = hidden.new_zeros(())
    for start in range(0, y.numel(), chunk):
        logits = F.linear(h[start : start + chunk], weight).float()  # [n_chunk, v]
        total = total + F.cross_entropy(logits, y[start : start + chunk], reduction="sum")
    return total / y.numel()


def _static_labeled_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, chunk: int, max_labeled: int
) -> torch.Tensor:
    targets = labels[:, 1:].flatten()  # [b * (s-1)]
    keep = targets != -100
    if not 0 < max_labeled <= targets.numel():
        raise ValueError(f"max_labeled must be in 1..{targets.numel()} (the batch's positions), got {max_labeled}")
    if not must_stay_static(labels):
        n = int(keep.sum())
        if n == 0:
            raise ValueError("batch has no labeled positions: every label is -100")
        if n > max_labeled:
            raise ValueError(f"batch has {n} labeled positions, more than max_labeled={max_labeled}")
    # A stable sort puts the labelled positions first, in order: the same rows, in the same
    # order, as the boolean gather above, padded with unlabelled ones (target -100, ignored).
    rows = torch.argsort((~keep).to(torch.uint8), stable=True)[:max_labeled]  # [n_max]
    h = hidden[:, :-1].flatten(0, 1).index_select(0, rows)  # [n_max, d]
    y = targets.index_select(0, rows)  # [n_max]
    total = hidden.new_zeros(())
    for start in range(0, max_labeled, chunk):
        logits = F.linear(h[start : start + chunk], weight).float()  # [n_chunk, v]
        total = total + F.cross_entropy(logits, y[start : start + chunk], reduction="sum")
    return total / keep.sum().clamp(min=1)
