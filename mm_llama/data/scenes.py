"""Built-in image dataset: coloured shapes on a grid (DESIGN §7).

Every sample is a function of ``(seed, split, index)`` alone, so shards are
byte-identical across runs and machines and independent of the shard size.

A scene holds 1 to ``SceneSpec.max_objects`` objects in distinct cells of a
``SceneSpec.grid`` x ``grid`` layout (default: 1-2 objects on 2x2, the four
corners; ``SceneSpec(grid=3, max_objects=3)`` is the harder 3x3 set with the
centre and edge cells); an object is a (colour, shape) pair, no pair repeats within a scene (so "Where is the red square?" has one
answer), sizes and offsets are jittered inside the cell. Each sample asks one
question, drawn uniformly from :data:`TASKS`; answers are short canonical
strings scored by exact match:

* ``caption``: "Describe the image." -> "A red square in the top left and a
  blue circle in the bottom right." (objects in row-major order);
* ``colour``: "What colour is the shape in the {position}?" -> "red";
* ``count``: "How many shapes are there?" -> "one" / "two" / "three";
* ``where``: "Where is the {colour} {shape}?" -> "top left".

The (colour, shape) pairs in :data:`HELDOUT_COMBOS` never occur in train or
val. In test, half of the scenes are forced to contain one (and the question,
when it names an object, is about it); every test sample that contains one is
marked ``"heldout": true`` so compositional generalisation is scored apart.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from mm_llama.data.examples import CAPTION_PROMPT
from mm_llama.data.shard_sets import MANIFEST, brace_url, ensure_shard_set, plan_splits, shard_path, write_split  # noqa: F401

GENERATOR_VERSION = 2  # 2: SceneSpec (grid, max_objects) in the manifest; default 2x2, 1-2 objects
SPLITS = ("train", "val", "test")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 200),
    "orange": (245, 140, 30),
    "pink": (250, 140, 190),
    "white": (245, 245, 245),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("square", "circle", "triangle", "diamond", "star")
POSITION_NAMES: dict[int, tuple[str, ...]] = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: (
        "top left", "top middle", "top right",
        "middle left", "center", "middle right",
        "bottom left", "bottom middle", "bottom right",
    ),
}  # fmt: skip
"""Cell names in row-major order, per grid size."""
POSITIONS = POSITION_NAMES[3]  # every cell name of every grid
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("green", "star"), ("blue", "diamond")}
)
TASKS = ("caption", "colour", "count", "where")
NUMBER_WORDS = ("zero", "one", "two", "three")

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, still deterministic
_P_FORCE_HELDOUT = 0.5


@dataclass(frozen=True)
class SceneSpec:
    """Layout of the built-in scenes.

    Attributes:
        grid: cells per side: 2 (the four corners) or 3 (adds centre and edge cells).
        max_objects: a scene holds 1 to ``max_objects`` objects, in distinct cells.
    """

    grid: int = 2
    max_objects: int = 2

    def __post_init__(self) -> None:
        if self.grid not in POSITION_NAMES:
            raise ValueError(f"grid must be one of {sorted(POSITION_NAMES)}, got {self.grid}")
        if not 1 <= self.max_objects <= min(self.grid**2, len(NUMBER_WORDS) - 1):
            raise ValueError(
                f"max_objects must be in 1..{min(self.grid**2, len(NUMBER_WORDS) - 1)} for a "
                f"{self.grid}x{self.grid} grid, got {self.max_objects}"
            )

    @property
    def positions(self) -> tuple[str, ...]:
        return POSITION_NAMES[self.grid]


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell.

    Attributes:
        colour: key of :data:`COLOURS`.
        shape: one of :data:`SHAPES`.
        row: grid row, 0 (top) to ``grid - 1``.
        col: grid column, 0 (left) to ``grid - 1``.
        size: object width as a fraction of the cell width.
        dx: horizontal offset of the centre, a fraction of the free margin (-1..1).
        dy: vertical offset, likewise.
        grid: cells per side of the scene's layout (see :class:`SceneSpec`).
    """

    colour: str
    shape: str
    row: int
    col: int
    size: float
    dx: float
    dy: float
    grid: int = 3

    @property
    def position(self) -> str:
        return POSITION_NAMES[self.grid][self.grid * self.row + self.col]

    @property
    def heldout(self) -> bool:
        return (self.colour, self.shape) in HELDOUT_COMBOS


