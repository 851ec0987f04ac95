"""The arguments of one ``train_adapter.py`` run (:class:`RunConfig`, checked when built) and the
trainer settings every stage starts from (:func:`trainer_defaults`, shared with ``mm-llama``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.speech_adapter import SPEECH_FUSIONS
from mm_llama.data.pipeline import check_task_weights
from mm_llama.model import ModelConfig
from mm_llama.training.encoder_pretrain import EncoderPretrainConfig
from mm_llama.training.modalities import FRAME_PRETRAIN_STEPS, MODALITIES, SPEECH_PRETRAINING, Modality
from mm_llama.training.module import DEFAULT_LM
from mm_llama.training.optim import OptimConfig


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
    """Trainer settings shared by ``mm-llama`` (as LightningCLI defaults) and :func:`~mm_llama.training.run.run`."""
    return {
        "accelerator": "auto",
        "precision": default_precision(),
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
    }


@dataclass
class RunConfig:
    """Arguments of one run (the command-line flags of ``train_adapter.py``).

    Attributes:
        modality: a key of :data:`~mm_llama.training.modalities.MODALITIES`.
        lm: frozen LM: registered name, HF directory or ``.gguf`` file.
        encoder: encoder backbone ``"<library>:<name>"`` (e.g. ``"open_clip:ViT-B-32"``);
            the CPU-sized shape of the default config (depth, width, patch) is kept.
            ``None``: the default config's backbone.
        steps: optimizer steps (also the length of the cosine decay); ``None``: the modality's
            default (:attr:`Modality.steps`: 150 for image, 400 for video, 200 for speech; 400 for
            speech with ``fusion="cross_attention"``, :attr:`Modality.fusion_steps`).
        batch_size: samples per step, or per micro-batch with ``accumulate_grad_batches``.
        eval_batch_size: samples per batch of validation and test (answers generated without
            gradients: 32 a batch took 30.5 s for 128 test samples, 8 a batch 45.6 s; stop 17, 2-core CPU).
        lr: peak learning rate; ``None`` keeps :class:`OptimConfig`'s.
        out: output directory; ``None``: the modality's default (``runs/image``).
        data_dir: built-in shards directory; ``None``: the modality's default (``data/shapes``).
        resume: continue from ``<out>/last.ckpt`` when it exists; before it does, an unfinished
            encoder pre-training stage continues from ``<out>/encoder_pretrain_last.ckpt``.
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
            Skipped on ``--resume`` once stage 2 has a checkpoint (the encoder's weights are in it).
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
        activation_checkpointing: stage 2 recomputes the LM's, the cross-attention blocks and a
            trained encoder's in backward instead of holding their activations
            (``AdapterModule(activation_checkpointing=...)``), stage 1 the encoder's: for a larger
            ``lm`` or encoder on a small accelerator; slower, same losses. ``0``: off, ``1``: every
            block, ``n``: every n-th decoder block.
        accumulate_grad_batches: stage 2 sums the gradients of this many batches of ``batch_size``
            per optimizer step (Lightning's ``accumulate_grad_batches``): a step sees
            ``accumulate_grad_batches * batch_size`` samples with the activation memory of one batch.
            ``steps`` and ``val_every`` still count optimizer steps.
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
    activation_checkpointing: int = 0
    accumulate_grad_batches: int = 1

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not implemented yet; implemented: {sorted(MODALITIES)}")
        if self.steps is None:
            self.steps = self.spec.fusion_steps.get(self.fusion, self.spec.steps)
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
        for name in ("steps", "batch_size", "eval_batch_size", "val_samples", "eval_max_new_tokens",
                     "accumulate_grad_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.activation_checkpointing < 0:
            raise ValueError(f"--activation-checkpointing takes a block interval >= 1 (or none), "
                             f"got {self.activation_checkpointing}")
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
