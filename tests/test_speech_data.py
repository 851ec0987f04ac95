"""Speech data: eSpeak synthesis, the built-in spoken shards, and every kind of bad audio
(decoded correctly, or skipped and counted) through the real WebDataset pipeline."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from mm_llama.data import spoken
from mm_llama.data.audio_io import SAMPLE_RATE, AudioDecodeError, decode_audio
from mm_llama.data.espeak import ESpeakError, VoiceSettings, espeak
from mm_llama.data.examples import IGNORE_INDEX
from mm_llama.data.pipeline import DataConfig, SkipCounter, build_dataset, build_loader
from mm_llama.data.speech_pipeline import AudioAdjustments, AudioConfig, SpeechDecodeStage, collate_speech
from tests.test_data_examples import chat_tokenizer


def _encode(wave: np.ndarray, rate: int, fmt: str = "FLAC", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _tone(seconds: float, rate: int, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(spectrum.argmax()) * rate / len(wave)


# ---------------------------------------------------------------- eSpeak


def test_espeak_speaks_into_memory_and_voices_differ():
    engine = espeak()
    a = engine.synthesize("the small dog sleeps", VoiceSettings("en-us+m1", rate=175, pitch=50))
    b = engine.synthesize("the small dog sleeps", VoiceSettings("en-us+f2", rate=175, pitch=50))
    slow = engine.synthesize("the small dog sleeps", VoiceSettings("en-us+m1", rate=100, pitch=50))
    assert a.dtype == np.int16 and engine.sample_rate == 22050
    assert 0.5 < len(a) / engine.sample_rate < 3.0 and np.abs(a).max() > 1000  # audible speech
    assert len(a) != len(b) or not np.array_equal(a, b)
    assert len(slow) > 1.4 * len(a)  # rate is words per minute


def test_espeak_refuses_unknown_voice_and_bad_settings():
    with pytest.raises(ESpeakError, match="no-such-voice"):
        espeak().synthesize("hello", VoiceSettings("no-such-voice"))
    with pytest.raises(ValueError, match="rate"):
        VoiceSettings(rate=20)
    with pytest.raises(ValueError, match="empty"):
        espeak().synthesize("  ")


# ---------------------------------------------------------------- built-in shards


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    spoken.make_default_shards(root, n_train=24, n_val=4, n_test=16, samples_per_shard=12, progress=False)
    return root


def _read(root, split):
    return list(wds.DataPipeline(wds.SimpleShardList(sorted(str(p) for p in root.glob(f"{split}-*.tar"))),
                                 wds.tarfile_to_samples()))


def test_spoken_shards_hold_out_a_voice_and_facts_for_test(speech_dir):
    metas = {split: [json.loads(s["json"]) for s in _read(speech_dir, split)] for split in ("train", "val", "test")}
    assert [len(metas[s]) for s in ("train", "val", "test")] == [24, 4, 16]
    seen = metas["train"] + metas["val"]
    assert all(m["voice"] in spoken.TRAIN_VOICES for m in seen)
    assert {m["voice"] for m in metas["test"]} >= {spoken.HELDOUT_VOICE}
    assert sum(m["heldout_voice"] for m in metas["test"]) == 8
    assert all(m["heldout_voice"] == (m["voice"] == spoken.HELDOUT_VOICE) for m in metas["test"])
    assert not any(m["text"] in spoken.HELDOUT_FACTS for m in seen)
    test_qa = [m for m in metas["test"] if m["task"] == "qa"]
    assert test_qa and all(m["text"] in spoken.HELDOUT_FACTS and m["heldout_fact"] for m in test_qa)
    asr = [m for m in seen if m["task"] == "asr"]
    assert asr and all(m["response"] == m["text"] and m["prompt"] == spoken.ASR_PROMPT for m in asr)
    wave, rate = sf.read(io.BytesIO(_read(speech_dir, "train")[0]["flac"]))
    assert rate == 22050 and wave.ndim == 1 and len(wave) / rate > 0.5


def test_spoken_shards_are_reproducible(speech_dir, tmp_path):
    again = tmp_path / "again"
    spoken.write_shards(again, "train", 3, 3, seed=0, progress=False)
    def content(sample):  # what is said and how; not the clip's exact duration (eSpeak's jitter)
        return {k: v for k, v in json.loads(sample["json"]).items() if k != "seconds"}

    first = {s["__key__"]: content(s) for s in _read(speech_dir, "train")}
    assert all(first[s["__key__"]] == content(s) for s in _read(again, "train"))


# ---------------------------------------------------------------- bad audio, one by one


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_any_rate_is_resampled_to_16k_keeping_pitch(rate):
    clip = decode_audio(_encode(_tone(0.5, rate), rate))
    assert clip.source_rate == rate and clip.wave.dtype == torch.float32
    assert abs(len(clip.wave) - 0.5 * SAMPLE_RATE) <= 2
    assert abs(_peak_hz(clip.wave, SAMPLE_RATE) - 440.0) < 4.0


def test_stereo_is_downmixed():
    left = _tone(0.3, 16000, hz=300)
    right = _tone(0.3, 16000, hz=1000, amp=0.2)
    clip = decode_audio(_encode(np.stack([left, right], axis=1), 16000))
    assert clip.channels == 2 and clip.wave.dim() == 1
    assert torch.allclose(clip.wave, torch.from_numpy((left + right) / 2), atol=1e-4)


def test_clipped_float_audio_is_clamped():
    wave = _tone(0.3, 16000, amp=3.0)  # float WAV may hold |x| > 1
    clip = decode_audio(_encode(wave, 16000, "WAV", "FLOAT"))
    assert float(clip.wave.abs().max()) == 1.0 and (clip.wave.abs() == 1.0).sum() > 100


def test_long_audio_is_truncated():
    clip = decode_audio(_encode(_tone(3.0, 44100), 44100), max_seconds=1.0)
    assert clip.truncated and len(clip.wave) == SAMPLE_RATE


@pytest.mark.parametrize("make, kind", [
    (lambda: b"", "bad_audio"),
    (lambda: _encode(_tone(0.5, 16000), 16000)[:60], "bad_audio"),  # corrupt: header only, cut mid-stream
    (lambda: b"fLaC" + bytes(range(256)) * 4, "bad_audio"),
    (lambda: np.zeros(0).tobytes(), "bad_audio"),
    (lambda: _encode(np.zeros(16000, dtype=np.float32), 16000), "silent_audio"),
    (lambda: _encode(np.full(16000, 2e-5, dtype=np.float32), 16000, "WAV", "FLOAT"), "silent_audio"),
    (lambda: _encode(np.where(np.arange(8000) == 9, np.nan, _tone(0.5, 16000)).astype(np.float32), 16000,
                     "WAV", "FLOAT"), "bad_audio_values"),
    (lambda: _encode(np.where(np.arange(8000) == 9, np.inf, _tone(0.5, 16000)).astype(np.float32), 16000,
                     "WAV", "FLOAT"), "bad_audio_values"),
    (lambda: _encode(_tone(0.05, 16000), 16000), "audio_too_short"),
])  # fmt: skip
def test_unusable_audio_is_refused_with_its_kind(make, kind):
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(make())
    assert info.value.kind == kind


def test_corrupt_flac_body_is_bad_audio():
    data = bytearray(_encode(_tone(1.0, 16000), 16000))
    data[200:] = bytes(len(data) - 200)  # frames zeroed: no valid frame sync
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(bytes(data))
    assert info.value.kind in ("bad_audio", "silent_audio", "audio_too_short")


# ---------------------------------------------------------------- through the pipeline


def test_pipeline_counts_every_broken_clip_and_keeps_every_good_one(tmp_path):
    tok = chat_tokenizer()
    meta = json.dumps({"prompt": spoken.ASR_PROMPT, "response": "a red square"}).encode()
    good = {
        "ok16k": _encode(_tone(0.5, 16000), 16000),
        "ok8k": _encode(_tone(0.5, 8000), 8000),
        "ok48kstereo": _encode(np.stack([_tone(0.5, 48000)] * 2, axis=1), 48000),
        "oklong": _encode(_tone(3.0, 16000), 16000),
    }
    bad = {
        "silent": (_encode(np.zeros(8000, dtype=np.float32), 16000), "silent_audio"),
        "nan": (_encode(np.full(8000, np.nan, dtype=np.float32), 16000, "WAV", "FLOAT"), "bad_audio_values"),
        "short": (_encode(_tone(0.02, 16000), 16000), "audio_too_short"),
        "corrupt": (b"fLaC\x00\x00\x00\x22garbage", "bad_audio"),
    }
    path = tmp_path / "mixed-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for key, data in good.items():
            sink.write({"__key__": key, "flac": data, "json": meta})
        for key, (data, _) in bad.items():
            sink.write({"__key__": key, "wav" if key == "nan" else "flac": data, "json": meta})
        sink.write({"__key__": "noaudio", "json": meta})
    counter, adjustments = SkipCounter(), AudioAdjustments()
    stage = SpeechDecodeStage(tok, tok.vocab_size + 2, max_len=64, system_prompt=None, counter=counter,
                              audio=AudioConfig(max_seconds=2.0), adjustments=adjustments)
    cfg = DataConfig(train_urls=str(path), batch_size=8)
    dataset = build_dataset(str(path), tok, None, tok.vocab_size + 2, train=False, cfg=cfg, counter=counter,
                            decode_stage=stage)
    batches = list(build_loader(dataset, cfg, tok.pad_id, collate_fn=collate_speech))
    assert len(batches) == 1
    batch = batches[0]
    assert [m["__key__"] for m in batch["meta"]] == list(good)
    assert batch["audio_lengths"].tolist() == [8000, 8000, 8000, 32000]
    assert batch["audio"].shape == (4, 32000) and float(batch["audio"][0, 8000:].abs().sum()) == 0
    assert ((batch["input_ids"] == tok.vocab_size + 2).sum(1) == 1).all()
    assert (batch["labels"][batch["input_ids"] == tok.vocab_size + 2] == IGNORE_INDEX).all()
    counts = counter.counts()
    for _, kind in bad.values():
        assert counts[kind] == 1, (kind, counts)
    assert counts["missing_audio"] == 1 and counter.total == len(bad) + 1
    assert adjustments.counts() == {"truncated": 1, "resampled": 2, "downmixed": 1}


def test_make_shards_speech_from_the_command_line(tmp_path, capsys):
    from mm_llama.cli import main

    out = tmp_path / "speech"
    argv = ["make-shards", "--modality", "speech", "--out", str(out), "--speech-n-train", "2", "--speech-n-val", "2",
            "--speech-n-test", "2", "--speech-samples-per-shard", "1"]
    assert main(argv) == 0
    urls = json.loads(capsys.readouterr().out)
    assert urls["train"] == str(out / "train-{000000..000001}.tar") and (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["generator"] == "mm_llama.data.spoken"