def _sample_rng(seed: int, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across processes and Python runs.
    return random.Random(f"mm-llama-scenes/v{GENERATOR_VERSION}/{seed}/{split}/{index}")


def sample_scene(rng: random.Random, split: str, spec: SceneSpec = SceneSpec()) -> list[SceneObject]:
    """Draw 1 to ``spec.max_objects`` objects in distinct cells, honouring the held-out rule.

    In test, a forced held-out object comes first (the caller makes it the
    question's focus, then sorts the objects row-major).
    """
    all_combos = [(c, s) for c in COLOURS for s in SHAPES]
    n = rng.randint(1, spec.max_objects)
    if split == "test":
        if rng.random() < _P_FORCE_HELDOUT:
            forced = rng.choice(sorted(HELDOUT_COMBOS))
            rest = [c for c in all_combos if c != forced]
            combos = [forced] + rng.sample(rest, n - 1)
        else:
            combos = rng.sample(all_combos, n)
    else:
        combos = rng.sample([c for c in all_combos if c not in HELDOUT_COMBOS], n)
    cells = rng.sample(range(spec.grid**2), n)
    objects = [
        SceneObject(
            colour=colour,
            shape=shape,
            row=cell // spec.grid,
            col=cell % spec.grid,
            size=round(rng.uniform(0.5, 0.85), 3),
            dx=round(rng.uniform(-1.0, 1.0), 3),
            dy=round(rng.uniform(-1.0, 1.0), 3),
            grid=spec.grid,
        )
        for (colour, shape), cell in zip(combos, cells)
    ]
    return objects


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def render_scene(objects: Sequence[SceneObject], image_size: int = 64) -> Image.Image:
    """Draw the objects on a black ``image_size`` x ``image_size`` RGB image."""
    side = image_size * _SUPERSAMPLE
    cell = side / (objects[0].grid if objects else 3)
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        r = obj.size * cell / 2
        margin = cell / 2 - r
        cx = (obj.col + 0.5) * cell + 0.8 * margin * obj.dx
        cy = (obj.row + 0.5) * cell + 0.8 * margin * obj.dy
        draw_shape(draw, obj.shape, COLOURS[obj.colour], cx, cy, r)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], cx: float, cy: float, r: float
) -> None:
    """Draw one filled ``shape`` (of :data:`SHAPES`) of half-width ``r`` centred on ``(cx, cy)``."""
    if shape == "square":
        h = 0.85 * r  # a full-width square looks much bigger than the other shapes
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _with_article(phrase: str, capital: bool) -> str:
    article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article.capitalize() if capital else article} {phrase}"


def caption(objects: Sequence[SceneObject]) -> str:
    """Canonical caption, objects in row-major order."""
    parts = [
        _with_article(f"{o.colour} {o.shape} in the {o.position}", capital=i == 0)
        for i, o in enumerate(sorted(objects, key=lambda o: (o.row, o.col)))
    ]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def make_question(rng: random.Random, objects: Sequence[SceneObject], focus: SceneObject) -> tuple[str, str, str]:
    """Draw a task and return ``(task, prompt, response)`` about ``focus`` where it applies."""
    task = rng.choice(TASKS)
    if task == "caption":
        return task, CAPTION_PROMPT, caption(objects)
    if task == "colour":
        return task, f"What colour is the shape in the {focus.position}?", focus.colour
    if task == "count":
        return task, "How many shapes are there?", NUMBER_WORDS[len(objects)]
    return task, f"Where is the {focus.colour} {focus.shape}?", focus.position


