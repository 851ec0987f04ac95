"""Train / eval modes at the start of training: the frozen parts stay in eval mode on purpose.

The frozen LM is kept in eval mode by its owner's ``train()`` (:meth:`mm_llama.model.MultimodalLlama.train`;
the token-CTC stage does the same for its frozen speech encoder), so that no dropout-like behaviour
ever changes it. (A pre-trained encoder frozen for stage 2 is not: it trains in train mode, which for
the default encoders changes nothing but the speech front end's SpecAugment; ``PartsSummary`` in
:mod:`mm_llama.training.console` shows each part's mode.) Lightning then warns at every fit that it "found N module(s) in eval
mode", hundreds of them, which is noise that hides the case that matters: a module that *trains*
left in eval mode (its dropout off, its normalisation statistics frozen). :class:`NamesTrainableInEval`
replaces that count with a check that names exactly those modules.
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


class NamesTrainableInEval:
    """Mixin (before ``L.LightningModule``): at the start of training, warn naming every module
    that owns trainable weights but is in eval mode, instead of Lightning's count of all modules
    in eval mode (the frozen ones are meant to be)."""

    def on_fit_start(self) -> None:
        # Filters added here persist for the process: the message is only ever this count.
        warnings.filterwarnings("ignore", message=LIGHTNING_EVAL_MODE_WARNING, category=PossibleUserWarning)
        super().on_fit_start()

    def on_train_start(self) -> None:
        stale = trainable_in_eval(self)
        if stale:
            shown = ", ".join(stale[:8]) + (f" and {len(stale) - 8} more" if len(stale) > 8 else "")
            rank_zero_warn(f"{len(stale)} module(s) with trainable weights are in eval mode at the start of "
                           f"training (dropout off, normalisation statistics frozen): {shown}",
                           category=PossibleUserWarning)
        super().on_train_start()
