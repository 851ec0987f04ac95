"""Writing a generated dataset as WebDataset shards, for every built-in generator
(image scenes, video clips, spoken sentences).

* :func:`write_split` writes one split's shards, each to a temporary name renamed into
  place when complete (a shard file that exists is whole), with fixed tar metadata
  (identical bytes on every run).
* :func:`ensure_shard_set` writes a train/val/test set under a manifest: the manifest
  is written last, and when it is missing or differs from the request every split is
  deleted and written again, so an interrupted generation is never half-used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

MANIFEST = "manifest.json"


def shard_path(out_dir: str | os.PathLike, split: str, shard: int) -> Path:
    return Path(out_dir) / f"{split}-{shard:06d}.tar"


def brace_url(out_dir: str | os.PathLike, split: str, n_shards: int) -> str:
    """Brace pattern naming ``n_shards`` shards, e.g. ``.../train-{000000..000019}.tar``."""
    return str(Path(out_dir) / f"{split}-{{000000..{n_shards - 1:06d}}}.tar")


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    n_samples: int,
    samples_per_shard: int,
    make_sample: Callable[[int], dict[str, Any]],
    *,
    desc: str,
    unit: str = "sample",
    progress: bool = True,
) -> list[Path]:
    """Write ``{split}-000000.tar``, ... under ``out_dir`` from ``make_sample(index)``; returns the paths.

    Keys are the samples' own (the generators use the global index).
    """
    if n_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"need n_samples >= 1 and samples_per_shard >= 1, got {n_samples}, {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    bar = tqdm(total=n_samples, desc=f"{desc} {split}", unit=unit, disable=not progress)
    for shard, start in enumerate(range(0, n_samples, samples_per_shard)):
        path = shard_path(out, split, shard)
        tmp = path.with_suffix(".tar.tmp")
        # Fixed mtime/user/group: identical bytes on every run. An integer mtime keeps tarfile from
        # adding a pax header to every member (a float one does): half the bytes on disk.
        with wds.TarWriter(str(tmp), mtime=0, user="mm-llama", group="mm-llama") as sink:
            for index in range(start, min(start + samples_per_shard, n_samples)):
                sink.write(make_sample(index))
                bar.update()
        os.replace(tmp, path)
        paths.append(path)
    bar.close()
    return paths


def plan_splits(counts: Mapping[str, int], samples_per_shard: int, min_shards: int) -> dict[str, dict[str, int]]:
    """``{split: {"n_samples", "samples_per_shard", "n_shards"}}`` for ``counts = {split: n_samples}``.

    Small splits still get ``min_shards`` shards, so that ranks x workers all have one.
    """
    plan = {}
    for split, n in counts.items():
        size = max(1, min(samples_per_shard, math.ceil(n / min_shards)))
        plan[split] = {"n_samples": n, "samples_per_shard": size, "n_shards": math.ceil(n / size)}
    return plan


def ensure_shard_set(
    root: str | os.PathLike,
    manifest: dict[str, Any],
    write: Callable[[Path, str, dict[str, int]], Any],
) -> dict[str, str]:
    """Write every split of ``manifest["splits"]`` (a :func:`plan_splits` plan) under ``root``
    with ``write(root, split, plan[split])``, unless ``root`` already holds this exact manifest.

    Returns:
        ``{"train": ".../train-{000000..000019}.tar", "val": ..., "test": ...}``.
    """
    root = Path(root)
    plan = manifest["splits"]
    urls = {split: brace_url(root, split, p["n_shards"]) for split, p in plan.items()}
    manifest_path = root / MANIFEST
    if manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
        return urls
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    for split in plan:
        for stale in [*root.glob(f"{split}-[0-9]*.tar"), *root.glob(f"{split}-[0-9]*.tar.tmp")]:
            stale.unlink()
    for split, p in plan.items():
        write(root, split, p)
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    return urls
