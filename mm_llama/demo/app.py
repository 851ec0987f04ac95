"""The gradio page: ``mm-llama demo --checkpoint CKPT [--host 127.0.0.1 --port 7860]``.

Layout only; what a click does is :func:`mm_llama.demo.handlers.respond`. The page's
API (for ``gradio_client``) is ``/generate`` with the inputs ``image``, ``video``,
``audio`` (file paths), ``prompt``, ``max_new_tokens``, ``temperature``, ``top_p``,
returning ``(answer, status)``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from mm_llama.demo.handlers import (MAX_NEW_TOKENS_LIMIT, preview, preview_audio, preview_video, respond,
                                    unavailable_note, write_examples)
from mm_llama.inference import Assistant, GenerationSettings
from mm_llama.inputs import (AUDIO_SUFFIXES, IMAGE_SUFFIXES, MAX_AUDIO_BYTES, MAX_IMAGE_BYTES, MAX_VIDEO_BYTES,
                             MEDIA_KINDS, VIDEO_SUFFIXES)

TITLE = "mm-llama: ask a frozen Llama about an image, a video or speech"

ACCEPTS = {
    "image": (IMAGE_SUFFIXES, MAX_IMAGE_BYTES),
    "video": (VIDEO_SUFFIXES, MAX_VIDEO_BYTES),
    "audio": (AUDIO_SUFFIXES, MAX_AUDIO_BYTES),
}


def _label(kind: str, available: bool) -> str:
    suffixes, max_bytes = ACCEPTS[kind]
    if not available:
        return f"{kind.capitalize()}: not available (this checkpoint has no {MEDIA_KINDS[kind]} adapter)"
    return f"{kind.capitalize()} ({', '.join(suffixes)}; up to {max_bytes // 2**20} MiB)"


def build_app(assistant: Assistant, examples_dir: str | Path | None = None, n_examples: int = 4) -> gr.Blocks:
    """The demo page for ``assistant``.

    One input per media kind; a kind the checkpoint has no adapter for is shown closed and
    labelled unavailable (an upload there gets a message, not an answer). Each input shows
    what the model will read: the image, the sampled video frames in order, the 16 kHz audio.

    Args:
        assistant: the loaded checkpoint.
        examples_dir: where to write the example media (default: a new temporary directory).
        n_examples: how many built-in samples to offer per available kind.
    """
    examples_dir = Path(examples_dir or tempfile.mkdtemp(prefix="mm-llama-demo-"))
    available = {kind: MEDIA_KINDS[kind] in assistant.modalities for kind in ACCEPTS}
    defaults = GenerationSettings()
    reads = ", ".join(assistant.modalities) or "text only"
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nThis checkpoint reads **{reads}**. Upload one media file, ask about it, and "
                    "watch the answer stream in. Without media the frozen LM answers alone.")
        inputs: dict[str, gr.File] = {}
        with gr.Row():
            with gr.Column():
                with gr.Accordion("Image", open=available["image"]):
                    inputs["image"] = gr.File(label=_label("image", available["image"]), type="filepath",
                                              elem_id="image-input")
                    shown = gr.Image(label="Image as read", interactive=False, height=224, elem_id="image-preview")
                with gr.Accordion("Video", open=available["video"]):
                    inputs["video"] = gr.File(label=_label("video", available["video"]), type="filepath",
                                              elem_id="video-input")
                    frames = gr.Gallery(label="Frames as read, in order", columns=8, height=120,
                                        elem_id="video-preview")
                with gr.Accordion("Audio", open=available["audio"]):
                    inputs["audio"] = gr.File(label=_label("audio", available["audio"]), type="filepath",
                                              elem_id="audio-input")
                    heard = gr.Audio(label="Audio as heard (16 kHz mono)", interactive=False,
                                     elem_id="audio-preview")
                if note := unavailable_note(assistant):
                    gr.Markdown(note)
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="Describe the image.", lines=2, elem_id="prompt")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=defaults.max_new_tokens, step=1,
                                               label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                            label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                submit = gr.Button("Generate", variant="primary", elem_id="generate")
                answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer")
                status = gr.Markdown(elem_id="status")
        for kind, what in (("image", "Scenes"), ("video", "Clips"), ("audio", "Utterances")):
            if available[kind]:
                size = max(64, assistant.image_size or 64)
                examples = write_examples(kind, examples_dir, n_examples, image_size=size)
                gr.Examples(examples, inputs=[inputs[kind], prompt], label=f"{what} from the built-in {kind} dataset")

        private = {"api_visibility": "private"}
        inputs["image"].change(preview, inputs=inputs["image"], outputs=[shown, status], **private)
        inputs["video"].change(functools.partial(preview_video, assistant), inputs=inputs["video"],
                               outputs=[frames, status], **private)
        inputs["audio"].change(functools.partial(preview_audio, assistant), inputs=inputs["audio"],
                               outputs=[heard, status], **private)
        request = [inputs["image"], inputs["video"], inputs["audio"], prompt, max_new_tokens, temperature, top_p]
        run = functools.partial(respond, assistant)
        submit.click(run, inputs=request, outputs=[answer, status], api_name="generate")
        prompt.submit(run, inputs=request, outputs=[answer, status], **private)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> gr.Blocks:
    """Serve ``app`` (one request at a time: generation uses every core).

    ``block=False`` returns once the server is up (tests, notebooks); ``app.close()`` stops it.
    """
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False,
               max_file_size=max(MAX_IMAGE_BYTES, MAX_VIDEO_BYTES, MAX_AUDIO_BYTES), footer_links=["api"], quiet=not block)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-llama demo", description="Serve the gradio demo for an adapter checkpoint.")
    p.add_argument("--checkpoint", required=True, help="adapter checkpoint (e.g. runs/image/adapter.ckpt)")
    p.add_argument("--lm", default=None, help="frozen LM source overriding the checkpoint's (sha256-checked)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mm-llama demo``: load the checkpoint and serve until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        assistant = Assistant.from_checkpoint(args.checkpoint, lm=args.lm)
    except (FileNotFoundError, ValueError) as exn:
        print(f"mm-llama demo: {exn}", file=sys.stderr)
        return 1
    launch(build_app(assistant), args.host, args.port)
    return 0
