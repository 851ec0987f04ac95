"""The gradio demo: ``mm-llama demo --checkpoint CKPT``.

:mod:`mm_llama.demo.handlers` holds the request logic as plain functions (testable
without a browser or gradio); :mod:`mm_llama.demo.app` lays out the page and serves it.
"""
