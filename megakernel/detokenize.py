"""Incremental detokenization for streaming: text pieces in constant time per token.

Decoding the whole generated sequence after every token costs O(n) per token. Instead
the decoder keeps a short window: `prefix` tokens already emitted as text (kept only as
context, since tokenizers may render a token differently after others, e.g. a leading
space) and the tokens after it. A piece is emitted once the window's text no longer ends
in an incomplete character (U+FFFD from bytes split across tokens); flush() emits what
is still held back at the end.
"""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix = 0     # window start: context tokens, already emitted
        self._read = 0       # tokens [prefix, read) are emitted; [read, end) held back

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (may be empty)."""
        self._tokens.append(token)
        emitted = self._decode(self._tokens[self._prefix:self._read])
        text = self._decode(self._tokens[self._prefix:])
        if len(text) > len(emitted) and not text.endswith(REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self._tokens)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        """The text held back so far (e.g. an incomplete character at the very end)."""
        emitted = self._decode(self._tokens[self._prefix:self._read])
        text = self._decode(self._tokens[self._prefix:])
        self._prefix = self._read = len(self._tokens)
        return text[len(emitted):]
