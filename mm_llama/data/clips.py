"""Built-in video dataset: short mp4 clips of shapes whose caption needs the frames' order.

``mm-llama make-shards --modality video --out data/clips`` writes
``{train,val,test}-NNNNNN.tar`` shards of ``{"__key__", "mp4", "json"}`` samples
(``json``: ``{"prompt": "Describe the video.", "response": <caption>, "task", ...}``).
Every clip shows one shape (the colours, shapes and drawing of :mod:`mm_llama.data.scenes`)
doing one of three things, each of which a single frame, or the frames in another
order, cannot tell apart:

* ``move``:    "The red square moves from left to right." (or right to left, top to
  bottom, bottom to top; the middle frame shows it in the middle either way);
* ``colour``:  "The green circle turns blue, then yellow." (three colours, each for a third);
* ``appear``:  "The white star appears." / "The white star disappears." (at a random
  instant in the middle of the clip).

The shape sits in a cell of the image scenes' 2x2 grid (centre jittered, as there), and a
``move`` goes from one cell's centre to its neighbour's: the frame encoder, trained on the
image scenes first (README, "Video"), sees shapes where it learned to see them, with one
token per cell. (Version 1 put shapes anywhere in the middle of the frame, mostly across
the four patches; stage 1 then learned little of colour and shape:
benchmarks/RESULTS.md, "Video runs".)

Clip lengths and frame rates are drawn uniformly (``ClipSpec``), so clips have from a
handful to a few dozen frames, some fewer than the model samples (padding + mask).
Generation is deterministic from the seed, like the image scenes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from mm_llama.data.scenes import BACKGROUND, COLOURS, SHAPES, SPLITS, draw_shape
from mm_llama.data.shard_sets import ensure_shard_set, plan_splits, write_split
from mm_llama.data.video import encode_mp4

GENERATOR_VERSION = 2  # 2: shapes on the 2x2 grid of the image scenes; moves between cells
VIDEO_PROMPT = "Describe the video."
VIDEO_PLACEHOLDER = "<|video|>"
CLIP_TASKS = ("move", "colour", "appear")
CELL_CENTRES: tuple[float, float] = (0.25, 0.75)
"""Centres of the 2x2 grid's cells along either axis, as fractions of the frame side."""

JITTER = 0.06
"""Largest offset of a shape's centre from its cell's centre, as a fraction of the frame side
(the image scenes jitter by up to 0.8 of the free margin, 0.03 to 0.10 of the frame)."""

_NEAR, _FAR = CELL_CENTRES
DIRECTIONS: dict[str, tuple[int, float, float]] = {
    "from left to right": (0, _NEAR, _FAR),
    "from right to left": (0, _FAR, _NEAR),
    "from top to bottom": (1, _NEAR, _FAR),
    "from bottom to top": (1, _FAR, _NEAR),
}
"""Caption phrase → (axis it moves along: 0 x, 1 y; start; end), the centre's coordinate on that
axis as a fraction of the frame side: from one cell's centre to its neighbour's."""

_SUPERSAMPLE = 4  # draw at 4x and box-filter down, as the image scenes do


@dataclass(frozen=True)
class ClipSpec:
    """Timing and size of the built-in clips.

    Attributes:
        size: frame side in pixels (square frames).
        min_seconds: shortest clip.
        max_seconds: longest clip (durations are uniform in between).
        min_fps: lowest frame rate.
        max_fps: highest frame rate (integer rates uniform in between).
    """

    size: int = 64
    min_seconds: float = 1.5
    max_seconds: float = 4.0
    min_fps: int = 3
    max_fps: int = 8

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be even and >= 16, got {self.size}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(f"need 0 < min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if not 1 <= self.min_fps <= self.max_fps:
            raise ValueError(f"need 1 <= min_fps <= max_fps, got {self.min_fps}, {self.max_fps}")
        if self.min_seconds * self.min_fps < 3:
            raise ValueError(
                f"the shortest clip has {self.min_seconds * self.min_fps:.1f} frames; at least 3 are needed "
                "(a colour change shows three colours)"
            )


@dataclass(frozen=True)
class ClipEvent:
    """What one clip shows.

    Attributes:
        task: one of :data:`CLIP_TASKS`.
        shape: one of :data:`~mm_llama.data.scenes.SHAPES`.
        colours: one colour (``move``, ``appear``) or three in order (``colour``).
        direction: key of :data:`DIRECTIONS` (``move``), ``"appears"``/``"disappears"``
            (``appear``), or ``""``.
        x: centre, as a fraction of the frame width (where it does not move).
        y: centre, as a fraction of the frame height (where it does not move).
        size: shape width as a fraction of the frame.
        switch: fraction of the clip at which an ``appear`` event happens.
    """

    task: str
    shape: str
    colours: tuple[str, ...]
    direction: str
    x: float
    y: float
    size: float
    switch: float

    @property
    def caption(self) -> str:
        if self.task == "move":
            return f"The {self.colours[0]} {self.shape} moves {self.direction}."
        if self.task == "colour":
            first, second, third = self.colours
            return f"The {first} {self.shape} turns {second}, then {third}."
        return f"The {self.colours[0]} {self.shape} {self.direction}."

    def state(self, t: float) -> tuple[str | None, float, float]:
        """Colour (``None``: not shown) and centre (fractions of the frame) at time ``t`` in [0, 1]."""
        if self.task == "move":
            axis, start, end = DIRECTIONS[self.direction]
            along = start + (end - start) * t
            return (self.colours[0], along, self.y) if axis == 0 else (self.colours[0], self.x, along)
        if self.task == "colour":
            return self.colours[min(2, int(t * 3))], self.x, self.y
        visible = (t >= self.switch) == (self.direction == "appears")
        return (self.colours[0] if visible else None), self.x, self.y


def _clip_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"mm-llama-clips/v{GENERATOR_VERSION}/{seed}/{split}/{index}")


