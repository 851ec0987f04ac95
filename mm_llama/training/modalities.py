"""What ``train_adapter.py`` trains for each modality (:class:`Modality`, :data:`MODALITIES`).

An entry says how its model and data are built from a
:class:`~mm_llama.training.run_config.RunConfig`, which stages run before the adapters, what its
defaults are and what it adds to ``metrics.json``; :func:`~mm_llama.training.run.run` trains any
entry the same way. A new modality plugs in as one more entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import lightning as L

from adapters.speech_adapter import SpeechAdapterConfig
from encoders import ImageEncoderConfig
from encoders.speech import SPEECH_BACKBONES, SpeechEncoderConfig
from mm_llama.model import CrossAttentionConfig, ModelConfig
from mm_llama.training.datamodule import ImageDataModule, ModelInputs
from mm_llama.training.encoder_pretrain import EncoderPretrainConfig
from mm_llama.training.module import AdapterModule
from mm_llama.training.speech_datamodule import SpeechDataModule
from mm_llama.training.video_stage import video_stage_config
from mm_llama.video_adapter import VideoConfig

if TYPE_CHECKING:
    from mm_llama.training.run_config import RunConfig

DEFAULT_STEPS = 200
"""Optimizer steps of a run whose modality does not set its own (:attr:`Modality.steps`)."""


@dataclass(frozen=True)
class Modality:
    """How one modality is trained by :func:`~mm_llama.training.run.run`.

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
        fusion_steps: default steps by :attr:`RunConfig.fusion` where they differ from ``steps``.
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
    fusion_steps: dict[str, int] = field(default_factory=dict)
    encoder_pretrain_steps: int = EncoderPretrainConfig().steps
    cpu_bf16: bool = False
    task_weights: dict[str, float] = field(default_factory=dict)
    prompt_reader: bool = False


def _datamodule_args(cfg: RunConfig, batch_size: int | None) -> dict[str, Any]:
    """What every modality's data module takes from the run configuration."""
    return dict(data_dir=cfg.data_dir or cfg.spec.data_dir, batch_size=batch_size or cfg.batch_size,
                eval_batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                val_samples=cfg.val_samples, test_samples=cfg.test_samples, progress=cfg.progress)


# ---------------------------------------------------------------- image


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


IMAGE_TASK_WEIGHTS: dict[str, float] = {"count": 0.25}
"""Stage 2's default mix on the image scenes: count questions are a quarter of the data and always
answered right, so 3 in 4 of them give their place to the other tasks (stop 20, 2-core CPU: 88.7 %
over 2 seeds of the whole run against 86-88.5 % before; benchmarks/RESULTS.md, "Image runs")."""


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


def _image_datamodule(cfg: RunConfig, batch_size: int | None = None,
                      task_weights: dict[str, float] | None = None) -> ImageDataModule:
    return ImageDataModule(**_datamodule_args(cfg, batch_size), task_weights=task_weights or None)


# ---------------------------------------------------------------- video


FRAME_PRETRAIN_STEPS = 600
"""Video's default ``frame_pretrain_steps``: the image stage 1 its frame encoder was measured with
(stop 16, 97.7 %); the image run's own stage 1 is longer since stop 24, for its prompt reader."""


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


# ---------------------------------------------------------------- speech


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
    (frozen after CTC, as the image encoder is after its caption stage). On ``resume`` (stage 2 has a
    ``last.ckpt``) nothing runs: the encoder's weights are in it, only the trainable set is restored.
    Otherwise ``cfg.resume`` continues each stage from its own state in ``out`` (a finished one
    trains nothing)."""
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
                       trainer_defaults=cfg.trainer_defaults(), progress=cfg.progress, resume=cfg.resume)
    encoder = dataclasses.replace(model_cfg.speech_encoder, checkpoint=summary["checkpoint"])
    adapter = model_cfg.speech_adapter
    if ctc and cfg.speech_adapter_pretrain_steps:
        # The adapter's output starts at the embedding table's RMS under embedding fusion (as in the model).
        rms = float(embed_tokens.pow(2).mean().sqrt()) if adapter.fusion == "embedding" else 1.0
        summary["adapter"] = pretrain_speech_adapter_ctc(
            encoder, adapter, embed_tokens, tokenize, datamodule, cfg.speech_adapter_pretrain_steps, out,
            output_rms=rms, trainer_defaults=cfg.trainer_defaults(), progress=cfg.progress, resume=cfg.resume)
        adapter = dataclasses.replace(adapter, checkpoint=summary["adapter"]["checkpoint"])
    return dataclasses.replace(model_cfg, speech_encoder=encoder, speech_adapter=adapter, trainable=trainable), summary


def _speech_metrics(cfg: RunConfig, datamodule: L.LightningDataModule) -> dict[str, Any]:
    return {"fusion": cfg.fusion, "audio_adjusted": datamodule.audio_adjusted()}


# ---------------------------------------------------------------- the table


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
    # still climbs at 200 steps: 400 gave 34 % instead of 16 % on the same stage-1 files
    # (benchmarks/RESULTS.md, "Video runs").
    "video": Modality(_video_model_config, _video_datamodule, data_dir="data/clips", out="runs/video",
                      extra_tests=frame_ablations, steps=400, encoder_pretrain_steps=400),
    # Speech: CTC and token CTC first (pretrain_stage), then 200 adapter steps: embedding fusion's
    # held-out WER 0.63 % (stop 31). Cross-attention fusion gets 400 (10.9 % at 200; 0.0 and 0.25 %
    # at 400 on two seeds, stop 32; README, "Speech").
    "speech": Modality(_speech_model_config, _speech_datamodule, data_dir="data/speech", out="runs/speech-{fusion}",
                       encoder_pretraining=False, extra_metrics=_speech_metrics, pretrain_stage=_pretrain_speech_encoder,
                       fusion_steps={"cross_attention": 400}),
}
"""The modalities ``train_adapter.py`` trains."""
