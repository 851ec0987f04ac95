"""Stage 1, the image encoder's caption pre-training: its pieces on a tiny encoder, and
``train_adapter.py`` running it before the adapters, freezing the result and skipping it
on resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch

from encoders import ImageEncoder, ImageEncoderConfig
from mm_llama.training.encoder_pretrain import (
    UNK,
    CaptionDecoder,
    EncoderPretrainConfig,
    EncoderPretrainModule,
    STAGE_CHECKPOINT,
    compact_vocabulary,
    pretrain_image_encoder,
)
from mm_llama.training.datamodule import ModelInputs
from tests.conftest import two_stage_image_run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

TINY_ENCODER = ImageEncoderConfig(
        backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8, depth=2, width=32, heads=2,
        intermediate_layers=(0,))


def test_compact_vocabulary_numbers_seen_ids_and_sends_the_rest_to_unk():
    batches = [{"input_ids": torch.tensor([[5, 9, 5]])}, {"input_ids": torch.tensor([[2, 9]])}]
    lookup = compact_vocabulary(batches)
    assert lookup[[2, 5, 9]].tolist() == [1, 2, 3]
    assert lookup[[0, 1, 3, 4, 6]].tolist() == [UNK] * 5
    assert len(lookup) == 11 and lookup[-1] == UNK  # callers clamp larger ids onto this row
    with pytest.raises(ValueError, match="training split empty"):
        compact_vocabulary([])


def test_caption_decoder_is_causal_and_reads_the_media():
    torch.manual_seed(0)
    decoder = CaptionDecoder(vocab_size=12, media_dim=24, width=16, depth=2, heads=2, max_len=8).eval()
    ids, media, mask = torch.randint(0, 12, (2, 6)), torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    logits = decoder(ids, media, mask)
    assert logits.shape == (2, 6, 12)
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] + 1) % 12
    assert torch.allclose(decoder(later, media, mask)[:, :4], logits[:, :4], atol=1e-6)
    assert not torch.allclose(decoder(ids, torch.randn(2, 5, 24), mask), logits, atol=1e-3)
    with pytest.raises(ValueError, match="at most 8 tokens"):
        decoder(torch.zeros(1, 9, dtype=torch.long), media[:1], mask[:1])


@pytest.mark.parametrize("field, value", [("steps", -1), ("batch_size", 0), ("lr", 0.0), ("heads", 5)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field if field != "heads" else "multiple of heads"):
        EncoderPretrainConfig(**{field: value})


def test_the_loss_uses_response_tokens_only_and_trains_the_encoder():
    torch.manual_seed(0)
    encoder = ImageEncoder(TINY_ENCODER)
    lookup = torch.arange(12)  # identity: ids 0..11 are their own compact ids
    inputs = ModelInputs(tokenizer=None, media_token_id=11, image_size=16, system_prompt="")
    module = EncoderPretrainModule(encoder, inputs, lookup, EncoderPretrainConfig(width=16, heads=2, depth=1))
    ids = torch.tensor([[1, 11, 3, 4, 5, 6], [1, 11, 2, 7, 8, 9]])
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = ids[:, 4:]
    batch = {"images": torch.randn(2, 3, 16, 16), "input_ids": ids, "labels": labels}
    loss = module.loss(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters() if p.requires_grad)
    # Unlabeled positions do not count: changing a prompt label that is -100 anyway changes nothing,
    # changing a response token does.
    same = dict(batch, labels=labels.clone())
    assert torch.equal(module.loss(same), loss.detach())
    other = dict(batch, labels=labels.clone())
    other["labels"][:, 5] = 10
    assert not torch.allclose(module.loss(other), loss.detach())


def test_decoder_exact_match_needs_every_response_token_right_and_ignores_the_prompt():
    torch.manual_seed(0)
    inputs = ModelInputs(tokenizer=None, media_token_id=11, image_size=16, system_prompt="")
    module = EncoderPretrainModule(ImageEncoder(TINY_ENCODER), inputs, torch.arange(12),
                                   EncoderPretrainConfig(width=16, heads=2, depth=1)).eval()
    ids = torch.tensor([[1, 11, 3, 4, 5, 6], [1, 11, 2, 7, 8, 9], [1, 11, 2, 7, 8, 9]])
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = ids[:, 4:]
    batch = {"images": torch.randn(3, 3, 16, 16), "input_ids": ids, "labels": labels}
    _, targets = module.logits_and_targets(batch)
    perfect = torch.nn.functional.one_hot(targets.clamp(min=0), 12).float()  # the right token everywhere
    perfect[1, 0] = torch.eye(12)[7]  # a prompt position: not scored
    perfect[2, 4] = torch.eye(12)[3]  # the last response token: wrong
    module.logits_and_targets = lambda b: (perfect, targets)
    assert module.answers_right(batch).tolist() == [True, True, False]


def test_train_adapter_pretrains_freezes_and_skips_the_stage_on_resume(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    from mm_llama.training import run as run_module

    out, flags = two_stage_image_run(tiny_lm_dir, tmp_path, monkeypatch, TINY_ENCODER)
    assert run_module.main([*flags, "--steps", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stage1 = metrics["encoder_pretrain"]
    assert stage1["steps"] == 2 and stage1["loss"] > 0
    assert metrics["train_seconds"] == pytest.approx(metrics["adapter_train_seconds"] + stage1["seconds"], abs=0.02)

    # Stage 2 loaded the pre-trained backbone and left it untouched (frozen), and the
    # adapter checkpoint carries it, so inference does not need the stage-1 file.
    saved = safetensors.torch.load_file(out / "image_encoder.safetensors")
    with safetensors.safe_open(out / "image_encoder.safetensors", framework="pt") as f:
        assert f.metadata() == {"stem_norm": TINY_ENCODER.stem_norm}  # checked when it is loaded
    state = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    prefix = "model.image_encoder.backbone.model."
    assert saved and all(torch.equal(state[prefix + k], v) for k, v in saved.items())
    initial = ImageEncoder(TINY_ENCODER).backbone.model.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in saved.items())  # stage 1 did train it
    encoder_params = sum(p.numel() for p in ImageEncoder(TINY_ENCODER).parameters())
    all_groups = sum(v.numel() for k, v in state.items() if not k.startswith("model.image_encoder."))
    assert metrics["trainable_params"] <= all_groups < metrics["trainable_params"] + encoder_params

    from mm_llama.inference import Assistant

    (out / "image_encoder.safetensors").rename(tmp_path / "moved.safetensors")
    assistant = Assistant.from_checkpoint(out / "adapter.ckpt")
    loaded = assistant.model.image_encoder.backbone.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())

    # --resume: no second stage 1; the frozen encoder comes back from last.ckpt
    assert run_module.main([*flags, "--steps", "3", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["steps"] == 3 and resumed["encoder_pretrain"] is None
    state = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(state[prefix + k], v) for k, v in saved.items())


def test_activation_checkpointing_recomputes_stage_1s_encoder_and_trains_it_the_same(tiny_lm_dir, tmp_path,
                                                                                     capsys, monkeypatch):
    """``--activation-checkpointing`` reaches stage 1: its encoder's blocks run again in backward, and
    the encoder it hands to stage 2 is the one a run without the flag trains (same data, same seed)."""
    from mm_llama.training import run as run_module

    block_runs = []

    def spy(encoder, *args, **kwargs):  # counts the encoder's block calls while stage 1 trains
        hooks = [b.register_forward_pre_hook(lambda *_: block_runs[-1].append(1)) for b in encoder.blocks()]
        block_runs.append([])
        try:
            return pretrain_image_encoder(encoder, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(run_module, "pretrain_image_encoder", spy)
    trained = {}
    for flag in ([], ["--activation-checkpointing"]):
        out, flags = two_stage_image_run(tiny_lm_dir, tmp_path / f"run{len(flag)}", monkeypatch, TINY_ENCODER)
        assert run_module.main([*flags, *flag, "--steps", "1"]) == 0
        capsys.readouterr()
        trained[bool(flag)] = safetensors.torch.load_file(out / "image_encoder.safetensors")
    plain, recomputed = (len(r) for r in block_runs)
    # 2 steps x the encoder's blocks, once more each in backward; evaluation adds the same forwards to both
    assert recomputed - plain == 2 * len(ImageEncoder(TINY_ENCODER).blocks()), (plain, recomputed)
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, rtol=0, atol=1e-6, msg=name)


class Crash(RuntimeError):
    """The simulated kill."""


def test_a_stage_1_killed_part_way_resumes_from_its_checkpoint_and_trains_the_same_encoder(
        tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """Stage 1 writes its state every ``checkpoint_every`` steps; killed after step 3 of 6, before stage 2
    has a ``last.ckpt``, ``--resume`` continues it from there (not from scratch, not skipped) and hands
    stage 2 the encoder a run that never stopped trains."""
    from mm_llama.training import run as run_module

    def every_step(encoder, inputs, datamodule, cfg, *args, **kwargs):
        return pretrain_image_encoder(encoder, inputs, datamodule, dataclasses.replace(cfg, checkpoint_every=1),
                                      *args, **kwargs)

    monkeypatch.setattr(run_module, "pretrain_image_encoder", every_step)
    runs = {}
    for name in ("whole", "killed"):
        out, flags = two_stage_image_run(tiny_lm_dir, tmp_path / name, monkeypatch, TINY_ENCODER)
        runs[name] = (out, [*flags, "--encoder-pretrain-steps", "6", "--steps", "1"])
    out, flags = runs["whole"]
    assert run_module.main(flags) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["encoder_pretrain"]
    expected = safetensors.torch.load_file(out / "image_encoder.safetensors")

    out, flags = runs["killed"]
    step = EncoderPretrainModule.training_step

    def killed_after_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise Crash("killed in stage 1")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(EncoderPretrainModule, "training_step", killed_after_3)
    with pytest.raises(Crash):
        run_module.main(flags)
    assert (out / STAGE_CHECKPOINT).is_file() and not (out / "last.ckpt").exists()
    assert torch.load(out / STAGE_CHECKPOINT, map_location="cpu", weights_only=True)["global_step"] == 3
    trained_steps = []

    def counted(self, batch, batch_idx):
        trained_steps.append(self.global_step + 1)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(EncoderPretrainModule, "training_step", counted)
    assert run_module.main([*flags, "--resume"]) == 0
    assert trained_steps == [4, 5, 6]  # continued, neither restarted nor skipped
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["encoder_pretrain"]
    assert resumed["steps"] == whole["steps"] == 6
    assert resumed["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # the losses of all 6 steps, as checkpointed
    trained = safetensors.torch.load_file(out / "image_encoder.safetensors")
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6, msg=name)


def test_a_clip_encoder_with_frozen_frames_trains_only_its_aggregator():
    from mm_llama.training.encoder_pretrain import ClipEncoder
    from mm_llama.video_adapter import VideoConfig, build_aggregator

    torch.manual_seed(0)
    frames = ImageEncoder(TINY_ENCODER)
    clip = ClipEncoder(frames, build_aggregator(VideoConfig(frames=2, frames_per_group=2, depth=1, heads=2),
                                                frames.out_dim, frames.num_tokens), frozen_frames=True)
    inputs = ModelInputs(tokenizer=None, media_token_id=11, image_size=16, system_prompt="", frames=2)
    module = EncoderPretrainModule(clip, inputs, torch.arange(12), EncoderPretrainConfig(width=16, heads=2, depth=1))
    ids = torch.tensor([[1, 11, 3, 4, 5, 6], [1, 11, 2, 7, 8, 9]])
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = ids[:, 4:]
    batch = {"videos": torch.randn(2, 2, 3, 16, 16), "frame_mask": torch.ones(2, 2, dtype=torch.bool),
             "input_ids": ids, "labels": labels}
    module.loss(batch).backward()
    assert all(not p.requires_grad and p.grad is None for p in frames.parameters())
    assert all(p.grad is not None for p in clip.aggregator.parameters())
