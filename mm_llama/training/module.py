"""The Lightning module that trains the adapters of a :class:`MultimodalLlama`.

Checkpoints hold only what is not the frozen LM (encoders, projection, adapters,
fusion embeddings) plus the LM's identity (source path and sha256), so a 135M- or
405B-parameter LM is never copied into a checkpoint.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Literal

import lightning as L
import torch

from adapters.prompt_reader import PromptReaderConfig
from adapters.speech_adapter import SpeechAdapterConfig
from encoders import ImageEncoderConfig, MllamaVisionEncoderConfig
from encoders.speech import SpeechEncoderConfig
from encoders.speech_frontend import FrontEndConfig
from mm_llama.data.examples import encode_prompt
from mm_llama.generation import generate
from mm_llama.lm import load_language_model
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama
from mm_llama.data.video import frame_view
from mm_llama.speech_generation import generate_from_speech
from mm_llama.training.modes import TrainModes
from mm_llama.training.optim import OptimConfig, build_optimizer, uses_loss_scaling
from mm_llama.training.random_state import RandomStateCheckpoint
from mm_llama.training.scale import ClipsGradients, compile_blocks_, gather_to_all, is_sharded
from mm_llama.training.speech_metrics import speech_metrics
from mm_llama.training.video_stage import VIDEO_GROUPS, check_video_stage_trainable, load_stage_weights
from mm_llama.video_adapter import VideoConfig

log = logging.getLogger(__name__)

# Checkpoints carry the hyper-parameters, i.e. these plain config dataclasses; Lightning restores
# with torch.load(weights_only=True), whose unpickler must be allowed to rebuild them.
torch.serialization.add_safe_globals([
    ModelConfig, ImageEncoderConfig, MllamaVisionEncoderConfig, CrossAttentionConfig, OptimConfig, VideoConfig,
    SpeechEncoderConfig, FrontEndConfig, SpeechAdapterConfig, PromptReaderConfig,
])

DEFAULT_LM = "smollm2-135m-instruct"

LM_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Dtypes the frozen LM may be held in (``AdapterModule(lm_dtype=...)``)."""


def normalise_answer(text: str) -> str:
    """Exact-match normalisation: case, surrounding whitespace and a final full stop."""
    return " ".join(text.strip().lower().rstrip(".").split())


