"""What a training run leaves behind besides its checkpoint: the training curve, a grid
of test samples with their predictions, and ``metrics.json``.

Two small callbacks collect the raw material while Lightning runs:
:class:`TrainingHistory` (train loss per step, validation metrics per evaluation;
saved in checkpoints so a resumed run keeps its whole curve) and
:class:`TestSamples` (the first test images, as the model saw them).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from encoders.preprocess import CLIP_MEAN, CLIP_STD  # noqa: E402
from mm_llama.checkpoint_files import atomic_write  # noqa: E402

RIGHT, WRONG = "#1a7f37", "#cf222e"


class TrainingHistory(L.Callback):
    """Records ``(step, train loss)`` after every optimizer step,
    ``(step, metrics)`` after every validation (sanity checks excluded) and, in :attr:`last`, the
    values last logged in training (what a stage's summary reports, kept across a resume).

    With gradient accumulation a step's loss is the mean over its batches: Lightning hands each
    batch's loss divided by ``accumulate_grad_batches``, and they are summed until the step is taken.
    """

    def __init__(self) -> None:
        self.train_loss: list[tuple[int, float]] = []
        self.val: list[tuple[int, dict[str, float]]] = []
        self._last: dict[str, torch.Tensor] = {}  # read as floats only when asked: no device sync a step
        self._pending = 0.0  # this step's batches so far

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._pending += float(loss)
        last_step = self.train_loss[-1][0] if self.train_loss else 0
        if trainer.global_step > last_step:  # the optimizer stepped after this batch
            self.train_loss.append((trainer.global_step, self._pending))
            self._pending = 0.0
            self._last.update((k, v.detach()) for k, v in trainer.callback_metrics.items() if v.numel() == 1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = getattr(pl_module, "last_eval", None)
        if trainer.sanity_checking or not last or last.get("stage") != "val":
            return
        self.val.append((trainer.global_step, dict(last["metrics"])))

    @property
    def last(self) -> dict[str, float]:
        """The values last logged in training, by name (``"ctc/cer"``, ``"bestrq/accuracy"``, ...)."""
        return {k: float(v) for k, v in self._last.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"train_loss": list(self.train_loss), "val": list(self.val), "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_loss = [tuple(x) for x in state_dict["train_loss"]]
        self.val = [tuple(x) for x in state_dict["val"]]
        # absent from checkpoints before stop 36
        self._last = {k: torch.tensor(v) for k, v in state_dict.get("last", {}).items()}


class TestSamples(L.Callback):
    """Keeps the first ``n`` test images (CLIP normalisation undone) by ``(url, key)``."""

    def __init__(self, n: int = 8) -> None:
        self.n = n
        self.images: dict[tuple[str | None, str], torch.Tensor] = {}

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if "images" in batch:
            images = batch["images"]
        elif "videos" in batch:
            images = batch["videos"][:, 0]  # a clip: its first frame
        else:  # a speech batch: nothing to draw
            return
        for image, meta in zip(images, batch["meta"]):
            if len(self.images) >= self.n:
                return
            self.images[(meta.get("__url__"), meta["__key__"])] = denormalise(image.float().cpu())

    def join(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``samples`` (``last_eval["samples"]``) that have a recorded image, with ``"image"`` added."""
        out = []
        for s in samples:
            image = self.images.get((s.get("__url__"), s.get("__key__")))
            if image is not None:
                out.append({**s, "image": image})
        return out


def denormalise(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` CLIP-normalised → ``[H, W, 3]`` in ``[0, 1]`` for plotting."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0)  # [H, W, 3]


def plot_training_curve(history: TrainingHistory, path: str | Path, title: str = "") -> Path:
    """Train loss per step (left axis) and validation exact match per evaluation (right axis)."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if history.train_loss:
        steps, losses = zip(*history.train_loss)
        ax.plot(steps, losses, color="#8c959f", lw=0.8, label="train loss")
        window = max(1, len(losses) // 25)
        if window > 1:  # a running mean makes the trend readable at a glance
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="#0969da", lw=1.6, label=f"train loss (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    val = [(s, m["exact_match"]) for s, m in history.val if "exact_match" in m]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color=RIGHT, label="val exact match")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("val exact match")
        more_lines, more_labels = ax2.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    if lines:
        ax.legend(lines, labels, loc="center right", fontsize=8)
    ax.set_title(title or "training curve")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_samples(samples: list[dict[str, Any]], path: str | Path, judge=None, columns: int = 4) -> Path:
    """A grid of images titled prompt / prediction / target, green if right, red if wrong.

    Args:
        samples: dicts with ``image`` (``[H, W, 3]`` in [0, 1]), ``prompt``, ``prediction``, ``response``.
        path: the PNG to write.
        judge: ``(prediction, response) -> bool``; exact string equality when ``None``.
        columns: images per row.
    """
    judge = judge or (lambda p, r: p == r)
    rows = max(1, math.ceil(len(samples) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 4.3 * rows), dpi=110, squeeze=False,
                             layout="constrained")
    fig.suptitle("test samples: green = right, red = wrong (exact match)", fontsize=10)
    for ax in axes.flat[len(samples):]:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        colour = RIGHT if judge(s["prediction"], s["response"]) else WRONG
        ax.imshow(s["image"].numpy(), interpolation="nearest")
        ax.set_title(
            f"Q: {_wrap(s['prompt'])}\npred: {_wrap(s['prediction'])}\ntrue: {_wrap(s['response'], max_lines=3)}",
            fontsize=7, color=colour, loc="left",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(colour)
            spine.set_linewidth(3)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 44, max_lines: int = 2) -> str:
    # An untrained model's answer can hold control bytes (``\x13``), which no font draws: show them
    # as escapes rather than as empty boxes (and a matplotlib warning per glyph).
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in " ".join(text.split()))
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n      ".join(lines[:max_lines]) + (" …" if len(lines) > max_lines else "")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats turned into ``None`` (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_predictions(samples: list[dict[str, Any]], path: str | Path) -> None:
    """Write evaluated ``samples`` (``last_eval["samples"]``: prompt, response, prediction,
    ``correct`` and the rest of each sample's metadata) to ``path``, one JSON object a line,
    atomically: the file for error analysis (``jq 'select(.correct == false)'``)."""
    with atomic_write(path, "w") as file:
        for sample in samples:
            file.write(json.dumps(json_safe(sample), sort_keys=True) + "\n")


def write_metrics(metrics: dict[str, Any], path: str | Path) -> str:
    """Write ``metrics`` as strict JSON to ``path`` (atomically: the previous file stays whole
    until the new one is complete); returns the one-line JSON string."""
    line = json.dumps(json_safe(metrics), sort_keys=True, allow_nan=False)
    with atomic_write(path, "w") as file:
        file.write(json.dumps(json.loads(line), indent=2, sort_keys=True) + "\n")
    return line
