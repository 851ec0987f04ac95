"""``python train_adapter.py --modality image``: one adapter training run, end to end.

:func:`run` generates the built-in shards if they are missing, loads the frozen LM,
trains the adapters with Lightning (validating on a capped validation set a few
times), tests on the whole test split and writes into ``out``:

* ``adapter.ckpt``: only the trained weights plus the LM's identity (no optimizer);
* ``last.ckpt``: the full training state, for ``--resume``; while stage 1 (image and video
  encoder pre-training) is unfinished, its own state is ``encoder_pretrain_last.ckpt``, which
  ``--resume`` continues from;
* ``config.yaml``: the resolved configuration, a valid ``mm-llama fit --config`` file;
* ``training_curve.png``, ``samples.png`` and ``metrics.json``.

The run's arguments are a :class:`~mm_llama.training.run_config.RunConfig`; what each modality
builds and which stages it runs first are entries of
:data:`~mm_llama.training.modalities.MODALITIES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from adapters.prompt_reader import PromptReaderConfig
from adapters.speech_adapter import SPEECH_FUSIONS
from encoders import ImageEncoderConfig
from encoders.speech import SPEECH_BACKBONES
from mm_llama.checkpoint_files import atomic_write
from mm_llama.model import ModelConfig
from mm_llama.training import checkpoint_io
from mm_llama.training.checkpoint_io import AtomicCheckpointIO
from mm_llama.training.console import PartsSummary, StepProgressBar, quiet_lightning
from mm_llama.training.datamodule import ModelInputs
from mm_llama.training.encoder_pretrain import EncoderPretrainConfig, pretrain_image_encoder
from mm_llama.training.modalities import FRAME_PRETRAIN_STEPS, MODALITIES, SPEECH_PRETRAINING
from mm_llama.training.module import AdapterModule, normalise_answer
from mm_llama.training.optim import OptimConfig
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
from mm_llama.training.run_config import PRECISIONS, RunConfig, cpu_has_native_bf16
from mm_llama.video_adapter import VideoConfig

log = logging.getLogger(__name__)


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
                           lm_dtype=lm_dtype, init_from=cfg.image_checkpoint,
                           activation_checkpointing=cfg.activation_checkpointing)

    history, test_samples = TrainingHistory(), TestSamples(8)
    checkpoint_cfg = {
        "dirpath": str(out), "save_last": True, "save_top_k": 0,
        "every_n_train_steps": cfg.validate_every, "enable_version_counter": False,
    }  # fmt: skip
    logger_cfg = {"save_dir": str(out), "name": "logs"}
    trainer_cfg = {
        **cfg.trainer_defaults(),
        "max_steps": cfg.steps,
        "val_check_interval": cfg.validate_every * cfg.accumulate_grad_batches,  # counts batches
        "accumulate_grad_batches": cfg.accumulate_grad_batches,
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
        "shard_retries": datamodule.retried_shards(),
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
    # --activation-checkpointing: the trained encoder's blocks are recomputed here too (its
    # activations are most of this stage's memory); a frozen frame encoder keeps none.
    encoder.set_grad_checkpointing(cfg.activation_checkpointing > 0 and (video is None or frame_encoder is None))
    if video is not None:
        encoder = ClipEncoder(encoder, build_aggregator(video, encoder.out_dim, encoder.num_tokens),
                              frozen_frames=frame_encoder is not None)
    stage1 = pretrain_image_encoder(encoder, inputs, datamodule, pre, out, trainer_defaults=cfg.trainer_defaults(),
                                    progress=cfg.progress, resume=cfg.resume)
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
        log.warning("--resume: %s does not exist, training the adapters from scratch (after any unfinished "
                    "pre-training stage, continued from its own checkpoint)", last)
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
            **({"activation_checkpointing": module.hparams.activation_checkpointing}
               if module.hparams.get("activation_checkpointing") else {}),
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
                   help="optimizer steps (default: " + ", ".join(
                       f"{k} {m.steps}" + "".join(f"; {n} with --fusion {f}" for f, n in m.fusion_steps.items())
                       for k, m in MODALITIES.items()) + ")")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="samples per batch of validation and test (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {OptimConfig().lr})")
    p.add_argument("--out", default=None, help="output directory (default: runs/<modality>)")
    p.add_argument("--data-dir", default=None, help="built-in shards directory, generated if missing "
                   "(default: data/shapes for image, data/clips for video)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/last.ckpt if it exists (else an unfinished stage 1 from its own checkpoint)")
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
                   help="speech: how speech frames reach the LM; cross_attention trains 400 steps by default "
                        "(held-out WER 0.0-0.25 %% there, 10.9 %% at 200) (default: %(default)s)")
    p.add_argument("--task-weights", type=parse_task_weights, default=None, metavar="TASK=P[,TASK=P]",
                   help="stage 2's training mix: keep a training sample of TASK with probability P (others: "
                        "1), e.g. count=0.25; 'all' keeps every sample (default: the modality's, image: "
                        f"{_format_task_weights(MODALITIES['image'].task_weights)})")
    p.add_argument("--activation-checkpointing", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="recompute the LM's, the cross-attention and a trained encoder's blocks in backward "
                        "instead of holding their activations: less memory for a larger --lm, one more forward "
                        "of them a step (stage 1: the encoder's blocks); N: only every N-th decoder block "
                        "(default: off)")
    p.add_argument("--accumulate-grad-batches", type=int, default=d.accumulate_grad_batches, metavar="K",
                   help="sum the gradients of K batches per optimizer step: K x --batch-size samples a step, "
                        "one batch's activation memory (default: %(default)s)")
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
