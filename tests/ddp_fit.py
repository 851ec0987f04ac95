"""A tiny :class:`AdapterModule` fit on CPU in its own process: the worker of ``tests/test_distributed.py``.

Two modes::

    python tests/ddp_fit.py parallel --lm DIR --shards URLS --out DIR --devices 2 --batch-size 2 --epoch-length 16
    python tests/ddp_fit.py parallel --activation-checkpointing ...
    python tests/ddp_fit.py parallel --strategy fsdp --lm-dtype bfloat16 ...
    python tests/ddp_fit.py parallel --strategy fsdp --epochs 2 --stop-after 1 ... / --resume-from CKPT ...
    python tests/ddp_fit.py reference --lm DIR --shards URLS --out DIR --ranks-from PARALLEL_OUT
    python tests/ddp_fit.py parallel|reference --modality speech|video ...   # spoken / clip shards, tiny models

``parallel`` trains through :class:`ImageDataModule` (``--modality speech``: :class:`SpeechDataModule` and a
tiny cross-attention speech model; ``--modality video``: clips and the tiny model with a video branch) with
Lightning's DDP strategy, or with
:class:`~mm_llama.training.scale.AdapterFSDPStrategy` (both over gloo on CPU); Lightning relaunches this
script once per extra rank. ``reference`` is one process whose step ``k`` trains on the union of every
rank's step-``k`` samples (the global batch, read back from the same shards by key).

Each rank writes ``rank<r>.json`` into ``--out`` (the shards it opened, the sample keys and loss of every
step, its step count, a fingerprint of its random streams); ``init.pt`` holds the trainable weights before training and ``final.ckpt`` is the
checkpoint saved after it (through the strategy: under FSDP, gathered from the shards; the FSDP units it
gathered go to ``gathered_units.json``). It is a script
and not a pytest-run function so that pytest itself is never forked.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from encoders.speech_frontend import FrontEndConfig
from mm_llama.data.collate import collate
from mm_llama.data.speech_pipeline import collate_speech
from mm_llama.model import ModelConfig
from mm_llama.training.datamodule import ImageDataModule
from mm_llama.training.module import AdapterModule
from mm_llama.training.optim import OptimConfig
from mm_llama.training.scale import AdapterFSDPStrategy
from mm_llama.training.speech_datamodule import SpeechDataModule
from tests.test_speech_training import tiny_speech_model
from tests.test_training import TINY_MODEL
from tests.test_video_training import TINY_VIDEO

LR = 1e-2
VAL_BATCHES = 3
"""Validation batches per rank with ``--validate``: under FSDP every rank must run as many (each forward
gathers weights from all ranks), so at most the fewest any rank has (the tests' shards: 3 and 4)."""


class RecordSteps(L.Callback):
    """Per optimizer step: the batch's sample keys and shards, and the loss; written at the end of fit."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[dict[str, Any]] = []
        self.streams: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.steps:  # which random streams this rank trains with (a fingerprint: nothing drawn)
            self.streams = {"torch": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
                            "python": hash(random.getstate())}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({
            "keys": [m["__key__"] for m in batch["meta"]],
            "urls": [m["__url__"] for m in batch["meta"]],
            "loss": outputs["loss"].item(),
        })

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        record = {"rank": rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                  "steps": self.steps, "streams": self.streams, "val": getattr(pl_module, "last_eval", {}).get("metrics"),
                  "activation_checkpointing": pl_module.model.grad_checkpointing}
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))


def model_config(modality: str) -> ModelConfig:
    """The tiny image model, with a video branch for video, or the tiny cross-attention speech model
    without SpecAugment (its random masks would differ between a rank's batch and the reference's
    global batch)."""
    if modality == "image":
        return TINY_MODEL
    if modality == "video":
        return dataclasses.replace(TINY_MODEL, video=TINY_VIDEO)
    cfg = tiny_speech_model("cross_attention")
    no_masks = FrontEndConfig(freq_masks=0, time_masks=0)
    return dataclasses.replace(cfg, speech_encoder=dataclasses.replace(cfg.speech_encoder, frontend=no_masks))


def make_datamodule(args: argparse.Namespace, **kwargs: Any) -> ImageDataModule:
    """The modality's data module over ``--shards`` (all three splits)."""
    urls = dict(train_urls=args.shards, val_urls=args.shards, test_urls=args.shards, num_workers=0)
    if args.modality == "speech":
        return SpeechDataModule(**urls, **kwargs)
    return ImageDataModule(**urls, modality=args.modality, **kwargs)


def make_module(args: argparse.Namespace, steps: int) -> AdapterModule:
    L.seed_everything(0)  # the same initial weights on every rank and in the reference
    module = AdapterModule(lm=args.lm, model=model_config(args.modality),
                           optim=OptimConfig(lr=LR, warmup_steps=0, total_steps=steps),
                           lm_dtype=args.lm_dtype, eval_max_new_tokens=3,
                           activation_checkpointing=args.activation_checkpointing)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # the launching process; Lightning sets LOCAL_RANK for the others
        torch.save(module.model.trainable_state_dict(), args.out / "init.pt")
    return module


def fit_and_save(trainer: L.Trainer, module: AdapterModule, out: Path, **fit_kwargs: Any) -> None:
    trainer.fit(module, **fit_kwargs)
    trainer.save_checkpoint(out / "final.ckpt")  # every rank takes part (FSDP gathers the shards)
    if isinstance(trainer.strategy, AdapterFSDPStrategy) and trainer.global_rank == 0:
        (out / "gathered_units.json").write_text(json.dumps(trainer.strategy.gathered_units))
        (out / "fsdp_layout.json").write_text(json.dumps(fsdp_layout(trainer.strategy.model)))


def fsdp_layout(wrapped: torch.nn.Module) -> dict[str, list[str]]:
    """The module names (wrappers left out) of the FSDP units and of the blocks recomputed in backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel

    def plain(name: str) -> str:
        return ".".join(part for part in name.split(".") if part not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"))

    kinds = {"units": FullyShardedDataParallel, "recomputed": CheckpointWrapper}
    return {kind: [plain(n) for n, m in wrapped.named_modules() if isinstance(m, cls)] for kind, cls in kinds.items()}


def make_trainer(out: Path, record: RecordSteps, validate: bool = False, max_epochs: int = 1,
                 **kwargs: Any) -> L.Trainer:
    """A CPU trainer for ``max_epochs``; ``validate``: one validation at the epoch's end (generation included)."""
    return L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, gradient_clip_val=1.0, limit_val_batches=VAL_BATCHES if validate else 0,
        num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(out), callbacks=[record], **kwargs,
    )  # fmt: skip


