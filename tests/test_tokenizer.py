"""Tokenizer: ids and chat template against ``transformers`` on SmolLM2's GGUF; rules on tiny files."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import tokenizers

from mm_llama.registry import REGISTERED_LMS, resolve_lm_source
from mm_llama.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox.",
    "café, naïve, élève — 日本語のテキスト 🙂👍🏽",
    "12345 3.14159 and 2024-06-01",
    "a   b\n\n\tc  \n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


# ---------------------------------------------------------------------------- tiny files


def _write_tokenizer_gguf(path: Path, *, model: str = "gpt2", pre: str = "smollm") -> Path:
    """A GGUF holding only tokenizer metadata: the byte alphabet, two merges, two control tokens."""
    merges = ["h i", "Ġ t"]
    tokens = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + ["hi", "Ġt", "<|im_start|>", "<|im_end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([1] * 258 + [3, 3])
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_tokenizer(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(_write_tokenizer_gguf(tmp_path / "t.gguf"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (260, 258, 259, 259)
    assert tok.stop_ids == [259]
    ids = tok.encode("<|im_start|>hi t<|im_end|>")
    assert ids == [258, 256, 257, 259]  # control tokens whole, both merges applied
    assert tok.decode(ids) == "hi t"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi t<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"


def test_sentencepiece_gguf_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf(_write_tokenizer_gguf(tmp_path / "t.gguf", model="llama"))


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'mystery'"):
        Tokenizer.from_gguf(_write_tokenizer_gguf(tmp_path / "t.gguf", pre="mystery"))


# ---------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def ours(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours: Tokenizer, reference, text: str) -> None:
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_rendered_chat_ids_match_transformers(ours: Tokenizer, reference) -> None:
    prompt = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert ours.encode(prompt) == reference.encode(prompt, add_special_tokens=False)
    assert ours.encode(prompt)[:1] == [ours.token_to_id("<|im_start|>")]


@pytest.mark.slow
def test_digits_are_isolated_before_the_gpt2_split(ours: Tokenizer) -> None:
    # Where we knowingly differ from transformers 5.x, which lacks llama.cpp's "smollm"
    # pre-tokenizer: digits are cut off first, so "a  1" splits as "a", "  ", "1" and the
    # two spaces merge into "ĠĠ" (id 256); transformers gives a, Ġ, Ġ, 1 = [81, 216, 216, 33].
    assert ours.encode("a  1") == [81, 256, 33]
    assert ours.encode("x12") == [ours.token_to_id(c) for c in "x12"]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(ours: Tokenizer, text: str) -> None:
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


@pytest.mark.slow
def test_decode_skips_special_tokens(ours: Tokenizer) -> None:
    ids = ours.encode("<|im_start|>assistant\nParis<|im_end|>")
    assert ours.decode(ids) == "assistant\nParis"


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(ours: Tokenizer, reference, add_generation_prompt: bool) -> None:
    expected = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow
def test_default_system_prompt_is_kept_and_replaceable(ours: Tokenizer) -> None:
    default = ours.apply_chat_template(CONVERSATION[:1])
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    custom = ours.apply_chat_template([{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]])
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


@pytest.mark.slow
def test_special_ids(ours: Tokenizer) -> None:
    assert ours.vocab_size == 49152
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # <|im_start|>, <|im_end|>, <|im_end|>
    assert ours.stop_ids == [2, 0]  # <|im_end|>, <|endoftext|>
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template


@pytest.mark.slow
def test_from_hf_dir_matches_transformers(reference, tmp_path: Path) -> None:
    reference.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True) == reference.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
