"""Turn a (prompt, response) pair into token ids and response-only labels.

The chat template of the frozen LM renders the conversation; the media
placeholder string (``<|image|>``) that was prepended to the user message is then
cut out of the rendered text and replaced by ``media_token_id``. That id lies
*outside* the frozen vocabulary (``>= vocab_size``): it indexes the small
trainable fusion embedding, so the LM's own embedding table is never resized
(DESIGN §2, torchtune's ``FusionEmbedding``).

Loss is on the response only (DESIGN §5): the labels are ``-100`` on the system
and user turns, on the media token and on the generation prompt, and equal the
input ids on the response tokens and the end-of-turn token that closes the
assistant turn (so the model learns to stop). Labels are *not* shifted; the
loss shifts them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

IGNORE_INDEX = -100
DEFAULT_MEDIA_PLACEHOLDER = "<|image|>"
CAPTION_PROMPT = "Describe the image."  # the fixed prompt of a `txt` caption sample (DESIGN §6)


@runtime_checkable
class ChatTokenizer(Protocol):
    """What the data code needs from a tokenizer (``mm_llama.tokenizer`` provides it).

    Read-only properties, so that plain attributes satisfy the protocol too.
    """

    @property
    def pad_id(self) -> int:
        """Id used to right-pad batches (never receives loss)."""
        ...

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn (end-of-turn / end-of-text)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Rows of the frozen embedding; media ids start at or above it."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added; literal special tokens map to their ids."""
        ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> str:
        """Render ``[{"role", "content"}, ...]`` with the model's chat template."""
        ...


class BadExample(ValueError):
    """The *data* cannot make an example (empty response, stray placeholder, too long).

    Distinct from a plain ``ValueError`` (bad arguments, unusable chat template),
    which is a configuration bug: the pipeline skips and counts ``BadExample``
    but lets a configuration bug stop the run.
    """


class ExampleTooLong(BadExample):
    """An encoded example exceeds ``max_len`` tokens.

    Examples are never truncated: cutting the prompt would drop the media token
    or the question, cutting the response would teach the model to stop early.
    The pipeline skips such samples and counts them as ``too_long``.
    """


def _messages(prompt: str, media_placeholder: str | None, system: str | None) -> list[dict[str, str]]:
    user = prompt if media_placeholder is None else media_placeholder + prompt
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user})
    return messages


def _encode_with_media(
    tok: ChatTokenizer, text: str, media_placeholder: str | None, media_token_id: int | None
) -> list[int]:
    """Encode ``text``, replacing its single ``media_placeholder`` by ``media_token_id``."""
    if media_placeholder is None:
        return tok.encode(text)
    before, after = text.split(media_placeholder)  # exactly one occurrence, checked by the caller
    return tok.encode(before) + [media_token_id] + tok.encode(after)


def _check_media_args(
    tok: ChatTokenizer, media_placeholder: str | None, media_token_id: int | None
) -> None:
    if media_placeholder is None:
        return
    if not media_placeholder:
        raise ValueError("media_placeholder must be a non-empty string or None")
    if media_token_id is None:
        raise ValueError(f"media_placeholder={media_placeholder!r} needs a media_token_id")
    if media_token_id < tok.vocab_size:
        raise ValueError(
            f"media_token_id={media_token_id} must be >= vocab_size={tok.vocab_size}: media ids "
            "index the trainable fusion embedding, not the frozen vocabulary"
        )


def _check_placeholder_count(text: str, media_placeholder: str | None) -> None:
    if media_placeholder is not None and text.count(media_placeholder) != 1:
        raise BadExample(
            f"expected exactly one {media_placeholder!r} in the rendered conversation, found "
            f"{text.count(media_placeholder)} (does the prompt, system or response contain it?)"
        )