def make_sample(seed: int, split: str, index: int, image_size: int = 64, spec: SceneSpec = SceneSpec()) -> dict:
    """One WebDataset sample: ``{"__key__", "png": bytes, "json": bytes}``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _sample_rng(seed, split, index)
    objects = sample_scene(rng, split, spec)
    focus = objects[0] if objects[0].heldout else rng.choice(objects)
    objects = sorted(objects, key=lambda o: (o.row, o.col))
    task, prompt, response = make_question(rng, objects, focus)
    buffer = io.BytesIO()
    render_scene(objects, image_size).save(buffer, format="PNG")
    meta = {
        "prompt": prompt,
        "response": response,
        "task": task,
        "heldout": any(o.heldout for o in objects),
        "objects": [{**asdict(o), "position": o.position} for o in objects],
        "split": split,
    }
    return {
        "__key__": f"{index:08d}",
        "png": buffer.getvalue(),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def write_shards(
    out_dir: str | os.PathLike,
    split: str,
    n_samples: int,
    samples_per_shard: int,
    seed: int,
    image_size: int = 64,
    progress: bool = True,
    spec: SceneSpec = SceneSpec(),
) -> list[Path]:
    """Write ``{split}-000000.tar``, ... under ``out_dir``; returns the shard paths.

    Each shard is written to a temporary name and renamed when complete, so a
    shard file that exists is whole. Keys are the global sample index.
    """
    if image_size < 8:
        raise ValueError(f"need image_size >= 8, got {image_size}")
    return write_split(out_dir, split, n_samples, samples_per_shard,
                       lambda index: make_sample(seed, split, index, image_size, spec),
                       desc="shapes", unit="img", progress=progress)


def make_default_shards(
    root: str | os.PathLike,
    image_size: int = 64,
    n_train: int = 20_000,
    n_val: int = 256,
    n_test: int = 512,
    seed: int = 0,
    samples_per_shard: int = 1000,
    min_shards: int = 4,
    progress: bool = True,
    spec: SceneSpec = SceneSpec(),
) -> dict[str, str]:
    """Write train/val/test shards under ``root`` unless a matching complete set exists.

    ``manifest.json`` (counts, seed, image size, generator version) is written
    last; when it is missing or differs from the request, the shards of all
    splits are deleted and written again, so an interrupted generation is never
    half-used (:func:`~mm_llama.data.shard_sets.ensure_shard_set`).

    Returns:
        ``{"train": ".../train-{000000..000019}.tar", "val": ..., "test": ...}``.
    """
    manifest = {
        "generator": "mm_llama.data.scenes",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "scene": asdict(spec),
        "splits": plan_splits(dict(zip(SPLITS, (n_train, n_val, n_test))), samples_per_shard, min_shards),
        "heldout": sorted(" ".join(c) for c in HELDOUT_COMBOS),
    }
    return ensure_shard_set(root, manifest, lambda out, split, plan: write_shards(
        out, split, plan["n_samples"], plan["samples_per_shard"], seed, image_size, progress, spec))


def main(argv: Sequence[str] | None = None) -> int:
    """``mm-llama make-shards --modality image --out data/shapes ...``: print the shard URLs
    (``--modality video`` hands over to :func:`mm_llama.data.clips.main`, ``--modality speech``
    to :func:`mm_llama.data.spoken.main_speech`)."""
    modality = argparse.ArgumentParser(add_help=False)
    modality.add_argument("--modality", choices=["image", "video", "speech"], default="image")
    if modality.parse_known_args(argv)[0].modality == "video":
        from mm_llama.data.clips import main as make_clip_shards

        return make_clip_shards(argv)
    parser = argparse.ArgumentParser(prog="mm-llama make-shards", description=__doc__.split("\n")[0])
    parser.add_argument("--modality", choices=["image", "video", "speech"], default="image",
                        help="video: the clip shards (mm-llama make-shards --modality video --help)")
    parser.add_argument("--out", default=None, help="output directory (default: data/shapes, data/speech)")
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-val", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=512)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=SceneSpec.grid, choices=sorted(POSITION_NAMES),
                        help="cells per side: 2 = corners, 3 = 3x3 (default: %(default)s)")
    parser.add_argument("--max-objects", type=int, default=SceneSpec.max_objects,
                        help="objects per scene, 1..N (default: %(default)s)")
    from mm_llama.data import spoken

    spoken.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.modality == "speech":
        print(json.dumps(spoken.main_speech(args), indent=2))
        return 0
    urls = make_default_shards(
        args.out or "data/shapes",
        image_size=args.image_size,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        spec=SceneSpec(args.grid, args.max_objects),
    )
    print(json.dumps(urls, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
