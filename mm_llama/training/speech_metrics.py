"""Speech evaluation: word and character error rates (``torchmetrics``) and spoken-QA accuracy.

Each evaluated sample is ``(hit, meta)`` where ``meta`` carries the data's json fields
(``task``, ``voice``, ``heldout_voice``, ``response``) and the model's ``prediction``.
Error rates are corpus-level (total edits / total reference words or characters),
computed after the same normalisation as exact match (case, spacing, final full stop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torchmetrics.functional.text import char_error_rate, word_error_rate


def speech_metrics(results: Iterable[tuple[bool, dict]], normalise: Callable[[str], str]) -> dict[str, float]:
    """``wer``/``cer`` over ASR samples (all, held-out voice, seen voices, per voice) and
    ``spoken_qa_accuracy`` (exact match) over spoken questions; absent groups are left out.

    ``normalise`` is applied to predictions and references before counting edits.
    """

    def _rates(rows: list[dict]) -> tuple[float, float]:
        predictions = [normalise(m["prediction"]) for m in rows]
        references = [normalise(m["response"]) for m in rows]
        return float(word_error_rate(predictions, references)), float(char_error_rate(predictions, references))

    results = list(results)
    asr = [m for _, m in results if m.get("task") == "asr"]
    qa = [(hit, m) for hit, m in results if m.get("task") == "qa"]
    metrics: dict[str, float] = {}
    if asr:
        metrics["wer"], metrics["cer"] = _rates(asr)
        groups = {"heldout_voice": [m for m in asr if m.get("heldout_voice")],
                  "seen_voices": [m for m in asr if not m.get("heldout_voice")]}
        groups.update({f"voice/{v}": [m for m in asr if m.get("voice") == v]
                       for v in sorted({m.get("voice") for m in asr if m.get("voice")})})
        for name, rows in groups.items():
            if rows:
                metrics[f"wer_{name}"], metrics[f"cer_{name}"] = _rates(rows)
    if qa:
        metrics["spoken_qa_accuracy"] = sum(hit for hit, _ in qa) / len(qa)
        heldout = [hit for hit, m in qa if m.get("heldout_voice")]
        if heldout:
            metrics["spoken_qa_accuracy_heldout_voice"] = sum(heldout) / len(heldout)
    return metrics
