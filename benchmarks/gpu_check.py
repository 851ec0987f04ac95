"""GPU check: training-step speed (eager vs ``torch.compile``, MFU) and the default image run in
``bf16-mixed`` on a CUDA device.

``--lm`` names the frozen LM (a ``.gguf`` file or HF directory; the device machines have no
network, so the default SmolLM2 file is copied there). Without it the LM is a random one of
SmolLM2's depth and width (30 layers, d=576, GQA) with a small BPE tokenizer: the code path is
the same, the accuracy is meaningless. Prints one JSON line.

* ``throughput``: fwd + bwd + AdamW steps of the fused model (frozen LM in bf16, adapters in
  fp32, bf16 autocast) on chat-shaped batches, eager and with every decoder / cross-attention
  block compiled (:func:`mm_llama.training.scale.compile_blocks_`). ``mfu`` is the step's
  FLOPs (``torch.utils.flop_counter``) per second over the measured bf16 matmul peak of the
  device (``mfu_vs_spec``: over ``--peak-tflops``, the data-sheet dense bf16 figure);
* ``run``: :func:`mm_llama.training.run.run` with the default recipe (both stages, default
  steps, batch size and evaluation), unless ``--no-run``.

    python benchmarks/gpu_check.py --lm /path/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mm_llama.lm import load_language_model  # noqa: E402
from mm_llama.model import ModelConfig, MultimodalLlama  # noqa: E402
from mm_llama.training.optim import OptimConfig, build_optimizer  # noqa: E402
from mm_llama.training.run import RunConfig, run  # noqa: E402
from mm_llama.training.scale import compile_blocks_  # noqa: E402
from train_step import flop_counter, matmul_peak_flops  # noqa: E402


def step_throughput(lm: str, batch: int, seq: int, compiled: bool, peak: float, steps: int = 10) -> dict:
    """Steps/s, tokens/s, MFU and peak memory of the fused model's training step.

    The batch: ``<|im_start|>user\\n<|image|>`` then random prompt tokens; the last 8 tokens
    of every row are the labelled answer (the built-in data's shape).
    """
    torch.manual_seed(0)
    model = MultimodalLlama(load_language_model(lm), ModelConfig()).cuda().train()
    model.lm.to(torch.bfloat16)  # frozen weights in bf16; adapters stay fp32 under autocast
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

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids, labels, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    start = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    with flop_counter() as counter:
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    flops = counter.get_total_flops()
    return {"batch": batch, "seq": seq, "compiled": compiled, "warmup_s": round(warmup_s, 1),
            "step_ms": round(dt * 1e3, 2), "tokens_per_s": round(batch * seq / dt),
            "samples_per_s": round(batch / dt, 1), "step_tflop": round(flops / 1e12, 4),
            "achieved_tflops": round(flops / dt / 1e12, 2), "mfu": round(flops / dt / peak, 4),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20), "loss_finite": bool(torch.isfinite(loss))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/gpu_check")
    parser.add_argument("--lm", default=None, help="frozen LM (.gguf / HF dir); default: random SmolLM2-shaped")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="throughput batch sizes")
    parser.add_argument("--seq", type=int, default=48, help="throughput tokens per row")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="data-sheet dense bf16 peak (H100 SXM)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled throughput rows")
    parser.add_argument("--no-run", action="store_true", help="skip the default image run")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = Path(args.out)
    lm = args.lm
    if lm is None:
        from tests.conftest import write_tiny_lm_dir

        lm = str(write_tiny_lm_dir(out / "lm", n_layers=30, dim=576))
    peak = matmul_peak_flops(8192, device="cuda", dtype=torch.bfloat16)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "lm": lm,
                    "bf16_matmul_peak_tflops": round(peak / 1e12, 1), "throughput": []}
    for compiled in (False,) if args.no_compile else (False, True):
        for b in args.batches:
            try:
                row = step_throughput(lm, b, args.seq, compiled, peak)
                row["mfu_vs_spec"] = round(row["achieved_tflops"] / args.peak_tflops, 4)
            except Exception as err:  # a failed variant is a finding, not the end of the check
                row = {"batch": b, "compiled": compiled, "error": f"{type(err).__name__}: {err}"[:500]}
            print(json.dumps(row), flush=True)
            result["throughput"].append(row)
    if not args.no_run:
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
