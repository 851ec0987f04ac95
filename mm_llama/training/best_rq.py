"""Speech stage 0: BEST-RQ pre-training of the Conformer on audio alone, as its own Lightning stage.

:class:`BestRQModule` trains a :class:`~encoders.best_rq.BestRQ` (encoder + random-projection
quantizer + prediction head) on the ``audio`` of any speech batch (transcripts unused);
:func:`pretrain_speech_encoder` runs it and saves the encoder's state dict, the file
``SpeechEncoderConfig.checkpoint`` loads before the adapters are trained
(``train_adapter.py --modality speech --speech-pretrain-steps N``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from encoders.best_rq import BestRQ, BestRQConfig
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from mm_llama.checkpoint_files import atomic_write
from mm_llama.training.checkpoint_io import StageCheckpoint
from mm_llama.training.console import StepProgressBar
from mm_llama.training.datamodule import ModelInputs
from mm_llama.training.modes import TrainModes
from mm_llama.training.random_state import RandomStateCheckpoint
from mm_llama.training.report import TrainingHistory

log = logging.getLogger(__name__)


class BestRQModule(TrainModes, L.LightningModule):
    """Masked-frame prediction of random-projection labels.

    Args:
        encoder: the speech encoder's configuration (its ``checkpoint`` is loaded if set).
        best_rq: quantizer and masking.
        lr: AdamW peak learning rate (linear warm-up over ``warmup_steps``, then constant).
        warmup_steps: warm-up length.
    """

    def __init__(self, encoder: SpeechEncoderConfig | None = None, best_rq: BestRQConfig | None = None,
                 lr: float = 1e-3, warmup_steps: int = 20) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = BestRQ(SpeechEncoder(encoder or SpeechEncoderConfig()), best_rq or BestRQConfig())
        self.lr, self.warmup_steps = lr, warmup_steps
        self.inputs: ModelInputs | None = None  # what the data module reads (the stage has no LM to ask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.model(batch["audio"], batch["audio_lengths"])
        b = batch["audio"].shape[0]
        self.log("bestrq/loss", out["loss"], prog_bar=True, batch_size=b)
        self.log("bestrq/accuracy", out["accuracy"], prog_bar=True, batch_size=b)
        return out["loss"]

    def configure_callbacks(self) -> list[L.Callback]:
        """Generator states in the stage's checkpoints (the masks drawn after a resume are the same)."""
        return [RandomStateCheckpoint()]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, self.warmup_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def save_encoder(self, path: str | Path) -> Path:
        """Write the encoder's state dict (what ``SpeechEncoderConfig.checkpoint`` loads), atomically."""
        path = Path(path)
        with atomic_write(path, "wb") as file:
            torch.save(self.model.encoder.state_dict(), file)
        return path


def pretrain_speech_encoder(encoder: SpeechEncoderConfig, datamodule: L.LightningDataModule, steps: int,
                            out: str | Path, *, best_rq: BestRQConfig | None = None, lr: float = 1e-3,
                            trainer_defaults: dict[str, Any] | None = None, progress: bool = True,
                            checkpoint_every: int = 50, resume: bool = False) -> dict[str, Any]:
    """Run ``steps`` of BEST-RQ on ``datamodule``'s training audio; save ``out/speech_encoder.pt``.

    ``datamodule`` must already be connected to the model inputs it needs (tokenizer, ``<|speech|>`` id).
    The stage's state goes to ``out/bestrq_last.ckpt`` every ``checkpoint_every`` steps; with
    ``resume`` an existing one is continued from (:class:`~mm_llama.training.checkpoint_io.StageCheckpoint`).

    Returns:
        ``{"checkpoint", "steps", "seconds", "loss", "accuracy"}`` (loss/accuracy of the last step).
    """
    module = BestRQModule(encoder, best_rq, lr=lr)
    module.inputs = datamodule.inputs
    stage, history = StageCheckpoint(out, "bestrq", checkpoint_every), TrainingHistory()
    trainer = L.Trainer(**{**(trainer_defaults or {}), "max_steps": steps, "limit_val_batches": 0,
                           "num_sanity_val_steps": 0, "logger": False,
                           "callbacks": [history, *stage.callbacks(), *([StepProgressBar("BEST-RQ")] if progress else [])],
                           "plugins": stage.plugins(),
                           "enable_progress_bar": progress, "enable_model_summary": False,
                           "default_root_dir": str(out)})
    start = time.perf_counter()
    stage.fit(trainer, module, datamodule, resume)
    seconds = time.perf_counter() - start
    path = module.save_encoder(Path(out) / "speech_encoder.pt")
    summary = {"checkpoint": str(path), "steps": trainer.global_step, "seconds": round(seconds, 2),
               "loss": history.last.get("bestrq/loss"), "accuracy": history.last.get("bestrq/accuracy")}
    log.info("BEST-RQ pre-training: %s", summary)
    return summary
