"""GPU check: training-step speed (eager vs ``torch.compile``, MFU) and the default image run in
``bf16-mixed`` on a CUDA device.

``--lm`` names the frozen LM (a ``.gguf`` file or HF directory; the device machines have no
network, so the default SmolLM2 file is copied there). Without it the LM is a random one of
SmolLM2's depth and width (30 layers, d=576, GQA) with a small BPE tokenizer: the code path is
the same, the accuracy is meaningless. Prints one JSON line.

* ``throughput``: fwd + bwd + AdamW steps of the fused model (frozen LM in bf16, adapters in
  fp32, bf16 autocast) on chat-shaped batches, eager and with every decoder / cross-attention / encoder
  block compiled (:func:`mm_llama.training.scale.compile_blocks_`), and as one CUDA graph
  replayed per step (:class:`mm_llama.training.graphed_step.GraphedTrainStep`, the static loss;
  ``--no-graph`` skips these rows). ``mfu`` is the step's
  FLOPs (``torch.utils.flop_counter``) per second over the measured bf16 matmul peak of the
  device (``mfu_vs_spec``: over ``--peak-tflops``, the data-sheet dense bf16 figure);
* ``--llama3-8b``: the same rows for Llama 3.1 8B's shape with the paper's ViT-H/14
  (``configs/fsdp_llama3_8b.yaml``'s model), random, built in place on the GPU (no run);
* ``generate``: greedy decoding of the same model (bf16 autocast, 64 new tokens, batch 1 and
  8), eager with a growing KV cache against :class:`mm_llama.generation.StaticStep` (one CUDA
  graph replayed per token): tokens/s after the first token and end to end (encoding, prefill
  and the graph's capture included), and whether both gave the same tokens;
* ``--profile F``: a ``torch.profiler`` table of three eager steps (top ops by GPU and by host
  time) in ``F.b<batch>.txt``;
* ``run``: :func:`mm_llama.training.run.run` with the default recipe (both stages, default
  steps, batch size and evaluation), unless ``--no-run``.

    python benchmarks/gpu_check.py --lm /path/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/gpu_check
    python benchmarks/gpu_check.py --no-run --llama3-8b --batches 2 8 --seq 256 --no-compile
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encoders.image import ImageEncoderConfig  # noqa: E402
from mm_llama.config import LlamaConfig, RopeScaling  # noqa: E402
from mm_llama.llama import LlamaLM  # noqa: E402
from mm_llama.lm import load_language_model  # noqa: E402
from mm_llama.model import ModelConfig, MultimodalLlama  # noqa: E402
from mm_llama.training.graphed_step import GraphedTrainStep  # noqa: E402
from mm_llama.training.optim import OptimConfig, build_optimizer  # noqa: E402
from mm_llama.training.run import RunConfig, run  # noqa: E402
from mm_llama.training.scale import compile_blocks_  # noqa: E402
from train_step import flop_counter, matmul_peak_flops  # noqa: E402


# Llama 3.1 8B's decoder and the paper's ViT-H/14 image encoder, as configs/fsdp_llama3_8b.yaml
# has them (random weights: the speed of a step does not depend on the values).
LLAMA3_8B = LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                        norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(), max_seq_len=2048,
                        tie_embeddings=False)
VIT_H14 = ImageEncoderConfig(backbone="open_clip:ViT-H-14", image_size=224, patch_size=None, depth=None,
                             width=None, heads=None, intermediate_layers=(3, 7, 15, 23, 30), n_global_layers=8,
                             drop_cls=True)


def build_model(lm: str | None, device: str = "cuda", shape: LlamaConfig = LLAMA3_8B,
                encoder: ImageEncoderConfig = VIT_H14) -> MultimodalLlama:
    """The fused model on ``device`` with its frozen LM in bf16 and the rest in fp32: ``lm``
    loaded, or (``None``) a random LM of ``shape`` with ``encoder``, built in place."""
    if lm is not None:
        model = MultimodalLlama(load_language_model(lm), ModelConfig()).to(device)
        model.lm.to(torch.bfloat16)  # frozen weights in bf16; adapters stay fp32 under autocast
        return model
    torch.set_default_dtype(torch.bfloat16)  # the 8B LM is built in bf16 (16 GB), never in fp32
    try:
        with torch.device(device):
            decoder = LlamaLM(shape)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.device(device):  # encoder and adapters: fp32 master weights
        return MultimodalLlama(decoder, ModelConfig(image_encoder=encoder))


def step_throughput(lm: str | None, batch: int, seq: int, compiled: bool, peak: float, steps: int = 10,
                    profile: Path | None = None, graph: bool = False) -> dict:
    """Steps/s, tokens/s, MFU and peak memory of the fused model's training step.

    The batch: ``<|im_start|>user\\n<|image|>`` then random prompt tokens; the last 8 tokens
    of every row are the labelled answer (the built-in data's shape). ``lm=None``: Llama 3.1
    8B's shape (:data:`LLAMA3_8B`, :data:`VIT_H14`). ``profile``: also write a
    ``torch.profiler`` table of 3 steps (top ops by GPU and by CPU time) to that file.
    ``graph``: the step through :class:`GraphedTrainStep` (the static loss, one CUDA graph
    replayed per step; its warm-up and capture happen in the first of the 3 warm-up calls).
    """
    torch.manual_seed(0)
    model = build_model(lm).train()
    if compiled:
        compile_blocks_(model)
    ids = torch.randint(10, 300, (batch, seq), device="cuda")  # [b, s]
    ids[:, 3] = model.media_token_id("image")
    labels = torch.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]
    size = model.cfg.image_encoder.image_size
    images = torch.randn(batch, 3, size, size, device="cuda")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, _ = build_optimizer(named, model.group_of, OptimConfig())

    n_labeled = int((labels[:, 1:] != -100).sum())

    def eager_step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids, labels, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step = eager_step
    if graph:  # build_optimizer fuses AdamW on a GPU: graph-safe
        graphed = GraphedTrainStep(lambda ids, labels, images: model.loss(ids, labels, images, max_labeled=n_labeled),
                                   opt, dict(ids=ids, labels=labels, images=images), autocast_dtype=torch.bfloat16)
        step = functools.partial(graphed, ids=ids, labels=labels, images=images)

    start = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation, or the graph's capture)
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    with flop_counter() as counter:  # a replayed graph dispatches no op to count: count an eager pass
        if graph:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(ids, labels, images, max_labeled=n_labeled)
            torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        else:
            step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    flops = counter.get_total_flops()
    if profile is not None:
        write_profile(step, profile)
    return {"trainable_params": sum(p.numel() for _, p in named), "batch": batch, "seq": seq, "compiled": compiled,
            "graph": graph,
            "warmup_s": round(warmup_s, 1),
            "step_ms": round(dt * 1e3, 2), "tokens_per_s": round(batch * seq / dt),
            "samples_per_s": round(batch / dt, 1), "step_tflop": round(flops / 1e12, 4),
            "achieved_tflops": round(flops / dt / 1e12, 2), "mfu": round(flops / dt / peak, 4),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20), "loss_finite": bool(torch.isfinite(loss))}


def generate_throughput(lm: str, batch: int, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Decode tokens/s of :func:`mm_llama.generation.generate`, eager against CUDA-graph steps."""
    from mm_llama.generation import generate

    torch.manual_seed(0)
    model = build_model(lm).eval()
    img = model.media_token_id("image")
    prompts = [[1, 2, img] + torch.randint(10, 300, (24,)).tolist() for _ in range(batch)]
    size = model.cfg.image_encoder.image_size
    images = torch.randn(batch, 3, size, size, device="cuda")
    row: dict = {"batch": batch, "new_tokens": new_tokens}
    tokens = {}
    for name, static in (("eager", False), ("cuda_graph", True)):
        decode, e2e = [], []
        for _ in range(repeats + 1):  # the first is a warm-up
            stamps: list[float] = []

            def stamp(_ids: torch.Tensor) -> None:
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())

            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                tokens[name] = generate(model, prompts, images, max_new_tokens=new_tokens, on_token=stamp,
                                        stop_early=False, static_cache=static)
            torch.cuda.synchronize()
            decode.append(batch * (new_tokens - 1) / (stamps[-1] - stamps[0]))
            e2e.append(batch * new_tokens / (time.perf_counter() - start))
        row[f"{name}_decode_tok_s"] = round(statistics.median(decode[1:]), 1)
        row[f"{name}_e2e_tok_s"] = round(statistics.median(e2e[1:]), 1)
    row["graph_decode_speedup"] = round(row["cuda_graph_decode_tok_s"] / row["eager_decode_tok_s"], 2)
    row["graph_e2e_speedup"] = round(row["cuda_graph_e2e_tok_s"] / row["eager_e2e_tok_s"], 2)
    row["same_tokens"] = tokens["eager"] == tokens["cuda_graph"]
    return row


