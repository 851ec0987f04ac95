"""Fault tolerance of training: a run killed mid-epoch and resumed from its last checkpoint
continues exactly as if it had never stopped."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from mm_llama.training.optim import OptimConfig
from mm_llama.training.datamodule import ImageDataModule
from tests.test_training import make_module, shapes_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

N_STEPS = 18  # 48 training samples / batch 4 = 12 steps per epoch: the run spans two epochs


class Crash(RuntimeError):
    """The simulated failure."""


class Record(L.Callback):
    """Per-step training loss and batch keys, by global step (1-based); optionally crashes
    before the step ``crash_at + 1`` starts, after ``last.ckpt`` of step ``crash_at`` is written."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.loss: dict[int, float] = {}
        self.keys: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.crash_at:
            raise Crash(f"killed before step {self.crash_at + 1}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss[trainer.global_step] = outputs["loss"].item()
        self.keys[trainer.global_step] = [m["__key__"] for m in batch["meta"]]


def fit(lm_dir, data_dir, root: Path, record: Record, ckpt_path: Path | None = None, workers: int = 0) -> L.Trainer:
    module = make_module(lm_dir)
    module.optim_cfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=N_STEPS)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=N_STEPS, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
        callbacks=[record, ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1,
                                           enable_version_counter=False)],
    )  # fmt: skip
    datamodule = ImageDataModule(data_dir=str(data_dir), batch_size=4, num_workers=workers, shuffle_buffer=8)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm_dir, shapes_dir, tmp_path_factory):  # noqa: F811
    """``workers -> Record`` of the run that is never stopped (built on first use)."""
    records: dict[int, Record] = {}

    def get(workers: int) -> Record:
        if workers not in records:
            record = Record()
            fit(tiny_lm_dir, shapes_dir, tmp_path_factory.mktemp("uninterrupted"), record, workers=workers)
            assert sorted(record.loss) == list(range(1, N_STEPS + 1))
            records[workers] = record
        return records[workers]

    return get


@pytest.mark.parametrize(
    "crash_at, workers",
    [(5, 0), (12, 0), (15, 0), (15, 2)],
    ids=["mid-epoch-0", "epoch-boundary", "mid-epoch-1", "mid-epoch-1-two-workers"],
)
def test_killed_and_resumed_run_equals_the_uninterrupted_one(uninterrupted, tiny_lm_dir, shapes_dir, tmp_path,
                                                             crash_at, workers):  # noqa: F811
    """Same batches in the same order and the same per-step loss (|delta| <= 1e-5; measured: 0.0)
    after a crash at step ``crash_at`` and a resume from ``last.ckpt``."""
    reference = uninterrupted(workers)
    first = Record(crash_at=crash_at)
    with pytest.raises(Crash):
        fit(tiny_lm_dir, shapes_dir, tmp_path, first, workers=workers)
    assert sorted(first.loss) == list(range(1, crash_at + 1))
    assert first.keys == {s: reference.keys[s] for s in first.keys}
    second = Record()
    trainer = fit(tiny_lm_dir, shapes_dir, tmp_path, second, ckpt_path=tmp_path / "last.ckpt", workers=workers)
    assert trainer.global_step == N_STEPS and sorted(second.loss) == list(range(crash_at + 1, N_STEPS + 1))
    steps = range(crash_at + 1, N_STEPS + 1)
    assert [second.keys[s] for s in steps] == [reference.keys[s] for s in steps]  # same data order
    deltas = [abs(second.loss[s] - reference.loss[s]) for s in steps]
    print(f"crash at {crash_at}, {workers} workers: max |dloss| = {max(deltas):.3g}")
    assert max(deltas) <= 1e-5
