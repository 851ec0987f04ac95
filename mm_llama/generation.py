"""Batched greedy / sampled decoding with a KV cache and media K/V computed once.

Shape legend: ``b`` batch, ``s`` prompt tokens, ``t`` generated tokens, ``v`` vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from adapters.prompt_reader import pad_prompts
from encoders.mllama_vision import TiledImages
from mm_llama.llama import KVCache
from mm_llama.model import MediaContext, MultimodalLlama


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists → ``ids [b, s]`` and ``mask [b, s]`` (True = real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = True
    return ids, mask


class RowReader:
    """The prompt reader's per-row tokens during generation (``PromptReaderConfig.every_row``).

    The reader is causal and its positions count from each text's first token, so it reads the
    unpadded prompts (right-padded, :func:`pad_prompts`) and the prefill's rows are shifted into
    the left-padded layout; each decode step reads prompt + generated ids again and keeps the last
    row (the decoder is two small blocks: re-reading costs far less than one LM step).

    Args:
        model: a model whose reader has ``every_row``.
        prompts: the ``b`` prompts as given to :func:`generate`.
        images: ``[b, 3, H, W]`` on the model's device (encoded once here).
    """

    def __init__(self, model: MultimodalLlama, prompts: Sequence[Sequence[int]], images: torch.Tensor) -> None:
        self.model, self.prompts = model, [list(p) for p in prompts]
        self.encoded = model.image_encoder(images)
        self.tokens, self.mask = model.image_projection(self.encoded.tokens), self.encoded.mask  # [b, s_e, d], [b, s_e]
        self.max_len = model.prompt_reader.cfg.max_len
        self.device = images.device

    def prefill(self, width: int) -> torch.Tensor:
        """``[b, width, d]``: each prompt row's token, right-aligned as :func:`left_pad` aligns prompts."""
        ids, lengths = (t.to(self.device) for t in pad_prompts(self.prompts))
        rows = self.model.read_rows(ids, self.encoded)  # [b, s, d], row j of prompt i at column j
        column = torch.arange(width, device=self.device)[None] - (width - lengths)[:, None]  # [b, width]
        gathered = rows.gather(1, column.clamp(min=0)[..., None].expand(-1, -1, rows.shape[-1]))
        return gathered * (column >= 0)[..., None].to(rows.dtype)  # left padding: zero tokens, never seen

    def step(self, generated: torch.Tensor) -> torch.Tensor:
        """``[b, 1, d]``: the token of each row's newest id (``generated [b, t]``, the last just fed).

        Texts longer than the decoder's ``max_len`` are read over their last ``max_len`` ids."""
        texts = [(p + g)[-self.max_len:] for p, g in zip(self.prompts, generated.tolist())]
        ids, lengths = (t.to(self.device) for t in pad_prompts(texts))
        read = self.model.prompt_reader(ids, lengths, self.encoded.tokens, self.encoded.mask)  # [b, w]
        return self.model.prompt_projection(read)[:, None]


