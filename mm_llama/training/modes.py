"""Train / eval modes at the start of training: each module's own ``train()`` decides them.

The frozen LM and any part frozen for a stage (stage 1's encoder in stage 2, the speech encoder
under token CTC) stay in eval mode: their owners override ``train()`` to keep them there
(:meth:`mm_llama.model.MultimodalLlama.train`, ``TokenCTCModule.train``; ``BestRQ.train`` keeps its
front end's SpecAugment off so that the targets see clean features). But Lightning (2.6, as pinned)
never calls ``train()`` when a fit starts: it keeps whatever modes the modules were built in, all
``training=True`` (those overrides were dead code until stop 31: SpecAugment ran inside the frozen
speech encoder, and BEST-RQ quantized augmented features). :class:`TrainModes` calls it.

It also replaces Lightning's warning that it "found N module(s) in eval mode", hundreds of them,
all frozen on purpose, with a check that names the case that matters: a module that *trains* but
is left in eval mode (its dropout off, its normalisation statistics frozen).
"""

from __future__ import annotations

import warnings

from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

# Lightning's message (``fit_loop._warn_if_modules_in_eval_mode``), which counts frozen modules too.
LIGHTNING_EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


def trainable_in_eval(module: nn.Module) -> list[str]:
    """Names of the submodules of ``module`` in eval mode that own a parameter requiring grad."""
    return [
        name or type(module).__name__
        for name, m in module.named_modules()
        if not m.training and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


class TrainModes:
    """Mixin (before ``L.LightningModule``): when training starts, put the module in train mode
    through ``self.train()`` (so every ``train()`` override below it runs), then warn naming every
    module that owns trainable weights but is in eval mode, instead of Lightning's count of all
    modules in eval mode (the frozen ones are meant to be).

    Lightning keeps these modes across validation (it restores each module's flag afterwards).
    """

    def on_fit_start(self) -> None:
        # Filters added here persist for the process: the message is only ever this count.
        warnings.filterwarnings("ignore", message=LIGHTNING_EVAL_MODE_WARNING, category=PossibleUserWarning)
        super().on_fit_start()

    def on_train_start(self) -> None:
        self.train()
        stale = trainable_in_eval(self)
        if stale:
            shown = ", ".join(stale[:8]) + (f" and {len(stale) - 8} more" if len(stale) > 8 else "")
            rank_zero_warn(f"{len(stale)} module(s) with trainable weights are in eval mode at the start of "
                           f"training (dropout off, normalisation statistics frozen): {shown}",
                           category=PossibleUserWarning)
        super().on_train_start()
