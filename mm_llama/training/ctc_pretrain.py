"""Speech stage 1: CTC pre-training of the Conformer on the transcripts, before the adapters.

The image path measured it first (benchmarks/RESULTS.md, "Learning dynamics"): a randomly
initialised encoder learns slowly when its only gradient comes through zero-initialised gates and a
frozen 135M-parameter LM, where every sample costs a forward and backward of the LM. A
short stage without the LM moves the encoder's learning to where samples are cheap. For
speech the natural cheap target is the transcript itself: the Conformer and a linear
character head learn to transcribe with CTC (blank + 38 characters), at a few hundred
milliseconds a step. Its encoder is then saved in the format
:attr:`~encoders.speech.SpeechEncoderConfig.checkpoint` loads and, by default, frozen
while the speech adapter learns to hand its frames to the LM.

Llama 3 pre-trains its Conformer self-supervised (BEST-RQ, :mod:`mm_llama.training.best_rq`,
also available) on millions of hours; with a few thousand synthetic clips and minutes of CPU,
supervised CTC is what gives the encoder phonetic features in time.

A second, as cheap phase trains the speech adapter the same way (:class:`TokenCTCModule`):
with the encoder frozen, CTC over the frozen LM's *tokens* of the transcript, each frame
scored by its cosine similarity with the LM's own input embedding of every token. The
adapter thus learns to put, at the frames where a word is spoken, a vector that points
where the LM's embedding of that word points: what embedding fusion hands the LM is then
close to the transcript's own embeddings before the first step through the LM.

Shape legend: ``b`` batch, ``t`` encoder frames (40 ms) or adapter frames (80 ms), ``c``
characters + blank, ``V_c`` compact token vocabulary + blank, ``d`` LM width.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.speech_adapter import SpeechAdapter, SpeechAdapterConfig
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
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

CHARACTERS = " abcdefghijklmnopqrstuvwxyz'0123456789"
"""The CTC alphabet after the blank (id 0): text is lower-cased; other characters are dropped."""

_INDEX = {ch: i + 1 for i, ch in enumerate(CHARACTERS)}


def encode_text(text: str) -> list[int]:
    """Character ids (1-based; 0 is the blank) of ``text``, lower-cased, punctuation dropped."""
    return [_INDEX[ch] for ch in text.lower() if ch in _INDEX]


def greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[str]:
    """Best-path decoding of ``log_probs [b, t, c]`` (``lengths [b]`` frames): merge repeats, drop blanks."""
    texts = []
    for row, n in zip(log_probs.argmax(-1).tolist(), lengths.tolist()):
        ids = [k for j, k in enumerate(row[:n]) if k != 0 and (j == 0 or k != row[j - 1])]
        texts.append("".join(CHARACTERS[k - 1] for k in ids))
    return texts


class _CTCStage(ClipsGradients, TrainModes, L.LightningModule):
    """What the two CTC stages share: AdamW over the trainable parameters, a finite-loss check,
    the log, and writing one part's state dict for the fused model to load.

    Subclasses set :attr:`name` (the log prefix) and implement ``loss(batch) -> (loss, extra)``.
    """

    name = "ctc"

    def __init__(self, optim: OptimConfig) -> None:
        super().__init__()
        self.optim = optim
        self.inputs: ModelInputs | None = None  # what the data module reads (the stage has no LM to ask)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def log_extra(self, batch: dict[str, Any], batch_idx: int, extra: Any) -> None:
        """Log more than the loss (default: nothing)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, extra = self.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {self.name} loss {loss.item()} at step {self.global_step}")
        self.log(f"{self.name}/loss", loss, prog_bar=True, batch_size=batch["audio"].shape[0])
        self.log_extra(batch, batch_idx, extra)
        return loss

    def configure_callbacks(self) -> list[L.Callback]:
        """Generator states in the stage's checkpoints (SpecAugment and dropout draw the same after a resume)."""
        return [RandomStateCheckpoint()]

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        opt, sched = build_optimizer(named, lambda name: name.partition(".")[0], self.optim,
                                     fused=not uses_loss_scaling(self._trainer))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @staticmethod
    def save_part(part: nn.Module, path: str | Path) -> Path:
        """Write ``part``'s state dict (what its config's ``checkpoint`` loads), atomically."""
        path = Path(path)
        with atomic_write(path, "wb") as file:
            torch.save(part.state_dict(), file)
        return path


