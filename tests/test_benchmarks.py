"""The benchmarks run and print the JSON they promise (smoke runs, real models at tiny batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_json(script: str, *args: str, timeout: float = 1200) -> dict:
    """Run ``benchmarks/<script>`` in a fresh interpreter; parse its last output line as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hf_cross_attention_layers_interleave_like_ours():
    sys.path.insert(0, str(BENCHMARKS))
    from vs_hf_mllama import hf_cross_attention_layers

    # ours: a block before self layers 3, 7, ..., 27 of 30; HF counts the 7 blocks in its list
    assert hf_cross_attention_layers(30, 4) == [3, 8, 13, 18, 23, 28, 33]
    assert hf_cross_attention_layers(8, 4) == [3, 8]


def test_ragged_benchmark_batch_is_right_padded_with_the_response_at_each_rows_end():
    sys.path.insert(0, str(BENCHMARKS))
    from vs_hf_mllama import IMAGE_POS, PAD_ID, make_batch

    batch = make_batch(6, 40, 8, 97, 16, ragged=True)
    lengths = batch.attention_mask.sum(1)
    assert lengths[0] == 40 and (lengths >= 20).all() and len(set(lengths.tolist())) > 1
    for r, n in enumerate(lengths.tolist()):
        assert (batch.labels[r] != -100).nonzero().flatten().tolist() == list(range(n - 8, n))
        assert (batch.ids[r, n:] == PAD_ID).all() and batch.ids[r, IMAGE_POS] == 97
    assert make_batch(2, 40, 8, 97, 16).attention_mask is None  # the default: every row full


def test_vs_hf_mllama_quick_prints_ratios():
    out = run_json("vs_hf_mllama.py", "--quick")
    for key in ("train_step_speedup", "peak_memory_ratio", "peak_rss_ratio", "generate_speedup"):
        assert isinstance(out[key], float) and out[key] > 0, (key, out[key])
    ours, hf = out["ours"], out["hf"]
    assert out["train_step_speedup"] == pytest.approx(hf["step_s"] / ours["step_s"], rel=0.01)
    for side in (ours, hf):
        assert side["train_increment_mb"] > 0 and side["peak_rss_mb"] >= side["loaded_rss_mb"]
        assert 0 < side["matmul_peak_fraction"] < 1.5
        assert side["generate_b1"]["decode_tokens_per_s"] > 0
    # same cross-attention blocks on both sides; the rest differs by a few thousand parameters
    assert ours["trainable_by_part"]["cross_attention"] == hf["trainable_by_part"]["cross_attention"]
    assert abs(out["trainable_params_diff"]) < 0.001 * hf["trainable_params"]


def test_vs_hf_mllama_graphed_runner_takes_the_eager_runners_step():
    """``--ours-graph`` (GraphedTrainStep; eager here, captured on a GPU) trains ours at the
    benchmark's full shape the same as the default step, up to float rounding, with code a
    capture accepts."""
    sys.path.insert(0, str(BENCHMARKS))
    import torch
    from vs_hf_mllama import OursRunner, VisionSizes, make_batch

    batch = make_batch(2, 24, 8, 49152, VisionSizes().image_size)
    off = torch.autocast("cpu", enabled=False)
    after = []
    for graph in (False, True):
        torch.manual_seed(0)
        runner = OursRunner(VisionSizes(), graph=graph)
        opt = runner.optimizer()
        before = torch.cat([p.detach().flatten() for p in runner.trainable()])
        runner.train_step(opt, batch, off)
        after.append(torch.cat([p.detach().flatten() for p in runner.trainable()]))
    assert runner.step is not None  # the graphed runner went through GraphedTrainStep
    assert (after[1] - before).abs().max() > 1e-5  # AdamW at lr 1e-4 moved the weights
    torch.testing.assert_close(after[1], after[0], rtol=1e-4, atol=1e-6)
    # ... and at this shape the captured code reads no device value on the host (what a capture
    # would reject; tests/test_graphed_step.py shows that this check fails where it should).
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mm_llama.static import static_shapes

    n = int((batch.labels[:, 1:] != -100).sum())
    with FakeTensorMode(allow_non_fake_inputs=True), static_shapes():
        loss = runner.model.loss(batch.ids, batch.labels, batch.images, max_labeled=n)
        torch.autograd.grad(loss, runner.trainable(), allow_unused=True)


def test_vs_hf_mllama_checkpointing_flags_cut_what_each_side_saves_for_backward():
    """``--ours-checkpointing`` / ``--hf-checkpointing`` recompute blocks on each side: at the
    benchmark's full shape the same loss, and less saved for backward."""
    sys.path.insert(0, str(BENCHMARKS))
    import torch
    from vs_hf_mllama import HFRunner, OursRunner, VisionSizes, make_batch, saved_activation_mb

    batch = make_batch(2, 24, 8, 49152, VisionSizes().image_size)
    off = torch.autocast("cpu", enabled=False)
    for runner_class in (OursRunner, HFRunner):
        saved, losses = {}, {}
        for checkpointing in (False, True):
            torch.manual_seed(0)
            runner = runner_class(VisionSizes(), checkpointing=checkpointing)
            runner.model.train()
            saved[checkpointing] = saved_activation_mb(runner, batch, off)
            losses[checkpointing] = runner.loss(batch).item()
            del runner
        assert losses[True] == pytest.approx(losses[False], rel=1e-5), runner_class.__name__
        assert saved[True] < 0.8 * saved[False], (runner_class.__name__, saved)


