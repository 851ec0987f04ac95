"""Stage 1: caption pre-training of the image encoder (and, for video, the temporal
aggregator), before the adapters see it.

The paper's ViT is pre-trained on image–text pairs before the cross-attention
adapters are trained (Llama 3 §7.2). Here the same role is played by a short
stage in which the image encoder and a small text decoder learn to
produce the *responses* of the training shards from the image and the prompt
(captioning pre-training, as in CapPa). The frozen LM is not involved, so a step
costs a few milliseconds per sample instead of the ~0.2 s of a step through the
LM: in two and a half minutes on a 2-core CPU the encoder sees ~20k samples. Its
backbone is then saved in the format :attr:`ImageEncoderConfig.checkpoint` loads
and, by default, frozen for stage 2 (benchmarks/RESULTS.md, "Learning dynamics"). With
``EncoderPretrainConfig.prompt_reader`` (the image default) the decoder is saved too and stays,
frozen, as stage 2's prompt reader (:mod:`adapters.prompt_reader`).

For video the stage trains a :class:`ClipEncoder`, the frame encoder followed by the
video branch's temporal aggregator, on the clips' captions: the decoder reads only the
aggregated tokens, so the aggregator must carry what happens and in which order. The
aggregator's weights are saved beside the encoder's and loaded (frozen) in stage 2
through :attr:`~mm_llama.video_adapter.VideoConfig.aggregator_checkpoint`.

Shape legend: ``b`` batch, ``s`` text tokens, ``s_e`` media tokens, ``d_e`` encoder
feature width, ``w`` decoder width, ``V`` compact vocabulary size.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.prompt_reader import CaptionDecoder, PromptReaderConfig, save_prompt_reader
from adapters.temporal import TemporalAggregator
from encoders import ImageEncoder
from encoders.base import EncoderOutput
from mm_llama.checkpoint_files import atomic_write
from mm_llama.training.checkpoint_io import StageCheckpoint
from mm_llama.training.console import StepProgressBar
from mm_llama.training.datamodule import ModelInputs
from mm_llama.training.modes import TrainModes
from mm_llama.training.optim import OptimConfig, build_optimizer, uses_loss_scaling
from mm_llama.training.random_state import RandomStateCheckpoint
from mm_llama.training.scale import ClipsGradients
from mm_llama.training.report import TrainingHistory

log = logging.getLogger(__name__)

STAGE_CHECKPOINT = StageCheckpoint(".", "encoder_pretrain", 1).path.name  # encoder_pretrain_last.ckpt
"""Stage 1's training state in the run's directory (weights, optimizer, schedule, the position in
the data, the generators), written every ``checkpoint_every`` steps; what ``--resume`` continues from
while the stage is unfinished (stage 2's ``last.ckpt`` does not exist yet)."""

UNK = 0
"""Compact id of every token the vocabulary scan did not see."""


@dataclass
class EncoderPretrainConfig:
    """Stage 1 settings.

    Attributes:
        steps: optimizer steps; 0 skips the stage (the encoder then trains with the adapters).
        batch_size: samples per step (the stage is cheap per sample: large batches).
        lr: peak AdamW learning rate (warm-up, then cosine to 10 %).
        warmup_steps: linear warm-up.
        width: decoder width ``w``. depth: decoder blocks. heads: decoder attention heads.
        vocab_scan_batches: training batches read up front to collect the token ids the
            decoder predicts; ids first seen later map to one unknown class.
        freeze_encoder: keep the pre-trained encoder fixed in stage 2 (measured better
            than fine-tuning it with the adapters: benchmarks/RESULTS.md).
        prompt_reader: images only: keep the decoder too (``prompt_reader.safetensors``), so
            stage 2 appends its reading of each prompt to the media tokens
            (:mod:`adapters.prompt_reader`, ``ModelConfig.prompt_reader``).
        checkpoint_every: write the stage's training state (:data:`STAGE_CHECKPOINT`) every this
            many steps, so that ``--resume`` continues a stage killed part-way.
    """

    steps: int = 250
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10
    width: int = 192
    depth: int = 2
    heads: int = 4
    vocab_scan_batches: int = 8
    freeze_encoder: bool = True
    prompt_reader: bool = False
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"EncoderPretrainConfig.steps must be >= 0, got {self.steps}")
        for name in ("batch_size", "width", "depth", "heads", "vocab_scan_batches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"EncoderPretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"EncoderPretrainConfig.width {self.width} is not a multiple of heads {self.heads}")
        if self.lr <= 0:
            raise ValueError(f"EncoderPretrainConfig.lr must be > 0, got {self.lr}")


def compact_vocabulary(batches: Iterable[dict[str, Any]]) -> Tensor:
    """Lookup from LM token id to compact id: ``LongTensor[max id seen + 2]``.

    Every id in the batches' ``input_ids`` gets a compact id from 1; all others map to
    ``UNK`` (0), including ids past the table, which callers clamp to its last (UNK) row.
    """
    seen: set[int] = set()
    for batch in batches:
        seen.update(batch["input_ids"].unique().tolist())
    if not seen:
        raise ValueError("the vocabulary scan read no training batch: is the training split empty?")
    lookup = torch.zeros(max(seen) + 2, dtype=torch.long)
    ids = torch.tensor(sorted(seen), dtype=torch.long)
    lookup[ids] = torch.arange(1, len(ids) + 1)
    return lookup


