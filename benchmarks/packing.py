"""Packed rows vs the padded batch: the default stage-2 training step on real built-in batches.

Writes built-in shape shards to a temporary directory, reads ``--batches`` batches through the
default training pipeline (batch 8, an empty system turn, as ``configs/image.yaml``), and runs
the default image model's stage-2 step (encoder frozen; loss, backward, AdamW) on each batch
twice, padded (``pack=False``) and packed (``pack=True``, :mod:`mm_llama.packing`), alternating
which goes first so that load from elsewhere falls on both alike; loss and backward are timed
for each, AdamW once per batch (the same for both) and added to each. Both use the shared chat
header (:class:`~mm_llama.llama.SharedPrefix`). It reports the median step time of each, the
speedup, the columns each computes (padded: ``b x (s - p)``; packed: ``n``) and the largest
difference between the two losses. Prints one JSON line (the last line of output)::

    python benchmarks/packing.py [--batches 12] [--batch-size 8] [--lm smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

import torch

from mm_llama import load_language_model
from mm_llama.data.pipeline import DataConfig, build_dataset, build_loader
from mm_llama.data.scenes import brace_url, write_shards
from mm_llama.model import MultimodalLlama, shared_prefix_length
from mm_llama.packing import PackedRows, packing_pays
from mm_llama.training.optim import OptimConfig, build_optimizer
from mm_llama.training.modalities import image_model_config
from mm_llama.training.run_config import RunConfig


def real_batches(lm, image_size: int, batch_size: int, n: int, samples: int = 256) -> list[dict]:
    """``n`` training batches of the built-in data through the default pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(tmp, "train", samples, samples // 4, seed=0, progress=False)
        cfg = DataConfig(train_urls=brace_url(tmp, "train", len(paths)), batch_size=batch_size,
                         num_workers=0, image_size=image_size, system_prompt="")
        dataset = build_dataset(cfg.train_urls, lm.tokenizer, None, lm.cfg.vocab_size, train=True, cfg=cfg)
        loader = iter(build_loader(dataset, cfg, pad_id=lm.tokenizer.pad_id))
        return [next(loader) for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="measured batches (after one warm-up)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    lm = load_language_model(args.lm)
    default = image_model_config(RunConfig(modality="image"))
    stage2 = tuple(g for g in default.trainable if g != "image_encoder")  # stage 2 trains no encoder
    model = MultimodalLlama(lm, dataclasses.replace(default, trainable=stage2)).train()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    opt, _ = build_optimizer(named, model.group_of, OptimConfig())
    batches = real_batches(lm, model.cfg.image_encoder.image_size, args.batch_size, args.batches + 1)

    def forward_backward(batch: dict, pack: bool) -> tuple[float, float]:
        opt.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model.loss(batch["input_ids"], batch["labels"], batch["images"], pack=pack)
        loss.backward()
        return time.perf_counter() - start, loss.item()

    forward_backward(batches[0], True), forward_backward(batches[0], False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    opt_times: list[float] = []
    padded_cols = packed_cols = packed_batches = 0
    loss_diff = 0.0
    for i, batch in enumerate(batches[1:]):
        ids, labels = batch["input_ids"], batch["labels"]
        p = shared_prefix_length(ids, labels, lm.cfg.vocab_size)
        rows = PackedRows.from_labels(labels[:, p:])
        packs = packing_pays(lm.cfg, rows, past=p)
        padded_cols += ids.shape[0] * (ids.shape[1] - p)
        packed_cols += rows.tokens if packs else ids.shape[0] * (ids.shape[1] - p)
        packed_batches += packs
        losses = {}
        for pack in ((True, False) if i % 2 == 0 else (False, True)):  # the same weights for both
            seconds, losses[pack] = forward_backward(batch, pack)
            times[pack].append(seconds)
        loss_diff = max(loss_diff, abs(losses[True] - losses[False]))
        start = time.perf_counter()
        opt.step()  # on the second one's gradients: the same for both, up to rounding
        opt_times.append(time.perf_counter() - start)
    optimizer_s = statistics.median(opt_times)
    padded_s = statistics.median(times[False]) + optimizer_s
    packed_s = statistics.median(times[True]) + optimizer_s
    print(json.dumps({
        "padded_step_s": round(padded_s, 4),
        "packed_step_s": round(packed_s, 4),
        "speedup": round(padded_s / packed_s, 3),
        "optimizer_step_s": round(optimizer_s, 4),
        "padded_columns": padded_cols,
        "packed_columns": packed_cols,
        "column_fraction": round(packed_cols / padded_cols, 3),
        "batches_packed": packed_batches,
        "batches": args.batches,
        "max_loss_diff": loss_diff,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    main()
