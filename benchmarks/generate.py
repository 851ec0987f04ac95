"""Generation speed of the default LM + image adapter: tokens/s and time to first token,
with and without the media K/V cache.

The adapters are randomly initialised with their gates opened (``--gate``), so the
image changes every decode step; speed does not depend on what the weights learned.
"Without the cache" recomputes every cross-attention block's media K/V from the encoded
image tokens at every forward (``generate(..., cache_media_kv=False)``); the image is
still encoded once.

* ``ttft_ms``: from the call to the first generated token (image encoding, media K/V,
  prompt prefill, first pick), median over repeats;
* ``tokens_per_s``: decode throughput after the first token, ``(n - 1) / (t_last - t_first)``,
  median over repeats, summed over the batch.

Prints one JSON line (the last line of output)::

    python benchmarks/generate.py [--lm smollm2-135m-instruct] [--new-tokens 32] [--repeats 3] [--batch-size 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mm_llama import load_language_model
from mm_llama.data.examples import encode_prompt
from mm_llama.generation import generate
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama


def timed_generate(model, prompts, images, new_tokens: int, cache_media_kv: bool) -> tuple[float, float]:
    """One greedy run of exactly ``new_tokens`` (no stop ids); returns ``(ttft_s, decode_tokens_per_s)``."""
    stamps: list[float] = []
    start = time.perf_counter()
    generate(model, prompts, images, max_new_tokens=new_tokens, cache_media_kv=cache_media_kv,
             on_token=lambda _: stamps.append(time.perf_counter()))
    b = len(prompts)
    return stamps[0] - start, b * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gate", type=float, default=0.5, help="initial value of every tanh gate (0 = image ignored)")
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (throughput is measured after the first token)")

    torch.manual_seed(0)
    lm = load_language_model(args.lm)
    model = MultimodalLlama(lm, ModelConfig(cross_attention=CrossAttentionConfig(gate_init=args.gate))).eval()
    ids = encode_prompt(lm.tokenizer, args.prompt, media_token_id=model.media_token_id("image"))["input_ids"]
    prompts = [ids.tolist()] * args.batch_size
    size = model.cfg.image_encoder.image_size
    images = torch.randn(args.batch_size, 3, size, size)
    media_tokens = model.encode_images(images[:1])[0].shape[1]

    timed_generate(model, prompts, images, 4, True)  # warm-up: allocator, kernels
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.repeats):  # interleaved, so background load hits both modes alike
        for cached in (True, False):
            results[cached].append(timed_generate(model, prompts, images, args.new_tokens, cached))

    def median(cached: bool, k: int) -> float:
        return statistics.median(r[k] for r in results[cached])

    print(json.dumps({
        "lm": args.lm,
        "batch_size": args.batch_size,
        "prompt_tokens": len(prompts[0]),
        "media_tokens": media_tokens,
        "new_tokens": args.new_tokens,
        "cross_attention_layers": len(model.cross_attn),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ttft_ms_no_media_cache": round(1000 * median(False, 0), 1),
        "tokens_per_s_no_media_cache": round(median(False, 1), 2),
        "ttft_ms": round(1000 * median(True, 0), 1),
        "tokens_per_s": round(median(True, 1), 2),
    }), flush=True)


if __name__ == "__main__":
    main()
