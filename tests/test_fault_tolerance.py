"""Fault tolerance of training: a run killed mid-epoch and resumed from its last checkpoint
continues exactly as if it had never stopped; checkpoints and run artefacts are written
atomically (a failed write leaves the previous file whole and no partial file); a corrupt
checkpoint is refused with an error naming it."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mm_llama.checkpoint_files import CorruptCheckpointError, atomic_write
from mm_llama.training import report
from mm_llama.training.checkpoint_io import AtomicCheckpointIO
from mm_llama.training.datamodule import ImageDataModule
from mm_llama.training.optim import OptimConfig
from mm_llama.data import spoken
from mm_llama.training.module import AdapterModule
from mm_llama.training.speech_datamodule import SpeechDataModule
from tests.test_speech_training import tiny_speech_model
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


def fit(lm_dir, data_dir, root: Path, record: Record, ckpt_path: Path | None = None, workers: int = 0,
        speech: bool = False) -> L.Trainer:
    """``N_STEPS`` steps of the tiny image model, or (``speech``) of the tiny cross-attention speech
    model, whose training draws random numbers every step (SpecAugment's masks, dropout)."""
    if speech:
        torch.manual_seed(0)
        module = AdapterModule(lm=str(lm_dir), model=tiny_speech_model("cross_attention", dropout=0.1))
    else:
        module = make_module(lm_dir)
    module.optim_cfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=N_STEPS)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=N_STEPS, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
        callbacks=[record, ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1,
                                           enable_version_counter=False)],
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    data = SpeechDataModule if speech else ImageDataModule
    datamodule = data(data_dir=str(data_dir), batch_size=4, num_workers=workers, shuffle_buffer=8)
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


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    """48 spoken training samples: 12 steps of 4 an epoch, as the image shards."""
    root = tmp_path_factory.mktemp("speech")
    spoken.make_default_shards(root, n_train=48, n_val=4, n_test=4, samples_per_shard=16, progress=False)
    return root


def test_killed_and_resumed_speech_run_draws_the_same_random_numbers(tiny_lm_dir, speech_dir, tmp_path):
    """The speech model draws random numbers at every training step (SpecAugment's masks, dropout):
    resumed from ``last.ckpt``, it must draw what the uninterrupted run drew, or the losses part
    (before ``RandomStateCheckpoint``: by up to 2.9e-3; measured since: 0.0)."""
    reference = Record()
    fit(tiny_lm_dir, speech_dir, tmp_path / "whole", reference, speech=True)
    first = Record(crash_at=7)
    with pytest.raises(Crash):
        fit(tiny_lm_dir, speech_dir, tmp_path / "cut", first, speech=True)
    second = Record()
    trainer = fit(tiny_lm_dir, speech_dir, tmp_path / "cut", second, ckpt_path=tmp_path / "cut" / "last.ckpt",
                  speech=True)
    assert trainer.global_step == N_STEPS
    steps = range(8, N_STEPS + 1)
    assert [second.keys[s] for s in steps] == [reference.keys[s] for s in steps]
    deltas = [abs(second.loss[s] - reference.loss[s]) for s in steps]
    print(f"speech, crash at 7: max |dloss| = {max(deltas):.3g}")
    assert max(deltas) <= 1e-5, deltas


# --------------------------------------------------------------------------- atomic writes


class Interrupted(RuntimeError):
    """A write that dies part-way."""


def failing_torch_save(obj, f, *args, **kwargs):
    """Writes the first kilobyte of a real checkpoint, then fails (a kill during serialisation)."""
    f.write(b"PK\x03\x04" + b"\0" * 1020)
    raise Interrupted("killed while writing")


def only(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("mode, old, new", [("wb", b"old", b"new"), ("w", "old \u00e9", "new \u00e9")])
def test_atomic_write_replaces_only_on_success(tmp_path, mode, old, new):
    target = tmp_path / "file"
    with atomic_write(target, mode) as f:
        f.write(old)
    os.chmod(target, 0o640)
    with pytest.raises(Interrupted):
        with atomic_write(target, mode) as f:
            f.write(new[:1])
            raise Interrupted
    assert only(tmp_path) == ["file"]  # no temporary file left behind
    read = target.read_bytes() if mode == "wb" else target.read_text(encoding="utf-8")
    assert read == old
    with atomic_write(target, mode) as f:
        f.write(new)
    read = target.read_bytes() if mode == "wb" else target.read_text(encoding="utf-8")
    assert read == new and only(tmp_path) == ["file"]
    assert target.stat().st_mode & 0o777 == 0o640  # the replaced file's permissions are kept


def test_metrics_json_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    report.write_metrics({"exact_match": 0.5}, path)

    def replace_fails(src, dst):
        raise Interrupted("killed before the rename")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(Interrupted):
        report.write_metrics({"exact_match": 0.9}, path)
    assert json.loads(path.read_text()) == {"exact_match": 0.5} and only(tmp_path) == ["metrics.json"]


def test_checkpoint_io_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4.0)}, path)
    monkeypatch.setattr(torch, "save", failing_torch_save)
    with pytest.raises(Interrupted):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert only(tmp_path) == ["last.ckpt"]
    restored = io.load_checkpoint(path)
    assert restored["global_step"] == 1 and torch.equal(restored["w"], torch.arange(4.0))


