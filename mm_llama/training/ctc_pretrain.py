"""Speech stage 1: CTC pre-training of the Conformer on the transcripts, before the adapters.

The image path measured it first (README, "Learning dynamics"): a randomly initialised
encoder learns slowly when its only gradient comes through zero-initialised gates and a
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

Shape legend: ``b`` batch, ``t`` encoder frames (40 ms), ``c`` characters + blank.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from mm_llama.checkpoint_files import atomic_write
from mm_llama.training.optim import OptimConfig, build_optimizer
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


class CTCModule(L.LightningModule):
    """A :class:`~encoders.speech.SpeechEncoder` and a linear character head trained with CTC on
    the ``meta[i]["text"]`` (what is said) of speech batches.

    Args:
        encoder: the speech encoder's configuration (its ``checkpoint`` is loaded if set).
        optim: AdamW settings (warm-up, cosine decay over ``total_steps``).
    """

    def __init__(self, encoder: SpeechEncoderConfig, optim: OptimConfig) -> None:
        super().__init__()
        self.encoder = SpeechEncoder(encoder)
        self.head = nn.Linear(self.encoder.out_dim, len(CHARACTERS) + 1)
        self.optim = optim

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``audio [b, n]`` 16 kHz (``lengths [b]`` samples) → log-probabilities ``[b, t, c]`` and frames ``[b]``."""
        out = self.encoder(audio, lengths)
        return self.head(out.tokens).log_softmax(-1), out.mask.sum(1)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Mean CTC loss per character of the batch, with the log-probabilities and frame counts."""
        log_probs, frames = self(batch["audio"], batch["audio_lengths"])
        targets = [torch.tensor(encode_text(m["text"]), dtype=torch.long) for m in batch["meta"]]
        target_lengths = torch.tensor([len(t) for t in targets])
        loss = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets), frames, target_lengths,
                          blank=0, reduction="mean", zero_infinity=True)  # too-fast speech: skipped, not inf
        return loss, log_probs, frames

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, log_probs, frames = self.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite CTC loss {loss.item()} at step {self.global_step}")
        b = batch["audio"].shape[0]
        self.log("ctc/loss", loss, prog_bar=True, batch_size=b)
        if batch_idx % 10 == 0:  # greedy character error rate of this batch, for the log
            from torchmetrics.functional.text import char_error_rate

            hyps = greedy_decode(log_probs.detach(), frames)
            refs = ["".join(CHARACTERS[k - 1] for k in encode_text(m["text"])) for m in batch["meta"]]
            self.log("ctc/cer", char_error_rate(hyps, refs), prog_bar=True, batch_size=b)
        return loss

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        opt, sched = build_optimizer(named, lambda name: name.partition(".")[0], self.optim)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def save_encoder(self, path: str | Path) -> Path:
        """Write the encoder's state dict (what ``SpeechEncoderConfig.checkpoint`` loads), atomically."""
        path = Path(path)
        with atomic_write(path, "wb") as file:
            torch.save(self.encoder.state_dict(), file)
        return path


def pretrain_speech_encoder_ctc(
    encoder: SpeechEncoderConfig,
    datamodule: L.LightningDataModule,
    steps: int,
    out: str | Path,
    *,
    lr: float = 2e-3,
    trainer_defaults: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``steps`` of CTC on ``datamodule``'s training clips; save ``out/speech_encoder.pt``.

    ``datamodule`` must already be connected to the model inputs it needs (tokenizer, ``<|speech|>`` id).

    Returns:
        ``{"method": "ctc", "checkpoint", "steps", "seconds", "loss", "cer"}`` (loss: mean of the
        last 20 steps; cer: greedy character error rate of the last logged training batch).
    """
    module = CTCModule(encoder, OptimConfig(lr=lr, warmup_steps=min(20, steps // 5), total_steps=max(1, steps)))
    history = TrainingHistory()
    trainer = L.Trainer(**{**(trainer_defaults or {}), "max_steps": steps, "limit_val_batches": 0,
                           "num_sanity_val_steps": 0, "enable_checkpointing": False,
                           "logger": L.pytorch.loggers.CSVLogger(str(Path(out) / "logs"), name="ctc_pretrain"),
                           "log_every_n_steps": 10, "callbacks": [history],
                           "enable_progress_bar": progress, "enable_model_summary": False,
                           "default_root_dir": str(out)})
    datamodule.setup("fit")
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    seconds = time.perf_counter() - start
    path = module.save_encoder(Path(out) / "speech_encoder.pt")
    tail = [loss for _, loss in history.train_loss[-20:]]
    cer = trainer.callback_metrics.get("ctc/cer")
    summary = {"method": "ctc", "checkpoint": str(path), "steps": trainer.global_step, "seconds": round(seconds, 2),
               "loss": round(sum(tail) / len(tail), 4) if tail else None,
               "cer": round(float(cer), 4) if cer is not None else None}
    log.info("CTC pre-training: %s", summary)
    return summary