class AdapterModule(ClipsGradients, TrainModes, L.LightningModule):
    """Trains everything but the frozen LM on next-token loss over response tokens.

    Args:
        lm: registered LM name, HF directory or ``.gguf`` path (frozen).
        model: encoder / cross-attention configuration.
        optim: AdamW + schedule.
        eval_max_new_tokens: generation budget for the answer-accuracy metric.
        system_prompt: system message of every prompt. ``""`` (default) is an empty
            system turn; ``None`` lets the chat template insert its default, which for
            SmolLM2 is 16 more tokens per example (39 instead of 23 for a caption
            prompt, about 1.6x the LM compute of the adapter's training step).
        lm_dtype: dtype the frozen LM is held in, a key of :data:`LM_DTYPES`. ``"bfloat16"``
            halves its memory (16 GB for Llama 3.1 8B, 141 GB for 70B); everything that
            trains stays fp32 whatever this is. Works with any strategy and precision
            (see :mod:`mm_llama.training.scale`).
        compile_blocks: ``torch.compile`` every decoder, cross-attention and media-encoder block
            (each on its own, so FSDP units and activation checkpointing stay per block).
        activation_checkpointing: recompute the LM's decoder blocks, the cross-attention blocks
            and the blocks of an encoder that trains in backward instead of holding their activations
            (:meth:`~mm_llama.model.MultimodalLlama.set_grad_checkpointing`); an integer ``n >= 2``
            recomputes only every n-th decoder block (``0``/``false``: off). For one device and
            DDP; under FSDP the strategy's own is the one (``AdapterFSDPStrategy(activation_checkpointing=True)``),
            and this one is refused. On the SmolLM2-shaped benchmark (``benchmarks/vs_hf_mllama.py``,
            batch 4 x 128): 91 MB saved for backward instead of 520, a third more FLOPs a step.
        init_from: an earlier stage's checkpoint (e.g. the image stage's ``adapter.ckpt``) whose
            weights start this stage; weights it lacks (a new video branch) keep their
            initialisation. With ``model.trainable`` equal to the video groups, the trainable
            set is asserted to be exactly the video branch (video pre-training, Llama 3 §7.4).

    Attributes:
        eval_frame_view: how evaluation shows clips' frames (``"ordered"``, ``"shuffled"``,
            ``"single"``; :func:`~mm_llama.data.video.frame_view`), for the temporal ablations.
    """

    def __init__(
        self,
        lm: str = DEFAULT_LM,
        model: ModelConfig | None = None,
        optim: OptimConfig | None = None,
        eval_max_new_tokens: int = 24,
        system_prompt: str | None = "",
        lm_dtype: Literal["float32", "bfloat16"] = "float32",
        compile_blocks: bool = False,
        init_from: str | None = None,
        activation_checkpointing: bool | int = False,
    ) -> None:
        super().__init__()
        if lm_dtype not in LM_DTYPES:
            raise ValueError(f"AdapterModule.lm_dtype must be one of {sorted(LM_DTYPES)}, got {lm_dtype!r}")
        self.save_hyperparameters()
        self.optim_cfg = optim or OptimConfig()
        self.eval_max_new_tokens = eval_max_new_tokens
        self.system_prompt = system_prompt
        language_model = load_language_model(lm, dtype=LM_DTYPES[lm_dtype])
        self.model = MultimodalLlama(language_model, model or ModelConfig())
        every = int(activation_checkpointing)  # True: every block
        if every < 0:
            raise ValueError(f"AdapterModule.activation_checkpointing must be true, false or a block interval >= 1, "
                             f"got {activation_checkpointing!r}")
        self.model.set_checkpoint_interval(every)
        if compile_blocks:
            compile_blocks_(self.model)
        # Names and shapes as built: FSDP (use_orig_params) keeps these parameter objects but
        # renames them (wrapper prefixes) and turns them into 1-D shards.
        self._named_parameters = list(self.model.named_parameters())
        self._parameter_ndims = {name: p.ndim for name, p in self._named_parameters}
        self.tokenizer = language_model.tokenizer
        self.lm_identity = {"source": language_model.source, "sha256": language_model.source_digest}
        if init_from is not None:
            load_stage_weights(self.model, init_from, self.lm_identity["sha256"])
        if set(self.model.cfg.trainable) == set(VIDEO_GROUPS):
            check_video_stage_trainable(self.model)
        self.eval_frame_view = "ordered"
        self.strict_loading = False  # checkpoints deliberately omit the frozen LM; checked below
        self._eval: dict[str, list[tuple[bool, dict]]] = defaultdict(list)

    # --- training ------------------------------------------------------------------------
    @staticmethod
    def media(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's media as keyword arguments of ``MultimodalLlama.loss`` / ``generate``
        (images, or videos with their frame mask; speech batches go through :meth:`batch_loss`)."""
        if "videos" in batch:
            return {"videos": batch["videos"], "frame_mask": batch["frame_mask"]}
        return {"images": batch["images"]}

    def batch_loss(self, batch: dict[str, Any], media: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Response-token loss of an image, video or speech (``audio``) batch; ``media``
        overrides :meth:`media` (e.g. shuffled frames)."""
        share = not is_sharded(self._trainer)  # FSDP: every rank must run the same LM forwards
        if "audio" in batch:
            return self.model.speech_loss(batch["input_ids"], batch["labels"], batch["audio"], batch["audio_lengths"],
                                          share_prefix=share)
        return self.model.loss(batch["input_ids"], batch["labels"], **(media or self.media(batch)), share_prefix=share)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step} "
                f"(batch keys {[m.get('__key__') for m in batch['meta']][:8]})"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def setup(self, stage: str) -> None:
        if self.model.grad_checkpointing and is_sharded(self.trainer):
            raise ValueError(
                "AdapterModule(activation_checkpointing=True) under FSDP: there the strategy checkpoints the "
                "blocks inside its units; set AdapterFSDPStrategy(activation_checkpointing=true) (or N, every "
                "N-th decoder block) and the module's to false")

    def configure_callbacks(self) -> list[L.Callback]:
        """Generator states in every checkpoint, so that a resumed run draws the random numbers the
        uninterrupted one drew (:class:`~mm_llama.training.random_state.RandomStateCheckpoint`)."""
        return [RandomStateCheckpoint()]

    def configure_optimizers(self):
        named = [(n, p) for n, p in self._named_parameters if p.requires_grad]
        opt, sched = build_optimizer(named, self.model.group_of, self.optim_cfg, ndims=self._parameter_ndims,
                                     fused=not uses_loss_scaling(self._trainer))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- evaluation ----------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], stage: str, batch_idx: int = 0) -> None:
        b = batch["input_ids"].shape[0]
        media = None if "audio" in batch else self.media(batch)
        if media is not None and "videos" in media and self.eval_frame_view != "ordered":
            generator = torch.Generator().manual_seed(batch_idx)  # the same shuffle every evaluation
            media["videos"] = frame_view(media["videos"].cpu(), media["frame_mask"].cpu(), self.eval_frame_view,
                                         generator).to(media["videos"].device)
        loss = self.batch_loss(batch, media)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=b)
        predictions = self.predict_batch(batch, media)
        for pred, meta in zip(predictions, batch["meta"]):
            hit = normalise_answer(pred) == normalise_answer(meta["response"])
            self._eval[stage].append((hit, {**meta, "prediction": pred}))

    def predict_batch(self, batch: dict[str, Any], media: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Greedy answers to the prompts of an image, video or speech batch."""
        prompts = [m["prompt"] for m in batch["meta"]]
        if "audio" in batch:
            return self.predict_speech_answers(batch["audio"], batch["audio_lengths"], prompts)
        media = media or self.media(batch)
        return self.predict_answers(media.get("images"), prompts, videos=media.get("videos"),
                                    frame_mask=media.get("frame_mask"))

    def predict_speech_answers(self, audio: torch.Tensor, lengths: torch.Tensor, prompts: list[str]) -> list[str]:
        """Greedy answers to ``prompts`` about ``audio [b, n]`` (16 kHz, ``lengths [b]`` samples)."""
        media_id = self.model.media_token_id("speech")
        ids = [
            encode_prompt(self.tokenizer, p, media_placeholder="<|speech|>", media_token_id=media_id,
                          system=self.system_prompt)["input_ids"].tolist()
            for p in prompts
        ]
        out = generate_from_speech(self.model, ids, audio, lengths, max_new_tokens=self.eval_max_new_tokens,
                                   stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id)
        return [self.tokenizer.decode(o) for o in out]

    def predict_answers(self, images: torch.Tensor | None, prompts: list[str], *, videos: torch.Tensor | None = None,
                        frame_mask: torch.Tensor | None = None) -> list[str]:
        """Greedy answers to ``prompts`` about ``images [b, 3, H, W]`` or ``videos [b, f, 3, H, W]``."""
        modality = "video" if videos is not None else "image"
        media_id = self.model.media_token_id(modality)
        ids = [
            encode_prompt(self.tokenizer, p, media_placeholder=f"<|{modality}|>", media_token_id=media_id,
                          system=self.system_prompt)["input_ids"].tolist()
            for p in prompts
        ]
        out = generate(self.model, ids, images, max_new_tokens=self.eval_max_new_tokens,
                       stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id,
                       stop_early=not is_sharded(self._trainer), videos=videos, frame_mask=frame_mask)
        return [self.tokenizer.decode(o) for o in out]

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", batch_idx)

    def predict_step(self, batch, batch_idx):
        """Greedy answers: ``[{"__key__", "prompt", "prediction", "response"}, ...]`` per batch."""
        predictions = self.predict_batch(batch)
        return [
            {"__key__": m.get("__key__"), "prompt": m["prompt"], "prediction": p, "response": m.get("response")}
            for p, m in zip(predictions, batch["meta"])
        ]

    def _finish(self, stage: str) -> None:
        # Every rank evaluated its own shards: summarise all of them, the same on every rank.
        results = gather_to_all(self._eval.pop(stage, []), self._trainer)
        if not results:
            return
        metrics = summarise(results)
        metrics.update(speech_metrics(results, normalise_answer))  # nothing unless samples are asr / qa
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, prog_bar=k == "exact_match", sync_dist=True)
        # Every sample, judged: train_adapter.py writes the test's to test_predictions.jsonl.
        self.last_eval = {"stage": stage, "metrics": metrics, "samples": [{**m, "correct": hit} for hit, m in results]}

    def on_validation_epoch_end(self):
        self._finish("val")

    def on_test_epoch_end(self):
        self._finish("test")

    # --- checkpoints ---------------------------------------------------------------------
    def keeps_in_checkpoint(self, name: str) -> bool:
        """Whether the state-dict entry ``name`` (``model.…``) goes into a checkpoint: what
        :meth:`MultimodalLlama.trainable_state_dict` holds, never the frozen LM. Under FSDP,
        :class:`~mm_llama.training.scale.AdapterFSDPStrategy` gathers only the units holding such entries."""
        return name.startswith("model.") and self.model.group_of(name.removeprefix("model.")) is not None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Filter the state Lightning gathered (under FSDP: already only these entries, from the strategy)
        # to what MultimodalLlama.trainable_state_dict holds, rather than asking the (wrapped) model again.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.keeps_in_checkpoint(k)}
        checkpoint["lm_identity"] = self.lm_identity

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint, self.lm_identity, {f"model.{k}" for k in self.model.trainable_state_dict()})


def check_checkpoint(checkpoint: dict[str, Any], lm_identity: dict[str, str], expected_keys: set[str]) -> None:
    """Raise ``ValueError`` naming the mismatch if ``checkpoint`` does not fit this model."""
    found = checkpoint.get("lm_identity")
    if found is None:
        raise ValueError("checkpoint has no 'lm_identity': it was not written by mm-llama's AdapterModule")
    if found.get("sha256") != lm_identity["sha256"]:
        raise ValueError(
            f"checkpoint was trained on LM {found.get('source')} (sha256 {str(found.get('sha256'))[:12]}…) "
            f"but this model uses {lm_identity['source']} (sha256 {lm_identity['sha256'][:12]}…)"
        )
    keys = set(checkpoint.get("state_dict", {}))
    missing, unexpected = sorted(expected_keys - keys), sorted(keys - expected_keys)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model config: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )


def summarise(results: list[tuple[bool, dict]]) -> dict[str, float]:
    """Exact match overall, per task, and on held-out colour-shape combinations."""
    def rate(rows):
        return sum(h for h, _ in rows) / len(rows) if rows else float("nan")

    metrics = {"exact_match": rate(results), "n": float(len(results))}
    heldout = [r for r in results if r[1].get("heldout")]
    if heldout:
        metrics["exact_match_heldout_combos"] = rate(heldout)
        metrics["exact_match_seen_combos"] = rate([r for r in results if not r[1].get("heldout")])
    for task in sorted({m.get("task") for _, m in results if m.get("task")}):
        metrics[f"exact_match_{task}"] = rate([r for r in results if r[1].get("task") == task])
    return metrics
