"""Speech training end to end on a tiny LM: ``train_adapter.py --modality speech`` writes its
artefacts and the speech metrics for both fusion modes, ASR loss falls well below its start,
and speech error rates are computed per voice."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torchaudio
import yaml

from adapters.speech_adapter import SpeechAdapterConfig
from encoders.speech import SpeechEncoderConfig
from mm_llama.data import spoken
from mm_llama.data.espeak import VoiceSettings
from mm_llama.data.examples import encode_example
from mm_llama.data.speech_pipeline import SPEECH_PLACEHOLDER, collate_speech, pad_audio
from mm_llama.lm import load_language_model, parameters_digest
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama
from mm_llama.training import modalities
from mm_llama.training import run as run_module
from mm_llama.training.module import normalise_answer
from mm_llama.training.speech_metrics import speech_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_ENCODER = SpeechEncoderConfig(dim=32, depth=1, heads=2, ffn_dim=64, dropout=0.0)
SPEECH_METRICS = {"wer", "wer_heldout_voice", "spoken_qa_accuracy", "train_seconds", "fusion"}


def tiny_speech_model(fusion: str, dropout: float = 0.0) -> ModelConfig:
    embedding = fusion == "embedding"
    return ModelConfig(
        image_encoder=None, speech_encoder=dataclasses.replace(TINY_ENCODER, dropout=dropout),
        speech_adapter=SpeechAdapterConfig(fusion=fusion, dim=32, heads=2, ffn_dim=64, dropout=dropout),
        cross_attention=CrossAttentionConfig(layers=()) if embedding else CrossAttentionConfig(every=2),
        trainable=("speech_encoder", "speech_adapter") + (() if embedding else ("cross_attention", "fusion_embedding")),
    )  # fmt: skip


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    spoken.make_default_shards(root, n_train=16, n_val=4, n_test=8, samples_per_shard=8, progress=False)
    return root


@pytest.mark.parametrize("fusion", ["embedding", "cross_attention"])
def test_train_adapter_speech_writes_metrics_for_each_fusion(tiny_lm_dir, speech_dir, tmp_path, capsys,
                                                             monkeypatch, fusion):
    spec = run_module.MODALITIES["speech"]
    tiny = modalities.Modality(lambda cfg: tiny_speech_model(cfg.fusion), spec.datamodule, spec.data_dir, spec.out,
                               encoder_pretraining=False, extra_metrics=spec.extra_metrics,
                               pretrain_stage=spec.pretrain_stage)
    monkeypatch.setitem(run_module.MODALITIES, "speech", tiny)
    monkeypatch.chdir(tmp_path)  # the default output directory, runs/speech-<fusion>, lands here
    flags = ["--modality", "speech", "--fusion", fusion, "--lm", str(tiny_lm_dir), "--data-dir", str(speech_dir),
             "--steps", "2", "--batch-size", "4", "--num-workers", "0", "--val-samples", "4", "--no-progress",
             # One pre-training stage each: BEST-RQ (encoder trains on) and CTC (encoder frozen).
             "--speech-pretrain", "best_rq" if fusion == "embedding" else "ctc", "--speech-pretrain-steps", "2",
             "--speech-adapter-pretrain-steps", "2"]  # after CTC only
    assert run_module.main(flags) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "runs" / f"speech-{fusion}"
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert SPEECH_METRICS <= set(metrics) and metrics["fusion"] == fusion
    assert metrics["test_samples"] == 8 and metrics["steps"] == 2
    # The pre-training stage ran first and stage 2 loaded its encoder.
    assert metrics["encoder_pretrain"]["steps"] == 2 and (out / "speech_encoder.pt").is_file()
    assert metrics["train_seconds"] > metrics["adapter_train_seconds"]
    checkpoint = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)
    encoder_trains = "speech_encoder" in checkpoint["hyper_parameters"]["model"].trainable
    assert encoder_trains == (fusion == "embedding")  # frozen after CTC (the cross_attention run here)
    if fusion == "cross_attention":  # CTC, then the adapter's token CTC; stage 2 started from both
        assert metrics["encoder_pretrain"]["method"] == "ctc"
        assert metrics["encoder_pretrain"]["adapter"]["steps"] == 2 and (out / "speech_adapter.pt").is_file()
        assert checkpoint["hyper_parameters"]["model"].speech_adapter.checkpoint == "runs/speech-cross_attention/speech_adapter.pt"
        stage1 = torch.load(out / "speech_encoder.pt", map_location="cpu", weights_only=True)
        assert all(torch.equal(checkpoint["state_dict"][f"model.speech_encoder.{k}"], v) for k, v in stage1.items())
    assert metrics["skipped"]["train"]["total"] == 0 and metrics["audio_adjusted"]["train"]["resampled"] > 0
    assert any(k.startswith("wer_voice/") for k in metrics) and 0 <= metrics["spoken_qa_accuracy"] <= 1
    for name in ("adapter.ckpt", "last.ckpt", "config.yaml", "training_curve.png"):
        assert (out / name).is_file(), name
    state = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("model.speech_encoder.") for k in state) and not any(".lm." in k for k in state)
    assert any(k.startswith("model.cross_attn.") for k in state) == (fusion == "cross_attention")
    from mm_llama.cli import main as cli_main  # the resolved config is a valid LightningCLI config

    monkeypatch.setattr("sys.argv", ["mm-llama"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(out / "config.yaml"), "--print_config"])
    assert exit_info.value.code == 0 and "SpeechDataModule" in capsys.readouterr().out


def test_each_fusion_defaults_to_the_steps_it_was_measured_with(capsys):
    from mm_llama.training.run import RunConfig, build_parser

    assert RunConfig(modality="speech").steps == 200  # embedding fusion: 0.63 % held-out WER (stop 31)
    assert RunConfig(modality="speech", fusion="cross_attention").steps == 400  # 10.9 % at 200 (stop 32)
    assert RunConfig(modality="speech", fusion="cross_attention", steps=50).steps == 50  # given: kept
    build_parser().print_help()
    assert "speech 200; 400 with --fusion cross_attention" in " ".join(capsys.readouterr().out.split())


def _asr_clips(n: int = 4) -> list[tuple[torch.Tensor, str]]:
    """``n`` eSpeak clips of ASR sentences at 16 kHz, with their sentences."""
    clips = []
    for i in range(n):
        sentence = spoken.make_sentence(random.Random(i))
        wave, rate = spoken.synthesize_float(sentence, VoiceSettings(spoken.TRAIN_VOICES[i % 2]))
        clips.append((torchaudio.functional.resample(torch.from_numpy(wave), rate, 16000), sentence))
    return clips


def _asr_batch(tok, media_id, n: int = 4):
    """``n`` eSpeak clips of ASR sentences, collated as the pipeline does."""
    samples = []
    for audio, sentence in _asr_clips(n):
        encoded = encode_example(tok, spoken.ASR_PROMPT, sentence, media_placeholder=SPEECH_PLACEHOLDER,
                                 media_token_id=media_id, system="")
        samples.append({**encoded, "audio": audio, "meta": {"task": "asr", "response": sentence, "text": sentence}})
    return collate_speech(samples, tok.pad_id)


def _train_asr(model: MultimodalLlama, steps: int, lr: float) -> list[float]:
    batch = _asr_batch(model.lm.tokenizer, model.media_token_id("speech"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.speech_loss(batch["input_ids"], batch["labels"], batch["audio"], batch["audio_lengths"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def short_smollm2(smollm2_path):
    """SmolLM2-135M cut to its first 6 of 30 blocks (final norm and tied head kept): a real,
    pretrained LM that reads its context, 5x cheaper per step. A tiny *random* LM cannot show
    the loss falling under embedding fusion: its input barely steers its output (measured:
    6.08 -> 5.91 in 40 steps)."""
    lm = load_language_model(str(smollm2_path))
    lm.layers = lm.layers[:6]
    lm.cfg = dataclasses.replace(lm.cfg, n_layers=6)
    return lm


@pytest.mark.parametrize("fusion", ["embedding", "cross_attention"])
def test_asr_loss_falls_well_below_its_start(short_smollm2, fusion):
    torch.manual_seed(0)
    model = MultimodalLlama(copy.deepcopy(short_smollm2), tiny_speech_model(fusion))
    digest = parameters_digest(model.lm)
    losses = _train_asr(model, steps=30, lr=3e-3)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses[::3]
    assert parameters_digest(model.lm) == digest


def test_speech_metrics_per_voice_and_task():
    rows = [
        (False, {"task": "asr", "voice": "a", "heldout_voice": False, "response": "the red dog",
                 "prediction": "the red cat"}),
        (True, {"task": "asr", "voice": "b", "heldout_voice": True, "response": "the big box sits",
                "prediction": "The big box sits."}),
        (True, {"task": "qa", "voice": "a", "heldout_voice": False, "response": "Paris", "prediction": "paris"}),
        (False, {"task": "qa", "voice": "b", "heldout_voice": True, "response": "5", "prediction": "6"}),
    ]
    m = speech_metrics(rows, normalise_answer)
    assert m["wer"] == pytest.approx(1 / 7) and m["wer_voice/a"] == pytest.approx(1 / 3)
    assert m["wer_heldout_voice"] == 0.0 and m["wer_seen_voices"] == pytest.approx(1 / 3)
    assert m["spoken_qa_accuracy"] == 0.5 and m["spoken_qa_accuracy_heldout_voice"] == 0.0
    assert speech_metrics([r for r in rows if r[1]["task"] == "qa"], normalise_answer).keys().isdisjoint({"wer"})


# ---------------------------------------------------------------- LightningCLI

SPEECH_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "speech.yaml"


def _cli_exit(argv: list[str]) -> int:
    from mm_llama.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_speech_config_validates(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["mm-llama"])
    assert _cli_exit(["fit", "--config", str(SPEECH_CONFIG), "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"].endswith("SpeechDataModule")
    assert config["model"]["model"]["image_encoder"] is None
    assert config["model"]["model"]["speech_adapter"]["fusion"] == "embedding"
    assert config["model"]["optim"]["total_steps"] == config["trainer"]["max_steps"]


def test_tiny_speech_fit_and_test_through_the_cli(tiny_lm_dir, speech_dir, tmp_path, monkeypatch):
    from mm_llama.cli import main

    monkeypatch.setattr("sys.argv", ["mm-llama"])
    config = yaml.safe_load(SPEECH_CONFIG.read_text())
    run_dir = tmp_path / "run"
    config["trainer"].update(max_steps=2, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(run_dir / "checkpoints")
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    config["model"].update(lm=str(tiny_lm_dir), eval_max_new_tokens=3)
    config["model"]["model"]["speech_encoder"].update(dim=32, depth=1, heads=2, ffn_dim=64)
    config["model"]["model"]["speech_adapter"].update(dim=32, heads=2, ffn_dim=64)
    config["model"]["optim"]["total_steps"] = 2
    config["data"]["init_args"].update(data_dir=str(speech_dir), batch_size=2, val_samples=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert main(["test", "--config", str(path), "--ckpt_path", str(last)]) == 0


# --------------------------------------------------------------------------- CTC pre-training


def _fit_ctc_stage(module, clips: list[tuple[torch.Tensor, str]], steps: int = 60) -> None:
    """Train a CTC stage module on one batch of ``clips``; assert its loss fell well below its start."""
    audio, lengths = pad_audio([a for a, _ in clips])
    batch = {"audio": audio, "audio_lengths": lengths, "meta": [{"text": t} for _, t in clips]}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    module.train()
    losses = []
    for _ in range(steps):
        loss, _ = module.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])


def test_ctc_alphabet_and_greedy_decoding():
    from mm_llama.training.ctc_pretrain import CHARACTERS, encode_text, greedy_decode

    ids = encode_text("What is two plus 3?")
    assert "".join(CHARACTERS[i - 1] for i in ids) == "what is two plus 3" and 0 not in ids
    # frames: h h <blank> i i <blank> <blank> i, and a padded tail that must be ignored
    h, i = encode_text("h")[0], encode_text("i")[0]
    scores = torch.full((1, 10, len(CHARACTERS) + 1), -10.0)
    for t, k in enumerate([h, h, 0, i, i, 0, 0, i, h, h]):
        scores[0, t, k] = 0.0
    assert greedy_decode(scores, torch.tensor([8])) == ["hii"]


def test_ctc_pretraining_learns_to_transcribe_espeak_clips():
    """CTC on four real eSpeak clips: the loss falls well below its start in 60 steps (tiny encoder)."""
    from mm_llama.training.ctc_pretrain import CTCModule
    from mm_llama.training.optim import OptimConfig

    torch.manual_seed(0)
    clips = _asr_clips()
    _fit_ctc_stage(CTCModule(TINY_ENCODER, OptimConfig(lr=3e-3, warmup_steps=5, total_steps=60)), clips)


def test_token_ctc_points_adapter_frames_at_the_lm_embeddings_of_the_spoken_tokens(tiny_lm_dir):
    """The adapter's token-CTC stage on four real eSpeak clips (tiny encoder, tiny LM's embeddings):
    the loss falls well below its start in 60 steps, and its state dict loads into the fused model."""
    from mm_llama.training.ctc_pretrain import TokenCTCModule
    from mm_llama.training.optim import OptimConfig

    torch.manual_seed(0)
    lm = load_language_model(str(tiny_lm_dir))
    clips = _asr_clips()
    vocab = sorted({t for _, text in clips for t in lm.tokenizer.encode(text)})
    adapter = SpeechAdapterConfig(dim=32, heads=2, ffn_dim=64, dropout=0.0)
    module = TokenCTCModule(TINY_ENCODER, adapter, lm.embed_tokens.weight[vocab].detach(),
                            {t: i + 1 for i, t in enumerate(vocab)}, lm.tokenizer.encode,
                            OptimConfig(lr=3e-3, warmup_steps=5, total_steps=60))
    assert all(len(module.targets(text)) == len(lm.tokenizer.encode(text)) for _, text in clips)
    _fit_ctc_stage(module, clips)
    assert not any(p.requires_grad for p in module.encoder.parameters())
    fused = MultimodalLlama(lm, ModelConfig(image_encoder=None, speech_encoder=TINY_ENCODER, speech_adapter=adapter,
                                            cross_attention=CrossAttentionConfig(layers=())))
    fused.speech_adapter.load_state_dict(module.adapter.state_dict(), strict=True)


class Crash(RuntimeError):
    """The simulated kill."""


@pytest.mark.parametrize("method", ["ctc", "best_rq"])
def test_speech_pretraining_killed_part_way_resumes_each_stage_from_its_own_state(tiny_lm_dir, speech_dir, tmp_path,
                                                                                   monkeypatch, method):
    """Each speech pre-training stage writes its state (here every step); killed part-way, ``--resume``
    continues it where it stopped, skips the stage that had finished, and hands stage 2 the encoder
    (and adapter) of a run that never stopped. CTC: killed in the encoder's stage at step 3 of 4, then
    in the adapter's token-CTC stage at step 3 of 4. BEST-RQ: killed at step 3 of 4."""
    from mm_llama.training import best_rq, ctc_pretrain
    from mm_llama.training.run_config import RunConfig

    for stage in (ctc_pretrain.pretrain_speech_encoder_ctc, ctc_pretrain.pretrain_speech_adapter_ctc,
                  best_rq.pretrain_speech_encoder):
        monkeypatch.setattr(stage.__module__ + "." + stage.__name__,
                            lambda *args, _stage=stage, **kwargs: _stage(*args, **kwargs, checkpoint_every=1))
    model_cfg = tiny_speech_model("cross_attention")
    stages = ("ctc", "token_ctc") if method == "ctc" else ("bestrq",)
    trained: list[tuple[str, int]] = []
    crash_at: list[tuple[str, int]] = []

    def recording(step):
        def training_step(self, batch, batch_idx):
            name = getattr(self, "name", "bestrq")
            if crash_at and crash_at[0] == (name, self.global_step + 1):
                crash_at.pop(0)
                raise Crash(f"killed at {name} step {self.global_step + 1}")
            trained.append((name, self.global_step + 1))
            return step(self, batch, batch_idx)
        return training_step

    monkeypatch.setattr(ctc_pretrain._CTCStage, "training_step", recording(ctc_pretrain._CTCStage.training_step))
    monkeypatch.setattr(best_rq.BestRQModule, "training_step", recording(best_rq.BestRQModule.training_step))

    def pretrain(out: Path, resume: bool = False):
        cfg = RunConfig(modality="speech", lm=str(tiny_lm_dir), data_dir=str(speech_dir), out=str(out),
                        speech_pretrain=method, speech_pretrain_steps=4, speech_adapter_pretrain_steps=4,
                        num_workers=0, progress=False, resume=resume)
        torch.manual_seed(cfg.seed)  # as run() seeds before its stages
        _, summary = modalities._pretrain_speech_encoder(cfg, model_cfg, out)
        return summary

    whole = pretrain(tmp_path / "whole")
    assert trained == [(s, k) for s in stages for k in (1, 2, 3, 4)]
    out = tmp_path / "killed"
    crash_at[:] = [(s, 3) for s in stages]
    runs = []
    for attempt in range(len(stages) + 1):
        trained.clear()
        try:
            summary = pretrain(out, resume=attempt > 0)
        except Crash:
            runs.append(list(trained))
            continue
        runs.append(list(trained))
    if method == "ctc":  # killed in CTC; resumed, killed in token CTC; resumed, CTC restored finished
        assert runs == [[("ctc", 1), ("ctc", 2)], [("ctc", 3), ("ctc", 4), ("token_ctc", 1), ("token_ctc", 2)],
                        [("token_ctc", 3), ("token_ctc", 4)]]
        assert summary["adapter"]["loss"] == pytest.approx(whole["adapter"]["loss"], rel=1e-6)
    else:
        assert runs == [[("bestrq", 1), ("bestrq", 2)], [("bestrq", 3), ("bestrq", 4)]]
        assert summary["accuracy"] == pytest.approx(whole["accuracy"], rel=1e-6)
    assert summary["steps"] == whole["steps"] == 4 and summary["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    files = ("speech_encoder.pt", "speech_adapter.pt") if method == "ctc" else ("speech_encoder.pt",)
    for name in files:
        expected = torch.load(tmp_path / "whole" / name, weights_only=True)
        got = torch.load(out / name, weights_only=True)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")
