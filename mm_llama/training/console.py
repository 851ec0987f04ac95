"""What a run prints while it trains: the model by part, then one progress bar per stage in steps.

Our stages stop at ``max_steps`` (``max_epochs=-1``), and Lightning's progress bar counts
epochs: stage 1 of the default image run showed sixteen bars of 61 batches, each titled
``Epoch N/-2`` with the logger's ``v_num: 0.000`` beside the loss, and no time left for the
stage as a whole. :class:`StepProgressBar` shows one bar per stage instead::

    encoder pre-training (epoch 0) ━━━━━━━━━━ 70/70 0:00:41 • 0:00:00 1.70it/s pretrain/loss: 0.583

:class:`PartsSummary` replaces Lightning's model summary, which listed the whole model as one row
with a "FLOPs 0" column (it counts FLOPs only given an example input), by one row per part: the
frozen LM, the encoder, the projection, the cross-attention blocks, each with its parameters, how
many of them train, and its train/eval mode.

:func:`quiet_lightning` drops Lightning's advertisements ("💡 Tip: ... install litlogger") and a
deprecation warning that Lightning's own code raises under this torch (``LeafSpec``); neither
asks anything of a researcher.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn

# Lightning's `utilities/_pytree.py` builds `LeafSpec()`, which torch 2.14 deprecates (FutureWarning).
LIGHTNING_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LIGHTNING_NOTICES = (
    "💡 Tip:",  # "try installing litlogger / litmodels"
    "Trainer already configured with model summary callbacks",  # that is PartsSummary, on purpose
    # A module's own RandomStateCheckpoint, attached again when the same trainer tests after fitting:
    "The following callbacks returned in `LightningModule.configure_callbacks` will override existing "
    "callbacks passed to Trainer: RandomStateCheckpoint",
)


class _DropNotices(logging.Filter):
    """Drops Lightning's records that start with one of :data:`LIGHTNING_NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_NOTICES)


_NOTICE_FILTER = _DropNotices()


def quiet_lightning() -> None:
    """Silence Lightning's product tips, its notice that :class:`PartsSummary` replaces its summary,
    and its own ``LeafSpec`` deprecation warning, for this process.

    Idempotent. Called by ``train_adapter.py``'s :func:`~mm_llama.training.run.run` and by
    ``mm-llama`` before their trainers are built (the tips are logged by ``Trainer.__init__``).
    Lightning's other messages and every warning about our code are kept.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _NOTICE_FILTER not in logger.filters:
            logger.addFilter(_NOTICE_FILTER)
    warnings.filterwarnings("ignore", message=LIGHTNING_LEAFSPEC_WARNING, category=FutureWarning)


class StepProgressBar(RichProgressBar):
    """Rich progress bar that counts optimizer steps to ``max_steps``, over all epochs.

    One bar for the whole fit, titled ``"<name> (epoch N)"``, with the time left to
    ``max_steps``; it resumes at the restored step after a restart. The logger's ``v_num``
    is left out of the metrics. A fit without ``max_steps`` gets Lightning's per-epoch bar,
    titled the same way.

    Args:
        name: what the bar is titled with, e.g. ``"stage 1"``.
        kwargs: :class:`~lightning.pytorch.callbacks.RichProgressBar`'s (``refresh_rate``, ``theme``, ...).
    """

    def __init__(self, name: str = "train", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name

    def _counts_steps(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        """``max_steps`` when the fit is bounded in steps; else Lightning's batches per epoch."""
        if self._counts_steps(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"{self.name} (epoch {current_epoch})"
        # Padding keeps the bars from jumping between this and "Validation" (as Lightning does).
        return f"{description:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = self._counts_steps(trainer)
        if steps and self.progress is not None and self.train_progress_bar_id is not None:
            # Later epochs keep the bar and its rate; only the title changes.
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)  # creates the bar (or a per-epoch one)
        if steps and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)  # a resumed fit

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a restart in the middle of an epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        """Lightning's count, or when the loader has no length (WebDataset) the data module's
        ``eval_batches("val")`` (an upper bound from the shards' manifest), if it has one."""
        return self._eval_total(super().total_val_batches_current_dataloader, "val")

    @property
    def total_test_batches_current_dataloader(self) -> int | float:
        """As :attr:`total_val_batches_current_dataloader`, for the test split."""
        return self._eval_total(super().total_test_batches_current_dataloader, "test")

    def _eval_total(self, total: int | float, split: str) -> int | float:
        count = getattr(self.trainer.datamodule, "eval_batches", None)
        if total != float("inf") or count is None:
            return total
        batches = count(split)
        return total if batches is None else batches

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def model_parts(module: nn.Module) -> list[dict[str, Any]]:
    """One row per child of ``module.model`` (or of ``module`` when it has no ``model``), then a total.

    Each row: ``{"name", "type", "params", "trainable", "mode"}``; ``mode`` is ``"train"``,
    ``"eval"`` or ``"mixed"`` over the part's modules. A parameter shared by two parts is
    counted in the first; the total counts each parameter once.
    """
    root = module.model if isinstance(getattr(module, "model", None), nn.Module) else module
    seen: set[int] = set()
    rows = []
    for name, part in root.named_children():
        params = [p for p in part.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        modes = {m.training for m in part.modules()}
        rows.append({"name": name, "type": type(part).__name__, "params": sum(p.numel() for p in params),
                     "trainable": sum(p.numel() for p in params if p.requires_grad),
                     "mode": "mixed" if len(modes) > 1 else "train" if modes == {True} else "eval"})
    unique = {id(p): p for p in module.parameters()}.values()
    rows.append({"name": "total", "type": type(root).__name__, "params": sum(p.numel() for p in unique),
                 "trainable": sum(p.numel() for p in unique if p.requires_grad), "mode": ""})
    return rows


class PartsSummary(ModelSummary):
    """Prints :func:`model_parts` as a table when training starts (rank zero only), after Lightning
    has put the model in train mode, so the mode column is the one the parts train in.

    A :class:`~lightning.pytorch.callbacks.ModelSummary`, so Lightning adds no summary of its own.
    """

    def __init__(self) -> None:
        super().__init__(max_depth=1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # Lightning's summary prints here, before the model's train mode is set

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(header_style="bold magenta")
        for column, justify in (("part", "left"), ("type", "left"), ("params", "right"),
                                ("trainable", "right"), ("mode", "left")):
            table.add_column(column, justify=justify)
        rows = model_parts(pl_module)
        for row in rows:
            table.add_row(row["name"], row["type"], get_human_readable_count(row["params"]),
                          get_human_readable_count(row["trainable"]), row["mode"],
                          style="bold" if row is rows[-1] else None, end_section=row is rows[-2])
        Console().print(table)  # not rich's global console, which a progress bar may have redirected