def write_profile(step, path: Path, steps: int = 3) -> None:
    """``torch.profiler`` over ``steps`` training steps: where the GPU's time goes, and the host's."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {steps} steps\n## by GPU time\n" + table.table(sort_by="cuda_time_total", row_limit=25)
                    + "\n## by host time\n" + table.table(sort_by="cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/gpu_check")
    parser.add_argument("--lm", default=None, help="frozen LM (.gguf / HF dir); default: random SmolLM2-shaped")
    parser.add_argument("--llama3-8b", action="store_true",
                        help="throughput of Llama 3.1 8B's shape with ViT-H/14 (random, built on the GPU)")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of the eager step here")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="throughput batch sizes")
    parser.add_argument("--seq", type=int, default=48, help="throughput tokens per row")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="data-sheet dense bf16 peak (H100 SXM)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled throughput rows")
    parser.add_argument("--no-graph", action="store_true",
                        help="skip the rows of the step as one CUDA graph (GraphedTrainStep)")
    parser.add_argument("--no-run", action="store_true", help="skip the default image run")
    parser.add_argument("--generate-batches", type=int, nargs="*", default=[1, 8],
                        help="generation batch sizes (eager vs CUDA graph); none: skip")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = Path(args.out)
    lm = args.lm
    if lm is None and not args.llama3_8b:
        from tests.conftest import write_tiny_lm_dir

        lm = str(write_tiny_lm_dir(out / "lm", n_layers=30, dim=576))
    peak = matmul_peak_flops(8192, device="cuda", dtype=torch.bfloat16)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "lm": lm,
                    "bf16_matmul_peak_tflops": round(peak / 1e12, 1), "throughput": []}
    variants = [(False, False)]  # (compiled, graph): eager first
    variants += [] if args.no_graph else [(False, True)]
    variants += [] if args.no_compile else [(True, False)]
    for compiled, graph in variants:
        for b in args.batches:
            try:
                profile = Path(f"{args.profile}.b{b}.txt") if args.profile and not (compiled or graph) else None
                row = step_throughput(None if args.llama3_8b else lm, b, args.seq, compiled, peak, profile=profile,
                                      graph=graph)
                row["mfu_vs_spec"] = round(row["achieved_tflops"] / args.peak_tflops, 4)
            except Exception as err:  # a failed variant is a finding, not the end of the check
                row = {"batch": b, "compiled": compiled, "graph": graph, "error": f"{type(err).__name__}: {err}"[:500]}
                del err
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            result["throughput"].append(row)
    if not args.llama3_8b:
        result["generate"] = []
        for b in args.generate_batches:
            try:
                row = generate_throughput(lm, b)
            except Exception as err:  # as above
                row = {"batch": b, "error": f"{type(err).__name__}: {err}"[:500]}
            print(json.dumps(row), flush=True)
            result["generate"].append(row)
    if not (args.no_run or args.llama3_8b):
        start = time.perf_counter()
        metrics = run(RunConfig(lm=lm, out=str(out / "run"), data_dir=str(out / "shapes"), num_workers=6,
                                progress=False))
        keep = ("train_seconds", "adapter_train_seconds", "steps", "encoder_pretrain", "precision", "device",
                "train_loss", "trainable_params", "val_exact_match", "peak_rss_mb")
        result["run"] = {k: v for k, v in metrics.items() if k.startswith("exact_match") or k in keep}
        result["run"]["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