def encode_prompt(
    tok: ChatTokenizer,
    prompt: str,
    media_placeholder: str | None = DEFAULT_MEDIA_PLACEHOLDER,
    media_token_id: int | None = None,
    system: str | None = None,
    max_len: int = 256,
) -> dict[str, torch.Tensor]:
    """Encode a prompt for generation, ending with the assistant generation prompt.

    Args:
        tok: tokenizer following :class:`ChatTokenizer`.
        prompt: user text (the media placeholder is prepended to it).
        media_placeholder: string marking the media position, or ``None`` for text only.
        media_token_id: id put at the placeholder position (``>= tok.vocab_size``).
        system: system message; ``None`` lets the template use its default.
        max_len: maximum number of tokens.

    Returns:
        ``{"input_ids": LongTensor[s]}``.

    Raises:
        ExampleTooLong: more than ``max_len`` tokens.
        BadExample: not exactly one placeholder in the render.
        ValueError: bad media arguments.
    """
    _check_media_args(tok, media_placeholder, media_token_id)
    text = tok.apply_chat_template(_messages(prompt, media_placeholder, system), add_generation_prompt=True)
    _check_placeholder_count(text, media_placeholder)
    ids = _encode_with_media(tok, text, media_placeholder, media_token_id)
    if len(ids) > max_len:
        raise ExampleTooLong(f"prompt has {len(ids)} tokens > max_len={max_len}")
    return {"input_ids": torch.tensor(ids, dtype=torch.long)}


def encode_example(
    tok: ChatTokenizer,
    prompt: str,
    response: str,
    media_placeholder: str | None = DEFAULT_MEDIA_PLACEHOLDER,
    media_token_id: int | None = None,
    system: str | None = None,
    max_len: int = 256,
) -> dict[str, torch.Tensor]:
    """Encode a training example with loss on the response only.

    The prefix (everything up to and including the generation prompt) is rendered
    with ``add_generation_prompt=True``; the full conversation with the assistant
    message. The prefix must be a string prefix of the full render; the rest is
    the response followed by the end-of-turn token (and whatever the template
    puts after it, e.g. a newline, which gets no loss).

    Args:
        tok: tokenizer following :class:`ChatTokenizer`.
        prompt: user text (the media placeholder is prepended to it).
        response: assistant text; must be non-empty.
        media_placeholder: string marking the media position, or ``None`` for text only.
        media_token_id: id put at the placeholder position (``>= tok.vocab_size``).
        system: system message; ``None`` lets the template use its default.
        max_len: maximum number of tokens; longer examples raise (never truncated).

    Returns:
        ``{"input_ids": LongTensor[s], "labels": LongTensor[s]}``.

    Raises:
        ExampleTooLong: more than ``max_len`` tokens (a :class:`BadExample`).
        BadExample: empty response, or not exactly one placeholder in the render.
        ValueError: bad media arguments, a template whose prefix render is not a
            prefix of the full render, or no end-of-turn token after the response.
    """
    if not response.strip():
        raise BadExample("response is empty; an example needs something to learn")
    _check_media_args(tok, media_placeholder, media_token_id)
    messages = _messages(prompt, media_placeholder, system)
    prefix = tok.apply_chat_template(messages, add_generation_prompt=True)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}])
    if not full.startswith(prefix):
        raise ValueError(
            "the chat template's generation prompt is not a prefix of the full conversation, so "
            f"the response cannot be located.\nprefix render: {prefix[-200:]!r}\n"
            f"full render:   {full[-200:]!r}"
        )
    _check_placeholder_count(full, media_placeholder)

    prompt_ids = _encode_with_media(tok, prefix, media_placeholder, media_token_id)
    answer_ids = tok.encode(full[len(prefix) :])
    stops = set(tok.stop_ids)
    end = next((i for i, t in enumerate(answer_ids) if t in stops), None)
    if end is None:
        raise ValueError(
            f"no end-of-turn token (stop_ids={tok.stop_ids}) after the response in "
            f"{full[len(prefix):]!r}"
        )
    if end == 0:
        raise BadExample(f"response {response!r} encodes to no tokens before the end-of-turn token")
    n = len(prompt_ids) + len(answer_ids)
    if n > max_len:
        raise ExampleTooLong(f"example has {n} tokens > max_len={max_len}")

    input_ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)  # [s]
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # [s]
    start = len(prompt_ids)
    labels[start : start + end + 1] = input_ids[start : start + end + 1]
    return {"input_ids": input_ids, "labels": labels}
