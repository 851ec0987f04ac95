"""Video and speech checkpoints answer through :class:`~mm_llama.inference.Assistant`, the
``mm-llama generate`` command and the demo's request logic, reading media exactly as the
training pipelines do; a kind a checkpoint has no adapter for is refused by name.

Checkpoints come from real (tiny, 2-step) ``train_adapter.py`` runs on built-in shards.
"""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from encoders.preprocess import image_transform
from mm_llama.cli import main as cli_main
from mm_llama.data import spoken
from mm_llama.data.audio_io import decode_audio
from mm_llama.data.video import VideoFrames
from mm_llama.demo.handlers import parse_request, preview_audio, preview_video, respond, unavailable_note
from mm_llama.generation import generate
from mm_llama.inference import Assistant, GenerationSettings
from mm_llama.inputs import InputError, load_audio, load_video
from mm_llama.speech_generation import generate_from_speech
from mm_llama.training import modalities
from mm_llama.training import run as run_module
from tests.test_speech_training import tiny_speech_model
from tests.test_video_data import _audio_only_mp4
from tests.test_video_training import clips_dir  # noqa: F401  (the tiny clip shards, a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

SHORT = GenerationSettings(max_new_tokens=5)
TRAIN_FLAGS = ["--steps", "2", "--batch-size", "4", "--num-workers", "0", "--val-every", "2", "--val-samples", "4",
               "--no-progress"]


