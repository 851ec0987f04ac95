"""encode_example / encode_prompt against a tiny real BPE tokenizer with a ChatML template.

``ChatMLTestTokenizer`` is also used by ``test_data_pipeline.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mm_llama.data.examples import (
    IGNORE_INDEX,
    BadExample,
    ChatTokenizer,
    ExampleTooLong,
    encode_example,
    encode_prompt,
)

DEFAULT_SYSTEM = "You are a helpful assistant."
CORPUS = [
    "Describe the image. A red square in the top left and a blue circle in the center.",
    "What colour is the shape in the bottom right? green yellow purple orange pink white",
    "How many shapes are there? one two three. Where is the star triangle diamond?",
    "system user assistant You are a helpful assistant.",
]


class ChatMLTestTokenizer:
    """Minimal :class:`ChatTokenizer`: byte-level BPE + SmolLM2's ChatML template,
    including its default system prompt when none is given."""

    def __init__(self) -> None:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(CORPUS, trainer)
        self.backend = backend
        self.im_start = backend.token_to_id("<|im_start|>")
        self.im_end = backend.token_to_id("<|im_end|>")
        self.pad_id = self.im_end  # as SmolLM2
        self.stop_ids = [self.im_end, backend.token_to_id("<|endoftext|>")]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@functools.cache
def chat_tokenizer() -> ChatMLTestTokenizer:
    return ChatMLTestTokenizer()


@pytest.fixture
def tok() -> ChatMLTestTokenizer:
    return chat_tokenizer()


def test_helper_follows_protocol(tok):
    assert isinstance(tok, ChatTokenizer)
    assert tok.encode("<|im_start|>user")[0] == tok.im_start  # literal special tokens map to ids


def test_labels_cover_response_and_end_of_turn_only(tok):
    media = tok.vocab_size + 3
    out = encode_example(tok, "Describe the image.", "A red square in the top left.", media_token_id=media)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape

    answer = tok.encode("A red square in the top left.")
    supervised = labels != IGNORE_INDEX
    assert labels[supervised].tolist() == answer + [tok.im_end]
    assert torch.equal(labels[supervised], ids[supervised])
    # The supervised span is contiguous and followed only by the template's trailing newline.
    first = int(supervised.nonzero()[0])
    assert supervised[first:].tolist() == [True] * (len(answer) + 1) + [False] * (len(ids) - first - len(answer) - 1)
    assert tok.decode(ids[first + len(answer) + 1 :].tolist()) == "\n"
    # The prompt is what the generation prompt renders.
    assert tok.decode(ids[:first].tolist()).endswith("<|im_start|>assistant\n")


def test_media_token_sits_right_after_user_turn_start(tok):
    media = tok.vocab_size
    out = encode_example(tok, "Where is the red square?", "top left", media_token_id=media)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    user_start = tok.encode("<|im_start|>user\n")
    starts = [i for i in range(len(ids)) if ids[i : i + len(user_start)] == user_start]
    assert len(starts) == 1
    pos = starts[0] + len(user_start)
    assert ids[pos] == media and ids.count(media) == 1
    assert labels[pos] == IGNORE_INDEX
    assert tok.decode(ids[pos + 1 : pos + 1 + len(tok.encode("Where"))]) == "Where"


def test_system_prompt_and_text_only(tok):
    out = encode_example(tok, "How many shapes are there?", "two", media_placeholder=None, system="Be brief.")
    text = tok.decode(out["input_ids"].tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow many")
    assert DEFAULT_SYSTEM not in text
    assert all(i < tok.vocab_size for i in out["input_ids"].tolist())


def test_encode_prompt_is_prefix_of_example(tok):
    media = tok.vocab_size + 1
    prompt = encode_prompt(tok, "Describe the image.", media_token_id=media)["input_ids"]
    full = encode_example(tok, "Describe the image.", "A blue star in the center.", media_token_id=media)
    assert torch.equal(full["input_ids"][: len(prompt)], prompt)
    assert (full["labels"][: len(prompt)] == IGNORE_INDEX).all()
    assert full["labels"][len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("response", ["", "   \n"])
def test_empty_response_raises(tok, response):
    with pytest.raises(ValueError, match="empty"):
        encode_example(tok, "Describe the image.", response, media_token_id=tok.vocab_size)


def test_bad_inputs_raise(tok):
    with pytest.raises(ValueError, match="vocab_size"):
        encode_example(tok, "Describe the image.", "red", media_token_id=5)
    with pytest.raises(ValueError, match="media_token_id"):
        encode_example(tok, "Describe the image.", "red")
    with pytest.raises(BadExample, match="exactly one"):
        encode_example(tok, "Compare <|image|> with this.", "red", media_token_id=tok.vocab_size)
    with pytest.raises(ExampleTooLong, match="max_len=8"):
        encode_example(tok, "Describe the image.", "red", media_token_id=tok.vocab_size, max_len=8)


def test_template_without_prefix_property_raises(tok):
    class Broken(ChatMLTestTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=False):
            text = super().apply_chat_template(messages, add_generation_prompt)
            return text.replace("assistant\n", "assistant:\n") if add_generation_prompt else text

    broken = Broken.__new__(Broken)
    broken.__dict__.update(tok.__dict__)
    with pytest.raises(ValueError, match="not a prefix"):
        encode_example(broken, "Describe the image.", "red", media_token_id=tok.vocab_size)