class StaticStep:
    """One decode step with static shapes, captured once as a CUDA graph and replayed on CUDA.

    A small model's decoding is bound by launching its many small kernels from Python, not by the
    GPU (stop 16's H100 profile of a training step: the GPU was busy 16 % of it). Here every step runs the same
    kernels on the same buffers: the next ids, the rotary positions ``[b, 1]``, the key mask
    ``[b, max_len]`` and the write offset of the :class:`KVCache` (``cache.offset``) live on the
    device and are updated in place; self-attention reads the whole cache under the mask. On
    CUDA the step's forward is captured as a :class:`torch.cuda.CUDAGraph` at the first call and
    replayed after; elsewhere it runs eagerly (a test path: it attends over the whole buffer, so
    it is slower than the growing cache).

    Args:
        model: the fused model; its forward for one token may not read device values on the host.
        cache: the prefill's cache (``length`` filled positions); switched to static writes.
        key_padding_mask: the prefill's ``[b, s]`` (True = attended).
        positions: the prefill's rotary positions ``[b, s]``.
        seen_media: ``[b, 1]`` whether the new tokens see the media (``None``: no media).
        media: the media context, the same at every step.
    """

    def __init__(self, model: MultimodalLlama, cache: KVCache, key_padding_mask: torch.Tensor,
                 positions: torch.Tensor, seen_media: torch.Tensor | None, media: MediaContext | None) -> None:
        b, s = key_padding_mask.shape
        device = key_padding_mask.device
        self.model, self.cache, self.seen_media, self.media = model, cache, seen_media, media
        self.keys = torch.zeros(b, cache.max_len, dtype=torch.bool, device=device)  # [b, max_len]
        self.keys[:, :s] = key_padding_mask
        self.positions = positions[:, -1:] + 1  # [b, 1]
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=device)  # [b, 1]
        cache.offset = torch.tensor([cache.length], device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None  # the graph's output [b, 1, d]

    def _forward(self) -> torch.Tensor:
        return self.model.hidden_states(self.ids, self.media, row_mask=self.seen_media, positions=self.positions,
                                        attn_mask=self.keys[:, None, None, :], cache=self.cache)

    def _capture(self) -> None:
        # Autocast's weight-cast cache must stay off: casts made under capture live in the graph's pool.
        autocast = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                    if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            self._forward()  # warm-up (lazy inits, cuBLAS handles); it writes what the replay rewrites
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), autocast:
            self.hidden = self._forward()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids [b]``; return their final-normed hidden states ``[b, 1, d]`` (the graph's
        output buffer on CUDA: read it before the next call)."""
        self.ids.copy_(ids[:, None])
        self.keys.index_fill_(1, self.cache.offset, True)  # the new token sees itself
        if self.keys.device.type == "cuda":
            if self.graph is None:
                self._capture()
            self.graph.replay()
            hidden = self.hidden
        else:
            hidden = self._forward()
        self.cache.offset += 1
        self.positions += 1
        return hidden


def use_static_step(static_cache: bool | None, device: torch.device, every_row: bool, cache_media_kv: bool) -> bool:
    """Whether :func:`generate` decodes with :class:`StaticStep`; ``None`` decides: on a CUDA
    device, with the media K/V fixed for the request, outside a process group (FSDP gathers
    weights with collectives at every forward)."""
    possible = not every_row and cache_media_kv
    if static_cache is None:
        return possible and device.type == "cuda" and not (dist.is_available() and dist.is_initialized())
    if static_cache and not possible:
        raise ValueError("static_cache=True needs media K/V that stay fixed during the request: "
                         "not with a prompt reader that reads every row, nor with cache_media_kv=False")
    return static_cache


def check_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Raise ``ValueError`` naming the first decoding setting out of range."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """``logits [b, v]`` → next ids ``[b]`` (greedy when ``temperature == 0``)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: MultimodalLlama,
    prompts: Sequence[Sequence[int]],
    images: torch.Tensor | TiledImages | None = None,
    *,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    cache_media_kv: bool = True,
    stop_early: bool = True,
    videos: torch.Tensor | None = None,
    frame_mask: torch.Tensor | None = None,
    static_cache: bool | None = None,
) -> list[list[int]]:
    """Continue each prompt; media are encoded once and their K/V reused at every step.

    Args:
        model: the fused model (its LM provides the KV cache layout).
        prompts: ``b`` token-id lists (each containing the media placeholder when ``images`` is given).
        images: ``[b, 3, H, W]`` (:class:`~encoders.mllama_vision.TiledImages` for the tiled
            encoder) or ``None`` for the text-only path.
        max_new_tokens: generation budget per prompt (>= 0).
        stop_ids: a sequence ends at the first of these (not included in the output).
        pad_id: id used for left padding (never attended).
        temperature: 0 is greedy; above 0, samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling mass in ``(0, 1]`` (ignored when greedy).
        seed: seed of the sampling generator (``None``: torch's global generator).
        on_token: called with each step's ids ``[b]`` (streaming); a finished row gets ``pad_id``.
        on_logits: called with each step's next-token logits ``[b, v]`` before picking.
        cache_media_kv: ``False`` recomputes every cross-attention block's media K/V from the
            encoded media tokens at every forward (prefill and each decode step); the result is
            the same, only slower. It exists to measure what the cache saves (images only).
        stop_early: stop as soon as every row has stopped. ``False`` runs all ``max_new_tokens``
            steps anyway (same output): a model sharded with FSDP gathers its weights at every
            forward, together on every rank, so all ranks must run the same number of forwards.
        videos: ``[b, f, 3, H, W]`` clips instead of ``images`` (prompts hold ``<|video|>``).
        frame_mask: ``[b, f]`` bool, True on real frames; ``None``: all real.
        static_cache: decode with :class:`StaticStep` (static shapes; one CUDA graph replayed per
            token on CUDA). ``None``: on a CUDA device when the media K/V stay fixed and no
            process group is running. The tokens are the same either way.

    Returns:
        The generated ids of each prompt, without the prompt and the stop token.

    Raises:
        ValueError: empty or mismatched inputs, or settings out of range.
    """
    check_settings(max_new_tokens, temperature, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    if videos is not None and videos.shape[0] != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {videos.shape[0]} videos")
    device = model.lm.embed_tokens.weight.device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    b, s = ids.shape
    media: MediaContext | None = None
    reader = RowReader(model, prompts, images.to(device)) if images is not None and model.reads_every_row else None
    if reader is not None:
        tokens, media_mask = reader.tokens, reader.mask
        media = model.media_kv(tokens, media_mask)
    elif images is not None:
        read = None if model.prompt_reader is None else tuple(t.to(device) for t in pad_prompts(prompts))
        tokens, media_mask = model.encode_images(images.to(device), read)  # [b, s_e, d], [b, s_e]
        media = model.media_kv(tokens, media_mask)
    elif videos is not None:
        media = model.video_context(videos.to(device), None if frame_mask is None else frame_mask.to(device))

    def media_for_step(generated: torch.Tensor | None = None) -> MediaContext | None:
        step = media
        if media is not None and not cache_media_kv and images is not None:
            step = model.media_kv(tokens, media_mask)
        if reader is not None:
            step = step.with_row_tokens(reader.prefill(s) if generated is None else reader.step(generated))
        return step

    static = use_static_step(static_cache, device, reader is not None, cache_media_kv)
    cache = KVCache(model.lm.cfg, b, s + max_new_tokens, device=device, dtype=model.lm.embed_tokens.weight.dtype)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [b, s]
    row_mask = model.media_rows(ids)  # [b, s]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    hidden = model.hidden_states(ids, media_for_step(), row_mask=row_mask, positions=positions,
                                 key_padding_mask=mask, cache=cache)
    return decode_loop(model, hidden, cache=cache, key_padding_mask=mask, positions=positions,
                       seen_media=row_mask[:, -1:], media_for_step=media_for_step, max_new_tokens=max_new_tokens,
                       stop_ids=stop_ids, pad_id=pad_id, generator=generator, temperature=temperature, top_p=top_p,
                       on_token=on_token, on_logits=on_logits, stop_early=stop_early,
                       static_step=StaticStep(model, cache, mask, positions, row_mask[:, -1:], media) if static else None)


