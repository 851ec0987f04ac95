"""A checkpoint answers in text: rebuilt model, prompts, images, streaming, the
``mm-llama generate`` command and input validation (tiny random LM, tiny checkpoint)."""

from __future__ import annotations

import io
import re
import json

import PIL.Image
import pytest
import torch

import mm_llama
from mm_llama import inputs
from mm_llama.cli import main as cli_main
from mm_llama.data.scenes import make_sample
from mm_llama.generation import generate
from mm_llama.inference import Assistant, GenerationSettings
from mm_llama.inputs import InputError, load_image


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def scene(index: int, size: int = 64) -> tuple[PIL.Image.Image, str]:
    sample = make_sample(0, "test", index, image_size=size)
    return PIL.Image.open(io.BytesIO(sample["png"])), json.loads(sample["json"])["prompt"]


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    paths = []
    for i in range(2):
        image, _ = scene(i)
        image.save(root / f"scene-{i}.png")
        paths.append(root / f"scene-{i}.png")
    return paths


SHORT = GenerationSettings(max_new_tokens=6)


def test_package_exports_generate():
    assert mm_llama.generate is generate
    assert mm_llama.Assistant is Assistant


def test_checkpoint_rebuilds_the_trained_weights(assistant, tiny_checkpoint):
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    rebuilt = assistant.model.trainable_state_dict()
    assert {f"model.{k}" for k in rebuilt} == set(saved)
    assert all(torch.equal(rebuilt[k[len("model."):]], v) for k, v in saved.items())
    assert not assistant.model.training
    gates = [float(b.attn_gate.detach()) for b in assistant.model.cross_attn.values()]
    assert gates and all(abs(g) > 0.1 for g in gates)  # opened in the fixture: the image matters


def test_prompt_ids_hold_the_image_token_once_or_not_at_all(assistant):
    media = assistant.model.media_token_id("image")
    assert assistant.prompt_ids("Describe the image.", "image").count(media) == 1
    assert media not in assistant.prompt_ids("Describe the image.")


def test_answer_depends_on_the_image_and_equals_the_low_level_generate(assistant):
    images = [scene(i)[0] for i in range(4)]
    prompt = scene(0)[1]
    a = images[0]
    answers = assistant.generate([prompt] * len(images), images, SHORT)
    assert len(set(answers)) > 1  # a tiny random model, but the media path changes its output
    ids = assistant.prompt_ids(prompt, "image")
    pixels = assistant.image_tensor(a)[None]  # [1, 3, H, W]
    low = generate(assistant.model, [ids], pixels, max_new_tokens=6, stop_ids=assistant.tokenizer.stop_ids,
                   pad_id=assistant.tokenizer.pad_id)
    assert answers[0] == assistant.tokenizer.decode(low[0])


def test_mixed_batch_matches_single_requests(assistant, scene_files):
    prompts = ["Describe the image.", "How many shapes are there?"]
    batch = assistant.generate(prompts, [scene_files[0], None], SHORT)
    assert batch[0] == assistant.generate(prompts[:1], [scene_files[0]], SHORT)[0]
    assert batch[1] == assistant.generate(prompts[1:], None, SHORT)[0]  # text-only path


def test_stream_yields_growing_text_ending_in_the_answer(assistant, scene_files):
    steps = list(assistant.stream("Describe the image.", scene_files[1], SHORT))
    assert steps and steps[-1] == assistant.generate(["Describe the image."], [scene_files[1]], SHORT)[0]
    assert len(steps) >= 2 and all(len(x) <= len(y) for x, y in zip(steps, steps[1:]))


def test_stream_rejects_bad_input_before_generating(assistant, tmp_path):
    with pytest.raises(InputError, match="prompt is empty"):
        next(assistant.stream("   "))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="not an accepted image type"):
        next(assistant.stream("hi", tmp_path / "x.txt"))


def test_sampling_settings_reach_the_decoder(assistant, scene_files):
    hot = GenerationSettings(max_new_tokens=8, temperature=5.0, seed=1)
    first = assistant.generate(["Describe the image."], [scene_files[0]], hot)
    assert first == assistant.generate(["Describe the image."], [scene_files[0]], hot)
    others = {assistant.generate(["Describe the image."], [scene_files[0]], GenerationSettings(8, 5.0, 1.0, s))[0]
              for s in (2, 3, 4)}
    assert others - set(first)


def test_checkpoint_for_another_lm_is_refused(tiny_checkpoint, tiny_lm_dir, tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        Assistant.from_checkpoint(tiny_checkpoint, lm=str(tiny_lm_dir))  # a different random LM
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Assistant.from_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0)])
def test_generation_settings_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GenerationSettings(**bad)


# --------------------------------------------------------------------------- mm-llama generate


def test_cli_generate_prints_the_answer(tiny_checkpoint, scene_files, assistant, capsys):
    code = cli_main(["generate", "--checkpoint", str(tiny_checkpoint), "--image", str(scene_files[0]),
                     "--max-new-tokens", "6", "Describe the image."])
    assert code == 0
    expected = assistant.generate(["Describe the image."], [scene_files[0]], SHORT)[0]
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("flag,suffix,message", [
    ("--video", "mp4", r"video input is not available: this checkpoint has no video adapter \(it reads image\)"),
    ("--audio", "flac", r"audio \(speech\) input is not available: this checkpoint has no speech adapter"),
])
def test_cli_generate_refuses_video_and_audio_clearly(tiny_checkpoint, tmp_path, capsys, flag, suffix, message):
    media = tmp_path / f"clip.{suffix}"
    media.write_bytes(b"\0" * 16)
    with pytest.raises(SystemExit) as info:
        cli_main(["generate", "--checkpoint", str(tiny_checkpoint), flag, str(media), "What is said?"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_cli_generate_reports_bad_image_and_missing_checkpoint(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["generate", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "no.png"), "hi"])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "none.ckpt"), "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- input validation


def test_load_image_accepts_a_real_image_fully_decoded(scene_files):
    image = load_image(scene_files[0])
    assert image.size == (64, 64) and image.getbbox() is not None


def test_load_image_rejects_wrong_type_empty_truncated_and_garbage(tmp_path, scene_files):
    cases = {"notes.txt": b"hello", "empty.png": b"", "garbage.jpg": b"\xff\xd8 not really a jpeg",
             "truncated.png": scene_files[0].read_bytes()[:100]}
    messages = {"notes.txt": "not an accepted image type", "empty.png": "is empty",
                "garbage.jpg": "could not be read", "truncated.png": "could not be read"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=messages[name]):
            load_image(tmp_path / name)


def test_load_image_rejects_oversized_files_and_pixel_counts(tmp_path, monkeypatch, scene_files):
    monkeypatch.setattr(inputs, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(InputError, match="MiB; images up to"):
        load_image(scene_files[0])
    monkeypatch.setattr(inputs, "MAX_IMAGE_BYTES", 2**20)
    monkeypatch.setattr(inputs, "MAX_IMAGE_PIXELS", 32 * 32)
    with pytest.raises(InputError, match="64x64 pixels; at most 1,024"):
        load_image(scene_files[0])


def test_prompt_checks():
    assert inputs.check_prompt("  What colour?  ") == "What colour?"
    for bad in ("", "   \n", None):
        with pytest.raises(InputError, match="empty"):
            inputs.check_prompt(bad)
    with pytest.raises(InputError, match="characters"):
        inputs.check_prompt("x" * (inputs.MAX_PROMPT_CHARS + 1))
