"""The prompt prefill on the GPU: replays of its CUDA graphs (prompt_graphs.py) against
the plain path, when they are captured (after the generation that first needed them),
and the generate() around them."""
from __future__ import annotations

import pytest
import torch

import megakernel
from megakernel.backends.prompt_graphs import MIN_BUCKET, PromptGraphs, bucket_of
from megakernel.backends.prompt_prefill import prefill_chunk
from tolerances import RELATIVE_TOLERANCE, relative_error

pytestmark = pytest.mark.gpu

BF16 = RELATIVE_TOLERANCE[torch.bfloat16]


@pytest.fixture(scope="module")
def engine():
    return megakernel.Engine.from_pretrained("random:tiny", device="cuda", backend="torch",
                                             max_seq_len=256, page_size=16)


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


def prefill(engine, run, n: int, reserve: int = 256, before: torch.Tensor | None = None):
    """run() after a fresh page reservation (and the tokens `before` prefilled at position
    0 without a graph): (logits, K and V of positions [0, n))."""
    kv = engine.kv_cache
    kv.release()
    kv.reserve(reserve)
    if before is not None:
        prefill_chunk(engine.backend, before)
    logits = run()
    pos = torch.arange(n, device="cuda")
    page, offset = kv.page_table[0, pos // kv.page_size].long(), pos % kv.page_size
    out = None if logits is None else logits.clone()
    return out, kv.k[:, page, offset].clone(), kv.v[:, page, offset].clone()


def test_buckets():
    assert [bucket_of(n) for n in (1, MIN_BUCKET, MIN_BUCKET + 1, 100, 512)] == [
        MIN_BUCKET, MIN_BUCKET, 2 * MIN_BUCKET, 128, 512]


def test_a_bucket_is_pending_after_its_first_prompt_and_replays_match(engine):
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    for i, n in enumerate([5, 12, 16, 9, 20, 31]):     # buckets 16, 16, 16, 16, 32, 32
        ids = prompt(n, seed=i)
        want = prefill(engine, lambda: prefill_chunk(engine.backend, ids), n)
        got = prefill(engine, lambda: graphs.run(ids), n)
        first_of_bucket = i in (0, 4)
        assert (got[0] is None) == first_of_bucket
        assert graphs.pending == ({(0, bucket_of(n))} if first_of_bucket else set())
        assert graphs.capture_pending() == (1 if first_of_bucket else 0)
        assert graphs.captures == (1 if i < 4 else 2) and not graphs.pending
        if not first_of_bucket:
            for g, w in zip(got, want):
                assert relative_error(g, w) < BF16


def test_later_chunks_have_graphs_of_their_own(engine):
    """A chunk after 48 cached positions: captured after its first use of (start, bucket),
    its replays equal the plain path; a chunk whose bucket runs past the pages gets none."""
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    before = prompt(48, seed=11)
    for i, n in enumerate([20, 30, 25]):                 # bucket 32 at start 48
        ids = prompt(n, seed=20 + i)
        want = prefill(engine, lambda: prefill_chunk(engine.backend, ids, 48), 48 + n,
                       before=before)
        got = prefill(engine, lambda: graphs.run(ids, 48), 48 + n, before=before)
        assert (got[0] is None) == (i == 0)
        graphs.capture_pending()
        assert graphs.captures == 1
        if i:
            for g, w in zip(got, want):
                assert relative_error(g, w) < BF16
    ids, before = prompt(20, seed=30), prompt(52, seed=31)
    for _ in range(3):                                   # pages for [0, 80), bucket [52, 84)
        assert prefill(engine, lambda: graphs.run(ids, 52), 72, reserve=72,
                       before=before)[0] is None
        assert not graphs.pending and graphs.capture_pending() == 0
    assert graphs.captures == 1


def test_a_graph_is_captured_again_when_a_weight_moves(engine):
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    ids = prompt(10, seed=7)
    for _ in range(2):
        prefill(engine, lambda: graphs.run(ids), 10)
        graphs.capture_pending()
    assert graphs.captures == 1
    weights = engine.backend.weights
    original = weights.down
    weights.down = original.clone()
    try:
        want = prefill(engine, lambda: prefill_chunk(engine.backend, ids), 10)
        assert prefill(engine, lambda: graphs.run(ids), 10)[0] is None
        assert graphs.capture_pending() == 1
        got = prefill(engine, lambda: graphs.run(ids), 10)
    finally:
        weights.down = original
    assert graphs.captures == 2
    for g, w in zip(got, want):
        assert relative_error(g, w) < BF16


def test_no_graph_for_a_bucket_past_the_reserved_pages(engine):
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    ids = prompt(33, seed=3)                             # bucket 64, pages for 48 positions
    for _ in range(3):
        assert prefill(engine, lambda: graphs.run(ids), 33, reserve=34)[0] is None
        assert graphs.capture_pending() == 0
    assert graphs.captures == 0


def test_generate_repeats_itself_through_the_graphs(engine):
    """The first generate() prefills without a graph and captures one after its last
    token; the next two replay it: the same tokens each time, logits within bf16
    rounding."""
    ids = prompt(23, seed=5).tolist()
    results, captures = [], []
    for _ in range(3):
        results.append(engine.generate(ids, max_new_tokens=6, ignore_eos=True,
                                       output_logits=True))
        captures.append(engine.backend._prompt_graphs.captures)
    assert captures[1] == captures[2] == captures[0] >= 1
    assert not engine.backend._prompt_graphs.pending
    for r in results[1:]:
        assert r.token_ids == results[0].token_ids
        assert relative_error(r.logits, results[0].logits) < BF16


def test_an_engine_without_prompt_graphs_captures_none():
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cuda", backend="torch",
                                               max_seq_len=256, page_size=16,
                                               prompt_graphs=False)
    ids = prompt(23, seed=5).tolist()
    first = engine.generate(ids, max_new_tokens=4, ignore_eos=True)
    assert engine.generate(ids, max_new_tokens=4, ignore_eos=True).token_ids == first.token_ids
    assert engine.backend._prompt_graphs.captures == 0


@pytest.mark.parametrize("backend", ["torch", "megakernel"])
def test_the_warm_up_at_load_leaves_no_trace(backend):
    """Engine.from_pretrained runs one dummy prompt on the GPU (a process's first library
    use, ~1 s, paid at load). It captures no graph, holds no page, and a poisoned cache is
    all NaN again; the first generation then matches a second one."""
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cuda", backend=backend,
                                               max_seq_len=256, page_size=16,
                                               poison_cache=True)
    kv = engine.kv_cache
    prompt_backend = engine.backend if backend == "torch" else engine.backend._prefill_backend
    assert prompt_backend is not None and prompt_backend._prompt_graphs is None
    assert kv.pages() == []
    assert torch.isnan(kv.k).all() and torch.isnan(kv.v).all()
    ids = prompt(20, seed=7).tolist()
    first = engine.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert engine.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids == first.token_ids
