"""``train_adapter.py --modality video`` end to end on a tiny LM and tiny clip shards: the joint
default, and the video stage on top of an image-stage checkpoint (only the video branch moves)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mm_llama.data.clips import ClipSpec, make_default_clip_shards
from mm_llama.training import modalities
from mm_llama.training import run as run_module
from mm_llama.video_adapter import VIDEO_GROUPS, VideoConfig
from encoders import ImageEncoder
from tests.test_training import TINY_MODEL

TINY_VIDEO = VideoConfig(frames=4, frames_per_group=3, depth=1, heads=2, every=1)  # 2 groups, the last padded
VIDEO_METRICS = {"accuracy", "accuracy_single_frame", "accuracy_shuffled_frames", "train_seconds"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    make_default_clip_shards(root, n_train=16, n_val=4, n_test=6, samples_per_shard=8, min_shards=2,
                             spec=ClipSpec(size=16), progress=False)
    return root


def flags(lm_dir, clips_dir, out, *extra: str) -> list[str]:
    return ["--modality", "video", "--lm", str(lm_dir), "--data-dir", str(clips_dir), "--out", str(out),
            "--batch-size", "4", "--num-workers", "0", "--val-every", "2", "--val-samples", "4", "--no-progress",
            "--steps", "2", *extra]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_video_default_trains_everything_and_reports_the_ablations(tiny_lm_dir, clips_dir, tmp_path, capsys,
                                                                   monkeypatch):
    spec = run_module.MODALITIES["video"]
    tiny = dataclasses.replace(spec, model_config=lambda cfg: dataclasses.replace(TINY_MODEL, video=TINY_VIDEO))
    monkeypatch.setitem(run_module.MODALITIES, "video", tiny)
    out = tmp_path / "video"
    assert run_module.main(flags(tiny_lm_dir, clips_dir, out, "--encoder-pretrain-steps", "2",
                                 "--frame-pretrain-steps", "0")) == 0
    metrics = last_json(capsys)
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert VIDEO_METRICS <= set(metrics) and metrics["modality"] == "video"
    assert metrics["accuracy"] == metrics["exact_match"] and metrics["test_samples"] == 6
    for name in ("accuracy", "accuracy_single_frame", "accuracy_shuffled_frames"):
        assert 0.0 <= metrics[name] <= 1.0
    assert any(k.startswith("accuracy_shuffled_frames_") for k in metrics)  # per task
    assert metrics["skipped"]["train"]["total"] == 0
    for name in ("adapter.ckpt", "last.ckpt", "config.yaml", "samples.png", "video_aggregator.safetensors"):
        assert (out / name).is_file(), name
    # Stage 1 trained encoder + aggregator on the clips' captions; stage 2 kept both frozen.
    assert metrics["encoder_pretrain"]["steps"] == 2
    assert metrics["encoder_pretrain"]["aggregator_checkpoint"] == str(out / "video_aggregator.safetensors")
    checkpoint = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)
    state, model_cfg = checkpoint["state_dict"], checkpoint["hyper_parameters"]["model"]
    assert not {"image_encoder", "temporal_aggregator"} & set(model_cfg.trainable)
    stage1 = safetensors.torch.load_file(out / "video_aggregator.safetensors")
    assert stage1 and all(torch.equal(state[f"model.video.aggregator.{k}"], v) for k, v in stage1.items())
    assert metrics["trainable_params"] == sum(
        v.numel() for k, v in state.items()
        if not k.startswith(("model.video.aggregator.", "model.image_encoder.")) and not k.endswith("output_scale")
    )


def test_frame_encoder_from_an_image_run_stays_frozen_while_stage_1_trains_the_aggregator(
        tiny_lm_dir, clips_dir, tmp_path, capsys, monkeypatch):
    from encoders import ImageEncoder

    spec = run_module.MODALITIES["video"]
    tiny = dataclasses.replace(spec, model_config=lambda cfg: dataclasses.replace(TINY_MODEL, video=TINY_VIDEO))
    monkeypatch.setitem(run_module.MODALITIES, "video", tiny)
    torch.manual_seed(1)
    image_run = ImageEncoder(TINY_MODEL.image_encoder).backbone.model.state_dict()  # an "image run's" stage 1
    frame_file = tmp_path / "image_encoder.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in image_run.items()}, str(frame_file))
    out = tmp_path / "video"
    assert run_module.main(flags(tiny_lm_dir, clips_dir, out, "--encoder-pretrain-steps", "2",
                                 "--frame-encoder", str(frame_file))) == 0
    metrics = last_json(capsys)
    assert metrics["encoder_pretrain"]["steps"] == 2
    saved = safetensors.torch.load_file(out / "image_encoder.safetensors")
    assert saved.keys() == image_run.keys() and all(torch.equal(saved[k], v) for k, v in image_run.items())
    state = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(state[f"model.image_encoder.backbone.model.{k}"], v) for k, v in image_run.items())
    assert (out / "video_aggregator.safetensors").is_file()


def test_frame_encoder_flag_is_checked(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        run_module.RunConfig(modality="video", frame_encoder=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="options of --modality video"):
        run_module.RunConfig(modality="image", frame_encoder=str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="options of --modality video"):
        run_module.RunConfig(modality="image", frame_pretrain_steps=10)
    with pytest.raises(ValueError, match="frame-pretrain-steps must be >= 0"):
        run_module.RunConfig(modality="video", frame_pretrain_steps=-1)
    video = run_module.RunConfig(modality="video")
    assert video.frame_pretrain_steps == modalities.FRAME_PRETRAIN_STEPS == 600  # what video was measured with


def test_video_default_model_has_the_image_defaults_mlp_width_in_both_branches():
    model = run_module.MODALITIES["video"].model_config(run_module.RunConfig(modality="video", frames=4))
    assert model.cross_attention.hidden_dim == model.video.hidden_dim == modalities.CROSS_ATTENTION_MLP
    assert model.video.frames == 4
    image = modalities.image_model_config(run_module.RunConfig(modality="image"))
    assert image.cross_attention == model.cross_attention
    # the same encoder but for the stem's norm: video keeps the GroupNorm it was measured with
    assert image.image_encoder == dataclasses.replace(model.image_encoder, stem_norm=modalities.IMAGE_STEM_NORM)
    assert model.image_encoder.stem_norm == "group"


def test_video_default_trains_its_frame_encoder_on_the_image_scenes_first(tiny_lm_dir, clips_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """No --frame-encoder: an image stage 1 on the image shards writes ``frames/image_encoder.safetensors``;
    video's stage 1 keeps that encoder frozen (bit-identical in the video run's files) and trains the aggregator."""
    from mm_llama.data.scenes import make_default_shards

    shapes = tmp_path / "shapes"
    make_default_shards(shapes, image_size=16, n_train=32, n_val=4, n_test=4, samples_per_shard=16, progress=False)
    image, video = run_module.MODALITIES["image"], run_module.MODALITIES["video"]
    monkeypatch.setitem(run_module.MODALITIES, "image", dataclasses.replace(
        image, data_dir=str(shapes), model_config=lambda cfg: TINY_MODEL))
    monkeypatch.setitem(run_module.MODALITIES, "video", dataclasses.replace(
        video, model_config=lambda cfg: dataclasses.replace(TINY_MODEL, video=TINY_VIDEO)))
    out = tmp_path / "video"
    assert run_module.main(flags(tiny_lm_dir, clips_dir, out, "--encoder-pretrain-steps", "2",
                                 "--frame-pretrain-steps", "3")) == 0
    metrics = last_json(capsys)
    frames = metrics["encoder_pretrain"]["frame_pretrain"]
    assert frames["steps"] == 3 and frames["checkpoint"] == str(out / "frames" / "image_encoder.safetensors")
    assert metrics["encoder_pretrain"]["steps"] == 2
    assert metrics["encoder_pretrain"]["seconds"] >= frames["seconds"] > 0
    trained = safetensors.torch.load_file(out / "frames" / "image_encoder.safetensors")
    untrained = ImageEncoder(TINY_MODEL.image_encoder).backbone.model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in untrained.items())  # the image stage moved it
    in_video = safetensors.torch.load_file(out / "image_encoder.safetensors")  # video stage 1's file
    assert in_video.keys() == trained.keys() and all(torch.equal(in_video[k], v) for k, v in trained.items())
    state = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(state[f"model.image_encoder.backbone.model.{k}"], v) for k, v in trained.items())


def test_video_stage_on_an_image_checkpoint_moves_only_the_video_branch(tiny_checkpoint, clips_dir, tmp_path,
                                                                        capsys):
    lm_dir = tiny_checkpoint.parent / "lm"
    out = tmp_path / "video-stage"
    assert run_module.main(flags(lm_dir, clips_dir, out, "--image-checkpoint", str(tiny_checkpoint),
                                 "--frames", "4")) == 0
    metrics = last_json(capsys)
    assert VIDEO_METRICS <= set(metrics)
    image = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    video = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)
    assert video["hyper_parameters"]["model"].trainable == VIDEO_GROUPS
    for key, value in image.items():
        if key != "model.fusion_embed.new.weight":  # its <|video|> row was copied from <|image|>
            assert torch.equal(video["state_dict"][key], value), key  # frozen image weights
    assert metrics["trainable_params"] == sum(
        v.numel() for k, v in video["state_dict"].items()
        if k.startswith(("model.video.aggregator.", "model.video.projection.", "model.video.cross_attn."))
        and not k.endswith("output_scale")
    )

    # The resolved config repeats the stage through LightningCLI (init_from + video branch).
    from mm_llama.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(out / "config.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert f"init_from: {tiny_checkpoint}" in printed and "frames_per_group: 4" in printed


def test_video_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        run_module.main(["--modality", "image", "--frames", "4"])
    assert "options of --modality video" in capsys.readouterr().err


def test_video_stage_config_validates(monkeypatch, capsys):
    import yaml

    from mm_llama.cli import main as cli_main

    monkeypatch.setattr("sys.argv", ["mm-llama"])
    config_path = Path(__file__).resolve().parents[1] / "configs" / "video.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config_path), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["init_args"]["modality"] == "video" and config["model"]["init_from"] == "runs/image/adapter.ckpt"
    assert tuple(config["model"]["model"]["trainable"]) == VIDEO_GROUPS
    assert config["model"]["model"]["video"]["frames_per_group"] == 4
    assert config["model"]["optim"]["total_steps"] == config["trainer"]["max_steps"]
    # init_from is train_adapter.py's image checkpoint: its image blocks must have the same shapes
    from mm_llama.training.modalities import image_model_config
    from mm_llama.training.run_config import RunConfig

    image = image_model_config(RunConfig(modality="image"))
    assert config["model"]["model"]["cross_attention"]["hidden_dim"] == image.cross_attention.hidden_dim
