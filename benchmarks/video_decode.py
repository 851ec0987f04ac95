"""Decoding throughput of the video data pipeline, in clips per second.

Writes ``--clips`` built-in clips (:mod:`mm_llama.data.clips`, 64x64, 5 to 32 frames) into a
temporary shard, then times, each over the whole shard:

* ``decode_clips_per_s``: :func:`~mm_llama.data.video.decode_clip` alone (demux, pick ``--frames``
  frames uniformly, decode them);
* ``frames_clips_per_s``: plus the image transform and padding (:class:`~mm_llama.data.video.VideoFrames`);
* ``pipeline_clips_per_s``: the training pipeline (tar reading, decoding, transform, chat
  tokenisation with the default LM's tokenizer) through a DataLoader with ``--workers`` workers.

and, on one long clip (``--long-seconds`` at 30 fps, a keyframe every second), the time to take
``--frames`` frames by decoding straight through versus seeking to the keyframe before each
(``long_clip_ms``): what ``decode_clip(seek=True)`` buys.

Prints one JSON line (the last line of output)::

    python benchmarks/video_decode.py [--clips 256] [--frames 8] [--workers 0] [--long-seconds 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from encoders.preprocess import image_transform
from mm_llama.data.clips import VIDEO_PLACEHOLDER, ClipSpec, make_clip_sample, render_frame, sample_event
from mm_llama.data.pipeline import DataConfig, build_dataset, build_loader
from mm_llama.data.video import VideoFrames, decode_clip, default_backend, encode_mp4


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--long-seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the transform)")
    p.add_argument("--lm", default="smollm2-135m-instruct", help="LM whose tokenizer the pipeline uses")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backend = default_backend()

    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "clips-000000.tar"
        samples = [make_clip_sample(0, "test", i) for i in range(args.clips)]
        with wds.TarWriter(str(shard)) as sink:
            for sample in samples:
                sink.write(sample)
        n_frames = [json.loads(s["json"])["frames"] for s in samples]

        start = time.perf_counter()
        for s in samples:
            decode_clip(s["mp4"], args.frames, backend=backend)
        decode_s = time.perf_counter() - start

        to_frames = VideoFrames(args.frames, image_transform(64, train=False), backend=backend)
        start = time.perf_counter()
        for s in samples:
            to_frames(s)
        frames_s = time.perf_counter() - start

        from mm_llama import load_language_model

        tokenizer = load_language_model(args.lm).tokenizer
        cfg = DataConfig(train_urls=str(shard), batch_size=8, num_workers=args.workers, image_size=64)
        dataset = build_dataset(str(shard), tokenizer, None, tokenizer.vocab_size + 1, train=False, cfg=cfg,
                                media=to_frames, media_placeholder=VIDEO_PLACEHOLDER)
        loader = build_loader(dataset, cfg, tokenizer.pad_id)
        start = time.perf_counter()
        seen = sum(batch["videos"].shape[0] for batch in loader)
        pipeline_s = time.perf_counter() - start
        assert seen == args.clips, (seen, args.clips)

    long_ms = {}
    if args.long_seconds > 0:
        fps = 30
        event = sample_event(__import__("random").Random(0))
        n = int(args.long_seconds * fps)
        data = encode_mp4([render_frame(event, k / (n - 1)) for k in range(n)], fps, keyframe_interval=fps)
        for name, seek in (("sequential", False), ("seeking", True)):
            start = time.perf_counter()
            decode_clip(data, args.frames, backend="pyav", seek=seek)
            long_ms[name] = round(1000 * (time.perf_counter() - start), 1)
        long_ms.update(frames=n, mp4_kib=round(len(data) / 1024, 1))

    print(json.dumps({
        "benchmark": "video_decode",
        "backend": backend,
        "clips": args.clips,
        "frames_sampled": args.frames,
        "clip_frames_mean": round(float(np.mean(n_frames)), 1),
        "decode_clips_per_s": _rate(args.clips, decode_s),
        "frames_clips_per_s": _rate(args.clips, frames_s),
        "pipeline_clips_per_s": _rate(args.clips, pipeline_s),
        "pipeline_workers": args.workers,
        "long_clip_ms": long_ms,
        "clip_spec": ClipSpec().__dict__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    main()
