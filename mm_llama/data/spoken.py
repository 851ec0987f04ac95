"""Built-in speech dataset: sentences spoken by eSpeak NG (DESIGN §7, issue 3).

What each sample says, and in which voice, speed and pitch, is a function of
``(seed, split, index)`` alone; the audio bytes are identical when the shards are
written by a fresh process (eSpeak's timing jitter depends on what it spoke before,
see :mod:`mm_llama.data.espeak`). A sample is a flac clip at eSpeak's own
rate (22.05 kHz; the pipeline resamples to 16 kHz) plus a json with the prompt, the
response and where it came from. Two tasks, drawn with equal probability:

* ``asr``: "Transcribe the audio." -> the spoken sentence, lower case, no punctuation
  ("the small dog sleeps under the old table"). Sentences come from a small grammar
  (:data:`ADJECTIVES`, :data:`NOUNS`, ...), so test sentences are mostly new word
  combinations over a known vocabulary.
* ``qa``: "Answer the spoken question." -> a one-word answer to a spoken question about
  capitals, colours of common things or small sums ("What is the capital of France?"
  -> "Paris"). The facts in :data:`HELDOUT_FACTS` are never spoken in train or val;
  test asks only those, so the answer has to come from the frozen LM's own knowledge:
  the adapter carries the question, the LM supplies the answer.

Voices: :data:`TRAIN_VOICES` (eSpeak variants of US and British English) speak
train, val and half of test, at speeds and pitches drawn per sample;
:data:`HELDOUT_VOICE` speaks only the other half of test (``"heldout_voice": true``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from mm_llama.data.espeak import VoiceSettings, espeak
from mm_llama.data.scenes import SPLITS
from mm_llama.data.shard_sets import ensure_shard_set, plan_splits, write_split

GENERATOR_VERSION = 1
ASR_PROMPT = "Transcribe the audio."
QA_PROMPT = "Answer the spoken question."
TASKS = ("asr", "qa")

TRAIN_VOICES: tuple[str, ...] = ("en-us+m1", "en-us+m3", "en-us+f1", "en-us+f3", "en+m2", "en+f4")
HELDOUT_VOICE = "en-us+f2"
RATES = (150, 200)  # words per minute, drawn uniformly
PITCHES = (35, 65)

ADJECTIVES = ("red", "blue", "green", "big", "small", "old", "new", "happy", "little", "black")
NOUNS = ("dog", "cat", "bird", "car", "boat", "tree", "house", "table", "chair", "ball", "book", "box")
VERBS = ("sits", "runs", "sleeps", "waits", "jumps", "stands", "rests", "stays")
PLACES = ("on", "under", "near", "behind", "beside", "inside")

CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "England": "London", "Russia": "Moscow", "Egypt": "Cairo", "China": "Beijing", "Greece": "Athens",
    "Ireland": "Dublin", "Sweden": "Stockholm", "Hungary": "Budapest", "Peru": "Lima", "Thailand": "Bangkok",
    "Australia": "Canberra", "Wales": "Cardiff", "Iraq": "Baghdad",
}  # fmt: skip
"""Capitals SmolLM2-135M-Instruct names correctly from text alone (checked when this set was made)."""
COLOURS_OF: dict[str, str] = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "blood": "red", "a lemon": "yellow", "milk": "white", "chocolate": "brown", "a tomato": "red",
    "a carrot": "orange", "a frog": "green", "the ocean": "blue", "a crow": "black", "salt": "white",
}  # fmt: skip
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Fact:
    """A spoken question and its one-word answer."""

    question: str
    answer: str
    kind: str  # "capital", "colour" or "sum"


def all_facts() -> list[Fact]:
    facts = [Fact(f"What is the capital of {c}?", a, "capital") for c, a in CAPITALS.items()]
    facts += [Fact(f"What colour is {t}?", a, "colour") for t, a in COLOURS_OF.items()]
    facts += [Fact(f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", str(a + b), "sum")
              for a in range(1, 10) for b in range(1, 10) if a + b < 10]
    return facts


HELDOUT_FACTS: frozenset[str] = frozenset({
    "What is the capital of Italy?", "What is the capital of Japan?", "What is the capital of Egypt?",
    "What is the capital of Sweden?", "What colour is snow?", "What colour is a banana?", "What colour is a frog?",
    "What is two plus three?", "What is four plus four?", "What is one plus six?", "What is three plus five?",
})  # fmt: skip
"""Questions spoken only in test: answering them needs the LM's knowledge, not memorised pairs."""


def _sample_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"mm-llama-spoken/v{GENERATOR_VERSION}/{seed}/{split}/{index}")


