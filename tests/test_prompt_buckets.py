"""Prompt chunks padded to their bucket (prompt_graphs.py): which shapes a backend's
warm-up runs, which positions a padded chunk needs, and the padded plain path against the
unpadded one, on the CPU (the GPU side: tests/test_gpu_prefill.py)."""
from __future__ import annotations

import pytest
import torch

import megakernel
from megakernel.backends import torch_backend
from megakernel.kv_cache import PagedKVCache
from megakernel.presets import PRESETS
from megakernel.backends.prompt_graphs import (MIN_BUCKET, PromptGraphs, padded_prompt_end,
                                               prompt_chunks, warm_up_buckets)
from megakernel.backends.prompt_prefill import prefill_chunk
from tolerances import RELATIVE_TOLERANCE, relative_error


@pytest.fixture(scope="module")
def engine():
    return megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend="torch",
                                             max_seq_len=256, page_size=16)


def test_warm_up_buckets_are_every_bucket_that_fits():
    assert warm_up_buckets(MIN_BUCKET - 1) == []
    assert warm_up_buckets(MIN_BUCKET) == [MIN_BUCKET]
    assert warm_up_buckets(100) == [16, 32, 64]
    assert warm_up_buckets(512) == [16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize("num_tokens, chunk, end", [
    (1, 512, 16), (16, 512, 16), (17, 512, 32), (37, 512, 64), (512, 512, 512),
    (513, 512, 528), (700, 512, 768), (1024, 512, 1024), (40, 32, 48),
])
def test_padded_prompt_end_covers_the_last_chunk_s_bucket(num_tokens, chunk, end):
    assert padded_prompt_end(num_tokens, chunk) == end


@pytest.mark.parametrize("num_tokens, long_chunk, spans, end", [
    (700, None, [(0, 512), (512, 188)], 768),
    (700, 2048, [(0, 512), (512, 188)], 768),
    (2047, 2048, [(0, 512), (512, 512), (1024, 512), (1536, 511)], 2048),
    (2048, 2048, [(0, 2048)], 2048),
    (2100, 2048, [(0, 2048), (2048, 52)], 2112),
    (4700, 2048, [(0, 2048), (2048, 2048), (4096, 512), (4608, 92)], 4736),
])
def test_long_chunks_come_first_and_run_unpadded(num_tokens, long_chunk, spans, end):
    assert prompt_chunks(num_tokens, 512, long_chunk) == spans
    assert padded_prompt_end(num_tokens, 512, long_chunk) == end


def test_a_prompt_in_long_chunks_gives_the_logits_of_short_ones(engine, monkeypatch):
    """The CPU has no long chunks; given some (64 tokens), a 200-token prompt prefills in
    three of them and one of 8, with the logits of chunks of 512 (float32: rounding)."""
    ids = torch.randint(3, 200, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    want = engine.generate(ids, max_new_tokens=4, ignore_eos=True, output_logits=True)
    lengths = []
    real = torch_backend.prefill_chunk
    monkeypatch.setattr(torch_backend, "prefill_chunk",
                        lambda backend, chunk, *a, **k: lengths.append(chunk.shape[0]) or
                        real(backend, chunk, *a, **k))
    monkeypatch.setattr(torch_backend.TorchBackend, "long_chunk", property(lambda self: 64))
    got = engine.generate(ids, max_new_tokens=4, ignore_eos=True, output_logits=True)
    assert lengths == [64, 64, 64, 8]
    assert got.token_ids == want.token_ids
    assert relative_error(got.logits, want.logits) < RELATIVE_TOLERANCE[torch.float32]


def test_the_warm_up_runs_each_bucket_up_to_the_longest_chunk(engine, monkeypatch):
    lengths = []
    real = torch_backend.prefill_padded
    monkeypatch.setattr(torch_backend, "prefill_padded",
                        lambda backend, ids, *a, **k: lengths.append(ids.shape[0]) or
                        real(backend, ids, *a, **k))
    kv = engine.kv_cache
    kv.reserve(256)
    try:
        logits = engine.backend.warm_up(100)
        assert lengths == [16, 32, 64]
        assert logits.shape == (engine.config.vocab_size,) and torch.isfinite(logits).all()
        lengths.clear()
        monkeypatch.setattr(torch_backend, "PREFILL_CHUNK", 32)
        engine.backend.warm_up(256)
        assert lengths == [16, 32]
    finally:
        kv.release()


def test_the_warm_up_runs_a_long_chunk_where_it_fits(engine, monkeypatch):
    padded, plain = [], []
    real_padded, real_plain = torch_backend.prefill_padded, torch_backend.prefill_chunk
    monkeypatch.setattr(torch_backend, "prefill_padded",
                        lambda backend, ids, *a, **k: padded.append(ids.shape[0]) or
                        real_padded(backend, ids, *a, **k))
    monkeypatch.setattr(torch_backend, "prefill_chunk",
                        lambda backend, ids, *a, **k: plain.append(ids.shape[0]) or
                        real_plain(backend, ids, *a, **k))
    monkeypatch.setattr(torch_backend.TorchBackend, "long_chunk", property(lambda self: 128))
    assert engine.backend.warm_up_tokens == 128
    kv = engine.kv_cache
    kv.reserve(256)
    try:
        engine.backend.warm_up(100)
        assert padded == [16, 32, 64] and plain == []
        padded.clear()
        assert torch.isfinite(engine.backend.warm_up(128)).all()
        assert padded == [16, 32, 64, 128] and plain == [128]
    finally:
        kv.release()


def test_a_chunk_without_a_graph_runs_padded_and_is_left_pending(engine):
    """The padded plain path gives the unpadded path's logits and K/V for the real tokens
    (float32 on the CPU: within rounding), and leaves (start, bucket) pending; a bucket
    past the pages is refused (None) and left alone."""
    kv = engine.kv_cache
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    ids = torch.randint(3, 200, (21,), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(21)

    def run(fn):
        kv.release()
        kv.reserve(64)
        logits = fn()
        page, offset = kv.page_table[0, pos // kv.page_size].long(), pos % kv.page_size
        return logits, kv.k[:, page, offset].clone(), kv.v[:, page, offset].clone()

    try:
        want = run(lambda: prefill_chunk(engine.backend, ids))
        got = run(lambda: graphs.run(ids))
        assert graphs.pending == {(0, 32)} and graphs.captures == 0
        for g, w in zip(got, want):
            assert relative_error(g, w) < RELATIVE_TOLERANCE[torch.float32]
        kv.release()
        kv.reserve(24)                                   # pages for 32 positions
        assert graphs.run(torch.cat([ids, ids])) is None  # bucket 64
        assert graphs.pending == {(0, 32)}
    finally:
        kv.release()


def test_capacity_stops_at_max_seq_len_inside_a_whole_page():
    """Pages of 16 for max_seq_len 1020: the last page's slots 1020-1023 exist, but no
    position past max_seq_len does (the RoPE tables end there), so a chunk padded to 1024
    must not count on them (tests/test_gpu_prefill.py runs that prompt on a GPU)."""
    cache = PagedKVCache(PRESETS["tiny"], max_seq_len=1020, page_size=16)
    cache.reserve(1000)
    assert cache.capacity() == 1008
    cache.reserve(1020)
    assert len(cache.pages()) == 64 and cache.capacity() == 1020


def test_generate_reserves_the_pages_of_the_padded_prompt(engine, monkeypatch):
    """A 37-token prompt with 4 new tokens needs 42 positions; its bucket (64) needs
    pages up to 64, which generate() reserves too, up to max_seq_len. (The prefill is
    replaced by a decode step: only the pages it sees count here.)"""
    seen = []
    monkeypatch.setattr(torch_backend.TorchBackend, "prefill",
                        lambda self, ids, start: seen.append(self.kv_cache.capacity()) or
                        torch_backend.TorchBackend.decode(self, ids[-1], start))
    engine.generate(list(range(3, 40)), max_new_tokens=4, ignore_eos=True)
    assert seen == [64]
    short = megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend="torch",
                                              max_seq_len=48, page_size=16)
    short.generate(list(range(3, 40)), max_new_tokens=4, ignore_eos=True)
    assert seen == [64, 48]
