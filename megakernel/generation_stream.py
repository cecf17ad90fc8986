"""A generation consumed as an iterator of text pieces (Engine.generate_stream).

    for piece in engine.generate_stream("Hello", max_new_tokens=64):
        print(piece, end="", flush=True)

The engine runs the generation inside the iteration: each next() returns once the next
token is on the host, with the launch after it already queued, so the caller's work
between pieces overlaps the GPU's as a generate() stream callback does. The engine holds
one sequence: a generation it starts, or prepare(), ends a stream still open first.
"""
from __future__ import annotations

from typing import Callable, Generator

from .errors import InvalidRequestError


class GenerationStream:
    """Iterate for the text pieces, one per new token ('' while text that may begin a
    stop string is held back). token_ids grows as tokens arrive; result is the
    GenerationResult once the iteration has ended. close(), or leaving a `with` block,
    ends the generation early and leaves the engine ready for the next one."""

    def __init__(self, steps: Generator):
        self._steps = steps           # yields (token_id, piece); returns the result
        self._superseded = False
        self.token_ids: list[int] = []
        self.result = None
        # Called with the result when the iteration ends with one (a chat session adds
        # the reply to its conversation then).
        self.on_result: Callable[[object], None] | None = None

    @property
    def open(self) -> bool:
        """True until the generation has ended: finished, failed or closed."""
        return self._steps.gi_frame is not None

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        if self._superseded:
            raise InvalidRequestError("this stream was ended early: a later generation or "
                                      "prepare() on its engine started before it finished")
        try:
            token, piece = next(self._steps)
        except StopIteration as done:
            self.result = done.value
            if self.result is not None and self.on_result is not None:
                self.on_result(self.result)
            raise StopIteration from None
        self.token_ids.append(token)
        return piece

    def close(self) -> None:
        """End the generation where it is. The launches in flight finish, and the KV cache
        keeps the prompt and the new tokens before the last one delivered, for a next
        generation with reuse_prefix (unless a launch faulted)."""
        self._steps.close()

    def end_for_another(self) -> None:
        """The engine's: close this stream, if still open, for a generation that starts."""
        if self.open:
            self._superseded = True
            self.close()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
