"""A generation that keeps the K/V of its prompt's prefix from the last one
(generate(..., reuse_prefix=True)), and the chat sessions built on it, on the CPU."""
from __future__ import annotations

import pytest
import torch

import megakernel
from megakernel.errors import InvalidRequestError
from megakernel.kv_cache import PagedKVCache
from megakernel.presets import PRESETS
from megakernel.tokenizer import ByteTokenizer, chat_messages

PROMPT = [1, 5, 9, 200, 17, 3, 44]
CHAT_FORMAT = "User: {user}\nAssistant: "


def make_engine(backend="torch", **kwargs):
    # Shuffled, NaN-poisoned pages: a reused position read from the wrong page, or never
    # written, turns the logits into NaN.
    return megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend=backend,
                                             max_seq_len=256, page_size=4,
                                             shuffle_pages_seed=3, poison_cache=True, **kwargs)


def chat_engine():
    engine = make_engine()
    engine.tokenizer = ByteTokenizer(256, 257, vocab_size=engine.config.vocab_size,
                                     chat_format=CHAT_FORMAT)
    return engine


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_reused_prefix_gives_a_whole_prefills_logits(backend):
    engine = make_engine(backend)
    first = engine.generate(PROMPT, max_new_tokens=10, ignore_eos=True)
    assert first.stats.reused_tokens == 0
    # The last generation's prompt and every new token but the last are in the cache.
    follow = PROMPT + first.token_ids + [60, 61, 62]
    reused = engine.generate(follow, max_new_tokens=8, ignore_eos=True, reuse_prefix=True,
                             output_logits=True)
    assert reused.stats.reused_tokens == len(PROMPT) + 10 - 1
    assert "(16 cached)" in reused.stats.line()
    whole = engine.generate(follow, max_new_tokens=8, ignore_eos=True, output_logits=True)
    assert whole.stats.reused_tokens == 0
    assert reused.token_ids == whole.token_ids
    torch.testing.assert_close(reused.logits, whole.logits, rtol=1e-4, atol=1e-4)
    # The same prompt again: all of it but its last token, which must run for the logits.
    again = engine.generate(follow, max_new_tokens=8, ignore_eos=True, reuse_prefix=True,
                            output_logits=True)
    assert again.stats.reused_tokens == len(follow) - 1
    torch.testing.assert_close(again.logits, whole.logits, rtol=1e-4, atol=1e-4)


def test_only_the_common_prefix_is_reused():
    engine = make_engine()
    engine.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    # A prompt that leaves the cached tokens at position 4: positions 4.. are prefilled.
    branch = PROMPT[:4] + [99, 98, 97]
    r = engine.generate(branch, max_new_tokens=6, ignore_eos=True, reuse_prefix=True,
                        output_logits=True)
    assert r.stats.reused_tokens == 4
    fresh = make_engine().generate(branch, max_new_tokens=6, ignore_eos=True,
                                   output_logits=True)
    torch.testing.assert_close(r.logits, fresh.logits, rtol=1e-4, atol=1e-4)
    # A prompt inside what the cache holds: all of it but its last token.
    assert engine.generate(PROMPT[:3], max_new_tokens=2,
                           reuse_prefix=True).stats.reused_tokens == 2
    assert engine.generate(PROMPT[:3] + [7], max_new_tokens=2,
                           reuse_prefix=True).stats.reused_tokens == 3


def test_a_bad_request_or_an_interrupt_keeps_the_cache_and_a_failed_generation_drops_it(
        monkeypatch):
    engine = make_engine()
    first = engine.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    follow = PROMPT + first.token_ids
    with pytest.raises(InvalidRequestError):
        engine.generate(follow, max_new_tokens=0, reuse_prefix=True)
    assert engine.generate(follow, max_new_tokens=3, ignore_eos=True,
                           reuse_prefix=True).stats.reused_tokens == len(follow) - 1

    # Ctrl-C in the stream callback at the third new token: the cache keeps the prompt
    # and the two tokens before it, whose K/V finished steps wrote.
    seen = []

    def interrupt(token, _piece):
        seen.append(token)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate(follow, max_new_tokens=8, ignore_eos=True, reuse_prefix=True,
                        stream=interrupt)
    after = follow + seen + [9]
    r = engine.generate(after, max_new_tokens=3, ignore_eos=True, reuse_prefix=True,
                        output_logits=True)
    assert r.stats.reused_tokens == len(follow) + 2
    whole = make_engine().generate(after, max_new_tokens=3, ignore_eos=True,
                                   output_logits=True)
    assert r.token_ids == whole.token_ids
    torch.testing.assert_close(r.logits, whole.logits, rtol=1e-4, atol=1e-4)

    # A step of the engine's own that fails: nothing is kept.
    def fail(*_args, **_kwargs):
        raise RuntimeError("a step failed")

    with monkeypatch.context() as m:
        m.setattr(engine.backend, "decode_steps", fail)
        with pytest.raises(RuntimeError, match="a step failed"):
            engine.generate(after, max_new_tokens=3, ignore_eos=True, reuse_prefix=True)
    r = engine.generate(after, max_new_tokens=3, ignore_eos=True, reuse_prefix=True,
                        output_logits=True)
    assert r.stats.reused_tokens == 0
    assert not torch.isnan(r.logits).any()


