"""Training-step throughput of the default image run, and its fraction of the matmul peak.

``--stage 2`` (default) times the adapter stage's step; ``--stage 1`` times stage 1's: the image
encoder (trainable, its hybrid stem included) and the small caption decoder, batch 64.

Prints one JSON line (the last line of output) with ``tokens_per_s``, ``samples_per_s``,
``peak_rss_mb``, ``saved_activation_mb`` (what autograd keeps for backward in one forward) and ``matmul_peak_fraction``: the FLOPs of one step (counted by ``torch.utils.flop_counter``) per
second, over the fp32 matmul peak measured here with large square matmuls on the same threads.

    python benchmarks/train_step.py [--batch-size 16] [--seq-len 40] [--steps 5] [--prompt-reader rows|last|none]
    python benchmarks/train_step.py --activation-checkpointing [N]   # stage 2 recomputing (every N-th) block
    python benchmarks/train_step.py --stage 1 [--batch-size 64] [--steps 10] [--activation-checkpointing]
    python benchmarks/train_step.py --stage 1 --encoder open_clip:ViT-B-32   # another backbone, as train_adapter.py's
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator

import psutil
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from adapters.prompt_reader import PromptReaderConfig
from mm_llama import load_language_model
from mm_llama.model import MultimodalLlama
from mm_llama.saved_tensors import saved_for_backward
from mm_llama.training.datamodule import ModelInputs
from mm_llama.training.encoder_pretrain import EncoderPretrainConfig, EncoderPretrainModule
from mm_llama.training.optim import OptimConfig, build_optimizer
from mm_llama.training.modalities import image_model_config
from mm_llama.training.run_config import RunConfig


@contextlib.contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """``FlopCounterMode`` that also counts grouped-query attention.

    Older torch releases (2.11, the GPU machine's) reject ``scaled_dot_product_attention`` with
    ``enable_gqa=True`` in their FLOP formula ("query/key/value shapes are incompatible"). While
    counting, K/V are repeated to the query heads first: the attention FLOPs are the same.
    """
    sdpa = F.scaled_dot_product_attention

    def expanded(q, k, v, *args, enable_gqa: bool = False, **kwargs):
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = expanded
    try:
        with FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        F.scaled_dot_product_attention = sdpa


def matmul_peak_flops(n: int = 2048, repeats: int = 5, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an ``n x n`` matmul in ``dtype`` on ``device`` (CPU: this process's threads)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    a @ b  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def stage1_step(args: argparse.Namespace, b: int, s: int) -> tuple[Callable[[], None], int, float]:
    """Stage 1's training step on random data of the built-in tasks' shape (``b`` images of the
    default size, ``s`` tokens, the last 8 labelled, 60 output tokens); returns it, the number of
    trainable parameters and the MiB saved for backward."""
    from encoders import ImageEncoder

    pre = EncoderPretrainConfig()
    encoder_cfg = image_model_config(RunConfig(modality="image", encoder=args.encoder)).image_encoder
    lm = load_language_model(args.lm)
    vocab = lm.cfg.vocab_size
    inputs = ModelInputs(tokenizer=lm.tokenizer, media_token_id=vocab, image_size=encoder_cfg.image_size,
                         system_prompt=None)
    del lm
    lookup = torch.randint(1, 60, (vocab,))
    encoder = ImageEncoder(encoder_cfg)
    encoder.set_grad_checkpointing(args.activation_checkpointing > 0)  # what train_adapter.py's flag does here
    module = EncoderPretrainModule(encoder, inputs, lookup, pre).train()
    ids = torch.randint(0, vocab, (b, s))
    labels = torch.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]
    batch = {"images": torch.randn(b, 3, encoder_cfg.image_size, encoder_cfg.image_size),
             "input_ids": ids, "labels": labels}
    opt = module.configure_optimizers()["optimizer"]

    def step() -> None:
        loss = module.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    saved = saved_activation_mb(module, lambda: module.loss(batch))
    return step, sum(p.numel() for p in module.parameters() if p.requires_grad), saved


def saved_activation_mb(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> float:
    """MiB autograd keeps for backward while ``loss_fn()`` runs, ``model``'s weights left out
    (:func:`mm_llama.saved_tensors.saved_for_backward`)."""
    return saved_for_backward(loss_fn, exclude=model.parameters())[1] / 2**20


def stage2_step(args: argparse.Namespace, b: int, s: int) -> tuple[Callable[[], None], int, float]:
    """The default run's stage-2 step (adapters through the frozen LM) on random data; returns it,
    the number of trainable parameters and the MiB saved for backward."""
    default = image_model_config(RunConfig(modality="image", encoder=args.encoder))  # train_adapter.py's, before stage 1
    groups = tuple(g for g in default.trainable if g != "prompt_reader")
    trainable = groups if args.train_encoder else tuple(g for g in groups if g != "image_encoder")
    reader = None
    if args.prompt_reader != "none":  # what stage 1 hands over: its decoder's shape, a 60-word vocabulary
        pre = EncoderPretrainConfig()
        reader = PromptReaderConfig(vocab_size=60, lookup_size=49154, width=pre.width, depth=pre.depth,
                                    heads=pre.heads, every_row=args.prompt_reader == "rows")
    cfg = dataclasses.replace(default, trainable=trainable, prompt_reader=reader)
    model = MultimodalLlama(load_language_model(args.lm), cfg).train()
    model.set_checkpoint_interval(args.activation_checkpointing)
    size = model.cfg.image_encoder.image_size
    ids = torch.randint(0, model.lm.cfg.vocab_size, (b, s))
    ids[:, 8] = model.media_token_id("image")
    labels = torch.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]  # a short response, like the built-in tasks
    images = torch.randn(b, 3, size, size)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, _ = build_optimizer(named, model.group_of, OptimConfig())

    def step() -> None:
        loss = model.loss(ids, labels, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    saved = saved_activation_mb(model, lambda: model.loss(ids, labels, images))
    return step, sum(p.numel() for _, p in named), saved



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m-instruct")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2,
                        help="2: the adapters' step (default); 1: the encoder pre-training step")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (stage 2), 64 (stage 1)")
    parser.add_argument("--seq-len", type=int, default=40, help="tokens per sample (the built-in data averages ~32-45)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--train-encoder", action="store_true",
                        help="train the image encoder too (default: frozen, as in stage 2 of the default run)")
    parser.add_argument("--prompt-reader", choices=("rows", "last", "none"), default="rows",
                        help="stage 1's decoder as the frozen prompt reader (random weights of its shape): read at "
                             "every row (the default run's), at the prompt's last row only, or none (the paper's model)")
    parser.add_argument("--activation-checkpointing", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="stage 2 recomputes the LM's, the cross-attention and a trained encoder's blocks in "
                             "backward (N: every N-th decoder block); stage 1 the encoder's blocks")
    parser.add_argument("--encoder", default=None,
                        help="the image encoder backbone, as train_adapter.py --encoder (default: the default run's)")
    args = parser.parse_args()
    b, s = args.batch_size or (EncoderPretrainConfig().batch_size if args.stage == 1 else 16), args.seq_len
    torch.manual_seed(0)
    if args.stage == 1:
        step, trainable_params, saved_mb = stage1_step(args, b, s)
    else:
        step, trainable_params, saved_mb = stage2_step(args, b, s)
    step()  # warm-up
    with flop_counter() as counter:
        step()
    flops_per_step = counter.get_total_flops()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)  # the median: robust to other jobs on a shared machine
    peak = matmul_peak_flops()
    result = {
        "stage": args.stage,
        "tokens_per_s": round(b * s / seconds, 1),
        "samples_per_s": round(b / seconds, 2),
        "step_seconds": round(seconds, 3),
        "peak_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        "saved_activation_mb": round(saved_mb, 1),
        "step_gflop": round(flops_per_step / 1e9, 3),
        "achieved_gflops": round(flops_per_step / seconds / 1e9, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_fraction": round(flops_per_step / seconds / peak, 3),
        "batch_size": b,
        "seq_len": s,
        "threads": torch.get_num_threads(),
        "trainable_params": trainable_params,
        "prompt_reader": args.prompt_reader if args.stage == 2 else None,
        "activation_checkpointing": args.activation_checkpointing,
        "encoder": args.encoder,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
