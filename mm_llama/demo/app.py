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

from mm_llama.demo.handlers import MAX_NEW_TOKENS_LIMIT, UNAVAILABLE_NOTE, preview, respond, write_example_images
from mm_llama.inference import Assistant, GenerationSettings
from mm_llama.inputs import IMAGE_SUFFIXES, MAX_IMAGE_BYTES

TITLE = "mm-llama: ask a frozen Llama about an image"


def build_app(assistant: Assistant, examples_dir: str | Path | None = None, n_examples: int = 4) -> gr.Blocks:
    """The demo page for ``assistant``.

    Args:
        assistant: the loaded checkpoint.
        examples_dir: where to write the example scenes (default: a new temporary directory).
        n_examples: how many built-in scenes to offer as examples.
    """
    examples_dir = Path(examples_dir or tempfile.mkdtemp(prefix="mm-llama-demo-"))
    examples = write_example_images(examples_dir, n_examples, image_size=max(64, assistant.image_size))
    defaults = GenerationSettings()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nUpload an image ({', '.join(IMAGE_SUFFIXES)}, up to "
                    f"{MAX_IMAGE_BYTES // 2**20} MiB), ask about it, and watch the answer stream in. "
                    "Without an image the frozen LM answers alone.")
        with gr.Row():
            with gr.Column():
                image = gr.File(label="Image", type="filepath", elem_id="image-input")
                shown = gr.Image(label="Image as read", interactive=False, height=224, elem_id="image-preview")
                with gr.Accordion("Video and audio (not available yet)", open=False):
                    gr.Markdown(UNAVAILABLE_NOTE)
                    video = gr.File(label="Video: not available yet (no video adapter)", type="filepath",
                                    elem_id="video-input")
                    audio = gr.File(label="Audio: not available yet (no speech adapter)", type="filepath",
                                    elem_id="audio-input")
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
        gr.Examples(examples, inputs=[image, prompt], label="Scenes from the built-in dataset")

        image.change(preview, inputs=image, outputs=[shown, status], api_visibility="private")
        inputs = [image, video, audio, prompt, max_new_tokens, temperature, top_p]
        run = functools.partial(respond, assistant)
        submit.click(run, inputs=inputs, outputs=[answer, status], api_name="generate")
        prompt.submit(run, inputs=inputs, outputs=[answer, status], api_visibility="private")
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> gr.Blocks:
    """Serve ``app`` (one request at a time: generation uses every core).

    ``block=False`` returns once the server is up (tests, notebooks); ``app.close()`` stops it.
    """
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False,
               max_file_size=MAX_IMAGE_BYTES, footer_links=["api"], quiet=not block)
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