def run_parallel(args: argparse.Namespace) -> None:
    datamodule = make_datamodule(args, batch_size=args.batch_size, shuffle_buffer=4, epoch_length=args.epoch_length)
    # Steps per rank follow from epoch_length; the schedule length only shapes the cosine decay.
    module = make_module(args, steps=args.epochs * args.epoch_length // (args.batch_size * args.devices))
    record = RecordSteps(args.out)
    # A hang (ranks with different step counts) fails after the timeout instead of after 30 minutes.
    timeout = timedelta(seconds=args.timeout)
    if args.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timeout)
    else:
        strategy = AdapterFSDPStrategy(process_group_backend="gloo", timeout=timeout)
    trainer = make_trainer(args.out, record, validate=args.validate, strategy=strategy, devices=args.devices,
                           max_epochs=args.stop_after or args.epochs)
    fit_and_save(trainer, module, args.out, datamodule=datamodule, ckpt_path=args.resume_from)


def run_reference(args: argparse.Namespace) -> None:
    ranks = sorted((json.loads(p.read_text()) for p in args.ranks_from.glob("rank*.json")), key=lambda r: r["rank"])
    global_batches = [sum((r["steps"][k]["keys"] for r in ranks), []) for k in range(len(ranks[0]["steps"]))]
    module = make_module(args, steps=len(global_batches))
    # Read every sample once, in order, through the evaluation pipeline (the same decoding and
    # tokenization as training: training adds only shuffling, splitting and repetition).
    reader = make_datamodule(args, test_samples=None)
    reader.connect(reader.model_inputs(module))
    reader.setup("test")
    samples = {s["meta"]["__key__"]: s for s in reader.datasets["test"]}
    pad_id = module.tokenizer.pad_id
    collate_fn = collate_speech if args.modality == "speech" else collate
    batches = [collate_fn([samples[key] for key in keys], pad_id) for keys in global_batches]
    record = RecordSteps(args.out)
    trainer = make_trainer(args.out, record, devices=1)
    fit_and_save(trainer, module, args.out,
                 train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("parallel", "reference"))
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--modality", choices=("image", "speech", "video"), default="image")
    parser.add_argument("--lm-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--lm", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epoch-length", type=int, default=16)
    parser.add_argument("--ranks-from", type=Path)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the run (the LR schedule's length)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (a 'crash')")
    parser.add_argument("--resume-from", default=None, help="checkpoint to resume the run from (parallel mode)")
    parser.add_argument("--validate", action="store_true", help="validate at the end of the epoch (parallel mode)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="AdapterModule(activation_checkpointing=True): blocks recomputed in backward")
    parser.add_argument("--timeout", type=int, default=120, help="process-group timeout in seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matmuls: two ranks on two cores
    args.out.mkdir(parents=True, exist_ok=True)
    (run_parallel if args.mode == "parallel" else run_reference)(args)


if __name__ == "__main__":
    main()
