"""The prompt reader (adapters/prompt_reader.py): stage 1's decoder reading each prompt against its
image, its place in MultimodalLlama (identity at init, what trains, prompt only, generation =
training), its files, and ``train_adapter.py --prompt-reader`` end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch

from adapters.prompt_reader import (
    CaptionDecoder, PromptReader, PromptReaderConfig, pad_prompts, save_prompt_reader,
)
from encoders import ImageEncoderConfig
from mm_llama.generation import generate
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama, prompt_lengths, without_weight_files
from tests.conftest import two_stage_image_run
from tests.test_model import VOCAB, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

TINY_ENCODER = ImageEncoderConfig(
    backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8, depth=2, width=32, heads=2,
    intermediate_layers=(0,))
READER = PromptReaderConfig(vocab_size=24, lookup_size=VOCAB + 1, width=16, depth=2, heads=2, max_len=32)


def reader_model(gate_init: float = 0.0, **cfg) -> MultimodalLlama:
    model = MultimodalLlama(tiny_lm(), ModelConfig(TINY_ENCODER, CrossAttentionConfig(gate_init=gate_init),
                                                   prompt_reader=READER, **cfg))
    with torch.no_grad():  # a lookup as stage 1 writes it: seen ids numbered from 1, the rest UNK
        model.prompt_reader.lookup.copy_(torch.arange(VOCAB + 1) % READER.vocab_size)
    return model


def media_batch(model, prompt_len=(6, 4), answer=3):
    """Right-padded rows ``prompt + answer`` with ``<|image|>`` at column 1; labels on the answers."""
    b, s = len(prompt_len), max(prompt_len) + answer
    ids = torch.randint(1, VOCAB, (b, s))
    ids[:, 1] = model.media_token_id("image")
    labels = torch.full((b, s), -100)
    for i, p in enumerate(prompt_len):
        labels[i, p:p + answer] = ids[i, p:p + answer]
        ids[i, p + answer:] = 0
    return ids, labels, torch.randn(b, 3, 16, 16)


def captured(model: MultimodalLlama) -> list[torch.Tensor]:
    """The projected reader tokens of every later encode, ``[b, d]`` each."""
    out: list[torch.Tensor] = []
    model.prompt_projection.register_forward_hook(lambda m, args, y: out.append(y.detach().clone()))
    return out


# --- the reader alone ---------------------------------------------------------------------------
def test_reader_reads_each_prompt_to_its_end_and_never_past_it():
    reader = PromptReader(READER, media_dim=24).eval()
    media, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    ids, lengths = pad_prompts([[3, 4, 5, 6], [7, 8]])
    with torch.no_grad():
        both = reader(ids, lengths, media, mask)  # [2, w]
        alone = reader(ids[1:, :2], lengths[1:], media[1:], mask[1:])
        ids[1, 2:] = torch.tensor([9, 10])  # what follows a prompt (padding, the answer) is never read
        after = reader(ids, lengths, media, mask)
        other_image = reader(ids, lengths, torch.randn(2, 5, 24), mask)
    assert both.shape == (2, READER.width)
    torch.testing.assert_close(both[1], alone[0], rtol=0, atol=1e-5)
    assert torch.equal(after, both)
    assert (other_image - both).abs().max() > 1e-2  # and it reads the image
    with pytest.raises(ValueError, match="prompt lengths must be in 1..4"):
        reader(ids, torch.tensor([4, 0]), media, mask)


def test_saved_decoder_loads_as_a_reader_whose_state_is_the_decoders_at_the_last_prompt_row(tmp_path):
    decoder = CaptionDecoder(READER.vocab_size, 24, READER.width, READER.depth, READER.heads, READER.max_len).eval()
    lookup = torch.randint(0, READER.vocab_size, (READER.lookup_size,))
    path = save_prompt_reader(decoder, lookup, tmp_path / "prompt_reader.safetensors")
    cfg = PromptReaderConfig.from_checkpoint(path, heads=READER.heads)
    assert dataclasses.replace(cfg, checkpoint=None) == READER
    reader = PromptReader(cfg, media_dim=24).eval()
    assert torch.equal(reader.lookup, lookup)
    ids, lengths = pad_prompts([[3, 4, 5, 60], [7]])  # 60 is past no table: clamped to the last row
    media, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        got = reader(ids, lengths, media, mask)
        states = decoder.states(lookup[ids.clamp(max=READER.lookup_size - 1)], media, mask)
        logits = decoder(lookup[ids.clamp(max=READER.lookup_size - 1)], media, mask)
    torch.testing.assert_close(got, states[[0, 1], [3, 0]], rtol=0, atol=1e-6)
    torch.testing.assert_close(decoder.head[1](states), logits)  # the state is what the head reads


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("lookup_size", 0), ("depth", 0), ("heads", 5)])
def test_bad_reader_configs_are_refused(field, value):
    with pytest.raises(ValueError, match=field if field != "heads" else "not a multiple of heads"):
        dataclasses.replace(READER, **{field: value})


def test_the_reader_is_for_images_only():
    from mm_llama.video_adapter import VideoConfig

    with pytest.raises(ValueError, match="prompt_reader reads prompts against images"):
        ModelConfig(TINY_ENCODER, video=VideoConfig(), prompt_reader=READER)
    with pytest.raises(ValueError, match="prompt_reader reads prompts against images"):
        ModelConfig(None, prompt_reader=READER)


# --- in the model -------------------------------------------------------------------------------
def test_gates_at_zero_still_equal_the_plain_lm_and_the_reader_adds_one_media_token():
    model = reader_model().eval()
    ids, labels, images = media_batch(model)
    with torch.no_grad():
        tokens, mask = model.encode_images(images, (ids, prompt_lengths(labels)))
        assert tokens.shape == (2, model.image_encoder.num_tokens + 1, model.lm.cfg.dim) and mask.all()
        fused = model(ids, images, prompt_lengths=prompt_lengths(labels))
        assert torch.equal(fused, model.lm.logits(model.hidden_states(ids, None)))
        assert torch.equal(model.loss(ids, labels, images), model.loss(ids, labels, None))
    with pytest.raises(ValueError, match="pass prompts"):
        model.encode_images(images)


def test_the_reader_reads_the_prompt_never_the_answer():
    model = reader_model(gate_init=0.5).eval()
    ids, labels, images = media_batch(model)
    reads = captured(model)
    answered = ids.clone()
    for i in range(2):  # other answers: other labels, same prompts
        keep = labels[i] != -100
        answered[i, keep] = (ids[i, keep] + 1) % VOCAB
    with torch.no_grad():
        model.loss(ids, labels, images)
        model.loss(answered, torch.where(labels != -100, answered, -100), images)
    assert torch.equal(reads[0], reads[1])
    assert prompt_lengths(labels).tolist() == [6, 4]
    with pytest.raises(ValueError, match="no labeled position"):
        prompt_lengths(torch.full((1, 4), -100))
    with pytest.raises(ValueError, match="labeled from column 0"):
        prompt_lengths(torch.tensor([[5, -100]]))


def test_generation_reads_the_prompt_as_training_does():
    model = reader_model(gate_init=0.5).eval()
    ids, labels, images = media_batch(model, prompt_len=(6, 4))
    reads = captured(model)
    with torch.no_grad():
        model.loss(ids, labels, images)
        prompts = [ids[0, :6].tolist(), ids[1, :4].tolist()]
        together = generate(model, prompts, images, max_new_tokens=4)
    torch.testing.assert_close(reads[1], reads[0], rtol=0, atol=1e-5)  # left-padded there, right-padded here
    alone = [generate(model, [p], images[i:i + 1], max_new_tokens=4)[0] for i, p in enumerate(prompts)]
    assert together == alone


def test_the_reader_is_frozen_its_projection_trains_and_both_are_checkpointed():
    groups = ("image_encoder", "projection", "cross_attention", "fusion_embedding")
    model = reader_model(gate_init=0.5, trainable=("projection", "cross_attention", "fusion_embedding"))
    before = {k: v.clone() for k, v in model.prompt_reader.state_dict().items()}
    ids, labels, images = media_batch(model)
    model.loss(ids, labels, images).backward()
    for name, p in model.named_parameters():
        if name.startswith(("prompt_reader.", "image_encoder.", "lm.")):
            assert not p.requires_grad and p.grad is None, name
    new = {n for n, p in model.named_parameters() if p.requires_grad} - set(
        n for n, _ in MultimodalLlama(tiny_lm(), ModelConfig(TINY_ENCODER, trainable=groups[1:])).named_parameters()
    )
    assert new == {"prompt_projection.proj.weight", "prompt_projection.proj.bias", "prompt_projection.norm.weight"}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in new)
    state = model.trainable_state_dict()
    assert {k for k in state if k.startswith("prompt_reader.")} == {f"prompt_reader.{k}" for k in before}
    assert all(torch.equal(model.prompt_reader.state_dict()[k], v) for k, v in before.items())
    cfg = dataclasses.replace(model.cfg, prompt_reader=dataclasses.replace(READER, checkpoint="gone.safetensors"))
    assert without_weight_files(cfg).prompt_reader == READER


# --- train_adapter.py ---------------------------------------------------------------------------
def test_train_adapter_keeps_stage_1s_decoder_as_the_reader_and_resumes(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    from mm_llama.inference import Assistant
    from mm_llama.training import run as run_module

    out, flags = two_stage_image_run(tiny_lm_dir, tmp_path, monkeypatch, TINY_ENCODER)
    flags = [*flags, "--prompt-reader"]
    assert run_module.main([*flags, "--steps", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["encoder_pretrain"]["prompt_reader"]["checkpoint"] == str(out / "prompt_reader.safetensors")
    assert metrics["encoder_pretrain"]["prompt_reader"]["every_row"] is True  # what the model reads with
    scores = metrics["encoder_pretrain"]["decoder_exact_match"]  # stage 1's decoder alone, on the test split
    assert 0 <= scores["all"] <= 1 and {"caption", "colour", "count", "where"} >= set(scores) - {"all"}

    saved = safetensors.torch.load_file(out / "prompt_reader.safetensors")
    ckpt = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(ckpt["state_dict"]["model.prompt_reader." + k], v) for k, v in saved.items())
    assert any(k.startswith("model.prompt_projection.") for k in ckpt["state_dict"])
    assert "prompt_reader" not in ckpt["hyper_parameters"]["model"].trainable
    assert ckpt["hyper_parameters"]["model"].prompt_reader.every_row  # the default: every row reads

    # the written config.yaml names the reader, and LightningCLI takes it
    import yaml

    from mm_llama.cli import main as cli_main

    reader = yaml.safe_load((out / "config.yaml").read_text())["model"]["model"]["prompt_reader"]
    assert reader["checkpoint"] == str(out / "prompt_reader.safetensors") and reader["vocab_size"] > 1
    assert reader["every_row"] is True
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(out / "config.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "prompt_reader.safetensors" in capsys.readouterr().out

    (out / "prompt_reader.safetensors").rename(tmp_path / "moved.safetensors")  # the checkpoint holds it
    assistant = Assistant.from_checkpoint(out / "adapter.ckpt")
    loaded = assistant.model.prompt_reader.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    (tmp_path / "moved.safetensors").rename(out / "prompt_reader.safetensors")

    assert run_module.main([*flags, "--steps", "3", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["steps"] == 3 and resumed["encoder_pretrain"] is None
    ckpt = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(ckpt["state_dict"]["model.prompt_reader." + k], v) for k, v in saved.items())
    assert ckpt["hyper_parameters"]["model"].prompt_reader.every_row

    # --no-reader-rows on resume: stop 23's reader, one token at the prompt's end, from the same file
    from mm_llama.training.encoder_pretrain import EncoderPretrainConfig
    from mm_llama.training.modalities import image_model_config
    from mm_llama.training.run import _resumed_stage1
    from mm_llama.training.run_config import RunConfig

    last_row = _resumed_stage1(image_model_config(RunConfig()), EncoderPretrainConfig(prompt_reader=True), out,
                               reader_rows=False)
    assert last_row.prompt_reader.every_row is False and "image_encoder" not in last_row.trainable


def test_per_row_reader_trains_and_answers_under_bf16_mixed(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """``--precision auto`` is bf16-mixed for images on a CPU with native bf16 (and on GPUs): the
    per-row reading must run there too, in training, validation and test generation."""
    from mm_llama.training import run as run_module

    out, flags = two_stage_image_run(tiny_lm_dir, tmp_path, monkeypatch, TINY_ENCODER)
    assert run_module.main([*flags, "--prompt-reader", "--steps", "2", "--precision", "bf16-mixed"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["precision"] == "bf16-mixed" and metrics["steps"] == 2
    assert 0 <= metrics["exact_match"] <= 1 and metrics["test_samples"] > 0
    model = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]["model"]
    assert model.prompt_reader.every_row


@pytest.mark.parametrize("flags, message", [
    (["--modality", "speech", "--prompt-reader"], "is for images"),
    (["--prompt-reader", "--encoder-pretrain-steps", "0"], "needs --encoder-pretrain-steps > 0"),
])
def test_prompt_reader_flag_is_refused_where_it_cannot_work(flags, message, capsys):
    from mm_llama.training import run as run_module

    with pytest.raises(SystemExit):
        run_module.main(flags)
    assert message in capsys.readouterr().err


def test_image_runs_read_prompts_by_default_and_other_runs_do_not():
    from mm_llama.training.modalities import image_model_config
    from mm_llama.training.run_config import RunConfig

    from mm_llama.training.run import build_parser

    assert RunConfig().pretrain.prompt_reader and RunConfig().reader_rows
    assert (RunConfig().pretrain.steps, RunConfig().steps) == (1000, 150)  # the schedule measured (README)
    assert build_parser().parse_args([]).reader_rows
    assert not build_parser().parse_args(["--no-reader-rows"]).reader_rows
    assert not RunConfig(prompt_reader=False).pretrain.prompt_reader
    assert not RunConfig(encoder_pretrain_steps=0).pretrain.prompt_reader  # no stage 1: nothing to keep
    assert not RunConfig(modality="video").pretrain.prompt_reader
    # the reader's default encoder: the hybrid stem with a per-pixel LayerNorm; another backbone keeps its own
    assert image_model_config(RunConfig()).image_encoder.stem_norm == "layer"
    assert image_model_config(RunConfig(encoder="timm:vit_tiny_patch16_224")).image_encoder.stem_norm == "group"
    assert RunConfig(modality="video").spec.model_config(RunConfig(modality="video")).image_encoder.stem_norm == "group"


# --- every_row: each text row sees the reader's state at its own row ----------------------------
ROWS = dataclasses.replace(READER, every_row=True)


def rows_model(gate_init: float = 0.5) -> MultimodalLlama:
    model = MultimodalLlama(tiny_lm(), ModelConfig(TINY_ENCODER, CrossAttentionConfig(gate_init=gate_init),
                                                   prompt_reader=ROWS))
    with torch.no_grad():
        model.prompt_reader.lookup.copy_(torch.arange(VOCAB + 1) % READER.vocab_size)
    return model


def test_every_row_reader_is_causal_and_identity_at_init():
    model = rows_model(gate_init=0.0).eval()
    ids, labels, images = media_batch(model)
    with torch.no_grad():
        tokens, _ = model.encode_images(images)
        assert tokens.shape[1] == model.image_encoder.num_tokens  # no appended token: the rows carry the reading
        assert torch.equal(model(ids, images), model.lm.logits(model.hidden_states(ids, None)))
    model = rows_model().eval()
    with torch.no_grad():
        logits = model(ids, images)
        changed = ids.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB  # later text changes no earlier row
        later = model(changed, images)
        rows = model.reading_context(images, ids).row_tokens
    assert rows.shape == (2, ids.shape[1], model.lm.cfg.dim)
    torch.testing.assert_close(later[:, :7], logits[:, :7], rtol=0, atol=1e-5)
    assert (later[:, 7:] - logits[:, 7:]).abs().max() > 1e-3
    text_only = model.lm.logits(model.hidden_states(ids, None))
    assert torch.equal(logits[:, :1], text_only[:, :1])  # the row before <|image|> sees nothing


@pytest.mark.parametrize("share_prefix, pack", [(False, False), (True, False), (True, True)])
def test_every_row_loss_equals_the_full_forwards_on_every_path(share_prefix, pack):
    model = rows_model().eval()
    ids, labels, images = media_batch(model, prompt_len=(6, 4, 5), answer=3)
    ids[:, 0] = 5  # a shared first column: the shared-prefix path has something to skip
    with torch.no_grad():
        logits = model(ids, images)
        reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss = model.loss(ids, labels, images, share_prefix=share_prefix, pack=pack)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_every_row_generation_equals_greedy_over_full_forwards_batched_or_alone():
    model = rows_model(gate_init=1.0).eval()
    ids, _, images = media_batch(model, prompt_len=(6, 4))
    prompts = [ids[0, :6].tolist(), ids[1, :4].tolist()]
    with torch.no_grad():
        together = generate(model, prompts, images, max_new_tokens=5)
        for i, prompt in enumerate(prompts):  # the reference: a full forward per new token, no cache
            text = list(prompt)
            for _ in range(5):
                text.append(int(model(torch.tensor([text]), images[i:i + 1])[0, -1].argmax()))
            assert together[i] == text[len(prompt):]
        alone = [generate(model, [p], images[i:i + 1], max_new_tokens=5)[0] for i, p in enumerate(prompts)]
        uncached = generate(model, prompts, images, max_new_tokens=5, cache_media_kv=False)
    assert together == alone == uncached


def test_every_row_needs_cross_attention_masking_both_branches():
    with pytest.raises(ValueError, match='every_row needs cross_attention.row_mask_mode="both"'):
        ModelConfig(TINY_ENCODER, CrossAttentionConfig(row_mask_mode="mlp_only"), prompt_reader=ROWS)


def test_every_row_generation_runs_past_the_readers_positions():
    """Answers longer than the decoder's ``max_len`` (32 here) keep going: later rows are read over
    the last ``max_len`` ids."""
    model = rows_model(gate_init=1.0).eval()
    ids, _, images = media_batch(model, prompt_len=(6, 4))
    with torch.no_grad():
        out = generate(model, [ids[0, :6].tolist(), ids[1, :4].tolist()], images, max_new_tokens=40)
    assert [len(o) for o in out] == [40, 40]
