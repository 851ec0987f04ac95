"""Text tokenizer of the frozen LM, built from a Hugging Face directory or a GGUF file.

A thin wrapper around a ``tokenizers.Tokenizer`` that adds what the rest of the code
needs: the special ids (BOS, EOS, padding, the ids that end a turn) and the model's
own jinja chat template.

A GGUF file carries no ``tokenizer.json``; it stores the byte-level BPE as metadata
(``tokenizer.ggml.tokens``, ``.merges``, ``.token_type``) plus the name of the
pre-tokenizer llama.cpp should use (``tokenizer.ggml.pre``). ``_PRE_TOKENIZERS`` maps
that name to the split llama.cpp applies (``src/llama-vocab.cpp``); a file without the
key, or with a name not in the table, is refused rather than tokenized with a guess.

Findings on SmolLM2 (``tokenizer.ggml.pre == "smollm"``):

* llama.cpp and SmolLM2's own ``tokenizer.json`` first isolate every digit, then apply
  the GPT-2 split (``Digits(individual_digits=True)`` + ``ByteLevel``). We do the same.
* ``transformers`` (5.x) has no entry for ``"smollm"`` and falls back to the bare GPT-2
  split. Because SmolLM2's merges never join a digit to anything, the two agree on
  digits themselves ("12345 3.14159" gives the same ids). They differ only where a run
  of two or more spaces precedes a digit: ``"a  1"`` is ``a, ĠĠ, 1`` here (and in the
  original tokenizer) but ``a, Ġ, Ġ, 1`` in ``transformers``. Tests pin that case.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# Tokens that end an assistant turn in the chat formats we know (ChatML, Llama 3).
# Each one present in the vocabulary is a stop id, besides EOS itself.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
)

# llama.cpp's ``llama_token_type`` values (gguf.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _gpt2_split()]
    )


def _llama3_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# ``tokenizer.ggml.pre`` -> pre-tokenizer, grouped as llama.cpp groups them
# (``llama_vocab::impl::load``, the ``regex_exprs`` per ``LLAMA_VOCAB_PRE_TYPE_*``).
_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt2": _gpt2_split,
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
        _digits_then_gpt2_split,
    ),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), _llama3_split),
}


class Tokenizer:
    """Byte-level BPE tokenizer with the special ids and chat template of one LM.

    Args:
        backend: the ``tokenizers.Tokenizer`` doing the work; special tokens must already
            be registered on it so that they are matched whole in text.
        eos_id: end-of-sequence id.
        bos_id: beginning-of-sequence id, or ``None`` if the model has none.
        pad_id: padding id; ``eos_id`` when ``None``.
        extra_stop_ids: further ids that end generation (e.g. from ``generation_config.json``).
        chat_template: the model's jinja chat template, or ``None``.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_id: int,
        bos_id: int | None = None,
        pad_id: int | None = None,
        extra_stop_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        size = self.vocab_size
        named = [("eos_id", eos_id), ("bos_id", bos_id), ("pad_id", pad_id)]
        named += [("extra_stop_ids", i) for i in extra_stop_ids]
        for name, value in named:
            if value is not None and not 0 <= value < size:
                raise ValueError(f"Tokenizer.{name} must be in [0, {size}), got {value}")
        self._eos_id = eos_id
        self._bos_id = bos_id
        self._pad_id = eos_id if pad_id is None else pad_id
        turn_ends = [i for i in (backend.token_to_id(t) for t in END_OF_TURN_TOKENS) if i is not None]
        self._stop_ids = list(dict.fromkeys([eos_id, *extra_stop_ids, *turn_ends]))
        self._chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a Hugging Face directory.

        Reads ``tokenizer.json``; ``tokenizer_config.json`` for the chat template and the
        BOS/EOS/pad tokens (the template may instead sit in ``chat_template.jinja``); and,
        if present, ``generation_config.json`` for further EOS ids.

        Args:
            path: the model directory.

        Returns:
            The tokenizer.
        """
        path = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")

        def token_id(field: str) -> int | None:
            token = config.get(field)
            if isinstance(token, dict):  # a serialised AddedToken
                token = token["content"]
            if token is None:
                return None
            index = backend.token_to_id(token)
            if index is None:
                raise ValueError(f"{field} {token!r} of {path}/tokenizer_config.json is not in the vocabulary")
            return index

        generation_eos = generation.get("eos_token_id", [])
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos)
        eos_id = token_id("eos_token")
        if eos_id is None:
            if not generation_eos:
                raise ValueError(
                    f"{path} names no eos_token (tokenizer_config.json) nor eos_token_id (generation_config.json)"
                )
            eos_id = generation_eos[0]
        bos_id = token_id("bos_token")
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        return cls(
            backend,
            eos_id=eos_id,
            bos_id=bos_id,
            pad_id=token_id("pad_token"),
            extra_stop_ids=generation_eos,
            chat_template=_hf_chat_template(path, config),
        )

    @classmethod
    def from_gguf(cls, reader_or_path: Any) -> Tokenizer:
        """Build the byte-level BPE tokenizer a GGUF file describes in its metadata.

        Args:
            reader_or_path: a ``gguf.GGUFReader`` or the path of a ``.gguf`` file.

        Returns:
            The tokenizer.

        Raises:
            ValueError: if ``tokenizer.ggml.model`` is not ``"gpt2"`` (byte-level BPE) or
                ``tokenizer.ggml.pre`` names a split we do not know.
        """
        import gguf  # the reader only when a GGUF is actually read

        from mm_llama.weights.gguf import GGUFMetadata  # that module imports this one

        if not isinstance(reader_or_path, gguf.GGUFReader):
            reader_or_path = gguf.GGUFReader(reader_or_path)
        meta = GGUFMetadata(reader_or_path)
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer.ggml.model {model!r}: only byte-level BPE ('gpt2', as in "
                "Llama 3 and SmolLM2) is supported; SentencePiece ('llama') vocabularies are not"
            )
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF tokenizer.ggml.pre {pre!r}; known: {sorted(_PRE_TOKENIZERS)}")

        tokens: list[str] = meta.require("tokenizer.ggml.tokens")
        vocab = {token: index for index, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF tokenizer.ggml.tokens has duplicate entries; ids would be ambiguous")
        merges = [tuple(merge.split(" ")) for merge in meta.require("tokenizer.ggml.merges")]
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
        backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()

        # Control tokens (<|im_start|>, <|eot_id|>...) must be matched whole and count as
        # special; user-defined ones are matched whole but decoded like text.
        types: list[int] = meta.get("tokenizer.ggml.token_type", [])
        typed = list(zip(tokens, types))
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _TOKEN_TYPE_CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in typed if k == _TOKEN_TYPE_USER_DEFINED]
        )
        return cls(
            backend,
            eos_id=meta.require("tokenizer.ggml.eos_token_id"),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it are matched, no BOS/EOS added."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, dropping special tokens unless ``skip_special_tokens`` is false."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render a conversation with the model's own chat template.

        The template is rendered as ``transformers`` does (sandboxed jinja, ``trim_blocks``,
        ``lstrip_blocks``). Whatever it adds is kept: SmolLM2's inserts a default system
        prompt when the conversation has none; pass a ``system`` message to replace it.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: append the header that opens the assistant's turn.

        Returns:
            The prompt text (special tokens written literally; :meth:`encode` maps them).
        """
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._compiled_template is None:
            self._compiled_template = _jinja_environment().from_string(self._chat_template)
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token="" if self._bos_id is None else self._backend.id_to_token(self._bos_id),
            eos_token=self._backend.id_to_token(self._eos_id),
        )

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry, or ``None`` if absent."""
        return self._backend.token_to_id(token)

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def stop_ids(self) -> list[int]:
        """EOS first, then every other id that ends a turn; no duplicates."""
        return list(self._stop_ids)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _hf_chat_template(path: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    # Chat templates come from model files: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env
