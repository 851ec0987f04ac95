"""Our ``MultimodalLlama`` against ``transformers``' ``MllamaForConditionalGeneration``, same sizes.

Both models are built randomly initialised (speed and memory do not depend on the
values) with one shape:

* text: SmolLM2-135M (width 576, 30 self-attention layers, 9 heads / 3 KV heads, FFN 1536,
  vocabulary 49152, RoPE theta 1e5, tied embeddings) with a gated cross-attention block
  after every 4th self-attention layer (7 blocks; HF counts them in its layer list, so its
  ``cross_attention_layers`` are ``[3, 8, 13, 18, 23, 28, 33]`` of 37 layers);
* vision: a plain ViT (112 px images, 16 px patches, width 192, 6 blocks, 3 heads, MLP 768,
  intermediate layers 1 and 3 concatenated with the final output → 576 dims per token,
  2 gated "global" blocks, class token kept: 50 media tokens); HF with one tile
  (``max_num_tiles=1``);
* trainable: vision encoder, projector and cross-attention blocks; the LM's self-attention
  layers, embeddings, final norm and head frozen. Both use ``torch.optim.AdamW``.

The batch is chat-like: ``<|im_start|>user\\n<|image|>`` then prompt tokens, then a response
whose ``--response-len`` tokens are the only labelled ones; rows before the image see no media.
``--ragged`` gives the rows random lengths (right padding, HF gets the ``attention_mask``): ours
then packs them (``mm_llama/packing.py``), HF computes the padding.

Each model lives in its own subprocess (``--worker``), so peak RSS is its own; the parent
drives both one step (or one generation) at a time, alternating which goes first, so that
load from elsewhere on a shared machine falls on both alike:

* ``step_s``: median wall time of a training step (gradients set to ``None``, forward, loss,
  backward, AdamW step) after ``--warmup`` unmeasured steps;
* ``peak_rss_mb``: the process's peak resident set from start through the training steps
  (Python + torch + the model + training);
* ``train_increment_mb``: the training steps' peak RSS minus the RSS of the loaded model just
  before them (Linux: the high-water mark is reset through ``/proc/self/clear_refs``), i.e.
  the memory the training step itself needs: activations, gradients, optimizer state;
* ``saved_activation_mb``: what autograd saves for backward in one forward + loss (distinct
  storages, weights excluded): the activation memory, exact and independent of machine load;
* ``matmul_peak_fraction``: FLOPs of one step (``torch.utils.flop_counter``) per second of
  median step time, over the matmul peak of this machine (``train_step.matmul_peak_flops``; fp32,
  or bf16 with ``--precision bf16-mixed``: on a GPU this is the model FLOPs utilisation, MFU);
* generation: greedy, the same prompt, exactly ``--new-tokens`` tokens (no early stop), KV
  cache on in both (HF's ``generate`` caches the cross-attention K/V of the image in its
  cache; ours computes them once per request). On CUDA ours decodes with its default, one
  CUDA graph replayed per token (:class:`mm_llama.generation.StaticStep`); HF with its default,
  eager steps over a dynamic cache, or with ``--hf-static-cache`` its fixed-shape cache
  (``cache_implementation="static"``, under which ``transformers`` may compile its forward).
  ``decode_tokens_per_s`` is
  ``b * (n - 1) / (t_last_token - t_first_token)``, ``e2e_tokens_per_s`` is ``b * n`` over the
  whole call (image encoding and prefill included); medians over ``--repeats``.

The last line of output is one JSON object: ``train_step_speedup`` (HF step time / ours),
``peak_memory_ratio`` (ours / HF ``train_increment_mb``), ``peak_rss_ratio`` (ours / HF
``peak_rss_mb``), ``generate_speedup`` (ours / HF decode tokens/s at batch 1),
``generate_speedup_b<k>`` / ``generate_e2e_speedup_b<k>`` for every batch size, and the raw
figures of both models under ``ours`` and ``hf``. ``--torchtune`` adds torchtune's
``llama3_2_vision`` builders at the same sizes (same ratios under ``torchtune``); it needs an
interpreter that imports torchtune (``--torchtune-python``). ``--ours-checkpointing [N]`` and
``--hf-checkpointing [N]`` recompute each side's blocks in backward (activation checkpointing:
memory for time; ``N``: every N-th block only)::

    python benchmarks/vs_hf_mllama.py [--batch-size 8] [--seq-len 128] [--steps 5] [--new-tokens 32] [--quick]
    python benchmarks/vs_hf_mllama.py --device cuda --precision bf16-mixed   # on a GPU: memory is the GPU's
    python benchmarks/vs_hf_mllama.py --ours-checkpointing [--hf-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The workers import train_step (and through it the model code) when they need it: the parent
# only drives them, and importing the model there would hold up their start by seconds.
sys.path.insert(0, str(Path(__file__).resolve().parent))

IMPLEMENTATIONS = ("ours", "hf", "torchtune")


@dataclass(frozen=True)
class VisionSizes:
    """The shared ViT: ``g = (image_size / patch_size)^2`` patches plus one class token."""

    image_size: int = 112
    patch_size: int = 16
    width: int = 192
    depth: int = 6
    heads: int = 3
    intermediate_layers: tuple[int, ...] = (1, 3)
    global_layers: int = 2

    @property
    def out_dim(self) -> int:
        """``d_e``: final output plus every intermediate layer, concatenated."""
        return self.width * (1 + len(self.intermediate_layers))


@dataclass(frozen=True)
class Batch:
    """One training batch and one generation prompt, in the shared id space.

    ``ids [b, s]`` (the image placeholder at ``image_pos``, id = text vocabulary size),
    ``labels [b, s]`` (-100 except the response), ``images [b, 3, H, W]``, ``prompt_len``:
    the generation prompt is ``ids[:, :prompt_len]``.
    """

    ids: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor
    image_pos: int
    prompt_len: int
    attention_mask: torch.Tensor | None = None  # [b, s], 0 on right padding (``--ragged``)

    def to(self, device: str) -> "Batch":
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(self.ids.to(device), self.labels.to(device), self.images.to(device), self.image_pos,
                     self.prompt_len, mask)


IMAGE_POS = 3  # after "<|im_start|>", "user", "\n"


PAD_ID = 2


def make_batch(b: int, s: int, response_len: int, vocab: int, image_size: int, seed: int = 0,
               ragged: bool = False) -> Batch:
    """A chat-like batch: ``<|im_start|>user\\n<|image|> prompt ... <|im_start|>assistant\\n response``.

    ``ragged``: row lengths drawn uniformly from ``[s // 2, s]`` (the first row ``s``), each row
    right-padded with an ``attention_mask``, its response at the end of its own tokens, as the
    rows of a real batch (the built-in data's stage-2 batches are ~70 % real tokens).
    """
    if not IMAGE_POS < s - response_len - 2:
        raise ValueError(f"seq_len {s} leaves no prompt before a response of {response_len} tokens")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)  # [b, s]
    ids[:, IMAGE_POS] = vocab  # <|image|>: one past the frozen vocabulary in both models
    lengths = torch.full((b,), s)
    if ragged:
        shortest = max(s // 2, IMAGE_POS + response_len + 3)
        lengths = torch.randint(shortest, s + 1, (b,), generator=g)
        lengths[0] = s
    labels = torch.full_like(ids, -100)
    for r, n in enumerate(lengths.tolist()):
        labels[r, n - response_len : n] = ids[r, n - response_len : n]  # the response only
        ids[r, n:] = PAD_ID
    images = torch.randn(b, 3, image_size, image_size, generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).long() if ragged else None
    return Batch(ids, labels, images, IMAGE_POS, s - response_len, mask)


# --- the two models -------------------------------------------------------------------------
class Runner:
    """One implementation behind a common interface: ``loss``, ``generate``, parameter groups,
    and the training step (by default eager: loss, backward, ``torch.optim.AdamW`` step)."""

    model: torch.nn.Module

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable(), lr=1e-4, weight_decay=0.01)

    def train_step(self, opt: torch.optim.Optimizer, batch: Batch, autocast: torch.autocast) -> None:
        # The last step's gradients go before the forward, where the activations peak: the order of
        # HF's Trainer (zero_grad after each step) and of GraphedTrainStep.
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = self.loss(batch)
        loss.backward()
        opt.step()

    def generate(self, batch: Batch, b: int, new_tokens: int, on_token) -> None:
        raise NotImplementedError

    def param_groups(self) -> dict[str, int]:
        """Trainable parameter counts by part (``vision``, ``projector``, ``cross_attention``, ``other``)."""
        raise NotImplementedError

    def to(self, device: str) -> None:
        self.model.to(device)


class OursRunner(Runner):
    """Ours; ``graph``: its training step through :class:`GraphedTrainStep` (one CUDA graph
    replayed per step on a GPU; elsewhere the same static step, eager); ``checkpointing``: the
    decoder and cross-attention blocks recomputed in backward (``set_grad_checkpointing``; ``n``:
    every n-th decoder block, 0: none)."""

    def __init__(self, vision: VisionSizes, graph: bool = False, checkpointing: int = 0) -> None:
        from encoders import ImageEncoderConfig
        from mm_llama.config import LlamaConfig
        from mm_llama.llama import LlamaLM
        from mm_llama.lm import freeze
        from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama

        lm = freeze(LlamaLM(LlamaConfig()))  # LlamaConfig's defaults are SmolLM2-135M's shape
        encoder = ImageEncoderConfig(
            backbone="timm:vit_tiny_patch16_224", image_size=vision.image_size, patch_size=vision.patch_size,
            depth=vision.depth, width=vision.width, heads=vision.heads,
            intermediate_layers=vision.intermediate_layers, n_global_layers=vision.global_layers,
            drop_cls=False,  # HF keeps the class token among the media tokens
        )
        # The fusion embedding of <|image|> stays frozen, like HF's (its image token is a row of
        # the frozen table): only the encoder, projector and cross-attention blocks train.
        cfg = ModelConfig(image_encoder=encoder, cross_attention=CrossAttentionConfig(every=4),
                          trainable=("image_encoder", "projection", "cross_attention"))
        self.model = MultimodalLlama(lm, cfg)
        self.model.set_checkpoint_interval(int(checkpointing))
        self.graph = graph
        self.autocast_dtype: torch.dtype | None = None  # set by the worker: bf16 under --precision bf16-mixed
        self.step = None  # the GraphedTrainStep, built at the first training step

    def loss(self, batch: Batch) -> torch.Tensor:
        if self.graph:  # the static form the captured step runs, also for the FLOP and activation counts
            n = int((batch.labels[:, 1:] != -100).sum())
            return self.model.loss(batch.ids, batch.labels, batch.images, max_labeled=n)
        return self.model.loss(batch.ids, batch.labels, batch.images)

    def optimizer(self) -> torch.optim.Optimizer:
        if not self.graph:
            return super().optimizer()
        # The same AdamW, its step count kept on the device so that a CUDA graph can capture it.
        cuda = self.trainable()[0].is_cuda
        return torch.optim.AdamW(self.trainable(), lr=1e-4, weight_decay=0.01, capturable=cuda)

    def train_step(self, opt: torch.optim.Optimizer, batch: Batch, autocast: torch.autocast) -> None:
        if not self.graph:
            return super().train_step(opt, batch, autocast)
        if self.step is None:
            from mm_llama.training.graphed_step import GraphedTrainStep

            n = int((batch.labels[:, 1:] != -100).sum())  # the benchmark's batch never changes
            self.step = GraphedTrainStep(
                lambda ids, labels, images: self.model.loss(ids, labels, images, max_labeled=n), opt,
                dict(ids=batch.ids, labels=batch.labels, images=batch.images),
                autocast_dtype=self.autocast_dtype)
        self.step(ids=batch.ids, labels=batch.labels, images=batch.images)

    def generate(self, batch: Batch, b: int, new_tokens: int, on_token) -> None:
        from mm_llama.generation import generate

        prompts = batch.ids[:b, : batch.prompt_len].tolist()
        generate(self.model, prompts, batch.images[:b], max_new_tokens=new_tokens, on_token=on_token)

    def param_groups(self) -> dict[str, int]:
        parts = {"image_encoder": "vision", "projection": "projector", "cross_attention": "cross_attention"}
        counts = dict.fromkeys(("vision", "projector", "cross_attention", "other"), 0)
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                counts[parts.get(self.model.group_of(name), "other")] += p.numel()
        return counts


def hf_cross_attention_layers(n_self: int, every: int) -> list[int]:
    """Indices of the cross-attention layers in HF's combined layer list.

    Ours sits before self-attention layer ``p_j = every*(j+1) - 1``; in a list where the
    ``j`` earlier cross layers also count, that is index ``p_j + j``.
    """
    return [p + j for j, p in enumerate(range(every - 1, n_self, every))]


class HFRunner(Runner):
    """HF's Mllama; ``checkpointing``: its ``activation_checkpointing_enable`` (non-reentrant, as ours),
    which recomputes every decoder layer, self- and cross-attention (not the vision layers, as ours);
    ``n``: every n-th layer of its combined list (``every_n_layers``), 0: none."""

    def __init__(self, vision: VisionSizes, checkpointing: int = 0) -> None:
        from transformers import MllamaConfig, MllamaForConditionalGeneration

        from mm_llama.config import LlamaConfig

        t = LlamaConfig()
        cross = hf_cross_attention_layers(t.n_layers, 4)
        config = MllamaConfig(
            vision_config=dict(
                image_size=vision.image_size, patch_size=vision.patch_size, hidden_size=vision.width,
                num_hidden_layers=vision.depth, num_global_layers=vision.global_layers,
                attention_heads=vision.heads, intermediate_size=4 * vision.width,
                intermediate_layers_indices=list(vision.intermediate_layers), vision_output_dim=vision.out_dim,
                max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
            ),
            text_config=dict(
                vocab_size=t.vocab_size, hidden_size=t.dim, num_hidden_layers=t.n_layers + len(cross),
                num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads, intermediate_size=t.hidden_dim,
                rms_norm_eps=t.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                cross_attention_layers=cross, bos_token_id=1, eos_token_id=2, pad_token_id=2,
            ),
            image_token_index=t.vocab_size,
        )
        model = MllamaForConditionalGeneration(config)
        # SmolLM2 ties input and output embeddings; HF's Mllama cannot tie (its table has 8 extra
        # rows), so its head is pointed at the table's first v rows: no extra 113 MB on HF's side.
        self.vocab_size = t.vocab_size
        self._tie_head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = [model.model.vision_model, model.model.multi_modal_projector,
                     *(model.model.language_model.layers[i] for i in cross)]
        for module in trainable:
            module.requires_grad_(True)
        if checkpointing:  # transformers 5.25 renamed gradient_checkpointing_enable
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                      every_n_layers=int(checkpointing))
            elif checkpointing == 1:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                raise RuntimeError("--hf-checkpointing N > 1 needs transformers' activation_checkpointing_enable")
        self.model, self.cross = model, cross
        self.attn_implementation = config._attn_implementation
        self.static_cache = False  # generate(cache_implementation="static") with --hf-static-cache

    def _tie_head(self, model) -> None:
        embed = model.model.language_model.embed_tokens.weight
        model.lm_head.weight = torch.nn.Parameter(embed[: self.vocab_size], requires_grad=False)

    def to(self, device: str) -> None:
        self.model.to(device)
        self._tie_head(self.model)  # .to() copies the head apart from the table: view it again

    def _media_inputs(self, batch: Batch, b: int, s: int) -> dict[str, torch.Tensor]:
        device = batch.ids.device
        xmask = torch.zeros(b, s, 1, 1, dtype=torch.long, device=device)  # [b, s, images, tiles]
        xmask[:, batch.image_pos :] = 1  # rows at or after <|image|> see it
        return dict(
            pixel_values=batch.images[:b, None, None],  # [b, 1 image, 1 tile, 3, H, W]
            aspect_ratio_ids=torch.ones(b, 1, dtype=torch.long, device=device),
            aspect_ratio_mask=torch.ones(b, 1, 1, dtype=torch.long, device=device),
            cross_attention_mask=xmask,
        )

    def loss(self, batch: Batch) -> torch.Tensor:
        b, s = batch.ids.shape
        return self.model(input_ids=batch.ids, labels=batch.labels, attention_mask=batch.attention_mask,
                          **self._media_inputs(batch, b, s)).loss

    def generate(self, batch: Batch, b: int, new_tokens: int, on_token) -> None:
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if self.prompt_seen:  # the first put is the prompt itself
                    on_token(value)
                self.prompt_seen = True

            def end(self) -> None:
                pass

        ids = batch.ids[:b, : batch.prompt_len]
        self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **self._media_inputs(batch, b, batch.prompt_len),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            streamer=Stamps(), **({"cache_implementation": "static"} if self.static_cache else {}),
        )

    def param_groups(self) -> dict[str, int]:
        counts = dict.fromkeys(("vision", "projector", "cross_attention", "other"), 0)
        cross_prefixes = tuple(f"model.language_model.layers.{i}." for i in self.cross)
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("model.vision_model."):
                part = "vision"
            elif name.startswith("model.multi_modal_projector."):
                part = "projector"
            elif name.startswith(cross_prefixes):
                part = "cross_attention"
            else:
                part = "other"
            counts[part] += p.numel()
        return counts


class TorchtuneRunner(Runner):
    """torchtune's ``llama3_2_vision`` component builders at the shared sizes (``--torchtune``).

    Its recipes' loss (``CEWithChunkedOutputLoss``, 8 output chunks: full-vocabulary logits for
    every position, in chunks) and the KV-cached decoding loop of its ``dev/generate_v2`` recipe.
    """

    def __init__(self, vision: VisionSizes) -> None:
        from torchtune.models.llama3_2_vision import llama3_2_vision_decoder, llama3_2_vision_encoder
        from torchtune.modules import TiedLinear
        from torchtune.modules.loss import CEWithChunkedOutputLoss
        from torchtune.modules.model_fusion import DeepFusionModel

        from mm_llama.config import LlamaConfig

        t = LlamaConfig()
        self.media_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        encoder = llama3_2_vision_encoder(
            patch_size=vision.patch_size, num_heads=vision.heads, clip_embed_dim=vision.width,
            clip_num_layers=vision.depth,
            # torchtune's index i is the input of block i, i.e. the output of block i - 1
            clip_hidden_states=[i + 1 for i in vision.intermediate_layers],
            num_layers_projection=vision.global_layers, decoder_embed_dim=t.dim,
            tile_size=vision.image_size, max_num_tiles=1,
        )
        decoder = llama3_2_vision_decoder(
            vocab_size=t.vocab_size, num_layers=t.n_layers, fusion_interval=4, num_special_tokens=3,
            num_heads=t.n_heads, num_kv_heads=t.n_kv_heads, embed_dim=t.dim, max_seq_len=2048,
            encoder_max_seq_len=self.media_tokens, rope_base=t.rope_theta, intermediate_dim=t.hidden_dim,
        )
        del decoder.output  # an nn.Linear child; SmolLM2 ties its embeddings, as torchtune builds llama3_2
        decoder.output = TiedLinear(decoder.tok_embeddings.embedding)
        self.model = DeepFusionModel(decoder, encoder, encoder_trainable=True, decoder_trainable=False,
                                     fusion_trainable=True)
        decoder.tok_embeddings.fusion_embedding.requires_grad_(False)  # embeddings frozen, as in the others
        self.model.set_num_output_chunks(8)
        self.loss_fn = CEWithChunkedOutputLoss()

    def _inputs(self, batch: Batch, b: int, s: int) -> dict:
        xmask = torch.zeros(b, s, self.media_tokens, dtype=torch.bool)  # [b, s, s_e]
        xmask[:, batch.image_pos :] = True
        images = {"images": batch.images[:b, None, None], "aspect_ratio": torch.ones(b, 1, 2, dtype=torch.long)}
        return {"encoder_input": images, "encoder_mask": xmask}

    def loss(self, batch: Batch) -> torch.Tensor:
        b, s = batch.ids.shape
        logits = self.model(batch.ids, **self._inputs(batch, b, s))  # list of [b, s/8, v] chunks
        shifted = torch.cat([batch.labels[:, 1:], torch.full((b, 1), -100)], dim=1)  # as its recipes shift
        return self.loss_fn(logits, shifted)

    def generate(self, batch: Batch, b: int, new_tokens: int, on_token) -> None:
        self.model.set_num_output_chunks(0)
        p = batch.prompt_len
        total = p + new_tokens
        self.model.setup_caches(b, torch.float32, encoder_max_seq_len=self.media_tokens, decoder_max_seq_len=total)
        causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
        inputs = self._inputs(batch, b, p)
        positions = torch.arange(total)
        logits = self.model(batch.ids[:b, :p], mask=causal[None, :p].expand(b, -1, -1),
                            input_pos=positions[None, :p].expand(b, -1), **inputs)[:, -1]
        token = logits.argmax(-1, keepdim=True)  # [b, 1]
        on_token(token)
        row_mask = inputs["encoder_mask"][:, -1:]  # [b, 1, s_e]
        for pos in range(p, total - 1):
            logits = self.model(token, mask=causal[None, pos : pos + 1].expand(b, -1, -1),
                                input_pos=positions[None, pos : pos + 1].expand(b, -1),
                                encoder_input=None, encoder_mask=row_mask)[:, -1]
            token = logits.argmax(-1, keepdim=True)
            on_token(token)
        for module in self.model.modules():  # torchtune sets caches up once; the next call may change b
            if hasattr(module, "kv_cache"):
                module.kv_cache, module.cache_enabled = None, False
        self.model.set_num_output_chunks(8)

    def param_groups(self) -> dict[str, int]:
        counts = dict.fromkeys(("vision", "projector", "cross_attention", "other"), 0)
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("encoder.projection.output"):
                part = "projector"
            elif name.startswith("encoder."):
                part = "vision"
            elif ".fusion_layer." in name:
                part = "cross_attention"
            else:
                part = "other"
            counts[part] += p.numel()
        return counts


# --- measurement (inside one worker process) -------------------------------------------------
def rss_mb() -> float:
    """Current resident set size in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (since start, or since :func:`reset_peak_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def saved_activation_mb(runner: Runner, batch: Batch, autocast: torch.autocast) -> float:
    """MiB autograd keeps for backward in one forward + loss of ``runner`` (``train_step.saved_activation_mb``)."""
    from train_step import saved_activation_mb as saved_mb

    def loss() -> torch.Tensor:
        with autocast:
            return runner.loss(batch)

    return saved_mb(runner.model, loss)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); ``False`` where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Worker:
    """One implementation in its own process, driven one command at a time by the parent.

    Commands: ``train`` (one training step; the first one builds the optimizer and resets the
    RSS high-water mark), ``train_done`` (memory figures, then one FLOP-counted forward and backward),
    ``generate <b> <n>`` (one greedy generation), ``report`` (everything, then exit).
    """

    def __init__(self, impl: str, args: argparse.Namespace) -> None:
        from mm_llama.config import LlamaConfig

        torch.manual_seed(0)
        vision = VisionSizes()
        if impl == "ours":
            self.runner = OursRunner(vision, graph=args.ours_graph, checkpointing=args.ours_checkpointing)
        elif impl == "hf":
            self.runner = HFRunner(vision, checkpointing=args.hf_checkpointing)
        else:
            self.runner = TorchtuneRunner(vision)
        self.device, self.cuda = args.device, args.device.startswith("cuda")
        self.runner.to(self.device)
        self.batch = make_batch(args.batch_size, args.seq_len, args.response_len, LlamaConfig().vocab_size,
                                vision.image_size, ragged=args.ragged).to(self.device)
        # bf16-mixed: fp32 weights, matmuls in bf16 under autocast (the recipe's GPU precision).
        self.dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
        self.autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                       enabled=args.precision == "bf16-mixed")
        self.opt: torch.optim.Optimizer | None = None
        self.peak_n = 1024 if args.quick else (8192 if self.cuda else 2048)  # side of the peak-measuring matmuls
        self.report: dict = {"impl": impl, "threads": torch.get_num_threads(), "device": self.device_name(),
                             "precision": args.precision,
                             "activation_checkpointing": {"ours": args.ours_checkpointing,
                                                          "hf": args.hf_checkpointing}.get(impl, 0)}
        if isinstance(self.runner, OursRunner):
            self.runner.autocast_dtype = self.dtype if args.precision == "bf16-mixed" else None
            self.report["train_step"] = "graphed" if args.ours_graph else "eager"
        if isinstance(self.runner, HFRunner):
            self.report["attn_implementation"] = self.runner.attn_implementation
            self.runner.static_cache = args.hf_static_cache
            self.report["cache_implementation"] = "static" if args.hf_static_cache else "dynamic"

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def train(self) -> dict:
        model = self.runner.model
        if self.opt is None:
            import gc

            model.train()
            self.opt = self.runner.optimizer()
            gc.collect()
            self.report["peak_rss_before_training_mb"] = peak_rss_mb()
            self.report["loaded_rss_mb"] = round(rss_mb(), 1)
            self.report["rss_peak_reset"] = reset_peak_rss()
            if self.cuda:  # on a GPU the memory that counts is the device's
                self.report["peak_gpu_before_training_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                self.report["loaded_gpu_mb"] = round(torch.cuda.memory_allocated(self.device) / 2**20, 1)
                torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        start = time.perf_counter()
        self.runner.train_step(self.opt, self.batch, self.autocast)
        self.sync()
        return {"s": time.perf_counter() - start}

    def train_done(self) -> dict:
        from train_step import flop_counter, matmul_peak_flops

        train_peak = peak_rss_mb()
        r = self.report
        r["peak_rss_mb"] = round(max(r.pop("peak_rss_before_training_mb"), train_peak), 1)
        r["train_increment_mb"] = round(train_peak - r["loaded_rss_mb"], 1) if r.pop("rss_peak_reset") else None
        if self.cuda:
            gpu_peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            r["peak_gpu_mb"] = round(max(r.pop("peak_gpu_before_training_mb"), gpu_peak), 1)
            r["host_train_increment_mb"] = r["train_increment_mb"]
            r["train_increment_mb"] = round(gpu_peak - r["loaded_gpu_mb"], 1)
        with flop_counter() as counter:  # an eager step (a replayed graph dispatches no op to count)
            with self.autocast:
                loss = self.runner.loss(self.batch)
            torch.autograd.grad(loss, self.runner.trainable(), allow_unused=True)
        r["step_gflop"] = round(counter.get_total_flops() / 1e9, 2)
        r["saved_activation_mb"] = round(saved_activation_mb(self.runner, self.batch, self.autocast), 1)
        r["trainable_params"] = sum(p.numel() for p in self.runner.model.parameters() if p.requires_grad)
        r["trainable_by_part"] = self.runner.param_groups()
        r["matmul_peak_gflops"] = round(matmul_peak_flops(self.peak_n, device=self.device, dtype=self.dtype) / 1e9, 1)
        return {}

    @torch.no_grad()
    def generate(self, b: int, n: int) -> dict:
        self.runner.model.eval()
        stamps: list[float] = []

        def stamp(_) -> None:
            self.sync()
            stamps.append(time.perf_counter())

        self.sync()
        start = time.perf_counter()
        with self.autocast:
            self.runner.generate(self.batch, b, n, stamp)
        self.sync()
        end = time.perf_counter()
        if len(stamps) != n:
            raise RuntimeError(f"expected {n} generated tokens, got {len(stamps)}")
        return {"ttft_s": stamps[0] - start, "decode_tokens_per_s": b * (n - 1) / (stamps[-1] - stamps[0]),
                "e2e_tokens_per_s": b * n / (end - start)}

    def serve(self) -> None:
        reply({"ready": True})
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd == "report":
                reply(self.report)
                return
            reply(getattr(self, cmd)(*map(int, rest)))


REPLY = "@@ "  # marks protocol lines; libraries may print to stdout too


def reply(obj: dict) -> None:
    print(REPLY + json.dumps(obj), flush=True)


# --- the parent: one subprocess per implementation, steps interleaved ------------------------
class Remote:
    """The parent's handle on one worker process."""

    def __init__(self, impl: str, argv: list[str], python: str) -> None:
        self.impl = impl
        self.proc = subprocess.Popen([python, __file__, *argv, "--worker", impl], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, command: str = "") -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"the {self.impl} worker exited (code {self.proc.wait()}) before answering {command!r}")


def interleaved(remotes: list[Remote], command: str, rounds: int) -> dict[str, list[dict]]:
    """Send ``command`` to every worker in turn, ``rounds`` times, alternating who goes first,
    so that load from elsewhere on the machine falls on all implementations alike."""
    out: dict[str, list[dict]] = {r.impl: [] for r in remotes}
    for i in range(rounds):
        for r in remotes if i % 2 == 0 else remotes[::-1]:
            out[r.impl].append(r.ask(command))
    return out


def measure(args: argparse.Namespace, forwarded: list[str], impls: list[str]) -> dict[str, dict]:
    pythons = {impl: args.torchtune_python if impl == "torchtune" else sys.executable for impl in impls}
    remotes = [Remote(impl, forwarded, pythons[impl]) for impl in impls]
    try:
        return _measure(args, remotes)
    finally:
        for r in remotes:
            if r.proc.poll() is None:
                r.proc.kill()


def _measure(args: argparse.Namespace, remotes: list[Remote]) -> dict[str, dict]:
    start = time.perf_counter()

    def phase(name: str) -> None:  # on stderr: a run cut short still shows how far it got
        print(f"[{time.perf_counter() - start:6.1f} s] {name}", file=sys.stderr, flush=True)

    for r in remotes:
        r.ask()  # ready: model built
    phase("models built")
    interleaved(remotes, "train", args.warmup)
    steps = interleaved(remotes, "train", args.steps)
    phase("training steps done")
    for r in remotes:
        r.ask("train_done")
    phase("memory and FLOPs measured")
    gen: dict[str, dict] = {r.impl: {} for r in remotes}
    for b in args.generate_batch:
        phase(f"generating at batch {b}")
        interleaved(remotes, f"generate {b} 4", 1)  # warm-up
        runs = interleaved(remotes, f"generate {b} {args.new_tokens}", args.repeats)
        for impl, rs in runs.items():
            gen[impl][f"generate_b{b}"] = {
                "ttft_ms": round(1000 * statistics.median(x["ttft_s"] for x in rs), 1),
                "decode_tokens_per_s": round(statistics.median(x["decode_tokens_per_s"] for x in rs), 2),
                "e2e_tokens_per_s": round(statistics.median(x["e2e_tokens_per_s"] for x in rs), 2),
            }
    phase("generation done")
    results = {}
    b, s = args.batch_size, args.seq_len
    for r in remotes:
        rep = r.ask("report")
        r.proc.wait()
        times = [x["s"] for x in steps[r.impl]]
        step_s = statistics.median(times)
        rep.update(
            step_s=round(step_s, 4), step_s_all=[round(t, 3) for t in times], tokens_per_s=round(b * s / step_s, 1),
            achieved_gflops=round(rep["step_gflop"] / step_s, 2),
            matmul_peak_fraction=round(rep["step_gflop"] / step_s / rep["matmul_peak_gflops"], 4),
            **gen[r.impl],
        )
        results[r.impl] = rep
    return results


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else round(num / den, 3)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sample")
    parser.add_argument("--response-len", type=int, default=32, help="labelled tokens at the end of each sample")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured training steps")
    parser.add_argument("--steps", type=int, default=5, help="measured training steps (median reported)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--generate-batch", type=int, nargs="+", default=[1, 4], help="generation batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="generation runs per batch size (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny batch, 1+1 steps, 4 new tokens")
    parser.add_argument("--ragged", action="store_true",
                        help="training rows of random lengths in [seq_len / 2, seq_len], right-padded")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]; on cuda memory figures are the GPU's")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32",
                        help="bf16-mixed: both models under bf16 autocast (fp32 weights)")
    parser.add_argument("--hf-static-cache", action="store_true",
                        help="HF generates with cache_implementation='static' (its fixed-shape cache; transformers "
                             "may then compile its forward) instead of its default dynamic cache")
    parser.add_argument("--ours-graph", action="store_true",
                        help="ours trains through GraphedTrainStep: on CUDA one captured graph replayed per step "
                             "(AdamW capturable); elsewhere the same static step, eager")
    parser.add_argument("--ours-checkpointing", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="ours recomputes its decoder and cross-attention blocks in backward "
                             "(MultimodalLlama.set_grad_checkpointing): less memory, one more forward a step; "
                             "N: every N-th decoder block")
    parser.add_argument("--hf-checkpointing", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="HF recomputes its layers in backward (activation_checkpointing_enable, non-reentrant; "
                             "N: every_n_layers)")
    parser.add_argument("--torchtune", action="store_true",
                        help="also measure torchtune's llama3_2_vision builders (needs torchtune + torchao)")
    parser.add_argument("--torchtune-python", default=sys.executable,
                        help="interpreter that can import torchtune (e.g. a throwaway venv's python)")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.response_len = 2, 24, 8
        args.warmup, args.steps, args.new_tokens, args.generate_batch, args.repeats = 1, 1, 4, [1], 1
    if args.ours_graph and args.ours_checkpointing:
        parser.error("--ours-graph and --ours-checkpointing: the captured step is not measured with recomputation")
    if min(args.ours_checkpointing, args.hf_checkpointing) < 0:
        parser.error("--ours-checkpointing / --hf-checkpointing take a block interval >= 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode throughput is measured after the first token)")
    bad = [b for b in args.generate_batch if not 1 <= b <= args.batch_size]
    if bad and args.worker is None:
        parser.error(f"--generate-batch {bad} must lie in 1..--batch-size ({args.batch_size})")
    forwarded = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                 "--response-len", str(args.response_len), "--device", args.device, "--precision", args.precision,
                 *(["--quick"] if args.quick else []), *(["--ragged"] if args.ragged else []),
                 *(["--hf-static-cache"] if args.hf_static_cache else []),
                 *(["--ours-graph"] if args.ours_graph else []),
                 "--ours-checkpointing", str(args.ours_checkpointing), "--hf-checkpointing", str(args.hf_checkpointing)]
    return args, forwarded


def main(argv: list[str] | None = None) -> None:
    args, forwarded = parse_args(argv)
    if args.worker is not None:
        Worker(args.worker, args).serve()
        return
    impls = list(IMPLEMENTATIONS if args.torchtune else IMPLEMENTATIONS[:2])
    results = measure(args, forwarded, impls)
    for impl, result in results.items():
        print(f"{impl}: {json.dumps(result)}", flush=True)
    ours, hf = results["ours"], results["hf"]

    def versus(other: dict) -> dict:
        out = {
            "train_step_speedup": ratio(other["step_s"], ours["step_s"]),
            "peak_memory_ratio": ratio(ours["train_increment_mb"], other["train_increment_mb"]),
            "peak_rss_ratio": ratio(ours["peak_rss_mb"], other["peak_rss_mb"]),
        }
        for b in args.generate_batch:
            key = f"generate_b{b}"
            out[f"generate_speedup_b{b}"] = ratio(ours[key]["decode_tokens_per_s"], other[key]["decode_tokens_per_s"])
            out[f"generate_e2e_speedup_b{b}"] = ratio(ours[key]["e2e_tokens_per_s"], other[key]["e2e_tokens_per_s"])
        out["generate_speedup"] = out[f"generate_speedup_b{args.generate_batch[0]}"]
        out["trainable_params_diff"] = ours["trainable_params"] - other["trainable_params"]
        return out

    summary = versus(hf)
    summary["config"] = {
        "batch_size": args.batch_size, "seq_len": args.seq_len, "response_len": args.response_len,
        "ragged": args.ragged, "ours_graph": args.ours_graph, "ours_checkpointing": args.ours_checkpointing,
        "hf_checkpointing": args.hf_checkpointing, "steps": args.steps, "warmup": args.warmup,
        "new_tokens": args.new_tokens,
        "device": ours["device"], "precision": args.precision,
        "generate_batch": args.generate_batch, "vision": asdict(VisionSizes()),
        "hf_cross_attention_layers": hf_cross_attention_layers(30, 4),
    }
    if args.torchtune:
        summary["torchtune"] = {**versus(results["torchtune"]), "raw": results["torchtune"]}
    summary["ours"], summary["hf"] = ours, hf
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
