"""Is data loading ever the bottleneck? The image loader alone vs what a training step consumes.

Writes built-in shape shards (``mm_llama.data.scenes``) to a temporary directory, then reads
them through the default training pipeline (``build_dataset`` + ``build_loader``: shard and
sample shuffling, PNG decode, chat-template tokenisation, resize-to-tensor, collate) with the
default data settings of ``configs/image.yaml`` (batch 8, 2 workers, shuffle buffer 1000,
an empty system turn). It reports:

* ``loader_samples_per_s``: samples per second of the loader alone, after its first batch
  (worker start-up, reported separately as ``first_batch_s``), over ``--batches`` batches;
* ``step_samples_per_s``: samples per second the default stage-2 training step consumes, from
  ``benchmarks/train_step.py`` run in a subprocess at the same batch size and at the mean padded
  sequence length the loader produced;
* ``headroom``: loader / step; above 1 the loader keeps up (with ``num_workers > 0`` it runs
  in other processes, in parallel with the step).

The two are measured one after the other, each with the whole machine. Prints one JSON line
(the last line of output)::

    python benchmarks/data_loader.py [--batches 40] [--num-workers 2] [--batch-size 8] [--step-samples-per-s X]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mm_llama.data.pipeline import DataConfig, build_dataset, build_loader
from mm_llama.data.scenes import brace_url, write_shards

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "image.yaml"


def default_data_settings(config: Path = DEFAULT_CONFIG) -> dict:
    """The ``data:`` section of the default image config (batch size, workers, ...)."""
    return yaml.safe_load(config.read_text())["data"]


def load_tokenizer(lm: str):
    """The tokenizer of a registered LM (and the id of ``<|image|>`` just past its vocabulary)."""
    from mm_llama import load_language_model

    model = load_language_model(lm)
    return model.tokenizer, model.cfg.vocab_size


def measure_loader(urls: str, cfg: DataConfig, tokenizer, media_token_id: int, batches: int) -> dict:
    """Iterate the training loader for ``batches`` batches after the first one."""
    dataset = build_dataset(urls, tokenizer, None, media_token_id, train=True, cfg=cfg)
    loader = build_loader(dataset, cfg, pad_id=tokenizer.pad_id)
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - start
    lengths, samples = [first["input_ids"].shape[1]], 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:  # one pass over the shards was shorter than asked
            break
        samples += batch["input_ids"].shape[0]
        lengths.append(batch["input_ids"].shape[1])
    seconds = time.perf_counter() - start
    return {
        "loader_samples_per_s": round(samples / seconds, 1),
        "first_batch_s": round(first_s, 2),
        "measured_samples": samples,
        "mean_padded_len": round(statistics.mean(lengths), 1),
    }


def measure_step(batch_size: int, seq_len: int, steps: int) -> dict:
    """Run ``benchmarks/train_step.py`` in a fresh interpreter; its JSON result."""
    script = Path(__file__).resolve().parent / "train_step.py"
    cmd = [sys.executable, str(script), "--batch-size", str(batch_size), "--seq-len", str(seq_len),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train_step.py failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    data = default_data_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m-instruct", help="whose tokenizer encodes the text")
    parser.add_argument("--batch-size", type=int, default=data["batch_size"])
    parser.add_argument("--num-workers", type=int, default=data["num_workers"])
    parser.add_argument("--samples", type=int, default=1024, help="samples written to the temporary shards")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40, help="measured batches (after the first)")
    parser.add_argument("--steps", type=int, default=3, help="measured training steps")
    parser.add_argument("--step-samples-per-s", type=float, default=None,
                        help="skip the training-step measurement and use this figure")
    args = parser.parse_args(argv)
    if args.samples < args.shards or args.shards < max(1, args.num_workers):
        parser.error(f"need samples >= shards >= workers; got {args.samples}, {args.shards}, {args.num_workers}")

    tokenizer, vocab = load_tokenizer(args.lm)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(tmp, "train", args.samples, -(-args.samples // args.shards), seed=0, progress=False)
        urls = brace_url(tmp, "train", len(paths))
        cfg = DataConfig(train_urls=urls, batch_size=args.batch_size, num_workers=args.num_workers,
                         shuffle_buffer=data["shuffle_buffer"], max_len=data["max_len"], seed=data["seed"],
                         system_prompt="")
        loader = measure_loader(urls, cfg, tokenizer, vocab, args.batches)
    if args.step_samples_per_s is None:
        step = measure_step(args.batch_size, round(loader["mean_padded_len"]), args.steps)
        step_rate = step["samples_per_s"]
    else:
        step, step_rate = None, args.step_samples_per_s
    print(json.dumps({
        **loader,
        "step_samples_per_s": step_rate,
        "headroom": round(loader["loader_samples_per_s"] / step_rate, 2),
        "loader_is_bottleneck": loader["loader_samples_per_s"] < step_rate,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "train_step": step,
    }), flush=True)


if __name__ == "__main__":
    main()