def test_samples(shard_dir, ext: str, n: int = 2) -> list[tuple[bytes, dict]]:
    """The first ``n`` samples of the first test shard: ``(media bytes, metadata)``."""
    shard = sorted(shard_dir.glob("test-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    keys = sorted({name.rsplit(".", 1)[0] for name in members})[:n]
    return [(members[f"{k}.{ext}"], json.loads(members[f"{k}.json"])) for k in keys]


test_samples.__test__ = False  # a helper, not a test


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- a video checkpoint


@pytest.fixture(scope="module")
def video_run(tiny_checkpoint, clips_dir, tmp_path_factory):
    """``(assistant, checkpoint)`` of the video stage on the tiny image checkpoint (image gates open: frames matter)."""
    out = tmp_path_factory.mktemp("video-run")
    flags = ["--modality", "video", "--lm", str(tiny_checkpoint.parent / "lm"), "--data-dir", str(clips_dir),
             "--out", str(out), "--image-checkpoint", str(tiny_checkpoint), "--frames", "4"]
    assert run_module.main(flags + TRAIN_FLAGS) == 0
    return Assistant.from_checkpoint(out / "adapter.ckpt"), out / "adapter.ckpt"


def test_video_checkpoint_reads_videos_as_training_does(video_run, clips_dir, tmp_path):
    assistant, _ = video_run
    assert assistant.modalities == ("image", "video")
    (data, meta), (other, _) = test_samples(clips_dir, "mp4")
    path = write(tmp_path, "clip.mp4", data)
    frames, mask = assistant.video_tensor(path)
    expected = VideoFrames(4, image_transform(16, train=False))({"mp4": data})  # the training pipeline
    assert torch.equal(frames, expected["video"]) and torch.equal(mask, expected["frame_mask"])

    answer = assistant.generate([meta["prompt"]], videos=[path], settings=SHORT)[0]
    ids = assistant.prompt_ids(meta["prompt"], "video")
    assert ids.count(assistant.model.media_token_id("video")) == 1
    low = generate(assistant.model, [ids], videos=frames[None], frame_mask=mask[None], max_new_tokens=5,
                   stop_ids=assistant.tokenizer.stop_ids, pad_id=assistant.tokenizer.pad_id)[0]
    assert answer == assistant.tokenizer.decode(low)
    assert list(assistant.stream(meta["prompt"], video=path, settings=SHORT))[-1] == answer

    # The frames reach the answer: another clip changes the next-token distribution.
    def first_logits(video_path):
        seen = []
        f, m = assistant.video_tensor(video_path)
        generate(assistant.model, [ids], videos=f[None], frame_mask=m[None], max_new_tokens=1,
                 on_logits=seen.append)
        return seen[0]

    assert not torch.allclose(first_logits(path), first_logits(write(tmp_path, "other.mp4", other)))

    # A batch mixing a clip and a text-only prompt equals the two requests made alone.
    mixed = assistant.generate([meta["prompt"], "Hello"], videos=[path, None], settings=SHORT)
    assert mixed == [answer, assistant.generate(["Hello"], settings=SHORT)[0]]


def test_cli_generate_answers_about_a_video(video_run, clips_dir, tmp_path, capsys):
    assistant, checkpoint = video_run
    (data, meta), _ = test_samples(clips_dir, "mp4")
    path = write(tmp_path, "clip.mp4", data)
    code = cli_main(["generate", "--checkpoint", str(checkpoint), "--video", str(path), "--max-new-tokens", "5",
                     meta["prompt"]])
    assert code == 0
    assert capsys.readouterr().out == assistant.generate([meta["prompt"]], videos=[path], settings=SHORT)[0] + "\n"


def test_video_checkpoint_refuses_audio_and_two_kinds_at_once(video_run, clips_dir, tmp_path, capsys):
    assistant, checkpoint = video_run
    (data, _), _ = test_samples(clips_dir, "mp4")
    clip = write(tmp_path, "clip.mp4", data)
    flac = write(tmp_path, "speech.flac", b"fLaC not really")
    with pytest.raises(SystemExit) as info:
        cli_main(["generate", "--checkpoint", str(checkpoint), "--audio", str(flac), "What is said?"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert re.search(r"audio \(speech\) input is not available: this checkpoint has no speech adapter "
                     r"\(it reads image, video\)", err), err
    with pytest.raises(SystemExit) as info:
        cli_main(["generate", "--checkpoint", str(checkpoint), "--video", str(clip), "--image", "x.png", "hi"])
    assert info.value.code == 2 and "give one of --image, --video, --audio" in capsys.readouterr().err
    with pytest.raises(InputError, match="one kind of media per request"):
        assistant.generate(["hi"], images=[None], videos=[clip])
    assert "audio input is **not available**" in unavailable_note(assistant)


def test_demo_answers_about_a_video_and_previews_its_frames(video_run, clips_dir, tmp_path):
    assistant, _ = video_run
    (data, meta), _ = test_samples(clips_dir, "mp4")
    path = str(write(tmp_path, "clip.mp4", data))
    updates = list(respond(assistant, None, path, None, meta["prompt"], 5, 0.0, 1.0))
    assert updates[-1][0] == assistant.generate([meta["prompt"]], videos=[path], settings=SHORT)[0]
    assert updates[-1][1].startswith("Done in") and "with the video" in updates[-1][1]
    frames, note = preview_video(assistant, path)
    assert len(frames) == min(4, meta["frames"]) and note == ""
    assert preview_video(assistant, str(write(tmp_path, "bad.mp4", b"\0" * 64)))[1].startswith("⚠️")
    with pytest.raises(InputError, match="one media file per question"):
        parse_request(assistant, path, path, None, "hi", 5, 0.0, 1.0)


def test_bad_video_files_are_refused_with_their_reason(tmp_path):
    cases = {
        "notes.txt": (b"hello", "not an accepted video type"),
        "empty.mp4": (b"", "is empty"),
        "garbage.mp4": (b"\x00not an mp4" * 50, "could not be decoded as a video"),
        "sound.mp4": (_audio_only_mp4(), "has no video stream"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(InputError, match=message):
            load_video(write(tmp_path, name, data), 4)
    with pytest.raises(InputError, match="does not exist"):
        load_video(tmp_path / "missing.mp4", 4)


# --------------------------------------------------------------------------- a speech checkpoint


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    spoken.make_default_shards(root, n_train=8, n_val=4, n_test=4, samples_per_shard=4, progress=False)
    return root


@pytest.fixture(scope="module")
def speech_run(tiny_lm_dir, speech_dir, tmp_path_factory):
    """``(assistant, checkpoint)`` of a tiny cross-attention speech run."""
    out = tmp_path_factory.mktemp("speech-run")
    spec = run_module.MODALITIES["speech"]
    tiny = modalities.Modality(lambda cfg: tiny_speech_model(cfg.fusion), spec.datamodule, spec.data_dir, spec.out,
                               encoder_pretraining=False, extra_metrics=spec.extra_metrics,
                               pretrain_stage=spec.pretrain_stage)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(run_module.MODALITIES, "speech", tiny)
        flags = ["--modality", "speech", "--fusion", "cross_attention", "--lm", str(tiny_lm_dir),
                 "--data-dir", str(speech_dir), "--out", str(out), "--speech-pretrain-steps", "0"]
        assert run_module.main(flags + TRAIN_FLAGS) == 0
    return Assistant.from_checkpoint(out / "adapter.ckpt"), out / "adapter.ckpt"


def test_speech_checkpoint_reads_audio_as_training_does(speech_run, speech_dir, tmp_path):
    assistant, checkpoint = speech_run
    assert assistant.modalities == ("speech",) and assistant.image_size is None
    (data, meta), (other, other_meta) = test_samples(speech_dir, "flac")
    path = write(tmp_path, "speech.flac", data)
    wave = decode_audio(data).wave  # the training pipeline's decoding
    assert torch.equal(assistant.audio_wave(path), wave)

    answer = assistant.generate([meta["prompt"]], audio=[path], settings=SHORT)[0]
    ids = assistant.prompt_ids(meta["prompt"], "speech")
    low = generate_from_speech(assistant.model, [ids], wave[None], torch.tensor([len(wave)]), max_new_tokens=5,
                               stop_ids=assistant.tokenizer.stop_ids, pad_id=assistant.tokenizer.pad_id)[0]
    assert answer == assistant.tokenizer.decode(low)
    streamed = list(assistant.stream(meta["prompt"], audio=path, settings=SHORT))
    assert streamed[-1] == answer

    # Batched, padded clips of different lengths answer as they do alone.
    other_path = write(tmp_path, "other.flac", other)
    alone = assistant.generate([other_meta["prompt"]], audio=[other_path], settings=SHORT)[0]
    both = assistant.generate([meta["prompt"], other_meta["prompt"]], audio=[path, other_path], settings=SHORT)
    assert both == [answer, alone]

    # The same speech at 44.1 kHz in stereo wav is resampled and down-mixed, not refused.
    array, rate = sf.read(io.BytesIO(data), dtype="float32")  # [n] mono
    resampled = np.interp(np.linspace(0, len(array) - 1, round(len(array) * 44_100 / rate)), np.arange(len(array)),
                          array)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([resampled, resampled], axis=1), 44_100, format="WAV", subtype="FLOAT")
    heard = assistant.audio_wave(write(tmp_path, "speech.wav", buffer.getvalue()))
    assert abs(len(heard) - len(wave)) <= 16_000 * 0.01

    with pytest.raises(InputError, match="needs its audio"):
        assistant.generate([meta["prompt"], "Hello"], audio=[path, None])


def test_cli_and_demo_answer_about_audio_and_refuse_images(speech_run, speech_dir, tmp_path, capsys):
    assistant, checkpoint = speech_run
    (data, meta), _ = test_samples(speech_dir, "flac")
    path = write(tmp_path, "speech.flac", data)
    expected = assistant.generate([meta["prompt"]], audio=[path], settings=SHORT)[0]
    assert cli_main(["generate", "--checkpoint", str(checkpoint), "--audio", str(path), "--max-new-tokens", "5",
                     meta["prompt"]]) == 0
    assert capsys.readouterr().out == expected + "\n"

    updates = list(respond(assistant, None, None, str(path), meta["prompt"], 5, 0.0, 1.0))
    assert updates[-2][0] == expected  # streamed; the last update may say the answer is only whitespace
    assert updates[-1][1].startswith("Done in") and "with the audio" in updates[-1][1]
    rate, samples = preview_audio(assistant, str(path))[0]
    assert rate == 16_000 and len(samples) == len(decode_audio(data).wave)

    image = tmp_path / "x.png"
    image.write_bytes(b"png")
    updates = list(respond(assistant, str(image), None, None, "Describe the image.", 5, 0.0, 1.0))
    assert len(updates) == 1 and updates[0][0] == ""
    assert "image input is not available: this checkpoint has no image adapter (it reads speech)" in updates[0][1]
    assert "image and video input is **not available**" in unavailable_note(assistant)


def test_bad_audio_files_are_refused_with_their_reason(tmp_path):
    def wav(wave: np.ndarray, rate: int = 16_000) -> bytes:
        buffer = io.BytesIO()
        sf.write(buffer, wave, rate, format="WAV", subtype="FLOAT")
        return buffer.getvalue()

    tone = 0.5 * np.sin(np.linspace(0, 2 * np.pi * 440, 16_000)).astype(np.float32)
    cases = {
        "notes.mp3": (b"ID3", "not an accepted audio type"),
        "empty.flac": (b"", "is empty"),
        "garbage.flac": (b"fLaC" + b"\x01" * 200, "could not be decoded as audio"),
        "silent.wav": (wav(np.zeros(16_000, dtype=np.float32)), "is silent"),
        "nan.wav": (wav(np.where(np.arange(16_000) == 5, np.nan, tone).astype(np.float32)), "NaN or infinite"),
        "blip.wav": (wav(tone[:800]), "is too short"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(InputError, match=message):
            load_audio(write(tmp_path, name, data))
    with pytest.raises(InputError, match="longer than 0.5 s"):
        load_audio(write(tmp_path, "long.wav", wav(tone)), max_seconds=0.5)
    assert load_audio(write(tmp_path, "ok.wav", wav(tone))).wave.shape == (16_000,)
