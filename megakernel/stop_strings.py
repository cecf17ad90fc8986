"""Generated text cut at the first of a request's stop strings, streamed as it becomes final.

A stop string may span tokens and its start may arrive before it is known to be one, so
text that could still begin a stop string (the longest end of the text that is the start
of one) is held back until the next token settles it; the text before a stop string is
all that is ever handed out.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .detokenize import IncrementalDecoder
from .errors import InvalidRequestError


def check_stop_strings(stop) -> tuple[str, ...]:
    """A request's stop strings as a tuple: None is none, a string is one. Raises
    InvalidRequestError on anything but non-empty strings."""
    if stop is None:
        return ()
    try:
        strings = (stop,) if isinstance(stop, str) else tuple(stop)
    except TypeError:
        raise InvalidRequestError(f"stop must be a string or a list of strings, "
                                  f"got {stop!r}") from None
    for s in strings:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}")
    return strings


class StopStringText:
    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]):
        self._decoder = IncrementalDecoder(decode)
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""       # the final text of every token so far, uncut
        self._given = 0       # characters of it handed out
        self.cut: int | None = None   # where the first stop string begins, once found

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    @property
    def text(self) -> str:
        """The text so far, up to the first stop string."""
        return self._text if self.cut is None else self._text[:self.cut]

    def push(self, token: int, last: bool = False) -> str:
        """Add a token's text; return the text that is now safe to hand out. last: no
        token follows, so nothing is held back."""
        start = len(self._text)
        self._text += self._decoder.push(token)
        if last:
            self._text += self._decoder.flush()
        if self._stops and self.cut is None:
            since = max(0, start - self._longest + 1)    # a stop string may span pieces
            hits = [i for i in (self._text.find(s, since) for s in self._stops) if i >= 0]
            if hits:
                self.cut = min(hits)
        if self.cut is not None:
            end = self.cut
        else:
            end = len(self._text) - (0 if last else self._held_back())
        piece = self._text[self._given:end]
        self._given = max(self._given, end)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        text = self._text
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
