"""Stop strings: the text ends before the first one, streamed pieces never show any of it,
and the tokens a chained launch decoded past it are dropped."""
from __future__ import annotations

import pytest

import megakernel
from megakernel.errors import InvalidRequestError
from megakernel.stop_strings import StopStringText, check_stop_strings
from megakernel.tokenizer import ByteTokenizer


def stream_text(text: str, stops):
    """Push `text` as byte tokens; returns (pieces handed out, the StopStringText)."""
    tok = ByteTokenizer(None, 257)
    ids = list(text.encode("utf-8"))
    out = StopStringText(tok.decode, stops)
    pieces = []
    for i, t in enumerate(ids):
        pieces.append(out.push(t, last=i == len(ids) - 1))
        if out.stopped:
            break
    return pieces, out


@pytest.mark.parametrize("text,stops,expected", [
    ("hello world", ["wor"], "hello "),
    ("hello world", ["xyz"], "hello world"),
    ("hello world", ["o w", "ll"], "he"),              # the earliest of several
    ("abababc", ["abc"], "abab"),                       # a false start held, then given
    ("héllo wörld", ["ö"], "héllo w"),                 # multi-byte characters
    ("tail ab", ["abc"], "tail ab"),                    # held back, released at the end
])
def test_text_ends_before_the_first_stop_string(text, stops, expected):
    pieces, out = stream_text(text, stops)
    assert out.text == expected and "".join(pieces) == expected
    assert out.stopped == (expected != text)


def test_text_that_may_begin_a_stop_string_is_held_back():
    pieces, _ = stream_text("xabq", ["abc"])
    # "a" and "ab" could begin "abc": nothing after "x" is given until "q" settles it.
    assert pieces == ["x", "", "", "abq"]


def test_check_stop_strings():
    assert check_stop_strings(None) == () and check_stop_strings("a") == ("a",)
    assert check_stop_strings(["a", "bc"]) == ("a", "bc")
    for bad in ([""], [3], ["a", None]):
        with pytest.raises(InvalidRequestError, match="non-empty strings"):
            check_stop_strings(bad)


@pytest.fixture(scope="module", params=[("torch", None), ("reference", 8)])
def engine(request):
    backend, steps = request.param
    return megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend=backend,
                                             max_seq_len=128, steps_per_launch=steps)


def test_generation_stops_at_a_stop_string(engine):
    full = engine.generate("Hello", max_new_tokens=40, ignore_eos=True)
    stop = full.text[10:14]
    cut = full.text.find(stop)
    assert 0 < cut
    pieces = []
    r = engine.generate("Hello", max_new_tokens=40, ignore_eos=True, stop=[stop, "\x00zz"],
                        stream=lambda _token, piece: pieces.append(piece))
    assert r.finish_reason == "stop" and r.text == full.text[:cut]
    assert "".join(pieces) == r.text and len(pieces) == len(r.token_ids)
    # The tokens end with the one that completed the stop string; with 8 steps a launch,
    # the ones decoded past it are dropped.
    n = len(r.token_ids)
    assert r.token_ids == full.token_ids[:n]
    assert stop in engine.decode_text(r.token_ids) and stop not in engine.decode_text(
        r.token_ids[:-1])
    # Without the stop string the engine goes on as before.
    assert engine.generate("Hello", max_new_tokens=40, ignore_eos=True).token_ids == \
        full.token_ids


def test_a_stop_string_never_met_changes_nothing(engine):
    full = engine.generate("Hello", max_new_tokens=12, ignore_eos=True)
    r = engine.generate("Hello", max_new_tokens=12, ignore_eos=True, stop="\x00never")
    assert r.text == full.text and r.finish_reason == "length"


def test_bad_stop_strings_and_a_model_without_tokenizer(engine, tmp_path):
    with pytest.raises(InvalidRequestError, match="non-empty"):
        engine.generate("Hello", max_new_tokens=4, stop=[""])
    from megakernel.loading import save_pretrained
    from megakernel.presets import PRESETS, random_weights

    save_pretrained(random_weights(PRESETS["tiny"]), tmp_path)
    bare = megakernel.Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=64)
    with pytest.raises(InvalidRequestError, match="need a tokenizer"):
        bare.generate([1, 2], max_new_tokens=4, stop=["x"])
