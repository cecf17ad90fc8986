"""A conversation whose history stays in the engine's KV cache between turns.

    chat = engine.chat_session(system="You are terse.")
    reply = chat.send("Why is the sky blue?", max_new_tokens=256)
    reply = chat.send("And at sunset?")      # prefills only this turn's new tokens
    for piece in chat.send_stream("Why?"):   # the reply's text as it is generated
        print(piece, end="")

Each send() renders the whole conversation with the tokenizer's chat template, then
generates with reuse_prefix=True: the tokens the last turn left in the cache (its prompt
and reply) are the rendered conversation's prefix, so only the new user message and the
template's markers around it are prefilled. Where a re-rendered reply tokenizes
differently from the tokens generated, less is reused, never anything wrong: the cache
keeps only the common prefix. A turn that fails (a bad argument, a conversation longer
than max_seq_len) leaves the conversation as it was; reset() starts it over.
"""
from __future__ import annotations

from .engine import DEFAULT_MAX_NEW_TOKENS
from .errors import InvalidRequestError


class ChatSession:
    def __init__(self, engine, system: str | None = None):
        tokenizer = engine.tokenizer
        if tokenizer is None or not tokenizer.has_chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template: a chat "
                                      "session needs one")
        if system is not None and (not isinstance(system, str) or not system):
            raise InvalidRequestError("the system message must be a non-empty string")
        self.engine = engine
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, message: str, **generate_kwargs):
        """Add a user message, generate the reply (Engine.generate's arguments, but for
        chat and reuse_prefix) and add it to the conversation. Returns the
        GenerationResult; its stats.reused_tokens counts the prompt tokens whose K/V the
        earlier turns left in the cache."""
        messages, ids = self._turn(message, generate_kwargs)
        result = self.engine.generate(ids, reuse_prefix=True, **generate_kwargs)
        self._add_reply(messages, result)
        return result

    def send_stream(self, message: str, **generate_kwargs):
        """send() as an iterator of the reply's text pieces (Engine.generate_stream): the
        message and the reply join the conversation once the iteration has ended; a
        stream closed before then leaves the conversation as it was."""
        messages, ids = self._turn(message, generate_kwargs)
        stream = self.engine.generate_stream(ids, reuse_prefix=True, **generate_kwargs)
        stream.on_result = lambda result: self._add_reply(messages, result)
        return stream

    def _turn(self, message: str, generate_kwargs: dict) -> tuple[list[dict], list[int]]:
        """The conversation with `message` added, rendered to token ids; refused before
        anything runs where the arguments or the length do not allow the turn."""
        if not isinstance(message, str) or not message:
            raise InvalidRequestError("the message must be a non-empty string")
        fixed = {"chat", "reuse_prefix"} & generate_kwargs.keys()
        if fixed:
            raise InvalidRequestError(f"a chat session sets {', '.join(sorted(fixed))} itself")
        messages = self.messages + [{"role": "user", "content": message}]
        ids = self.engine.tokenizer.apply_chat_template(messages)
        new = generate_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        limit = self.engine.max_seq_len
        if isinstance(new, int) and len(ids) + new > limit:
            raise InvalidRequestError(
                f"the conversation ({len(ids)} tokens) + max_new_tokens ({new}) exceeds "
                f"max_seq_len {limit}: reset the session, or load with a larger max_seq_len")
        return messages, ids

    def _add_reply(self, messages: list[dict], result) -> None:
        self.messages = messages + [{"role": "assistant", "content": result.text}]
