"""GPU check: the default image run's code path in ``bf16-mixed`` on a CUDA device.

The device machine has no network and cannot hold the 100 MB default GGUF, so the
frozen LM is a random one with SmolLM2's depth and width (30 layers, d=576, GQA)
and a small BPE tokenizer; everything else is the real run (shards, Lightning,
bf16-mixed autocast, evaluation by generation). Prints one JSON line.

    python benchmarks/gpu_check.py --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_llama.model import ModelConfig, MultimodalLlama  # noqa: E402
from mm_llama.lm import load_language_model  # noqa: E402
from mm_llama.training.optim import OptimConfig, build_optimizer  # noqa: E402
from mm_llama.training.run import RunConfig, run  # noqa: E402
from tests.conftest import write_tiny_lm_dir  # noqa: E402


def step_throughput(lm_dir: Path, batch: int, seq: int, steps: int = 10) -> dict:
    """fwd+bwd+AdamW steps/s of the fused model under bf16 autocast (frozen LM in bf16)."""
    model = MultimodalLlama(load_language_model(str(lm_dir)), ModelConfig()).cuda().train()
    model.lm.to(torch.bfloat16)  # frozen weights in bf16; adapters stay fp32 under autocast
    ids = torch.randint(0, 300, (batch, seq), device="cuda")
    ids[:, 4] = model.media_token_id("image")
    labels = torch.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]
    images = torch.randn(batch, 3, 64, 64, device="cuda")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, _ = build_optimizer(named, model.group_of, OptimConfig())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids, labels, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    return {"batch": batch, "seq": seq, "step_ms": round(dt * 1e3, 1), "tokens_per_s": round(batch * seq / dt),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20), "loss_finite": bool(torch.isfinite(loss))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/gpu_check")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = Path(args.out)
    lm_dir = write_tiny_lm_dir(out / "lm", n_layers=30, dim=576)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "throughput": [step_throughput(lm_dir, b, 48) for b in (16, 64)]}
    metrics = run(RunConfig(lm=str(lm_dir), steps=args.steps, batch_size=32, out=str(out / "run"),
                            data_dir=str(out / "shapes"), val_samples=64, test_samples=256, num_workers=4,
                            progress=False))
    result["run"] = {k: metrics.get(k) for k in ("exact_match", "exact_match_heldout_combos", "train_seconds",
                                                  "steps", "precision", "device", "train_loss", "trainable_params")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