def make_sentence(rng: random.Random) -> str:
    """One sentence of the ASR grammar, lower case without punctuation (its own transcript)."""
    a1, a2 = rng.sample(ADJECTIVES, 2)
    n1, n2 = rng.sample(NOUNS, 2)
    return f"the {a1} {n1} {rng.choice(VERBS)} {rng.choice(PLACES)} the {a2} {n2}"


def make_text(rng: random.Random, split: str) -> tuple[str, str, str, str, bool]:
    """``(task, spoken text, prompt, response, heldout_fact)`` of one sample."""
    task = rng.choice(TASKS)
    if task == "asr":
        sentence = make_sentence(rng)
        return task, sentence, ASR_PROMPT, sentence, False
    facts = [f for f in all_facts() if (f.question in HELDOUT_FACTS) == (split == "test")]
    fact = rng.choice(facts)
    return task, fact.question, QA_PROMPT, fact.answer, split == "test"


def make_sample(seed: int, split: str, index: int) -> dict:
    """One WebDataset sample: ``{"__key__", "flac": bytes, "json": bytes}``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _sample_rng(seed, split, index)
    heldout_voice = split == "test" and index % 2 == 1
    voice = HELDOUT_VOICE if heldout_voice else rng.choice(TRAIN_VOICES)
    settings = VoiceSettings(voice, rng.randint(*RATES), rng.randint(*PITCHES))
    task, text, prompt, response, heldout_fact = make_text(rng, split)
    engine = espeak()
    samples = engine.synthesize(text, settings)  # int16 [n]
    buffer = io.BytesIO()
    sf.write(buffer, samples, engine.sample_rate, format="FLAC", subtype="PCM_16")
    meta = {
        "prompt": prompt, "response": response, "task": task, "text": text, "voice": voice,
        "rate": settings.rate, "pitch": settings.pitch, "heldout_voice": heldout_voice,
        "heldout_fact": heldout_fact, "seconds": round(len(samples) / engine.sample_rate, 3), "split": split,
    }  # fmt: skip
    return {"__key__": f"{index:08d}", "flac": buffer.getvalue(), "json": json.dumps(meta, sort_keys=True).encode()}


def write_shards(out_dir: str | os.PathLike, split: str, n_samples: int, samples_per_shard: int, seed: int,
                 progress: bool = True) -> list[Path]:
    """Write ``{split}-000000.tar``, ... under ``out_dir`` (each complete before it is renamed into place)."""
    return write_split(out_dir, split, n_samples, samples_per_shard, lambda index: make_sample(seed, split, index),
                       desc="speech", unit="clip", progress=progress)


def make_default_shards(
    root: str | os.PathLike,
    n_train: int = 2000,
    n_val: int = 128,
    n_test: int = 400,
    seed: int = 0,
    samples_per_shard: int = 500,
    min_shards: int = 2,
    progress: bool = True,
) -> dict[str, str]:
    """Write the spoken train/val/test shards under ``root`` unless a matching complete set exists.

    Like the image generator: ``manifest.json`` is written last, and a missing or different
    manifest makes every split be written again. About 25 ms per clip on one core.

    Returns:
        ``{"train": ".../train-{000000..000005}.tar", "val": ..., "test": ...}``.
    """
    plan = plan_splits(dict(zip(SPLITS, (n_train, n_val, n_test))), samples_per_shard, min_shards)
    manifest = {
        "generator": "mm_llama.data.spoken", "version": GENERATOR_VERSION, "seed": seed, "splits": plan,
        "train_voices": list(TRAIN_VOICES), "heldout_voice": HELDOUT_VOICE, "heldout_facts": sorted(HELDOUT_FACTS),
    }  # fmt: skip
    return ensure_shard_set(root, manifest, lambda out, split, p: write_shards(
        out, split, p["n_samples"], p["samples_per_shard"], seed, progress))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The speech options of ``mm-llama make-shards --modality speech``."""
    group = parser.add_argument_group("speech (--modality speech)")
    group.add_argument("--speech-n-train", type=int, default=2000)
    group.add_argument("--speech-n-val", type=int, default=128)
    group.add_argument("--speech-n-test", type=int, default=400)
    group.add_argument("--speech-samples-per-shard", type=int, default=500)


def main_speech(args: argparse.Namespace) -> dict[str, str]:
    return make_default_shards(args.out or "data/speech", n_train=args.speech_n_train, n_val=args.speech_n_val,
                               n_test=args.speech_n_test, seed=args.seed,
                               samples_per_shard=args.speech_samples_per_shard)


def synthesize_float(text: str, settings: VoiceSettings = VoiceSettings()) -> tuple[np.ndarray, int]:
    """``text`` spoken as float32 samples in [-1, 1] ``[n]`` and their rate (for demos and tests)."""
    engine = espeak()
    return engine.synthesize(text, settings).astype(np.float32) / 32768.0, engine.sample_rate