class ClipEncoder(nn.Module):
    """Frames through the image encoder, then the temporal aggregator (what video's stage 1 trains).

    Args:
        encoder: the frame encoder (``s_f`` tokens of width ``d_e`` per frame).
        aggregator: the video branch's aggregator over ``d_e``-wide tokens.
        frozen_frames: the frame encoder is already trained (on images) and stays fixed;
            only the aggregator learns.
    """

    def __init__(self, encoder: ImageEncoder, aggregator: TemporalAggregator, frozen_frames: bool = False) -> None:
        super().__init__()
        self.encoder, self.aggregator = encoder, aggregator
        self.frozen_frames = frozen_frames
        self.out_dim = encoder.out_dim

    def forward(self, videos: Tensor, frame_mask: Tensor) -> EncoderOutput:
        """``videos [b, f, 3, H, W]``, ``frame_mask [b, f]`` → aggregated tokens ``[b, g * n_l, d_e]`` and mask."""
        b, f = videos.shape[:2]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_frames):
            out = self.encoder(videos.flatten(0, 1))  # tokens [b * f, s_f, d_e]
        tokens, mask = self.aggregator(out.tokens.view(b, f, *out.tokens.shape[1:]), frame_mask)
        return EncoderOutput(tokens, mask)


class EncoderPretrainModule(ClipsGradients, TrainModes, L.LightningModule):
    """Trains an :class:`ImageEncoder` (or a :class:`ClipEncoder`) and a :class:`CaptionDecoder` on the
    response tokens.

    Reads the same collated batches as the adapter stage (``images`` — or ``videos`` and
    ``frame_mask`` —, ``input_ids``, ``labels`` from
    :class:`~mm_llama.training.datamodule.ImageDataModule`); the loss is next-token
    cross-entropy at the labeled (response) positions.

    Args:
        encoder: the image or clip encoder to pre-train (trained in place).
        inputs: what the data module needs (tokenizer, media id, image size, system prompt).
        lookup: LM id → compact id, from :func:`compact_vocabulary`.
        cfg: stage settings.
    """

    def __init__(self, encoder: ImageEncoder | ClipEncoder, inputs: ModelInputs, lookup: Tensor,
                 cfg: EncoderPretrainConfig) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(True)
        if isinstance(encoder, ClipEncoder) and encoder.frozen_frames:
            encoder.encoder.requires_grad_(False)
        self.inputs = inputs
        self.cfg = cfg
        self.register_buffer("lookup", lookup, persistent=False)
        self.decoder = CaptionDecoder(int(lookup.max()) + 1, encoder.out_dim, cfg.width, cfg.depth, cfg.heads)

    def logits_and_targets(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The decoder's logits ``[b, s-1, V]`` for the next token of every row, and the compact
        targets ``[b, s-1]`` (-100 where unlabelled: everything but the response)."""
        if "videos" in batch:
            media = self.encoder(batch["videos"], batch["frame_mask"])
        else:
            media = self.encoder(batch["images"])
        ids = self.lookup[batch["input_ids"].clamp(max=len(self.lookup) - 1)]  # [b, s]
        labels = batch["labels"][:, 1:]
        targets = torch.where(labels == -100, -100, self.lookup[labels.clamp(0, len(self.lookup) - 1)])
        return self.decoder(ids[:, :-1], media.tokens, media.mask), targets

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Mean cross-entropy over the response tokens of ``batch``."""
        logits, targets = self.logits_and_targets(batch)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def answers_right(self, batch: dict[str, Any]) -> Tensor:
        """``[b]`` bool: whether the decoder's argmax is the response's token at every labelled
        position, reading the true response before it (teacher-forced exact match: greedy decoding
        writes the response exactly when this holds, the stop token being labelled too)."""
        logits, targets = self.logits_and_targets(batch)
        return ((logits.argmax(-1) == targets) | (targets == -100)).all(1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite encoder pre-training loss {loss.item()} at step {self.global_step}")
        self.log("pretrain/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_callbacks(self) -> list[L.Callback]:
        """Generator states in the stage's checkpoints (a resumed stage draws what it would have)."""
        return [RandomStateCheckpoint()]

    def configure_optimizers(self):
        optim = OptimConfig(lr=self.cfg.lr, warmup_steps=self.cfg.warmup_steps, total_steps=max(1, self.cfg.steps))
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        opt, sched = build_optimizer(named, lambda name: name.partition(".")[0], optim,
                                     fused=not uses_loss_scaling(self._trainer))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def pretrain_image_encoder(
    encoder: ImageEncoder | ClipEncoder,
    inputs: ModelInputs,
    datamodule: L.LightningDataModule,
    cfg: EncoderPretrainConfig,
    out: Path,
    *,
    trainer_defaults: dict[str, Any],
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run stage 1 and save the backbone to ``out / "image_encoder.safetensors"`` (a clip
    encoder's aggregator also to ``out / "video_aggregator.safetensors"``).

    Every ``cfg.checkpoint_every`` steps the stage's training state goes to ``out /``
    :data:`STAGE_CHECKPOINT`; with ``resume`` an existing one is continued from, and the stage
    ends with the weights (and the losses) of a run that never stopped.

    Args:
        encoder: trained in place.
        inputs: the adapter model's data inputs (the datamodule is connected to them).
        datamodule: an :class:`~mm_llama.training.datamodule.ImageDataModule` whose
            batch size is ``cfg.batch_size``.
        cfg: stage settings (``cfg.steps > 0``).
        out: output directory (the CSV log goes to ``out/logs/encoder_pretrain``).
        trainer_defaults: accelerator / precision / clipping shared with stage 2.
        progress: show a progress bar.
        resume: continue from ``out /`` :data:`STAGE_CHECKPOINT` if it exists.

    Returns:
        ``{"steps", "seconds", "loss" (mean of the last 20 steps), "checkpoint"}``, plus
        ``"aggregator_checkpoint"`` for a clip encoder and, with ``cfg.prompt_reader``,
        ``"prompt_reader"``: the :class:`PromptReaderConfig` (as a dict) that loads the decoder,
        and ``"decoder_exact_match"``: the decoder's teacher-forced exact match on the test split
        (:meth:`EncoderPretrainModule.answers_right`; overall and by json ``task``), which the
        prompt reader's model follows closely (benchmarks/RESULTS.md, "Image runs", stop 24).
    """
    datamodule.connect(inputs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    lookup = compact_vocabulary(datamodule.first_train_batches(cfg.vocab_scan_batches))
    log.info("encoder pre-training: %d steps x %d samples, %d output tokens",
             cfg.steps, cfg.batch_size, int(lookup.max()))
    module = EncoderPretrainModule(encoder, inputs, lookup, cfg)
    history = TrainingHistory()
    stage = StageCheckpoint(out, "encoder_pretrain", cfg.checkpoint_every)
    trainer = L.Trainer(
        **{k: v for k, v in trainer_defaults.items() if k != "log_every_n_steps"},
        max_steps=cfg.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=L.pytorch.loggers.CSVLogger(str(out / "logs"), name="encoder_pretrain"),
        log_every_n_steps=10,
        callbacks=[history, *stage.callbacks(), *([StepProgressBar("encoder pre-training")] if progress else [])],
        plugins=stage.plugins(),
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    stage.fit(trainer, module, datamodule, resume)
    seconds = time.perf_counter() - start
    clip = encoder if isinstance(encoder, ClipEncoder) else None
    image_encoder = clip.encoder if clip is not None else encoder
    saved = {"checkpoint": _save(image_encoder.backbone.model, out / "image_encoder.safetensors",
                                 {"stem_norm": image_encoder.config.stem_norm})}
    if clip is not None:
        saved["aggregator_checkpoint"] = _save(clip.aggregator, out / "video_aggregator.safetensors")
    if cfg.prompt_reader:
        if clip is not None:
            raise ValueError("EncoderPretrainConfig.prompt_reader is for images; a video's stage 1 has no use for it")
        reader = PromptReaderConfig(
            vocab_size=module.decoder.embed.num_embeddings, lookup_size=len(lookup), width=cfg.width,
            depth=cfg.depth, heads=cfg.heads, max_len=module.decoder.position.shape[0],
            checkpoint=save_prompt_reader(module.decoder, lookup, out / "prompt_reader.safetensors"),
        )
        saved["prompt_reader"] = dataclasses.asdict(reader)
        saved["decoder_exact_match"] = decoder_exact_match(module, datamodule)
    tail = [loss for _, loss in history.train_loss[-20:]]
    return {
        "steps": trainer.global_step,
        "seconds": round(seconds, 2),
        "loss": round(sum(tail) / len(tail), 4) if tail else None,
        **saved,
    }


def decoder_exact_match(module: EncoderPretrainModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    """The stage-1 decoder's teacher-forced exact match on ``datamodule``'s test split:
    ``{"all": ..., "<task>": ...}`` (tasks from each sample's json ``task``)."""
    datamodule.setup("test")
    module.eval()
    right: dict[str, list[bool]] = {}
    for batch in datamodule.test_dataloader():
        for ok, meta in zip(module.answers_right(batch).tolist(), batch["meta"]):
            right.setdefault("all", []).append(ok)
            right.setdefault(str(meta.get("task", "?")), []).append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in right.items()}


def _save(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write ``module``'s state dict to ``path`` (safetensors, with ``metadata``) atomically; returns the path."""
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    with atomic_write(path, "wb") as file:
        file.write(safetensors.torch.save(state, metadata=metadata))
    return str(path)
