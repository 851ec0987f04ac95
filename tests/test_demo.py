"""The demo app: request logic as plain functions, the page's API through ``gradio_client``,
and the page itself in headless Chromium (tiny random LM, tiny checkpoint)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from mm_llama.demo.handlers import parse_request, preview, respond, unavailable_note, write_examples
from mm_llama.inference import GenerationSettings
from mm_llama.inputs import load_audio, load_video

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT_DIR = Path(__file__).resolve().parents[1] / "runs" / "demo-test"  # git-ignored, kept for a look


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return write_examples("image", tmp_path_factory.mktemp("examples"), n=3)


def answer_of(assistant, image, prompt, n=8):
    return assistant.generate([prompt], [image], GenerationSettings(max_new_tokens=n))[0]


# --------------------------------------------------------------------------- plain functions


def test_example_images_are_deterministic_dataset_scenes(examples, tmp_path):
    again = write_examples("image", tmp_path, n=3)
    assert [p for _, p in again] == [p for _, p in examples]
    assert all(Path(a).read_bytes() == Path(b).read_bytes() for (a, _), (b, _) in zip(again, examples))
    assert len({Path(a).read_bytes() for a, _ in examples}) == 3
    assert all(p.endswith("?") or p == "Describe the image." for _, p in examples)


@pytest.mark.parametrize("kind,ext,loader", [
    ("video", ".mp4", lambda path: load_video(path, 4).frames),
    ("audio", ".flac", lambda path: load_audio(path).wave),
])
def test_video_and_audio_examples_are_readable_dataset_samples(tmp_path, kind, ext, loader):
    examples = write_examples(kind, tmp_path, n=2)
    assert [Path(p).suffix for p, _ in examples] == [ext, ext] and all(prompt for _, prompt in examples)
    assert all(len(loader(p)) > 0 for p, _ in examples)  # what the inference path accepts
    assert write_examples(kind, tmp_path / "again", n=2)[0][1] == examples[0][1]


def test_an_image_checkpoint_says_video_and_audio_are_unavailable(assistant):
    assert assistant.modalities == ("image",)
    assert "video and audio input is **not available**" in unavailable_note(assistant)


def test_respond_streams_the_answer_then_reports_done(assistant, examples):
    image, prompt = examples[0]
    updates = list(respond(assistant, image, None, None, prompt, 8, 0.0, 1.0))
    answers = [a for a, _ in updates]
    assert answers[-1] == answer_of(assistant, image, prompt)
    assert len(updates) >= 3 and updates[-1][1].startswith("Done in") and "with the image" in updates[-1][1]


@pytest.mark.parametrize("field,value,message", [
    ("prompt", "  ", "the prompt is empty"),
    ("video", "clip.mp4", r"video input is not available: this checkpoint has no video adapter \(it reads image\)"),
    ("audio", "speech.flac", r"audio \(speech\) input is not available"),
    ("image", "notes.txt", "not an accepted image type"),
    ("image", "broken.png", "could not be read as an image"),
    ("temperature", -1, "temperature must be >= 0"),
    ("max_new_tokens", 10_000, "at most 256"),
])
def test_bad_requests_become_one_message(assistant, tmp_path, field, value, message):
    for name in ("clip.mp4", "speech.flac", "notes.txt", "broken.png"):
        (tmp_path / name).write_bytes(b"not media")
    request = dict(image=None, video=None, audio=None, prompt="Describe the image.", max_new_tokens=8,
                   temperature=0.0, top_p=1.0)
    request[field] = str(tmp_path / value) if isinstance(value, str) and "." in value else value
    updates = list(respond(assistant, **request))
    assert len(updates) == 1 and updates[0][0] == ""
    assert updates[0][1].startswith("⚠️") and re.search(message, updates[0][1])
    with pytest.raises(ValueError):
        parse_request(assistant, **request)


def test_preview_shows_the_image_or_says_why_not(examples, tmp_path):
    image, note = preview(examples[0][0])
    assert image is not None and image.size == (192, 192) and note == ""
    (tmp_path / "x.gif").write_bytes(b"GIF89a broken")
    image, note = preview(str(tmp_path / "x.gif"))
    assert image is None and "could not be read" in note
    assert preview(None) == (None, "")


# --------------------------------------------------------------------------- the served page


@pytest.fixture(scope="module")
def served(assistant, tmp_path_factory):
    """The app on 127.0.0.1 (a free port gradio picks), closed after the module."""
    from mm_llama.demo.app import build_app, launch

    app = launch(build_app(assistant, tmp_path_factory.mktemp("served-examples"), n_examples=2), block=False)
    yield app
    app.close()


def test_gradio_client_calls_the_generate_api(served, assistant, examples):
    from gradio_client import Client, handle_file

    client = Client(served.local_url, verbose=False)
    image, prompt = examples[1]
    answer, status = client.predict(handle_file(image), None, None, prompt, 8, 0.0, 1.0, api_name="/generate")
    assert answer == answer_of(assistant, image, prompt) and status.startswith("Done in")
    answer, status = client.predict(None, None, None, "", 8, 0.0, 1.0, api_name="/generate")
    assert answer == "" and "prompt is empty" in status


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        message = f"{CHROMIUM} / {CHROMEDRIVER} missing: apt-get install -y chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    # Explicit driver path: Selenium Manager never tries to download a browser or driver.
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def test_browser_uploads_an_image_and_sees_the_answer(served, assistant, examples):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image, prompt = examples[2]
    driver = chrome()
    try:
        driver.get(served.local_url)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image-input input[type=file]"))
        upload.send_keys(image)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-preview img"))  # read and shown back
        driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(prompt)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "Done in" in d.find_element(By.CSS_SELECTOR, "#status").text)
        shown = driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        page = driver.find_element(By.TAG_NAME, "body").text
        shot = SCREENSHOT_DIR / "demo-page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
    expected = answer_of(assistant, image, prompt, n=GenerationSettings().max_new_tokens)  # the page's default
    assert shown.strip() and shown == expected
    assert "This checkpoint reads image" in page and "video and audio input is not available" in page, page
    assert shot.stat().st_size > 10_000
