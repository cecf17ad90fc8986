"""Streaming text: pieces join to the full decode, never show a half character, and cost
a bounded window per token."""
from __future__ import annotations

import pytest

from megakernel.detokenize import REPLACEMENT_CHAR, IncrementalDecoder
from megakernel.tokenizer import ByteTokenizer

TEXTS = ["plain ascii", "héllo wörld", "emoji 😀 and 中文 mixed", "ends in é"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_full_text_without_broken_characters(text):
    tok = ByteTokenizer()
    ids = list(text.encode("utf-8"))
    decoder = IncrementalDecoder(tok.decode)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


def test_truncated_character_is_flushed_as_the_decoder_renders_it():
    tok = ByteTokenizer()
    ids = list("ok 😀".encode("utf-8"))[:-1]          # the emoji's last byte is missing
    decoder = IncrementalDecoder(tok.decode)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == "ok "
    assert "".join(pieces) + decoder.flush() == tok.decode(ids)


def test_each_step_decodes_a_short_window():
    tok = ByteTokenizer()
    seen = []

    def decode(ids):
        seen.append(len(ids))
        return tok.decode(ids)

    decoder = IncrementalDecoder(decode)
    for t in ("x" * 500).encode():
        decoder.push(t)
    assert max(seen) <= 2
