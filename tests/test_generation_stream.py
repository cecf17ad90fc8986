"""Engine.generate_stream: generate() as an iterator of text pieces, ended early in every
way a caller can, with the engine going on each time."""
from __future__ import annotations

import pytest

import megakernel
from megakernel.errors import InvalidRequestError

PROMPT = "Hello"
KW = dict(max_new_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module", params=["torch", "reference"])
def engine(request):
    # The reference backend chains 8 steps per launch: pieces arrive a launch at a time.
    return megakernel.Engine.from_pretrained("random:tiny", device="cpu",
                                             backend=request.param, max_seq_len=128)


@pytest.fixture(scope="module")
def baseline(engine):
    return engine.generate(PROMPT, **KW)


@pytest.fixture(scope="module")
def pieces(engine):
    """What generate()'s stream callback gets (a piece may hold back a character's
    first bytes until the token that completes it)."""
    got = []
    engine.generate(PROMPT, stream=lambda token, piece: got.append(piece), **KW)
    return got


def test_pieces_and_tokens_are_generate_s(engine, baseline, pieces):
    stream = engine.generate_stream(PROMPT, **KW)
    assert list(stream) == pieces and "".join(pieces) == baseline.text
    assert stream.token_ids == baseline.token_ids
    assert stream.result.token_ids == baseline.token_ids
    assert stream.result.text == baseline.text and stream.result.finish_reason == "length"
    assert not stream.open


def test_stop_strings_hold_text_back_and_end_it(engine, baseline):
    stop = baseline.text[5:8]
    pieces = list(engine.generate_stream(PROMPT, stop=stop, **KW))
    assert "".join(pieces) == baseline.text[:baseline.text.find(stop)]


def test_arguments_are_checked_when_the_stream_is_made(engine):
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.generate_stream(PROMPT, temperature=-1.0)
    with pytest.raises(InvalidRequestError, match="no stream callback"):
        engine.generate_stream(PROMPT, stream=print)
    with pytest.raises(TypeError):
        engine.generate_stream(PROMPT, max_tokens=3)


def test_closed_early_the_engine_goes_on(engine, baseline, pieces):
    stream = engine.generate_stream(PROMPT, **KW)
    assert [next(stream) for _ in range(3)] == pieces[:3]
    stream.close()
    assert not stream.open and stream.result is None and list(stream) == []
    assert engine.generate(PROMPT, **KW).token_ids == baseline.token_ids


def test_a_with_block_ends_it(engine, baseline):
    with engine.generate_stream(PROMPT, **KW) as stream:
        for i, _piece in enumerate(stream):
            if i == 10:
                break
    assert not stream.open and stream.token_ids == baseline.token_ids[:11]
    assert engine.generate(PROMPT, **KW).token_ids == baseline.token_ids


def test_the_next_generation_ends_a_stream_left_open(engine, baseline, pieces):
    stream = engine.generate_stream(PROMPT, **KW)
    next(stream)
    # Neither a stream never iterated nor one iterated part-way stands in the way.
    untouched = engine.generate_stream("Hi", **KW)
    assert engine.generate(PROMPT, **KW).token_ids == baseline.token_ids
    for superseded in (stream, untouched):
        with pytest.raises(InvalidRequestError, match="later generation"):
            next(superseded)
    assert list(engine.generate_stream(PROMPT, **KW)) == pieces


def test_an_error_in_a_generate_callback_leaves_the_engine_usable(engine, baseline):
    def stream(token, piece):
        if token == baseline.token_ids[9]:
            raise RuntimeError("the caller's own error")

    with pytest.raises(RuntimeError, match="caller's own"):
        engine.generate(PROMPT, stream=stream, **KW)
    assert engine.generate(PROMPT, **KW).token_ids == baseline.token_ids


def test_a_closed_stream_leaves_the_prefix_its_finished_steps_wrote(engine, baseline):
    """Closed after 5 pieces (on the reference backend inside its first launch of 8, the
    next one already run), the cache keeps the prompt and the first 4 new tokens; the next
    generation reuses them and gives the tokens it would have given."""
    with engine.generate_stream(PROMPT, **KW) as stream:
        for _ in range(5):
            next(stream)
    follow_up = baseline.prompt_token_ids + baseline.token_ids[:5]
    again = engine.generate(follow_up, reuse_prefix=True, max_new_tokens=4, ignore_eos=True)
    assert again.stats.reused_tokens == len(baseline.prompt_token_ids) + 4
    assert again.token_ids == baseline.token_ids[5:9]


def test_a_finished_stream_leaves_its_prefix_for_reuse(engine, baseline):
    list(engine.generate_stream(PROMPT, **KW))
    follow_up = baseline.prompt_token_ids + baseline.token_ids[:-1] + [7, 8]
    again = engine.generate_stream(follow_up, reuse_prefix=True, max_new_tokens=4,
                                   ignore_eos=True)
    list(again)
    # The K/V of the prompt and of every new token but the last, which was never fed.
    assert again.result.stats.reused_tokens == len(follow_up) - 2