def test_data_loader_reports_loader_rate_against_the_step(tiny_lm_dir):
    out = run_json("data_loader.py", "--lm", str(tiny_lm_dir), "--samples", "24", "--shards", "2",
                   "--batch-size", "4", "--num-workers", "0", "--batches", "3", "--step-samples-per-s", "2.0")
    assert out["measured_samples"] == 12  # 3 full batches after the first
    assert out["loader_samples_per_s"] > 0 and out["mean_padded_len"] > 0
    assert out["headroom"] == pytest.approx(out["loader_samples_per_s"] / 2.0, rel=0.01)
    assert out["loader_is_bottleneck"] == (out["loader_samples_per_s"] < 2.0)


def test_gpu_check_builds_a_random_lm_shape_in_place():
    """``gpu_check.py --llama3-8b`` builds its LM of a given shape in bf16 directly on the
    device and the trainable part in fp32; here a small shape on the CPU, one training loss."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    import gpu_check

    from encoders.image import ImageEncoderConfig
    from mm_llama.config import LlamaConfig, RopeScaling

    shape = LlamaConfig(vocab_size=500, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=128,
                        rope_scaling=RopeScaling(), tie_embeddings=False)
    encoder = ImageEncoderConfig(backbone="timm:vit_tiny_patch16_224", image_size=32, patch_size=16, depth=2, width=32,
                                 heads=2, intermediate_layers=(0,))
    model = gpu_check.build_model(None, device="cpu", shape=shape, encoder=encoder)
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.lm.cfg == shape
    ids = torch.randint(10, 300, (2, 12))
    ids[:, 3] = model.media_token_id("image")
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(ids, labels, torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)


def test_packing_benchmark_packs_real_batches_and_matches_the_padded_loss(tiny_lm_dir):
    out = run_json("packing.py", "--lm", str(tiny_lm_dir), "--batches", "2", "--batch-size", "4")
    assert out["batches"] == 2 and 0 <= out["batches_packed"] <= 2
    assert 0 < out["packed_columns"] <= out["padded_columns"]
    assert out["column_fraction"] == pytest.approx(out["packed_columns"] / out["padded_columns"], abs=1e-3)
    assert out["speedup"] == pytest.approx(out["padded_step_s"] / out["packed_step_s"], rel=0.03)  # times rounded
    assert out["max_loss_diff"] < 1e-4


def train_step_args(lm_dir) -> tuple[str, ...]:
    return ("--lm", str(lm_dir), "--batch-size", "2", "--seq-len", "20", "--steps", "1")


@pytest.fixture(scope="module")
def default_step(tiny_lm_dir) -> dict:
    """``train_step.py``'s output for the default stage-2 step (per-row prompt reader, no recomputation)."""
    return run_json("train_step.py", *train_step_args(tiny_lm_dir))


def test_train_step_reports_the_default_models_step_with_and_without_the_prompt_reader(tiny_lm_dir, default_step):
    """``train_step.py`` builds the default run's stage-2 model: the per-row prompt reader (frozen)
    adds FLOPs but no trainable parameter besides its projection."""
    rows, none = default_step, run_json("train_step.py", *train_step_args(tiny_lm_dir), "--prompt-reader", "none")
    assert rows["prompt_reader"] == "rows" and none["prompt_reader"] == "none"
    for out in (rows, none):
        assert out["tokens_per_s"] > 0 and out["samples_per_s"] > 0 and out["peak_rss_mb"] > 0
        assert 0 < out["matmul_peak_fraction"] < 1.5
    assert rows["step_gflop"] > none["step_gflop"]
    assert 0 < rows["trainable_params"] - none["trainable_params"] < 200_000  # the projection only


def test_train_step_with_activation_checkpointing_saves_less_for_more_flops(tiny_lm_dir, default_step):
    plain = default_step
    recomputed = run_json("train_step.py", *train_step_args(tiny_lm_dir), "--activation-checkpointing")
    assert (plain["activation_checkpointing"], recomputed["activation_checkpointing"]) == (0, 1)
    assert recomputed["saved_activation_mb"] < plain["saved_activation_mb"]
    assert recomputed["step_gflop"] > plain["step_gflop"]  # the blocks' forward, again in backward
    assert recomputed["trainable_params"] == plain["trainable_params"]


def test_train_step_stage_1_times_the_encoder_and_decoder(tiny_lm_dir):
    """``--stage 1`` times stage 1's step: the default image encoder and the caption decoder train
    (its trainable parameters are the encoder's plus the decoder's), no LM in the step."""
    from encoders import ImageEncoder
    from mm_llama.training.modalities import image_model_config
    from mm_llama.training.run_config import RunConfig

    args = ("--stage", "1", "--lm", str(tiny_lm_dir), "--batch-size", "4", "--steps", "1")
    out, recomputed = run_json("train_step.py", *args), run_json("train_step.py", *args, "--activation-checkpointing")
    assert out["stage"] == 1 and out["batch_size"] == 4 and out["prompt_reader"] is None
    encoder = ImageEncoder(image_model_config(RunConfig()).image_encoder)
    assert out["trainable_params"] > sum(p.numel() for p in encoder.parameters())
    assert out["step_gflop"] > 0 and out["step_seconds"] > 0
    # the encoder's blocks recomputed: less kept for backward, their forward once more
    assert recomputed["activation_checkpointing"] == 1 and recomputed["trainable_params"] == out["trainable_params"]
    assert recomputed["saved_activation_mb"] < out["saved_activation_mb"]
    assert recomputed["step_gflop"] > out["step_gflop"]
