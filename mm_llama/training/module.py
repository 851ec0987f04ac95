"""The Lightning module that trains the adapters of a :class:`MultimodalLlama`.

Checkpoints hold only what is not the frozen LM (encoders, projection, adapters,
fusion embeddings) plus the LM's identity (source path and sha256), so a 135M- or
405B-parameter LM is never copied into a checkpoint.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import lightning as L
import torch

from adapters.speech_adapter import SpeechAdapterConfig
from encoders import ImageEncoderConfig
from encoders.speech import SpeechEncoderConfig
from encoders.speech_frontend import FrontEndConfig
from mm_llama.data.examples import encode_prompt
from mm_llama.generation import generate
from mm_llama.lm import load_language_model
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama
from mm_llama.speech_generation import generate_from_speech
from mm_llama.training.optim import OptimConfig, build_optimizer
from mm_llama.training.speech_metrics import speech_metrics

log = logging.getLogger(__name__)

# Checkpoints carry the hyper-parameters, i.e. these plain config dataclasses; Lightning restores
# with torch.load(weights_only=True), whose unpickler must be allowed to rebuild them.
torch.serialization.add_safe_globals([ModelConfig, ImageEncoderConfig, CrossAttentionConfig, OptimConfig,
                                      SpeechEncoderConfig, FrontEndConfig, SpeechAdapterConfig])

DEFAULT_LM = "smollm2-135m-instruct"


def normalise_answer(text: str) -> str:
    """Exact-match normalisation: case, surrounding whitespace and a final full stop."""
    return " ".join(text.strip().lower().rstrip(".").split())


class AdapterModule(L.LightningModule):
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
    """

    def __init__(
        self,
        lm: str = DEFAULT_LM,
        model: ModelConfig | None = None,
        optim: OptimConfig | None = None,
        eval_max_new_tokens: int = 24,
        system_prompt: str | None = "",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim_cfg = optim or OptimConfig()
        self.eval_max_new_tokens = eval_max_new_tokens
        self.system_prompt = system_prompt
        language_model = load_language_model(lm)
        self.model = MultimodalLlama(language_model, model or ModelConfig())
        self.tokenizer = language_model.tokenizer
        self.lm_identity = {"source": language_model.source, "sha256": language_model.source_digest}
        self.strict_loading = False  # checkpoints deliberately omit the frozen LM; checked below
        self._eval: dict[str, list[tuple[bool, dict]]] = defaultdict(list)

    # --- training ------------------------------------------------------------------------
    def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Response-token loss of an image batch (``images``) or a speech batch (``audio``)."""
        if "audio" in batch:
            return self.model.speech_loss(batch["input_ids"], batch["labels"], batch["audio"], batch["audio_lengths"])
        return self.model.loss(batch["input_ids"], batch["labels"], batch["images"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step} "
                f"(batch keys {[m.get('__key__') for m in batch['meta']][:8]})"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        opt, sched = build_optimizer(named, self.model.group_of, self.optim_cfg)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- evaluation ----------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        b = batch["input_ids"].shape[0]
        loss = self.batch_loss(batch)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=b)
        predictions = self.predict_batch(batch)
        for pred, meta in zip(predictions, batch["meta"]):
            hit = normalise_answer(pred) == normalise_answer(meta["response"])
            self._eval[stage].append((hit, {**meta, "prediction": pred}))

    def predict_batch(self, batch: dict[str, Any]) -> list[str]:
        """Greedy answers to the prompts of an image or speech batch."""
        prompts = [m["prompt"] for m in batch["meta"]]
        if "audio" in batch:
            return self.predict_speech_answers(batch["audio"], batch["audio_lengths"], prompts)
        return self.predict_answers(batch["images"], prompts)

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

    def predict_answers(self, images: torch.Tensor, prompts: list[str]) -> list[str]:
        """Greedy answers to ``prompts`` about ``images [b, 3, H, W]``."""
        media_id = self.model.media_token_id("image")
        ids = [
            encode_prompt(self.tokenizer, p, media_token_id=media_id, system=self.system_prompt)["input_ids"].tolist()
            for p in prompts
        ]
        out = generate(self.model, ids, images, max_new_tokens=self.eval_max_new_tokens,
                       stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id)
        return [self.tokenizer.decode(o) for o in out]

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx):
        """Greedy answers: ``[{"__key__", "prompt", "prediction", "response"}, ...]`` per batch."""
        predictions = self.predict_batch(batch)
        return [
            {"__key__": m.get("__key__"), "prompt": m["prompt"], "prediction": p, "response": m.get("response")}
            for p, m in zip(predictions, batch["meta"])
        ]

    def _finish(self, stage: str) -> None:
        results = self._eval.pop(stage, [])
        if not results:
            return
        metrics = summarise(results)
        metrics.update(speech_metrics(results, normalise_answer))  # nothing unless samples are asr / qa
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, prog_bar=k == "exact_match", sync_dist=True)
        self.last_eval = {"stage": stage, "metrics": metrics, "samples": [m for _, m in results[:16]]}

    def on_validation_epoch_end(self):
        self._finish("val")

    def on_test_epoch_end(self):
        self._finish("test")

    # --- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in self.model.trainable_state_dict().items()}
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