def test_truncate_keeps_the_leading_pages():
    cache = PagedKVCache(PRESETS["tiny"], max_seq_len=64, page_size=4, shuffle_seed=5)
    cache.reserve(30)
    pages = cache.pages()
    cache.truncate(9)                    # positions 0-8: three pages
    assert cache.pages() == pages[:3] and cache.allocator.num_free == cache.num_pages - 3
    cache.reserve(20)
    assert cache.pages()[:3] == pages[:3] and len(cache.pages()) == 5
    assert cache.page_table[0, :5].tolist() == cache.pages()
    cache.truncate(0)
    assert cache.pages() == [] and cache.allocator.num_free == cache.num_pages


def test_spared_entries_point_at_free_pages_then_back():
    """What a prompt graph's capture runs inside: page-table entries 2-4 of the sequence
    point at free pages (none of the sequence's), then at its own again, the pages freed;
    where the pool has too few free pages nothing changes."""
    cache = PagedKVCache(PRESETS["tiny"], max_seq_len=64, page_size=4, shuffle_seed=5)
    cache.reserve(40)                    # 10 of 16 pages
    table = cache.page_table[0].tolist()
    with cache.spared(2, 3) as ok:
        assert ok
        during = cache.page_table[0].tolist()
        assert during[:2] == table[:2] and during[5:] == table[5:]
        assert not set(during[2:5]) & set(cache.pages()) and cache.allocator.num_free == 3
    assert cache.page_table[0].tolist() == table and cache.allocator.num_free == 6
    with cache.spared(0, 7) as ok:
        assert not ok and cache.page_table[0].tolist() == table
    with cache.spared(3, 0) as ok:
        assert ok and cache.page_table[0].tolist() == table
    assert cache.pages() == table[:10] and cache.allocator.num_free == 6


def test_byte_chat_format_renders_a_conversation():
    tok = ByteTokenizer(256, 257, chat_format=CHAT_FORMAT)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "yo"},
                                   {"role": "user", "content": "é"}])
    assert ids == ([256] + list(b"User: hi\nAssistant: ") + list(b"yo") + [257]
                   + list("User: é\nAssistant: ".encode()))
    assert tok.apply_chat_template("hi") == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match="system"):
        tok.apply_chat_template([{"role": "system", "content": "be brief"}])


@pytest.mark.parametrize("bad", [[{"role": "bot", "content": "x"}], [{"role": "user"}],
                                 ["hi"], [{"role": "user", "content": 3}]])
def test_malformed_chat_messages_are_refused(bad):
    with pytest.raises(InvalidRequestError, match="chat message"):
        chat_messages(bad)


def test_a_chat_session_prefills_only_its_new_turn():
    engine = chat_engine()
    chat = engine.chat_session()
    one = chat.send("hi there", max_new_tokens=6, ignore_eos=True)
    assert one.stats.reused_tokens == 0
    two = chat.send("and again", max_new_tokens=6, ignore_eos=True, output_logits=True)
    # At least the first turn's prompt stays (a random model's reply may not re-encode to
    # the tokens it generated: non-byte ids decode as text).
    assert two.stats.reused_tokens >= len(one.prompt_token_ids)
    assert two.prompt_token_ids == engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": one.text},
         {"role": "user", "content": "and again"}])
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[-1]["content"] == two.text
    # The same conversation from scratch gives the same logits.
    fresh = chat_engine().generate(two.prompt_token_ids, max_new_tokens=6, ignore_eos=True,
                                   output_logits=True)
    torch.testing.assert_close(two.logits, fresh.logits, rtol=1e-4, atol=1e-4)
    chat.reset()
    assert chat.messages == []


def test_a_chat_sessions_bad_turn_changes_nothing():
    engine = chat_engine()
    chat = engine.chat_session()
    chat.send("hi", max_new_tokens=4, ignore_eos=True)
    before = list(chat.messages)
    with pytest.raises(InvalidRequestError, match="non-empty"):
        chat.send("")
    with pytest.raises(InvalidRequestError, match="sets chat, reuse_prefix itself"):
        chat.send("x", chat=True, reuse_prefix=False)
    with pytest.raises(InvalidRequestError, match="exceeds max_seq_len 256: reset"):
        chat.send("x" * 300)
    assert chat.messages == before
    assert chat.send("ok", max_new_tokens=4).stats.reused_tokens > 0


def test_a_streamed_turn_joins_the_conversation_once_it_ends():
    engine = chat_engine()
    chat = engine.chat_session()
    kw = dict(max_new_tokens=6, ignore_eos=True)
    expected = chat_engine().chat_session().send("hi there", **kw)
    stream = chat.send_stream("hi there", **kw)
    first = next(stream)
    assert chat.messages == []            # not before the reply has ended
    assert first + "".join(stream) == expected.text
    assert chat.messages == [{"role": "user", "content": "hi there"},
                             {"role": "assistant", "content": expected.text}]
    # Closed part-way, a turn leaves the conversation as it was; the cache keeps its
    # prompt, so the same message again prefills only its last token.
    before = list(chat.messages)
    with chat.send_stream("and again", **kw) as cut:
        next(cut)
    assert chat.messages == before
    again = chat.send("and again", **kw)
    assert again.stats.reused_tokens == len(again.prompt_token_ids) - 1
    three = chat.send("more", **kw)
    assert three.stats.reused_tokens >= len(expected.prompt_token_ids)
    assert len(chat.messages) == 6
    with pytest.raises(InvalidRequestError, match="non-empty"):
        chat.send_stream("")


def test_a_chat_session_needs_a_chat_template():
    with pytest.raises(InvalidRequestError, match="no chat template"):
        make_engine().chat_session()
    with pytest.raises(InvalidRequestError, match="system message"):
        chat_engine().chat_session(system="")
