"""Tokenizers the engine can drive: a byte-level one for random models, and a wrapper
around a checkpoint's own Hugging Face tokenizer.

Both expose the same small surface (the `Tokenizer` protocol): token ids are plain Python
ints, `encode` prepends BOS when the tokenizer has one, and `decode` drops special tokens.
"""
from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence, runtime_checkable

from .errors import CheckpointError, InvalidRequestError, first_line


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def has_chat_template(self) -> bool: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: str | Sequence[dict]) -> list[int]: ...


ROLES = ("system", "user", "assistant")


def chat_messages(messages) -> list[dict]:
    """The conversation `messages` as a list of {"role", "content"} dicts: a string is one
    user message. Raises InvalidRequestError on anything else."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for m in messages:
        if (not isinstance(m, dict) or m.get("role") not in ROLES
                or not isinstance(m.get("content"), str)):
            raise InvalidRequestError(f"a chat message must be a dict with a role in "
                                      f"{ROLES} and a string content, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _as_id_tuple(ids: int | Iterable[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, int):
        return (ids,)
    return tuple(int(i) for i in ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, special ids live at >= 256.

    decode() skips BOS/EOS, decodes runs of byte ids as UTF-8 (errors='replace', so a
    sequence cut in the middle of a multi-byte character still decodes), and shows any other
    id >= 256 as '<|id|>' so random models' outputs stay visible.

    Chat: there is no chat template by default (apply_chat_template raises
    InvalidRequestError). Passing `chat_format`, a str.format pattern with a '{user}' field
    (e.g. "User: {user}\\nAssistant: "), enables a trivial one: BOS, then each user message
    formatted and each assistant message's bytes followed by EOS (no system role).
    """

    def __init__(self, bos_token_id: int | None = 256,
                 eos_token_id: int | Iterable[int] | None = 257,
                 vocab_size: int | None = None, chat_format: str | None = None):
        eos = _as_id_tuple(eos_token_id)
        specials = eos + ((bos_token_id,) if bos_token_id is not None else ())
        for i in specials:
            if i < 256:
                raise ValueError(f"special token id {i} collides with byte ids 0..255")
        needed = max(specials, default=255) + 1
        if vocab_size is None:
            vocab_size = needed
        elif vocab_size < needed:
            raise ValueError(f"vocab_size {vocab_size} is too small for token id {needed - 1}")
        if chat_format is not None and "{user}" not in chat_format:
            raise ValueError("chat_format must contain a '{user}' field")
        self.vocab_size = int(vocab_size)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos
        self.chat_format = chat_format
        self._special = frozenset(specials)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_format is not None

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            # Flush bytes before a non-byte id so multi-byte characters are decoded whole.
            if run:
                parts.append(run.decode("utf-8", errors="replace"))
                run.clear()
            if i not in self._special:
                parts.append(f"<|{i}|>")
        if run:
            parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def apply_chat_template(self, messages: str | Sequence[dict]) -> list[int]:
        if self.chat_format is None:
            raise InvalidRequestError("this model's tokenizer has no chat template "
                                      "(random-weight byte tokenizer); use a plain prompt")
        ids = [self.bos_token_id] if self.bos_token_id is not None else []
        for m in chat_messages(messages):
            if m["role"] == "system":
                raise InvalidRequestError("the byte tokenizer's chat format has no system "
                                          "role")
            if m["role"] == "user":
                ids += self.chat_format.format(user=m["content"]).encode("utf-8")
            else:
                ids += list(m["content"].encode("utf-8")) + list(self.eos_token_ids[:1])
        return ids


class HFTokenizer:
    """A checkpoint's own tokenizer, loaded with transformers.AutoTokenizer from a local
    directory (never from the network).

    eos_token_ids is the union, in order, of the tokenizer's EOS and `extra_eos_token_ids`
    (the loader passes config.json / generation_config.json ones: Llama 3 Instruct stops on
    <|eot_id|>, which only generation_config.json lists).
    """

    def __init__(self, path: str | os.PathLike,
                 extra_eos_token_ids: Iterable[int] | None = None):
        from transformers import AutoTokenizer

        self.path = os.fspath(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # transformers raises many kinds; the user needs one line
            raise CheckpointError(f"cannot load the tokenizer in {self.path}: "
                                  f"{first_line(e)}") from e
        tok = self._tok
        # len() counts added special tokens, which vocab_size (base vocabulary) omits.
        self.vocab_size = len(tok)
        self.bos_token_id = tok.bos_token_id
        eos: list[int] = []
        for i in _as_id_tuple(tok.eos_token_id) + _as_id_tuple(extra_eos_token_ids):
            if i not in eos:
                eos.append(i)
        self.eos_token_ids = tuple(eos)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        # BOS is prepended here rather than through add_special_tokens, whose meaning
        # depends on each tokenizer's post-processor (some add EOS too, some nothing).
        ids = list(self._tok.encode(text, add_special_tokens=False))
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: str | Sequence[dict]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidRequestError(f"the tokenizer in {self.path} has no chat template; "
                                      "use a plain prompt")
        messages = chat_messages(messages)
        try:
            out = self._tok.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
        except Exception as e:  # the template's own checks (jinja raise_exception, ...)
            raise InvalidRequestError(f"the chat template refused the messages: "
                                      f"{first_line(e)}") from e
        # transformers >= 5 returns a BatchEncoding, older versions a list of ids.
        if not isinstance(out, list):
            out = out["input_ids"]
        return [int(i) for i in out]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the Hugging Face tokenizer files into `path`."""
        self._tok.save_pretrained(os.fspath(path))