def test_checkpoint_io_never_moves_a_file_across_file_systems(tmp_path, monkeypatch):
    """Lightning's own save writes a temporary file in the system temp directory and moves it: across
    file systems (rename -> EXDEV) that is a copy, and a kill during the copy leaves a truncated
    last.ckpt (seen with lightning 2.6.6: a 100-byte file). Here every rename is cross-device and
    every copy dies part-way: the atomic save does neither, so it still completes."""

    def rename_crosses_devices(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def copy_dies(src, dst, *args, **kwargs):  # shutil.move -> copy2 -> copyfile, on EXDEV
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise Interrupted("killed during the copy")

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    monkeypatch.setattr(os, "rename", rename_crosses_devices)
    monkeypatch.setattr(shutil, "copyfile", copy_dies)
    io.save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 2 and only(tmp_path) == ["last.ckpt"]


def test_model_checkpoint_failing_mid_run_leaves_the_previous_last_ckpt(tiny_lm_dir, shapes_dir, tmp_path,
                                                                        monkeypatch):  # noqa: F811
    """ModelCheckpoint writes last.ckpt after every step; the save after step 3 dies part-way."""
    real_save = torch.save
    saves = []

    def save_then_fail(obj, f, *args, **kwargs):
        saves.append(obj["global_step"])
        if obj["global_step"] == 3:
            failing_torch_save(obj, f)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(Interrupted):
        fit(tiny_lm_dir, shapes_dir, tmp_path, Record())
    monkeypatch.undo()
    assert saves == [1, 2, 3]
    assert only(tmp_path) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2


# --------------------------------------------------------------------------- corrupt checkpoints


def truncated_copy(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def test_resume_from_a_truncated_checkpoint_names_the_file(tiny_lm_dir, shapes_dir, tmp_path):  # noqa: F811
    with pytest.raises(Crash):
        fit(tiny_lm_dir, shapes_dir, tmp_path / "run", Record(crash_at=2))
    bad = truncated_copy(tmp_path / "run" / "last.ckpt", tmp_path / "cut.ckpt")
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {bad} cannot be read: .*truncated\?") as info:
        fit(tiny_lm_dir, shapes_dir, tmp_path / "resumed", Record(), ckpt_path=bad)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no unpickler traceback
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=rf"{empty} cannot be read: the file is empty"):
        AtomicCheckpointIO().load_checkpoint(empty)


def test_a_readable_checkpoint_of_the_wrong_kind_is_not_called_corrupt(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"not": "lightning"}, path)
    io = AtomicCheckpointIO()
    assert io.load_checkpoint(path) == {"not": "lightning"}
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_assistant_refuses_a_truncated_checkpoint_naming_it(tiny_checkpoint, tmp_path, keep):
    from mm_llama.inference import Assistant

    bad = truncated_copy(tiny_checkpoint, tmp_path / "adapter.ckpt", keep)
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {bad} cannot be read"):
        Assistant.from_checkpoint(bad)


def test_generate_cli_reports_a_corrupt_checkpoint_in_one_line(tiny_checkpoint, tmp_path, capsys):
    from mm_llama.inference import main

    bad = truncated_copy(tiny_checkpoint, tmp_path / "adapter.ckpt")
    assert main(["--checkpoint", str(bad), "Hello"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mm-llama generate: checkpoint {bad} cannot be read") and "\n" not in err


def test_a_stage_state_of_another_model_is_refused_naming_file_and_mismatches(tmp_path):
    """``--resume`` of a pre-training stage whose settings changed since its state was written: a
    ``ValueError`` naming the file, the stage and the parameters that differ (not a bare size-mismatch
    deep in Lightning); a truncated state file is a ``CorruptCheckpointError`` naming it."""
    from mm_llama.training.checkpoint_io import StageCheckpoint

    stage = StageCheckpoint(tmp_path, "ctc", every=1)
    written = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with atomic_write(stage.path) as file:
        torch.save({"state_dict": written.state_dict(), "global_step": 3}, file)
    stage.check_fits(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), stage.path)  # fits
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError) as info:
        stage.check_fits(wider, stage.path)
    message = str(info.value)
    assert str(stage.path) in message and "the ctc stage of another model" in message
    assert "missing 2.weight" in message and "0.weight: [8, 4] in the file, [16, 4] here" in message
    assert "delete it" in message
    stage.path.write_bytes(stage.path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="ctc_last.ckpt"):
        stage.check_fits(written, stage.path)
