"""Greedy / sampled answers to prompts about speech, for both fusion modes.

The prefill differs by fusion: ``embedding`` splices the speech frames into the left-padded
prompt (so prompts grow by different amounts); ``cross_attention`` computes every block's
speech K/V once. Decoding then proceeds as in :func:`mm_llama.generation.generate`.

Shape legend: ``b`` batch, ``s`` prompt tokens, ``n`` audio samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mm_llama.generation import StaticStep, check_settings, decode_loop, left_pad, use_static_step
from mm_llama.llama import KVCache
from mm_llama.model import MultimodalLlama


@torch.no_grad()
def generate_from_speech(
    model: MultimodalLlama,
    prompts: Sequence[Sequence[int]],
    audio: torch.Tensor,
    audio_lengths: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    static_cache: bool | None = None,
) -> list[list[int]]:
    """Continue each prompt (holding one ``<|speech|>``) given ``audio [b, n]`` of ``audio_lengths [b]``.

    ``on_token`` (each step's ids ``[b]``, streaming), ``on_logits`` (each step's logits ``[b, v]``) and
    ``static_cache`` (one CUDA graph replayed per token; by default on CUDA outside process groups)
    are as in :func:`~mm_llama.generation.generate`.

    Returns:
        The generated ids of each prompt, without the prompt and the stop token.

    Raises:
        ValueError: empty or mismatched inputs, settings out of range.
    """
    check_settings(max_new_tokens, temperature, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_from_speech needs at least one prompt, and every prompt at least one token")
    if audio.shape[0] != len(prompts) or audio_lengths.shape[0] != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {audio.shape[0]} clips / {audio_lengths.shape[0]} lengths")
    device = model.lm.embed_tokens.weight.device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    audio, audio_lengths = audio.to(device), audio_lengths.to(device)
    b = ids.shape[0]
    dtype = model.lm.embed_tokens.weight.dtype
    media = None
    if model.cfg.speech_adapter.fusion == "embedding":
        spliced = model.splice_speech(ids, audio, audio_lengths, attention_mask=mask, left_pad=True)
        mask, positions = spliced.key_padding_mask, spliced.positions
        cache = KVCache(model.lm.cfg, b, mask.shape[1] + max_new_tokens, device=device, dtype=dtype)
        hidden = model.lm.decode(spliced.embeds, positions=positions, key_padding_mask=mask, cache=cache)
        seen_media = None
    else:
        media = model.media_kv(*model.encode_speech(audio, audio_lengths))
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [b, s]
        row_mask = model.media_rows(ids)  # [b, s]
        cache = KVCache(model.lm.cfg, b, ids.shape[1] + max_new_tokens, device=device, dtype=dtype)
        hidden = model.hidden_states(ids, media, row_mask=row_mask, positions=positions, key_padding_mask=mask,
                                     cache=cache)
        seen_media = row_mask[:, -1:]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    static = use_static_step(static_cache, device, every_row=False, cache_media_kv=True)
    return decode_loop(model, hidden, cache=cache, key_padding_mask=mask, positions=positions,
                       seen_media=seen_media, media_for_step=lambda generated: media, max_new_tokens=max_new_tokens,
                       stop_ids=stop_ids, pad_id=pad_id, generator=generator, temperature=temperature, top_p=top_p,
                       on_token=on_token, on_logits=on_logits,
                       static_step=StaticStep(model, cache, mask, positions, seen_media, media) if static else None)
