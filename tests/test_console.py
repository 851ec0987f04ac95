"""What a run prints: one progress bar per stage in optimizer steps (resumed at the restored step),
no ``v_num``, and none of Lightning's product tips or its own ``LeafSpec`` deprecation warning."""

from __future__ import annotations

import io
import logging
import warnings

import lightning as L
import pytest
import torch

from mm_llama.training import console
from mm_llama.training.console import StepProgressBar, quiet_lightning
from mm_llama.training.random_state import RandomStateCheckpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


class Tiny(L.LightningModule):
    """Least squares on 6 random rows, batches of 2 (3 batches an epoch); logs its loss to the bar."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.lin(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def rows() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 3)), batch_size=2)


class TinyWithState(Tiny):
    """:class:`Tiny` with the generator states in its checkpoints, as AdapterModule has."""

    def configure_callbacks(self) -> list[L.Callback]:
        return [RandomStateCheckpoint()]


def fit(root, bar: L.Callback | None, ckpt_path=None, **overrides) -> L.Trainer:
    kwargs = dict(max_steps=7, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(str(root)),
                  enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(root),
                  log_every_n_steps=1, callbacks=[bar] if bar else [], enable_progress_bar=bar is not None)
    trainer = L.Trainer(**{**kwargs, **overrides})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The number of training batches")
        trainer.fit(Tiny(), rows(), ckpt_path=ckpt_path)
    return trainer


def bar_to_text(name: str = "stage 1") -> tuple[StepProgressBar, io.StringIO]:
    out = io.StringIO()
    return StepProgressBar(name, console_kwargs={"file": out, "force_terminal": True, "width": 150}), out


def test_one_bar_counts_steps_over_epochs(tmp_path):
    bar, out = bar_to_text()
    trainer = fit(tmp_path, bar)
    assert trainer.current_epoch == 3 and trainer.global_step == 7  # 3 + 3 + 1 batches
    (task,) = bar.progress.tasks  # one bar, not one an epoch
    assert (task.completed, task.total) == (7, 7)
    assert task.description.strip() == "stage 1 (epoch 2)"
    text = out.getvalue()
    assert "7/7" in text and "/-" not in text and "Epoch" not in text
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert "train/loss" in metrics and "v_num" not in metrics


def test_lightning_default_bar_is_what_we_replace(tmp_path):
    """The bar Lightning picks on its own titles a step-bounded fit "Epoch N/-2" and restarts each epoch."""
    from lightning.pytorch.callbacks import RichProgressBar

    out = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": out, "force_terminal": True, "width": 150})
    fit(tmp_path, bar)
    (task,) = bar.progress.tasks
    assert (task.completed, task.total) == (1, 1)  # the last epoch's single batch
    assert "Epoch 2/-2" in out.getvalue() and "v_num" in out.getvalue()


class FirstPosition(L.Callback):
    """Where the training bar stands when the first batch of a fit starts."""

    def __init__(self, bar: StepProgressBar) -> None:
        self.bar, self.seen = bar, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen is None:
            self.seen = (self.bar.train_progress_bar.completed, self.bar.train_progress_bar.total)


def test_a_resumed_fit_starts_the_bar_at_the_restored_step(tmp_path):
    first = fit(tmp_path / "a", StepProgressBar(), max_steps=3)  # stops at the end of epoch 0
    ckpt = tmp_path / "step3.ckpt"
    first.save_checkpoint(ckpt)
    bar, _ = bar_to_text()
    probe = FirstPosition(bar)
    fit(tmp_path / "b", bar, ckpt_path=str(ckpt), callbacks=[bar, probe])
    assert probe.seen == (3, 7)
    (task,) = bar.progress.tasks
    assert (task.completed, task.total) == (7, 7)


def test_an_epoch_bounded_fit_keeps_one_bar_an_epoch(tmp_path):
    bar, out = bar_to_text("adapters")
    fit(tmp_path, bar, max_steps=-1, max_epochs=2)
    (task,) = bar.progress.tasks
    assert (task.completed, task.total) == (3, 3)
    assert task.description.strip() == "adapters (epoch 1)" and "v_num" not in out.getvalue()


class Stream(torch.utils.data.IterableDataset):
    """5 rows as a stream without a length, as WebDataset's are: Lightning can't count its batches."""

    def __iter__(self):
        return iter(torch.randn(5, 3))


class StreamData(L.LightningDataModule):
    """Batches of 2 from :class:`Stream`; ``eval_batches`` as :class:`ImageDataModule` gives it."""

    def __init__(self, known: bool) -> None:
        super().__init__()
        self.known = known

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(Stream(), batch_size=2)

    def eval_batches(self, split: str) -> int | None:
        assert split == "test"
        return 3 if self.known else None


class Scores(Tiny):
    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test/loss", self.lin(batch).pow(2).mean())


@pytest.mark.parametrize("known", [True, False])
def test_the_test_bar_shows_the_data_modules_batch_count(tmp_path, known):
    bar, out = bar_to_text("adapters")
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[bar], enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.test(Scores(), datamodule=StreamData(known), verbose=False)
    (task,) = bar.progress.tasks
    assert task.completed == 3
    assert task.total == (3 if known else float("inf"))  # inf: Lightning shows "3/--", no time left
    assert ("3/3" in out.getvalue()) == known


def test_quiet_lightning_drops_its_notices_and_leafspec_warning_only(tmp_path):
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    rank_zero.addHandler(handler)
    rank_zero.removeFilter(console._NOTICE_FILTER)  # as before any run in this process
    level = rank_zero.level
    rank_zero.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as loud:
            warnings.simplefilter("always")
            trainer = fit(tmp_path / "loud", None, callbacks=[console.PartsSummary()], enable_model_summary=True)
            trainer.fit(TinyWithState(), rows())  # done already (max_steps): attaches its callback twice
            trainer.fit(TinyWithState(), rows())
        loud_records, records[:] = list(records), []
        with warnings.catch_warnings(record=True) as quiet:
            warnings.simplefilter("always")
            quiet_lightning()
            quiet_lightning()  # idempotent
            trainer = fit(tmp_path / "quiet", None, callbacks=[console.PartsSummary()], enable_model_summary=True)
            trainer.fit(TinyWithState(), rows())
            trainer.fit(TinyWithState(), rows())
    finally:
        rank_zero.removeHandler(handler)
        rank_zero.setLevel(level)
        quiet_lightning()
    for notice in console.LIGHTNING_NOTICES:
        assert any(r.startswith(notice) for r in loud_records), (notice, loud_records)
        assert not any(r.startswith(notice) for r in records), (notice, records)
    assert any(r.startswith("GPU available") for r in records)  # Lightning's other messages stay
    assert rank_zero.filters.count(console._NOTICE_FILTER) == 1

    def leafspec(ws):
        return [w for w in ws if "LeafSpec" in str(w.message)]

    assert leafspec(loud) and not leafspec(quiet)


def test_parts_summary_lists_the_frozen_lm_and_the_trainable_parts(tiny_lm_dir, capsys):
    from tests.test_training import make_module

    module = make_module(tiny_lm_dir)
    module.train()  # as at the start of a fit: the frozen LM stays in eval mode
    rows = {row["name"]: row for row in console.model_parts(module)}
    assert rows["lm"]["trainable"] == 0 and rows["lm"]["mode"] == "eval"
    assert rows["lm"]["params"] == sum(p.numel() for p in module.model.lm.parameters())
    assert 0 < rows["cross_attn"]["trainable"] == rows["cross_attn"]["params"] and rows["cross_attn"]["mode"] == "train"
    unique = {id(p): p for p in module.parameters()}.values()
    assert rows["total"]["params"] == sum(p.numel() for p in unique)
    assert rows["total"]["trainable"] == sum(p.numel() for p in unique if p.requires_grad)
    parts = [row for name, row in rows.items() if name != "total"]
    assert sum(row["params"] for row in parts) == rows["total"]["params"]  # shared weights counted once

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[console.PartsSummary()])
    console.PartsSummary().on_train_start(trainer, module)
    printed = capsys.readouterr().out
    assert "cross_attn" in printed and "lm" in printed and "FLOPs" not in printed