class CTCModule(_CTCStage):
    """A :class:`~encoders.speech.SpeechEncoder` and a linear character head trained with CTC on
    the ``meta[i]["text"]`` (what is said) of speech batches.

    Args:
        encoder: the speech encoder's configuration (its ``checkpoint`` is loaded if set).
        optim: AdamW settings (warm-up, cosine decay over ``total_steps``).
    """

    name = "ctc"

    def __init__(self, encoder: SpeechEncoderConfig, optim: OptimConfig) -> None:
        super().__init__(optim)
        self.encoder = SpeechEncoder(encoder)
        self.head = nn.Linear(self.encoder.out_dim, len(CHARACTERS) + 1)

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``audio [b, n]`` 16 kHz (``lengths [b]`` samples) → log-probabilities ``[b, t, c]`` and frames ``[b]``."""
        out = self.encoder(audio, lengths)
        return self.head(out.tokens).log_softmax(-1), out.mask.sum(1)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Mean CTC loss per character of the batch, with the log-probabilities and frame counts."""
        log_probs, frames = self(batch["audio"], batch["audio_lengths"])
        targets = [torch.tensor(encode_text(m["text"]), dtype=torch.long) for m in batch["meta"]]
        target_lengths = torch.tensor([len(t) for t in targets])
        loss = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets), frames, target_lengths,
                          blank=0, reduction="mean", zero_infinity=True)  # too-fast speech: skipped, not inf
        return loss, (log_probs, frames)

    def log_extra(self, batch: dict[str, Any], batch_idx: int, extra: tuple[Tensor, Tensor]) -> None:
        if batch_idx % 10 == 0:  # greedy character error rate of this batch, for the log
            from torchmetrics.functional.text import char_error_rate

            hyps = greedy_decode(extra[0].detach(), extra[1])
            refs = ["".join(CHARACTERS[k - 1] for k in encode_text(m["text"])) for m in batch["meta"]]
            self.log("ctc/cer", char_error_rate(hyps, refs), prog_bar=True, batch_size=batch["audio"].shape[0])


def pretrain_speech_encoder_ctc(
    encoder: SpeechEncoderConfig,
    datamodule: L.LightningDataModule,
    steps: int,
    out: str | Path,
    *,
    lr: float = 2e-3,
    trainer_defaults: dict[str, Any] | None = None,
    progress: bool = True,
    checkpoint_every: int = 50,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``steps`` of CTC on ``datamodule``'s training clips; save ``out/speech_encoder.pt``.

    ``datamodule`` must already be connected to the model inputs it needs (tokenizer, ``<|speech|>`` id).
    The stage's state goes to ``out/ctc_last.ckpt`` every ``checkpoint_every`` steps; with ``resume``
    an existing one is continued from (:class:`~mm_llama.training.checkpoint_io.StageCheckpoint`).

    Returns:
        ``{"method": "ctc", "checkpoint", "steps", "seconds", "loss", "cer"}`` (loss: mean of the
        last 20 steps; cer: greedy character error rate of the last logged training batch).
    """
    module = CTCModule(encoder, OptimConfig(lr=lr, warmup_steps=min(20, steps // 5), total_steps=max(1, steps)))
    fitted = _fit(module, datamodule, steps, StageCheckpoint(out, module.name, checkpoint_every), resume,
                  trainer_defaults, progress)
    cer = fitted.pop("cer")
    summary = {"method": "ctc", "checkpoint": str(module.save_part(module.encoder, Path(out) / "speech_encoder.pt")),
               **fitted, "cer": round(float(cer), 4) if cer is not None else None}
    log.info("CTC pre-training: %s", summary)
    return summary


class TokenCTCModule(_CTCStage):
    """The speech adapter learns CTC over the LM's tokens, scored against the LM's input embeddings.

    Args:
        encoder: the (pre-trained) speech encoder's configuration; frozen here.
        adapter: the speech adapter's configuration (trained).
        embeddings: ``[V_c, d]`` the frozen LM's input embeddings of the compact vocabulary.
        lookup: LM token id → compact id + 1 (0: not in the compact vocabulary, dropped).
        tokenize: transcript → LM token ids.
        optim: AdamW settings.
        output_rms: the adapter's initial output RMS (as in the fused model).
    """

    name = "token_ctc"

    def __init__(self, encoder: SpeechEncoderConfig, adapter: SpeechAdapterConfig, embeddings: Tensor,
                 lookup: dict[int, int], tokenize, optim: OptimConfig, output_rms: float = 1.0) -> None:
        super().__init__(optim)
        self.encoder = SpeechEncoder(encoder).requires_grad_(False)
        self.adapter = SpeechAdapter(self.encoder.out_dim, embeddings.shape[1], adapter, output_rms=output_rms)
        self.register_buffer("rows", F.normalize(embeddings.float(), dim=-1), persistent=False)  # [V_c - 1, d]
        self.blank = nn.Parameter(torch.randn(embeddings.shape[1]) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # cosine → logits temperature
        self.lookup, self.tokenize = lookup, tokenize

    def train(self, mode: bool = True) -> TokenCTCModule:
        super().train(mode)
        self.encoder.eval()  # frozen: no SpecAugment, no dropout
        return self

    def targets(self, text: str) -> list[int]:
        """Compact ids (1-based; 0 is the blank) of ``text``'s LM tokens; tokens outside the vocabulary dropped."""
        return [k for k in (self.lookup.get(t, 0) for t in self.tokenize(text)) if k]

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, None]:
        """Mean CTC loss per target token of the batch."""
        with torch.no_grad():
            out = self.encoder(batch["audio"], batch["audio_lengths"])
        frames, mask = self.adapter(out.tokens, out.mask)  # [b, t, d], [b, t]
        classes = torch.cat([F.normalize(self.blank, dim=-1)[None], self.rows])  # [V_c, d]
        logits = F.normalize(frames, dim=-1) @ classes.T * self.log_scale.exp()  # [b, t, V_c]
        targets = [torch.tensor(self.targets(m["text"]), dtype=torch.long) for m in batch["meta"]]
        loss = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), torch.cat(targets), mask.sum(1),
                          torch.tensor([len(t) for t in targets]), blank=0, zero_infinity=True)
        return loss, None


