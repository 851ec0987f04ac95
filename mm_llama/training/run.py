"""``python train_adapter.py --modality image``: one adapter training run, end to end.

:func:`run` generates the built-in shards if they are missing, loads the frozen LM,
trains the adapters with Lightning (validating on a capped validation set a few
times), tests on the whole test split and writes into ``out``:

* ``adapter.ckpt``: only the trained weights plus the LM's identity (no optimizer);
* ``last.ckpt``: the full training state, for ``--resume``;
* ``config.yaml``: the resolved configuration, a valid ``mm-llama fit --config`` file;
* ``training_curve.png``, ``samples.png`` and ``metrics.json``.

Modalities are entries of :data:`MODALITIES`; video and speech plug in there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from adapters.prompt_reader import PromptReaderConfig
from adapters.speech_adapter import SPEECH_FUSIONS, SpeechAdapterConfig
from encoders import ImageEncoderConfig
from encoders.speech import SPEECH_BACKBONES, SpeechEncoderConfig
from mm_llama.model import CrossAttentionConfig, ModelConfig
from mm_llama.checkpoint_files import atomic_write
from mm_llama.training import checkpoint_io
from mm_llama.training.checkpoint_io import AtomicCheckpointIO
from mm_llama.training.console import PartsSummary, StepProgressBar, quiet_lightning
from mm_llama.data.pipeline import check_task_weights
from mm_llama.training.datamodule import ImageDataModule, ModelInputs
from mm_llama.training.encoder_pretrain import EncoderPretrainConfig, pretrain_image_encoder
from mm_llama.training.module import DEFAULT_LM, AdapterModule, normalise_answer
from mm_llama.training.optim import OptimConfig
from mm_llama.training.video_stage import video_stage_config
from mm_llama.video_adapter import VideoConfig
from mm_llama.training.speech_datamodule import SpeechDataModule
from mm_llama.training.report import (
    TestSamples,
    TrainingHistory,
    json_safe,
    peak_rss_mb,
    plot_samples,
    plot_training_curve,
    write_metrics,
    write_predictions,
)

log = logging.getLogger(__name__)

DEFAULT_STEPS = 200
"""Optimizer steps of a run whose modality does not set its own (:attr:`Modality.steps`)."""


# ---------------------------------------------------------------- trainer defaults


def default_num_workers() -> int:
    """0 on a machine with 2 cores or fewer, else 2.

    On 2 cores a loader process takes time from the two matmul threads of the step:
    measured here, 2.31 s/step with one worker vs 2.06 s/step decoding in the main
    process (40 steps of the default run); decoding a 64x64 PNG and tokenizing is ~1 ms.
    """
    return 0 if (os.cpu_count() or 1) <= 2 else 2


def default_precision() -> str:
    """``"bf16-mixed"`` on a CUDA device that supports bf16, else full fp32 (DESIGN §5)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX).

    On this project's 2-core AMD EPYC (AVX512-BF16) a bf16 matmul of the LM's sizes runs at
    ~400 GFLOP/s against ~125-170 in fp32 (stop 18); without such hardware bf16 is emulated
    and slower than fp32.
    """
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


PRECISIONS: tuple[str, ...] = ("auto", "32-true", "bf16-mixed")
"""``RunConfig.precision`` values; ``auto`` resolves with :meth:`RunConfig.trainer_precision`."""


def trainer_defaults() -> dict[str, Any]:
    """Trainer settings shared by ``mm-llama`` (as LightningCLI defaults) and :func:`run`."""
    return {
        "accelerator": "auto",
        "precision": default_precision(),
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
    }


# ---------------------------------------------------------------- modalities


@dataclass
class RunConfig:
    """Arguments of one run (the command-line flags of ``train_adapter.py``).

    Attributes:
        modality: a key of :data:`MODALITIES`.
        lm: frozen LM: registered name, HF directory or ``.gguf`` file.
        encoder: encoder backbone ``"<library>:<name>"`` (e.g. ``"open_clip:ViT-B-32"``);
            the CPU-sized shape of the default config (depth, width, patch) is kept.
            ``None``: the default config's backbone.
        steps: optimizer steps (also the length of the cosine decay); ``None``: the modality's
            default (:attr:`Modality.steps`: 150 for image, 400 for video, 200 for speech).
        batch_size: samples per step.
        eval_batch_size: samples per batch of validation and test (answers generated without
            gradients: 32 a batch took 30.5 s for 128 test samples, 8 a batch 45.6 s; stop 17, 2-core CPU).
        lr: peak learning rate; ``None`` keeps :class:`OptimConfig`'s.
        out: output directory; ``None``: the modality's default (``runs/image``).
        data_dir: built-in shards directory; ``None``: the modality's default (``data/shapes``).
        resume: continue from ``<out>/last.ckpt`` when it exists.
        seed: seeds weights initialisation and data order.
        num_workers: DataLoader workers per split; default :func:`default_num_workers`.
        precision: one of :data:`PRECISIONS`. ``"bf16-mixed"`` holds the frozen LM in bf16 and
            trains the fp32 adapters (and stage 1's encoder) under bf16 autocast. ``"auto"``: that on
            a CUDA GPU with bf16, and on a CPU with native bf16 matmul (:func:`cpu_has_native_bf16`)
            for the modalities measured that way (:attr:`Modality.cpu_bf16`: image, 22 % less
            training time at the same accuracy, stop 18); else ``"32-true"``.
        val_every: validate every this many steps; ``None``: twice per run (each validation
            generates ``val_samples`` answers, ``eval_batch_size`` at a time).
        val_samples: validation samples per evaluation (the first ones of the split).
        test_samples: test samples; ``None``: the whole test split.
        eval_max_new_tokens: generation budget of the answer-accuracy metric.
        progress: show progress bars.
        model: full model configuration (overrides ``encoder``); ``None``: defaults.
        optim: full optimizer configuration (``lr``/``steps`` still apply); ``None``: defaults.
        encoder_pretrain_steps: steps of stage 1, the image encoder's caption pre-training
            (:mod:`mm_llama.training.encoder_pretrain`); 0 skips it; ``None``: the modality's
            default (:attr:`Modality.encoder_pretrain_steps`: 1000 for image, 400 for video).
            Skipped on ``--resume`` (the encoder's weights are in the checkpoint).
        encoder_pretrain: the rest of stage 1's settings; ``None``: defaults.
        image_checkpoint: (video) an image-stage ``adapter.ckpt``: the video stage loads it and
            trains only the video branch (Llama 3 §7.4). ``None``: no trained image weights, so
            the default image configuration and the video branch train together on the clips.
        frames: (video) frames sampled per clip (``VideoConfig.frames``); ``None``: its default.
        frame_encoder: (video) an image run's stage-1 encoder file (``image_encoder.safetensors``):
            video's stage 1 starts the frame encoder from it and keeps it frozen, so only the
            temporal aggregator learns from the clips (README, "Video"). ``None``: trained here
            first (``frame_pretrain_steps``).
        frame_pretrain_steps: (video, without ``frame_encoder`` or ``image_checkpoint``) steps of an
            image stage 1 on the image scenes (``data/shapes``, generated if missing) that trains the
            frame encoder before video's stage 1, which then keeps it frozen as with ``frame_encoder``
            (a random frame encoder keeps video's stage 1 at the caption prior). ``None``: the image
            default (600); 0: none, the frame encoder starts random and learns with the aggregator.
        speech_pretrain: speech only: how the Conformer is pre-trained before the adapters:
            ``"ctc"`` (character CTC on the transcripts, :mod:`mm_llama.training.ctc_pretrain`;
            the encoder is then frozen in stage 2) or ``"best_rq"`` (self-supervised on the audio,
            :mod:`mm_llama.training.best_rq`; the encoder then trains with the adapters).
        speech_pretrain_steps: speech only: steps of that pre-training; 0 skips it.
        speech_adapter_pretrain_steps: speech only, after CTC: steps of the adapter's token-CTC
            stage (its frames learn to point at the LM's embeddings of the spoken tokens); 0 skips it.
        fusion: speech only: ``"embedding"`` (speech frames replace ``<|speech|>`` in the LM input,
            the paper) or ``"cross_attention"`` (they are the K/V of gated cross-attention blocks).
        task_weights: stage 2's training mix: keep probability of a training sample by its
            json ``task`` (others: 1), e.g. ``{"count": 0.25}``; ``{}``: every sample. ``None``: the
            modality's default (:attr:`Modality.task_weights`). Stage 1 and evaluation read every sample.
        prompt_reader: image only: stage 1's caption decoder stays, frozen, to read the text
            against its image; the cross-attention blocks see its reading (:mod:`adapters.prompt_reader`,
            ``reader_rows``).
            ``None``: the modality's default (:attr:`Modality.prompt_reader`), or
            ``encoder_pretrain.prompt_reader`` when that is given.
        reader_rows: with the prompt reader, every text row sees the reader's state at its own
            row (``PromptReaderConfig.every_row``), answer rows included; ``False``: only the
            state at the prompt's last row joins the media tokens (stop 23's reader).
    """

    modality: str = "image"
    lm: str = DEFAULT_LM
    encoder: str | None = None
    steps: int | None = None
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float | None = None
    out: str | None = None
    data_dir: str | None = None
    resume: bool = False
    seed: int = 0
    num_workers: int = field(default_factory=default_num_workers)
    precision: str = "auto"
    val_every: int | None = None
    val_samples: int = 64
    test_samples: int | None = None
    eval_max_new_tokens: int = 24
    progress: bool = True
    model: ModelConfig | None = None
    optim: OptimConfig | None = None
    encoder_pretrain_steps: int | None = None
    encoder_pretrain: EncoderPretrainConfig | None = None
    image_checkpoint: str | None = None
    frames: int | None = None
    frame_encoder: str | None = None
    frame_pretrain_steps: int | None = None
    fusion: str = "embedding"
    speech_pretrain: str = "ctc"
    speech_pretrain_steps: int = 300
    task_weights: dict[str, float] | None = None
    speech_adapter_pretrain_steps: int = 200
    prompt_reader: bool | None = None
    reader_rows: bool = True

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not implemented yet; implemented: {sorted(MODALITIES)}")
        if self.steps is None:
            self.steps = self.spec.steps
        if self.encoder_pretrain_steps is None:
            self.encoder_pretrain_steps = self.spec.encoder_pretrain_steps
        if self.task_weights is None:
            self.task_weights = dict(self.spec.task_weights)
        check_task_weights(self.task_weights, "RunConfig.task_weights")
        if self.task_weights and self.modality == "speech":
            raise ValueError("--task-weights weighs image and video tasks; the speech shards have none")
        video_options = (self.image_checkpoint, self.frames, self.frame_encoder, self.frame_pretrain_steps)
        if self.modality != "video" and video_options != (None,) * 4:
            raise ValueError("--image-checkpoint, --frames, --frame-encoder and --frame-pretrain-steps are options "
                             "of --modality video")
        if self.modality == "video" and self.frame_pretrain_steps is None:
            self.frame_pretrain_steps = FRAME_PRETRAIN_STEPS
        if self.frame_pretrain_steps is not None and self.frame_pretrain_steps < 0:
            raise ValueError(f"--frame-pretrain-steps must be >= 0, got {self.frame_pretrain_steps}")
        if self.frame_encoder is not None and self.image_checkpoint is not None:
            raise ValueError("--frame-encoder starts video's stage 1; --image-checkpoint skips it: give one")
        if self.frame_encoder is not None and not Path(self.frame_encoder).is_file():
            raise ValueError(f"--frame-encoder {self.frame_encoder}: no such file (an image run writes "
                             "runs/image/image_encoder.safetensors)")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"RunConfig.frames must be None or >= 1, got {self.frames}")
        for name in ("steps", "batch_size", "eval_batch_size", "val_samples", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "test_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"RunConfig.{name} must be None or >= 1, got {value}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"RunConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.num_workers < 0:
            raise ValueError(f"RunConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.encoder_pretrain_steps < 0:
            raise ValueError(f"RunConfig.encoder_pretrain_steps must be >= 0, got {self.encoder_pretrain_steps}")
        if self.speech_pretrain not in SPEECH_PRETRAINING:
            raise ValueError(f"RunConfig.speech_pretrain must be one of {SPEECH_PRETRAINING}, "
                             f"got {self.speech_pretrain!r}")
        for name in ("speech_pretrain_steps", "speech_adapter_pretrain_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"RunConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.fusion not in SPEECH_FUSIONS:
            raise ValueError(f"RunConfig.fusion must be one of {SPEECH_FUSIONS}, got {self.fusion!r}")
        if self.prompt_reader and self.modality != "image":
            raise ValueError(f"--prompt-reader is for images; {self.modality} has no use for it")
        if self.prompt_reader and not self.pretrain.steps:
            raise ValueError("--prompt-reader keeps stage 1's decoder: it needs --encoder-pretrain-steps > 0")

    @property
    def pretrain(self) -> EncoderPretrainConfig:
        """Stage 1's settings, ``steps`` from :attr:`encoder_pretrain_steps` (0 for a modality without it)."""
        # The video stage on an image checkpoint has its encoder already: no stage 1.
        on = self.spec.encoder_pretraining and self.image_checkpoint is None
        steps = self.encoder_pretrain_steps if on else 0
        # A clip is 8 frames through the encoder: half the image stage's batch keeps a step ~2 s here.
        default = (EncoderPretrainConfig(batch_size=32) if self.modality == "video"
                   else EncoderPretrainConfig(prompt_reader=self.spec.prompt_reader))
        reader = {} if self.prompt_reader is None else {"prompt_reader": self.prompt_reader}
        if not steps:  # no stage 1, no decoder to keep (an explicit --prompt-reader is refused above)
            reader = {"prompt_reader": False}
        return dataclasses.replace(self.encoder_pretrain or default, steps=steps, **reader)

    def trainer_precision(self) -> str:
        """The Lightning precision of this run (``precision`` with ``"auto"`` resolved)."""
        if self.precision != "auto":
            return self.precision
        if torch.cuda.is_available():
            return default_precision()
        return "bf16-mixed" if self.spec.cpu_bf16 and cpu_has_native_bf16() else "32-true"

    def trainer_defaults(self) -> dict[str, Any]:
        """:func:`trainer_defaults` at this run's precision (every stage's trainer starts from it)."""
        return {**trainer_defaults(), "precision": self.trainer_precision()}

    @property
    def spec(self) -> Modality:
        return MODALITIES[self.modality]

    @property
    def out_dir(self) -> Path:
        return Path(self.out or self.spec.out.format(fusion=self.fusion))

    @property
    def validate_every(self) -> int:
        return self.val_every or max(1, self.steps // 2)


CROSS_ATTENTION_MLP = 512
"""MLP width of the default runs' cross-attention blocks (the LM's is 1,536).

Image: the default run answered 88.7 % of the test with it (stop 14), 84.8 % with the LM's width
(stop 12), with 12.7M instead of 25.1M trainable parameters and 13 % fewer FLOPs per step
(``benchmarks/train_step.py``: 329 instead of 377 GFLOP at batch 16 x 40; benchmarks/RESULTS.md,
"Image runs").
Video (image and video blocks alike, stop 16): 97.7 % instead of 98.0 % on the temporal captions,
16.6M instead of 32.5M trainable parameters, stage 2 in 720 instead of 783 s (README, "Video")."""


IMAGE_STEM_NORM = "layer"
"""``ImageEncoderConfig.stem_norm`` of the image run's default (hybrid) backbone. With the prompt
reader, two-object "where" rose from chance to 69-83 % with it (stops 22-23, benchmarks/RESULTS.md,
"Image runs"); the stem's GroupNorm spreads one cell's colour over every cell. Another
``--encoder`` keeps its own stem, and video keeps ``"group"``, as it was measured."""


def _encoder_config(cfg: RunConfig, stem_norm: str) -> ImageEncoderConfig:
    encoder = ImageEncoderConfig()
    if cfg.encoder is not None and cfg.encoder != encoder.backbone:
        return dataclasses.replace(encoder, backbone=cfg.encoder)
    return dataclasses.replace(encoder, stem_norm=stem_norm)


def image_model_config(cfg: RunConfig, stem_norm: str = IMAGE_STEM_NORM) -> ModelConfig:
    """The image run's model: ``cfg.model`` if given, else the defaults with ``cfg.encoder``'s backbone
    (the default one with ``stem_norm``) and :data:`CROSS_ATTENTION_MLP`-wide cross-attention MLPs."""
    if cfg.model is not None:
        return cfg.model
    return ModelConfig(image_encoder=_encoder_config(cfg, stem_norm),
                       cross_attention=CrossAttentionConfig(hidden_dim=CROSS_ATTENTION_MLP))


def _datamodule_args(cfg: RunConfig, batch_size: int | None) -> dict[str, Any]:
    """What every modality's data module takes from the run configuration."""
    return dict(data_dir=cfg.data_dir or cfg.spec.data_dir, batch_size=batch_size or cfg.batch_size,
                eval_batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                val_samples=cfg.val_samples, test_samples=cfg.test_samples, progress=cfg.progress)


def _image_datamodule(cfg: RunConfig, batch_size: int | None = None,
                      task_weights: dict[str, float] | None = None) -> ImageDataModule:
    return ImageDataModule(**_datamodule_args(cfg, batch_size), task_weights=task_weights or None)


def _video_model_config(cfg: RunConfig) -> ModelConfig:
    if cfg.model is not None:
        if cfg.model.video is None:
            raise ValueError("--modality video needs a model configuration with a video branch (model.video)")
        return cfg.model
    frames = {"frames": cfg.frames} if cfg.frames is not None else {}
    if cfg.image_checkpoint is not None:  # the paper's video stage: the image model's blocks as they were
        return video_stage_config(VideoConfig(**frames), cfg.image_checkpoint)
    # The image default (its encoder and cross-attention) with a video branch of the same MLP width.
    return dataclasses.replace(image_model_config(cfg, stem_norm="group"),
                               video=VideoConfig(hidden_dim=CROSS_ATTENTION_MLP, **frames))


def _video_datamodule(cfg: RunConfig, batch_size: int | None = None,
                      task_weights: dict[str, float] | None = None) -> ImageDataModule:
    return ImageDataModule(**_datamodule_args(cfg, batch_size), modality="video", task_weights=task_weights or None)


def frame_ablations(trainer: L.Trainer, module: AdapterModule, datamodule: L.LightningDataModule,
                    verbose: bool = False) -> dict[str, float]:
    """Test accuracy with each clip's frames shuffled, and with its middle frame repeated.

    The image cross-attention blocks see frames as an unordered set, so only the video
    branch can use their order: these falling toward chance (while ``accuracy`` stays
    high) shows the temporal path is what answers.
    """
    out = {}
    for view, name in (("shuffled", "accuracy_shuffled_frames"), ("single", "accuracy_single_frame")):
        module.eval_frame_view = view
        try:
            trainer.test(module, datamodule=datamodule, verbose=verbose)
        finally:
            module.eval_frame_view = "ordered"
        metrics = module.last_eval["metrics"]
        out[name] = metrics["exact_match"]
        out.update({f"{name}_{k.removeprefix('exact_match_')}": v for k, v in metrics.items()
                    if k.startswith("exact_match_")})
    return out


def _speech_model_config(cfg: RunConfig) -> ModelConfig:
    """No image branch; the Conformer (``--encoder``: a speech backbone name) and the speech adapter.

    Embedding fusion needs no cross-attention blocks (none are built); cross-attention fusion
    trains them and leaves the fusion embedding (whose ``<|speech|>`` row it does use) trainable.
    """
    if cfg.model is not None:
        return cfg.model
    if cfg.encoder is not None and cfg.encoder not in SPEECH_BACKBONES:
        raise ValueError(f"--encoder {cfg.encoder!r} is not a speech backbone; known: {sorted(SPEECH_BACKBONES)}")
    encoder = SpeechEncoderConfig(**({"backbone": cfg.encoder} if cfg.encoder else {}))
    embedding = cfg.fusion == "embedding"
    return ModelConfig(
        image_encoder=None,
        speech_encoder=encoder,
        speech_adapter=SpeechAdapterConfig(fusion=cfg.fusion),
        cross_attention=CrossAttentionConfig(layers=()) if embedding else CrossAttentionConfig(),
        trainable=("speech_encoder", "speech_adapter") + (() if embedding else ("cross_attention", "fusion_embedding")),
    )


def _speech_datamodule(cfg: RunConfig, batch_size: int | None = None,
                       task_weights: dict[str, float] | None = None) -> SpeechDataModule:
    assert not task_weights, "RunConfig rejects task weights for speech"
    return SpeechDataModule(**_datamodule_args(cfg, batch_size))


SPEECH_PRETRAINING: tuple[str, ...] = ("ctc", "best_rq")
"""How ``--speech-pretrain`` pre-trains the Conformer before the adapters."""


def _pretrain_speech_encoder(cfg: RunConfig, model_cfg: ModelConfig, out: Path, resume: bool = False
                             ) -> tuple[ModelConfig, dict[str, Any] | None]:
    """CTC or BEST-RQ on the training split (``cfg.speech_pretrain_steps``); stage 2 loads the encoder
    (frozen after CTC, as the image encoder is after its caption stage). On ``resume`` nothing runs:
    the encoder's weights are in the checkpoint, only the trainable set is restored."""
    if not cfg.speech_pretrain_steps or model_cfg.speech_encoder is None:
        return model_cfg, None
    ctc = cfg.speech_pretrain == "ctc"
    trainable = tuple(g for g in model_cfg.trainable if not (ctc and g == "speech_encoder"))
    if resume:
        return dataclasses.replace(model_cfg, trainable=trainable), None
    from mm_llama import load_language_model
    from mm_llama.model import MEDIA_TOKENS
    from mm_llama.training.best_rq import pretrain_speech_encoder
    from mm_llama.training.ctc_pretrain import pretrain_speech_adapter_ctc, pretrain_speech_encoder_ctc

    datamodule = cfg.spec.datamodule(cfg, batch_size=32 if ctc else None)  # CTC steps are cheap: more clips
    lm = load_language_model(cfg.lm)  # for its tokenizer and embedding table; freed after
    speech_id = lm.cfg.vocab_size + MEDIA_TOKENS.index("speech")
    datamodule.connect(ModelInputs(tokenizer=lm.tokenizer, media_token_id=speech_id, image_size=1,
                                   system_prompt=datamodule.hparams.system_prompt))
    embed_tokens, tokenize = lm.embed_tokens.weight.detach(), lm.tokenizer.encode
    del lm
    pretrain = pretrain_speech_encoder_ctc if ctc else pretrain_speech_encoder
    summary = pretrain(model_cfg.speech_encoder, datamodule, cfg.speech_pretrain_steps, out,
                       trainer_defaults=cfg.trainer_defaults(), progress=cfg.progress)
    encoder = dataclasses.replace(model_cfg.speech_encoder, checkpoint=summary["checkpoint"])
    adapter = model_cfg.speech_adapter
    if ctc and cfg.speech_adapter_pretrain_steps:
        # The adapter's output starts at the embedding table's RMS under embedding fusion (as in the model).
        rms = float(embed_tokens.pow(2).mean().sqrt()) if adapter.fusion == "embedding" else 1.0
        summary["adapter"] = pretrain_speech_adapter_ctc(
            encoder, adapter, embed_tokens, tokenize, datamodule, cfg.speech_adapter_pretrain_steps, out,
            output_rms=rms, trainer_defaults=cfg.trainer_defaults(), progress=cfg.progress)
        adapter = dataclasses.replace(adapter, checkpoint=summary["adapter"]["checkpoint"])
    return dataclasses.replace(model_cfg, speech_encoder=encoder, speech_adapter=adapter, trainable=trainable), summary


def _speech_metrics(cfg: RunConfig, datamodule: L.LightningDataModule) -> dict[str, Any]:
    return {"fusion": cfg.fusion, "audio_adjusted": datamodule.audio_adjusted()}


@dataclass(frozen=True)
class Modality:
    """How one modality is trained by :func:`run`.

    Attributes:
        model_config: ``RunConfig -> ModelConfig``.
        datamodule: ``(RunConfig, batch_size=None, task_weights=None) -> LightningDataModule`` (with a
            ``skipped()`` method); ``batch_size`` overrides the run's (stage 1 uses its own);
            ``task_weights`` is stage 2's training mix (:attr:`RunConfig.task_weights`).
        data_dir: default directory of the built-in shards.
        out: default output directory (``{fusion}`` is replaced by the run's fusion mode).
        encoder_pretraining: run stage 1 (caption pre-training of the image encoder on the
            modality's shards; for video, of the encoder and the temporal aggregator) when
            ``encoder_pretrain_steps > 0`` and no ``image_checkpoint`` is given.
        extra_tests: ``(trainer, module, datamodule, verbose) -> metrics`` run after the test,
            added to ``metrics.json`` (video: :func:`frame_ablations`).
        extra_metrics: ``(RunConfig, datamodule) -> dict`` added to ``metrics.json``.
        pretrain_stage: ``(RunConfig, ModelConfig, out, resume=) -> (ModelConfig, summary | None)``,
            a stage run before the adapters on a fresh run (speech: CTC or BEST-RQ); on a resumed
            run it only returns stage 2's model configuration.
        steps: default optimizer steps of the adapter stage.
        encoder_pretrain_steps: default steps of stage 1 (when ``encoder_pretraining``).
        cpu_bf16: ``precision="auto"`` trains in bf16-mixed on a CPU with native bf16 matmul
            (measured for image: benchmarks/RESULTS.md, "Image runs"); off: fp32 on every CPU.
        task_weights: default training mix of stage 2 (:attr:`RunConfig.task_weights`).
        prompt_reader: stage 1's decoder reads each prompt for stage 2 by default
            (:attr:`RunConfig.prompt_reader`; image only).
    """

    model_config: Callable[[RunConfig], ModelConfig]
    datamodule: Callable[..., L.LightningDataModule]
    data_dir: str
    out: str
    encoder_pretraining: bool = True
    extra_tests: Callable[..., dict[str, float]] | None = None
    extra_metrics: Callable[[RunConfig, L.LightningDataModule], dict[str, Any]] = lambda cfg, dm: {}
    pretrain_stage: Callable[..., tuple[ModelConfig, dict[str, Any] | None]] | None = None
    steps: int = DEFAULT_STEPS
    encoder_pretrain_steps: int = EncoderPretrainConfig().steps
    cpu_bf16: bool = False
    task_weights: dict[str, float] = field(default_factory=dict)
    prompt_reader: bool = False


FRAME_PRETRAIN_STEPS = 600
"""Video's default ``frame_pretrain_steps``: the image stage 1 its frame encoder was measured with
(stop 16, 97.7 %); the image run's own stage 1 is longer since stop 24, for its prompt reader."""


IMAGE_TASK_WEIGHTS: dict[str, float] = {"count": 0.25}
"""Stage 2's default mix on the image scenes: count questions are a quarter of the data and always
answered right, so 3 in 4 of them give their place to the other tasks (stop 20, 2-core CPU: 88.7 %
over 2 seeds of the whole run against 86-88.5 % before; benchmarks/RESULTS.md, "Image runs")."""


MODALITIES: dict[str, Modality] = {
    # Image: stage 1's decoder stays as the prompt reader, read at every text row (stop 24), so the
    # accuracy follows stage 1's: 1000 steps of it (its decoder alone then answers 97.5-98.8 % of the
    # test, against 89.5-89.6 % at 600 on seeds 1 and 2), then 150 adapter steps, which the per-row
    # reading makes enough (count questions thinned to a quarter: always answered right). 150 answered
    # as 200 did on three seeds in 40 s less (stop 25; 100 lost a point): benchmarks/RESULTS.md,
    # "Image runs".
    "image": Modality(image_model_config, _image_datamodule, data_dir="data/shapes", out="runs/image",
                      steps=150, encoder_pretrain_steps=1000, cpu_bf16=True, task_weights=IMAGE_TASK_WEIGHTS,
                      prompt_reader=True),
    # Video: an image stage 1 trains the frame encoder on the image scenes (or --frame-encoder gives
    # one); video's stage 1 then trains the temporal aggregator on the clips' captions with the frame
    # encoder frozen; unless --image-checkpoint gives trained image weights (the video stage). Stage 2
    # still climbs at 200 steps: 400 gave 34 % instead of 16 % on the same stage-1 files (README).
    "video": Modality(_video_model_config, _video_datamodule, data_dir="data/clips", out="runs/video",
                      extra_tests=frame_ablations, steps=400, encoder_pretrain_steps=400),
    "speech": Modality(_speech_model_config, _speech_datamodule, data_dir="data/speech", out="runs/speech-{fusion}",
                       encoder_pretraining=False, extra_metrics=_speech_metrics, pretrain_stage=_pretrain_speech_encoder),
}
"""The modalities ``train_adapter.py`` trains."""


# ---------------------------------------------------------------- the run


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train, test and write every artefact of one run into ``cfg.out_dir``.

    Returns:
        The metrics also written to ``metrics.json``.
    """
    quiet_lightning()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    resume_from = _resume_checkpoint(cfg)

    model_cfg = cfg.spec.model_config(cfg)
    optim = dataclasses.replace(
        cfg.optim or OptimConfig(), total_steps=cfg.steps, **({"lr": cfg.lr} if cfg.lr is not None else {})
    )
    datamodule = cfg.spec.datamodule(cfg, task_weights=cfg.task_weights)  # stage 2's training mix
    datamodule.prepare_data()  # shards before the LM, so a missing-data error comes first
    stage1 = None
    if cfg.spec.pretrain_stage is not None:
        model_cfg, stage1 = cfg.spec.pretrain_stage(cfg, model_cfg, out, resume=resume_from is not None)
    pretrain_steps = cfg.pretrain.steps
    if pretrain_steps and resume_from is None:
        model_cfg, stage1 = _pretrain_encoder(cfg, model_cfg, out)
    elif pretrain_steps:  # its weights come from last.ckpt
        model_cfg = _resumed_stage1(model_cfg, cfg.pretrain, out, cfg.reader_rows)
    log.info("loading the frozen LM %s", cfg.lm)
    lm_dtype = "bfloat16" if cfg.trainer_precision() == "bf16-mixed" else "float32"
    if lm_dtype == "bfloat16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        log.warning("bf16-mixed on a CPU without native bf16 matmul (AVX512-BF16/AMX): emulated, slower than fp32")
    module = AdapterModule(lm=cfg.lm, model=model_cfg, optim=optim, eval_max_new_tokens=cfg.eval_max_new_tokens,
                           lm_dtype=lm_dtype, init_from=cfg.image_checkpoint)

    history, test_samples = TrainingHistory(), TestSamples(8)
    checkpoint_cfg = {
        "dirpath": str(out), "save_last": True, "save_top_k": 0,
        "every_n_train_steps": cfg.validate_every, "enable_version_counter": False,
    }  # fmt: skip
    logger_cfg = {"save_dir": str(out), "name": "logs"}
    trainer_cfg = {
        **cfg.trainer_defaults(),
        "max_steps": cfg.steps,
        "val_check_interval": cfg.validate_every,
        "check_val_every_n_epoch": None,  # count validation in steps across epochs (DESIGN §9)
        "num_sanity_val_steps": 0,
        "default_root_dir": str(out),
    }
    trainer = L.Trainer(
        **trainer_cfg,
        callbacks=[ModelCheckpoint(**checkpoint_cfg), history, test_samples,
                   *([PartsSummary(), StepProgressBar("adapters")] if cfg.progress else [])],
        logger=CSVLogger(**logger_cfg),
        plugins=[AtomicCheckpointIO()],  # last.ckpt / adapter.ckpt are never left half-written
        enable_progress_bar=cfg.progress,
        enable_model_summary=cfg.progress,
    )
    _write_config(out / "config.yaml", cfg, module, datamodule, trainer_cfg, checkpoint_cfg, logger_cfg)

    start = time.perf_counter()
    with warnings.catch_warnings():
        # `out` holds the run's other artefacts beside the checkpoints by design.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    train_seconds = time.perf_counter() - start
    trainer.save_checkpoint(out / "last.ckpt", weights_only=False)
    trainer.save_checkpoint(out / "adapter.ckpt", weights_only=True)

    trainer.test(module, datamodule=datamodule, verbose=cfg.progress)
    test = module.last_eval
    extra = cfg.spec.extra_tests(trainer, module, datamodule, cfg.progress) if cfg.spec.extra_tests else {}
    metrics: dict[str, Any] = {
        **{k: v for k, v in test["metrics"].items() if k != "n"},
        "exact_match_heldout_combos": test["metrics"].get("exact_match_heldout_combos", float("nan")),
        "test_samples": int(test["metrics"]["n"]),
        **({"accuracy": test["metrics"]["exact_match"], **extra} if extra else {}),
        "val_exact_match": history.val[-1][1].get("exact_match") if history.val else None,
        "train_loss": _tail_mean([loss for _, loss in history.train_loss]),
        "train_seconds": round(train_seconds + (stage1["seconds"] if stage1 else 0.0), 2),
        "adapter_train_seconds": round(train_seconds, 2),
        "encoder_pretrain": stage1,
        "steps": trainer.global_step,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "skipped": datamodule.skipped(),
        "lm": dict(module.lm_identity),
        "modality": cfg.modality,
        "device": str(trainer.strategy.root_device),
        "precision": str(trainer.precision),
        "resumed_from": str(resume_from) if resume_from else None,
        "checkpoint": str(out / "adapter.ckpt"),
        **cfg.spec.extra_metrics(cfg, datamodule),
    }
    plot_training_curve(history, out / "training_curve.png",
                        title=f"{cfg.modality} adapters on {Path(cfg.lm).name}, {trainer.global_step} steps")
    samples = test_samples.join(test["samples"])
    if samples:  # images only
        plot_samples(samples, out / "samples.png", judge=lambda p, r: normalise_answer(p) == normalise_answer(r))
    write_predictions(test["samples"], out / "test_predictions.jsonl")
    write_metrics(metrics, out / "metrics.json")
    return metrics


def _freeze_encoder(model_cfg: ModelConfig, stage1: dict[str, Any] | None = None) -> ModelConfig:
    """Stage 2's model config with stage 1's parts frozen: the image encoder, and for video the
    temporal aggregator; loaded from ``stage1``'s files when given (else from a checkpoint)."""
    encoder, video = model_cfg.image_encoder, model_cfg.video
    if stage1 is not None:
        encoder = dataclasses.replace(encoder, checkpoint=stage1["checkpoint"])
        if video is not None:
            video = dataclasses.replace(video, aggregator_checkpoint=stage1["aggregator_checkpoint"])
    frozen = {"image_encoder", "temporal_aggregator"} if video is not None else {"image_encoder"}
    trainable = tuple(g for g in model_cfg.trainable if g not in frozen)
    return dataclasses.replace(model_cfg, image_encoder=encoder, video=video, trainable=trainable)


def _with_prompt_reader(model_cfg: ModelConfig, reader: PromptReaderConfig | None, every_row: bool) -> ModelConfig:
    """``model_cfg`` with stage 1's decoder as its (frozen) prompt reader; ``None``: unchanged."""
    if reader is None:
        return model_cfg
    reader = dataclasses.replace(reader, every_row=every_row)
    trainable = tuple(g for g in model_cfg.trainable if g != "prompt_reader")
    return dataclasses.replace(model_cfg, prompt_reader=reader, trainable=trainable)


def _resumed_stage1(model_cfg: ModelConfig, pre: EncoderPretrainConfig, out: Path, reader_rows: bool) -> ModelConfig:
    """Stage 2's model config on ``--resume``: stage 1 does not run again, its weights are in
    ``last.ckpt``; the prompt reader's shape is read from the file stage 1 left in ``out``."""
    if pre.freeze_encoder:
        model_cfg = _freeze_encoder(model_cfg)
    if not pre.prompt_reader:
        return model_cfg
    path = out / "prompt_reader.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--resume with a prompt reader needs stage 1's {path}; it is gone")
    return _with_prompt_reader(model_cfg, PromptReaderConfig.from_checkpoint(str(path), heads=pre.heads), reader_rows)


def _pretrain_encoder(cfg: RunConfig, model_cfg: ModelConfig, out: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Stage 1 on a fresh encoder (video: encoder + temporal aggregator); returns stage 2's model
    config (loading them) and stage 1's summary."""
    from encoders import ImageEncoder
    from mm_llama import load_language_model
    from mm_llama.model import MEDIA_TOKENS
    from mm_llama.training.encoder_pretrain import ClipEncoder
    from mm_llama.video_adapter import build_aggregator

    pre, video = cfg.pretrain, model_cfg.video
    datamodule = cfg.spec.datamodule(cfg, batch_size=pre.batch_size)
    lm = load_language_model(cfg.lm)  # for its tokenizer and vocabulary size; freed before stage 2
    modality = "video" if video is not None else "image"
    inputs = ModelInputs(tokenizer=lm.tokenizer, media_token_id=lm.cfg.vocab_size + MEDIA_TOKENS.index(modality),
                         image_size=model_cfg.image_encoder.image_size, system_prompt=datamodule.hparams.system_prompt,
                         frames=video.frames if video is not None else None)
    del lm
    encoder_cfg, frame_encoder, frames_stage = model_cfg.image_encoder, cfg.frame_encoder, None
    if video is not None and frame_encoder is None and cfg.frame_pretrain_steps:
        frames_stage = _pretrain_frame_encoder(cfg, model_cfg, out / "frames")
        frame_encoder = frames_stage["checkpoint"]
    if frame_encoder is not None:
        encoder_cfg = dataclasses.replace(encoder_cfg, checkpoint=frame_encoder)
    encoder = ImageEncoder(encoder_cfg)
    if video is not None:
        encoder = ClipEncoder(encoder, build_aggregator(video, encoder.out_dim, encoder.num_tokens),
                              frozen_frames=frame_encoder is not None)
    stage1 = pretrain_image_encoder(encoder, inputs, datamodule, pre, out,
                                    trainer_defaults=cfg.trainer_defaults(), progress=cfg.progress)
    if frames_stage is not None:
        stage1 = {**stage1, "seconds": stage1["seconds"] + frames_stage["seconds"], "frame_pretrain": frames_stage}
    if "prompt_reader" in stage1:  # report the reading the model will use, not stage 1's default
        stage1 = {**stage1, "prompt_reader": {**stage1["prompt_reader"], "every_row": cfg.reader_rows}}
    log.info("encoder pre-training: %s", stage1)
    reader = PromptReaderConfig(**stage1["prompt_reader"]) if "prompt_reader" in stage1 else None
    if pre.freeze_encoder:
        return _with_prompt_reader(_freeze_encoder(model_cfg, stage1), reader, cfg.reader_rows), stage1
    encoder_cfg = dataclasses.replace(model_cfg.image_encoder, checkpoint=stage1["checkpoint"])
    if video is not None:
        video = dataclasses.replace(video, aggregator_checkpoint=stage1["aggregator_checkpoint"])
    model_cfg = dataclasses.replace(model_cfg, image_encoder=encoder_cfg, video=video)
    return _with_prompt_reader(model_cfg, reader, cfg.reader_rows), stage1


def _pretrain_frame_encoder(cfg: RunConfig, model_cfg: ModelConfig, out: Path) -> dict[str, Any]:
    """Video's stage 0: the image stage 1 on the image scenes, writing the frame encoder into
    ``out`` (``<run>/frames``); returns its summary (``checkpoint``: the encoder file)."""
    image_cfg = dataclasses.replace(
        cfg, modality="image", precision=cfg.trainer_precision(),  # the video run's, not image's auto
        data_dir=None, out=str(out), image_checkpoint=None, frames=None, frame_encoder=None,
        frame_pretrain_steps=None, encoder_pretrain_steps=cfg.frame_pretrain_steps, encoder_pretrain=None,
        prompt_reader=False,
    )
    log.info("frame encoder: %d steps of image stage 1 on %s", cfg.frame_pretrain_steps, image_cfg.spec.data_dir)
    image_cfg.spec.datamodule(image_cfg).prepare_data()  # the image shards, generated if missing
    out.mkdir(parents=True, exist_ok=True)
    _, stage = _pretrain_encoder(image_cfg, dataclasses.replace(model_cfg, video=None), out)
    return stage


def _resume_checkpoint(cfg: RunConfig) -> Path | None:
    last = cfg.out_dir / "last.ckpt"
    if cfg.resume and last.is_file():
        log.info("resuming from %s", last)
        return last
    if cfg.resume:
        log.warning("--resume: %s does not exist, starting from scratch", last)
    elif last.is_file():
        log.warning("%s exists and will be overwritten (pass --resume to continue it)", last)
    return None


def _tail_mean(values: list[float], n: int = 20) -> float | None:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else None


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and paths as YAML-safe dicts, lists and strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def resolved_config(
    cfg: RunConfig,
    module: AdapterModule,
    datamodule: L.LightningDataModule,
    trainer_cfg: dict[str, Any],
    checkpoint_cfg: dict[str, Any],
    logger_cfg: dict[str, Any],
) -> dict[str, Any]:
    """The run as a LightningCLI config (``mm-llama fit --config`` reproduces it)."""
    data = {k: v for k, v in datamodule.hparams.items() if k != "system_prompt"}  # linked to the model's
    return _plain({
        "seed_everything": cfg.seed,
        "trainer": {
            **trainer_cfg,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint_cfg}],
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": logger_cfg},
            "plugins": [{"class_path": checkpoint_io.CLASS_PATH}],
        },
        "model": {
            "lm": module.hparams.lm,
            "model": module.model.cfg,
            "optim": module.optim_cfg,
            "eval_max_new_tokens": module.eval_max_new_tokens,
            "system_prompt": module.system_prompt,
            **({"lm_dtype": module.hparams.lm_dtype} if module.hparams.get("lm_dtype", "float32") != "float32" else {}),
            **({"init_from": module.hparams.init_from} if module.hparams.get("init_from") else {}),
        },
        "data": {"class_path": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", "init_args": data},
    })


def _write_config(path: Path, cfg: RunConfig, *args: Any) -> None:
    run_args = {k: v for k, v in _plain(cfg).items() if k not in ("model", "optim")}
    header = (
        "# Resolved configuration of a train_adapter.py run; `mm-llama fit --config <this file>` repeats it.\n"
        f"# train_adapter.py arguments: {json.dumps(run_args)}\n"
    )
    with atomic_write(path, "w") as file:
        file.write(header + yaml.safe_dump(resolved_config(cfg, *args), sort_keys=False))


# ---------------------------------------------------------------- command line


def _modality(value: str) -> str:
    if value in MODALITIES:
        return value
    raise argparse.ArgumentTypeError(f"unknown modality {value!r} (implemented: {', '.join(MODALITIES)})")


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="train_adapter.py",
        description="Train the adapters joining an encoder to the frozen LM; test; write checkpoint, "
        "config, plots and metrics.json (whose JSON is also the last line of stdout).",
    )
    p.add_argument("--modality", type=_modality, choices=list(MODALITIES), default=d.modality)
    p.add_argument("--lm", default=d.lm,
                   help="frozen LM: registered name, HF directory or .gguf (default: %(default)s)")
    p.add_argument("--encoder", default=None,
                   help="image: backbone '<library>:<name>', e.g. timm:vit_tiny_patch16_224 or open_clip:ViT-B-32 "
                   f"(default: {ImageEncoderConfig().backbone}; the CPU-sized depth/width/patch are kept); "
                   f"speech: one of {', '.join(SPEECH_BACKBONES)} (default: conformer)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: " + ", ".join(f"{k} {m.steps}" for k, m in MODALITIES.items()) + ")")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="samples per batch of validation and test (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {OptimConfig().lr})")
    p.add_argument("--out", default=None, help="output directory (default: runs/<modality>)")
    p.add_argument("--data-dir", default=None, help="built-in shards directory, generated if missing "
                   "(default: data/shapes for image, data/clips for video)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.ckpt if it exists")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16-mixed (frozen LM in bf16, fp32 adapters) on a bf16 GPU, and for image on a "
                        "CPU with native bf16 matmul (AVX512-BF16/AMX); else 32-true (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: steps / 2)")
    p.add_argument("--val-samples", type=int, default=d.val_samples,
                   help="validation samples per evaluation (default: %(default)s)")
    p.add_argument("--test-samples", type=int, default=None, help="test samples (default: the whole test split)")
    p.add_argument("--encoder-pretrain-steps", type=int, default=None,
                   help="steps of the image encoder's caption pre-training before the adapters (video: the "
                        "temporal aggregator on the clips, the frame encoder too with --frame-pretrain-steps 0; "
                        "not with --image-checkpoint); 0: none "
                        "(default: " + ", ".join(f"{k} {m.encoder_pretrain_steps}" for k, m in MODALITIES.items()
                                                 if m.encoder_pretraining) + ")")
    p.add_argument("--prompt-reader", action=argparse.BooleanOptionalAction, default=None,
                   help="image: keep stage 1's decoder, frozen, to read the text against its image; the "
                        "cross-attention blocks see its reading (see --reader-rows) "
                        f"(default: {'on' if MODALITIES['image'].prompt_reader else 'off'})")
    p.add_argument("--reader-rows", action=argparse.BooleanOptionalAction, default=RunConfig.reader_rows,
                   help="with the prompt reader: every text row, answer rows included, sees the reader's state at "
                        "its own row; --no-reader-rows: only the state at the prompt's end joins the media tokens "
                        "(default: %(default)s)")
    p.add_argument("--image-checkpoint", default=None,
                   help="(video) image-stage adapter.ckpt to start from; only the video branch then trains "
                        "(default: none, the image configuration trains with the video branch)")
    p.add_argument("--frames", type=int, default=None,
                   help=f"(video) frames sampled per clip (default: {VideoConfig().frames})")
    p.add_argument("--frame-encoder", default=None,
                   help="(video) an image run's image_encoder.safetensors: stage 1 keeps this frame encoder "
                        "frozen and trains the temporal aggregator (default: none, trained here first, "
                        "see --frame-pretrain-steps)")
    p.add_argument("--frame-pretrain-steps", type=int, default=None,
                   help="(video) steps of an image stage 1 on the image scenes that trains the frame encoder "
                        "before video's stage 1 (not with --frame-encoder or --image-checkpoint); 0: none, the "
                        f"frame encoder then trains from scratch with the aggregator (default: "
                        f"{FRAME_PRETRAIN_STEPS})")
    p.add_argument("--speech-pretrain", choices=SPEECH_PRETRAINING, default=d.speech_pretrain,
                   help="speech: pre-training of the Conformer before the adapters: ctc (on the transcripts; "
                        "the encoder is then frozen) or best_rq (self-supervised) (default: %(default)s)")
    p.add_argument("--speech-pretrain-steps", type=int, default=d.speech_pretrain_steps,
                   help="speech: steps of that pre-training; 0: none (default: %(default)s)")
    p.add_argument("--speech-adapter-pretrain-steps", type=int, default=d.speech_adapter_pretrain_steps,
                   help="speech, after ctc: steps of the adapter's token-CTC stage against the LM's input "
                        "embeddings; 0: none (default: %(default)s)")
    p.add_argument("--fusion", choices=SPEECH_FUSIONS, default=d.fusion,
                   help="speech: how speech frames reach the LM (default: %(default)s)")
    p.add_argument("--task-weights", type=parse_task_weights, default=None, metavar="TASK=P[,TASK=P]",
                   help="stage 2's training mix: keep a training sample of TASK with probability P (others: "
                        "1), e.g. count=0.25; 'all' keeps every sample (default: the modality's, image: "
                        f"{_format_task_weights(MODALITIES['image'].task_weights)})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def parse_task_weights(text: str) -> dict[str, float]:
    """``"count=0.25,caption=0.5"`` → ``{"count": 0.25, "caption": 0.5}``; ``"all"`` → ``{}``.

    Raises:
        argparse.ArgumentTypeError: a malformed item or a probability outside [0, 1].
    """
    if text.strip().lower() == "all":
        return {}
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not task.strip() or not 0.0 <= weight <= 1.0:
            raise argparse.ArgumentTypeError(f"{item!r}: expected TASK=P with P in [0, 1] (e.g. count=0.25)")
        weights[task.strip()] = weight
    if not weights:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TASK=P[,TASK=P] or 'all'")
    return weights


def _format_task_weights(weights: dict[str, float]) -> str:
    return ",".join(f"{task}={weight:g}" for task, weight in weights.items()) or "all"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, :func:`run`, print the metrics JSON as the last line of stdout."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = RunConfig(**vars(args))
    except ValueError as exn:
        build_parser().error(str(exn))
    metrics = run(cfg)
    print(json.dumps(json_safe(metrics), sort_keys=True), flush=True)
    return 0