def _in_cell(rng: random.Random) -> float:
    """A coordinate near one of the grid's cell centres (fraction of the frame side)."""
    return round(rng.choice(CELL_CENTRES) + rng.uniform(-JITTER, JITTER), 3)


def sample_event(rng: random.Random) -> ClipEvent:
    """Draw a task, a shape, its colour(s) and placement."""
    task = rng.choice(CLIP_TASKS)
    shape = rng.choice(SHAPES)
    if task == "colour":
        colours = tuple(rng.sample(sorted(COLOURS), 3))
        direction = ""
    else:
        colours = (rng.choice(sorted(COLOURS)),)
        direction = rng.choice(sorted(DIRECTIONS)) if task == "move" else rng.choice(("appears", "disappears"))
    return ClipEvent(
        task=task, shape=shape, colours=colours, direction=direction,
        x=_in_cell(rng), y=_in_cell(rng),
        size=round(rng.uniform(0.28, 0.36), 3), switch=round(rng.uniform(0.35, 0.65), 3),
    )  # fmt: skip


def render_frame(event: ClipEvent, t: float, size: int = 64) -> np.ndarray:
    """The frame at time ``t`` (fraction of the clip) as ``uint8 [size, size, 3]``."""
    side = size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    colour, x, y = event.state(t)
    if colour is not None:
        draw_shape(ImageDraw.Draw(image), event.shape, COLOURS[colour], x * side, y * side, event.size * side / 2)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def make_clip_sample(seed: int, split: str, index: int, spec: ClipSpec = ClipSpec()) -> dict:
    """One WebDataset sample: ``{"__key__", "mp4": bytes, "json": bytes}``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _clip_rng(seed, split, index)
    event = sample_event(rng)
    seconds = rng.uniform(spec.min_seconds, spec.max_seconds)
    fps = rng.randint(spec.min_fps, spec.max_fps)
    n = max(3, round(seconds * fps))
    # Frame k shows the clip at time k / (n - 1): the first frame its start, the last its end
    # (a move reaches the far side; every n >= 3 shows all three colours of a colour change).
    frames = [render_frame(event, k / (n - 1), spec.size) for k in range(n)]
    meta = {
        "prompt": VIDEO_PROMPT,
        "response": event.caption,
        "task": event.task,
        "event": asdict(event),
        "frames": n,
        "fps": fps,
        "split": split,
    }
    return {
        "__key__": f"{index:08d}",
        "mp4": encode_mp4(frames, fps),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def write_clip_shards(
    out_dir: str | os.PathLike, split: str, n_samples: int, samples_per_shard: int, seed: int,
    spec: ClipSpec = ClipSpec(), progress: bool = True,
) -> list[Path]:
    """Write ``{split}-000000.tar``, ... (each renamed into place when complete)."""
    return write_split(out_dir, split, n_samples, samples_per_shard,
                       lambda index: make_clip_sample(seed, split, index, spec),
                       desc="clips", unit="clip", progress=progress)


def make_default_clip_shards(
    root: str | os.PathLike,
    n_train: int = 6000,
    n_val: int = 128,
    n_test: int = 300,
    seed: int = 0,
    samples_per_shard: int = 500,
    min_shards: int = 4,
    spec: ClipSpec = ClipSpec(),
    progress: bool = True,
) -> dict[str, str]:
    """Write train/val/test clip shards under ``root`` unless a matching complete set exists.

    Same contract as :func:`mm_llama.data.scenes.make_default_shards`: ``manifest.json`` is
    written last, and a missing or different manifest regenerates every split.

    Returns:
        ``{"train": ".../train-{000000..000011}.tar", "val": ..., "test": ...}``.
    """
    manifest = {
        "generator": "mm_llama.data.clips",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "clip": asdict(spec),
        "splits": plan_splits(dict(zip(SPLITS, (n_train, n_val, n_test))), samples_per_shard, min_shards),
    }
    return ensure_shard_set(root, manifest, lambda out, split, plan: write_clip_shards(
        out, split, plan["n_samples"], plan["samples_per_shard"], seed, spec, progress))


def main(argv: Sequence[str] | None = None) -> int:
    """``mm-llama make-shards --modality video --out data/clips ...``: print the shard URLs."""
    d = ClipSpec()
    parser = argparse.ArgumentParser(prog="mm-llama make-shards --modality video",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--modality", choices=["video"], default="video")
    parser.add_argument("--out", default="data/clips", help="output directory (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=d.size, help="frame side (default: %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=d.min_seconds, help="shortest clip (default: %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=d.max_seconds, help="longest clip (default: %(default)s)")
    parser.add_argument("--min-fps", type=int, default=d.min_fps, help="lowest frame rate (default: %(default)s)")
    parser.add_argument("--max-fps", type=int, default=d.max_fps, help="highest frame rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        spec = ClipSpec(args.image_size, args.min_seconds, args.max_seconds, args.min_fps, args.max_fps)
    except ValueError as exn:
        parser.error(str(exn))
    urls = make_default_clip_shards(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                    seed=args.seed, samples_per_shard=args.samples_per_shard, spec=spec)
    print(json.dumps(urls, indent=2))
    return 0