def pretrain_speech_adapter_ctc(
    encoder: SpeechEncoderConfig,
    adapter: SpeechAdapterConfig,
    embed_tokens: Tensor,
    tokenize,
    datamodule: L.LightningDataModule,
    steps: int,
    out: str | Path,
    *,
    lr: float = 2e-3,
    output_rms: float = 1.0,
    vocab_scan_batches: int = 16,
    trainer_defaults: dict[str, Any] | None = None,
    progress: bool = True,
    checkpoint_every: int = 50,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``steps`` of token CTC on the adapter (encoder frozen); save ``out/speech_adapter.pt``.

    Args:
        embed_tokens: the frozen LM's input embedding table ``[V, d]``.
        tokenize: transcript → LM token ids (the LM's tokenizer).
        vocab_scan_batches: training batches whose transcripts make the compact vocabulary (the
            first ones of the first epoch: the same vocabulary on a resume).
        checkpoint_every, resume: the stage's state in ``out/token_ctc_last.ckpt``, as for
            :func:`pretrain_speech_encoder_ctc`.

    Returns:
        ``{"method": "token_ctc", "checkpoint", "steps", "seconds", "loss", "vocabulary"}``.
    """
    datamodule.setup("fit")
    seen = {t for batch in datamodule.first_train_batches(vocab_scan_batches) for m in batch["meta"]
            for t in tokenize(m["text"])}
    vocab = sorted(seen)
    lookup = {t: i + 1 for i, t in enumerate(vocab)}
    module = TokenCTCModule(encoder, adapter, embed_tokens[vocab].detach().clone(), lookup, tokenize,
                            OptimConfig(lr=lr, warmup_steps=min(20, steps // 5), total_steps=max(1, steps)),
                            output_rms=output_rms)
    fitted = _fit(module, datamodule, steps, StageCheckpoint(out, module.name, checkpoint_every), resume,
                  trainer_defaults, progress)
    fitted.pop("cer")
    summary = {"method": "token_ctc", "checkpoint": str(module.save_part(module.adapter, Path(out) / "speech_adapter.pt")),
               **fitted, "vocabulary": len(vocab)}
    log.info("token-CTC pre-training of the adapter: %s", summary)
    return summary


def _fit(module: _CTCStage, datamodule: L.LightningDataModule, steps: int, stage: StageCheckpoint, resume: bool,
         trainer_defaults: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    """Train ``module`` for ``steps`` on the training split (CSV log in ``<out>/logs/<name>_pretrain``),
    writing (and, with ``resume``, continuing from) ``stage``'s state.

    Returns ``{"steps", "seconds", "loss" (mean of the last 20 steps), "cer" (last logged, or None)}``.
    """
    module.inputs = datamodule.inputs
    history = TrainingHistory()
    trainer = L.Trainer(**{**(trainer_defaults or {}), "max_steps": steps, "limit_val_batches": 0,
                           "num_sanity_val_steps": 0,
                           "logger": L.pytorch.loggers.CSVLogger(str(stage.out / "logs"), name=f"{module.name}_pretrain"),
                           "log_every_n_steps": 10,
                           "callbacks": [history, *stage.callbacks(),
                                         *([StepProgressBar(f"{module.name} CTC")] if progress else [])],
                           "plugins": stage.plugins(),
                           "enable_progress_bar": progress, "enable_model_summary": False,
                           "default_root_dir": str(stage.out)})
    start = time.perf_counter()
    stage.fit(trainer, module, datamodule, resume)
    tail = [loss for _, loss in history.train_loss[-20:]]
    return {"steps": trainer.global_step, "seconds": round(time.perf_counter() - start, 2),
            "loss": round(sum(tail) / len(tail), 4) if tail else None,
            "cer": history.last.get(f"{module.name}/cer")}