def decode_loop(
    model: MultimodalLlama,
    hidden: torch.Tensor,
    *,
    cache: KVCache,
    key_padding_mask: torch.Tensor,
    positions: torch.Tensor,
    seen_media: torch.Tensor | None,
    media_for_step: Callable[[torch.Tensor], MediaContext | None],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator | None,
    temperature: float,
    top_p: float,
    on_token: Callable[[torch.Tensor], None] | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    stop_early: bool = True,
    static_step: StaticStep | None = None,
) -> list[list[int]]:
    """Pick and feed tokens after a prefill, whatever the media and their fusion.

    Args:
        hidden: the prefill's hidden states ``[b, s, d]``; ``cache`` holds its keys and values.
        key_padding_mask: the prefill's ``[b, s]`` (True = attended), grown by one column a step.
        positions: the prefill's rotary positions ``[b, s]``; new tokens continue from the last.
        seen_media: ``[b, 1]``, whether each row's new tokens see the media (``None``: no media).
        media_for_step: the media K/V for the next forward (the cached context, or recomputed),
            given the ids generated so far ``[b, t]`` (per-row media depend on them).
        static_step: feeds the tokens instead of a growing cache and mask (built on ``cache``
            after the prefill); ``media_for_step`` is then not called.
        Others: as in :func:`generate`.

    Returns:
        The generated ids of each row, cut before its first stop token.
    """
    b, device = hidden.shape[0], hidden.device
    mask, next_pos = key_padding_mask, positions[:, -1:] + 1  # [b, s], [b, 1]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for index in range(max_new_tokens):
        logits = model.lm.logits(hidden[:, -1])  # [b, v]
        if on_logits is not None:
            on_logits(logits)
        nxt = _pick(logits, temperature, top_p, generator)  # [b]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        done = done | torch.isin(nxt, stops)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if (stop_early and bool(done.all())) or index == max_new_tokens - 1:
            break  # no forward for a token nobody will read
        if static_step is not None:
            hidden = static_step(nxt)
            continue
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        hidden = model.hidden_states(nxt[:, None], media_for_step(out), row_mask=seen_media, positions=next_pos,
                                     key_padding_mask=mask, cache=cache)
        next_pos = next_pos + 1
    stop_set = set(stop_ids)
    return [row[: next((j for j, t in enumerate(row) if t in stop_set), len(row))] for row in out.tolist()]
