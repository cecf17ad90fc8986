"""The prompt prefill on the GPU: replays of its CUDA graphs (prompt_graphs.py) against
the plain path, when they are captured (after the generation that first needed them),
and the generate() around them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import megakernel
from megakernel.backends.prompt_graphs import MIN_BUCKET, PromptGraphs, bucket_of
from megakernel.backends.prompt_prefill import fused_ops, prefill_chunk
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
    """A bucket's first prompt runs the plain path padded and leaves the bucket pending;
    later ones replay its graph. Both match the unpadded plain path."""
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    for i, n in enumerate([5, 12, 16, 9, 20, 31]):     # buckets 16, 16, 16, 16, 32, 32
        ids = prompt(n, seed=i)
        want = prefill(engine, lambda: prefill_chunk(engine.backend, ids), n)
        got = prefill(engine, lambda: graphs.run(ids), n)
        first_of_bucket = i in (0, 4)
        assert graphs.pending == ({(0, bucket_of(n))} if first_of_bucket else set())
        assert graphs.capture_pending() == ((1 if first_of_bucket else 0), False)
        assert graphs.captures == (1 if i < 4 else 2) and not graphs.pending
        for g, w in zip(got, want):
            assert relative_error(g, w) < BF16


def test_a_bucket_s_first_prompt_gets_the_bits_of_its_replays(engine):
    """The padded plain path runs the kernels the graph captures, on the same shapes: the
    first prompt of a bucket and a replay of it give identical logits and K/V."""
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    ids = prompt(37, seed=12)                            # bucket 64
    first = prefill(engine, lambda: graphs.run(ids), 37)
    assert graphs.pending == {(0, 64)} and graphs.capture_pending() == (1, False)
    replay = prefill(engine, lambda: graphs.run(ids), 37)
    assert graphs.captures == 1 and not graphs.pending
    for a, b in zip(first, replay):
        assert torch.equal(a, b)


def test_later_chunks_have_graphs_of_their_own(engine):
    """A chunk after 48 cached positions: captured after its first use of (bucket,
    window), its padded runs equal the plain path; a chunk whose bucket runs past the pages
    runs unpadded (None here) and gets no graph."""
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    before = prompt(48, seed=11)
    for i, n in enumerate([20, 30, 25]):                 # bucket 32 at start 48
        ids = prompt(n, seed=20 + i)
        want = prefill(engine, lambda: prefill_chunk(engine.backend, ids, 48), 48 + n,
                       before=before)
        got = prefill(engine, lambda: graphs.run(ids, 48), 48 + n, before=before)
        assert graphs.pending_windows == ({(32, 256)} if i == 0 else set())
        graphs.capture_pending()
        assert graphs.captures == 1
        for g, w in zip(got, want):
            assert relative_error(g, w) < BF16
    ids, before = prompt(20, seed=30), prompt(52, seed=31)
    for _ in range(3):                                   # pages for [0, 80), bucket [52, 84)
        assert prefill(engine, lambda: graphs.run(ids, 52), 72, reserve=72,
                       before=before)[0] is None
        assert not graphs.pending_windows and graphs.capture_pending() == (0, False)
    assert graphs.captures == 1


def test_a_windowed_graph_serves_its_bucket_at_any_start_in_its_window():
    """Later chunks of one bucket at starts 100, 137, 500 and 100 again (windows 512, 512,
    1024, 512): each window's first run through the graphs gives the bits of its replay, and
    every run matches the plain path at that start within bf16 rounding; one graph per
    (bucket, window)."""
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cuda", backend="torch",
                                               max_seq_len=1024, page_size=16)
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    for i, (start, n) in enumerate([(100, 20), (137, 27), (500, 17), (100, 30)]):
        before, ids = prompt(start, seed=40 + i), prompt(n, seed=50 + i)
        want = prefill(engine, lambda: prefill_chunk(engine.backend, ids, start), start + n,
                       reserve=1024, before=before)
        first = prefill(engine, lambda: graphs.run(ids, start), start + n, reserve=1024,
                        before=before)
        new_window = i in (0, 2)
        assert graphs.pending_windows == ({(32, 512 if i == 0 else 1024)} if new_window
                                          else set())
        assert graphs.capture_pending() == ((1, False) if new_window else (0, False))
        replay = prefill(engine, lambda: graphs.run(ids, start), start + n, reserve=1024,
                         before=before)
        for a, b, w in zip(first, replay, want):
            assert torch.equal(a, b) if new_window else relative_error(a, b) < BF16
            assert relative_error(b, w) < BF16
    assert graphs.captures == 2


@pytest.mark.parametrize("reserve, keep, captured", [
    (320, 300, 1),     # the window's last chunk, in 2 spare pages of the 44 free
    (1024, 300, 1),    # in the sequence's own pages past the kept positions
    (1024, 500, 0),    # neither: no page free, and positions 480-511 are kept
])
def test_a_capture_spares_the_positions_the_cache_keeps(reserve, keep, captured):
    """A windowed graph (bucket 32, window 512) captured after a generation whose first
    `keep` positions the cache keeps: its chunk's K/V land where no kept position is, and
    the kept K/V stay as they were; where it cannot, it waits for a later capture."""
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cuda", backend="torch",
                                               max_seq_len=1024, page_size=16)
    graphs = PromptGraphs(engine.backend, max_tokens=512)
    kv = engine.kv_cache
    kv.reserve(reserve)
    prefill_chunk(engine.backend, prompt(280, seed=60))
    assert graphs.run(prompt(20, seed=61), 280) is not None
    kept = kv.page_table[0, :-(-keep // 16)].long()
    k, v = kv.k[:, kept].clone(), kv.v[:, kept].clone()
    assert graphs.capture_pending(keep_positions=keep) == (captured, False)
    assert graphs.captures == captured and not graphs.pending_windows
    assert torch.equal(kv.k[:, kept], k) and torch.equal(kv.v[:, kept], v)
    assert kv.allocator.num_free == 64 - reserve // 16
    assert kv.page_table[0, :reserve // 16].tolist() == kv.pages()


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
        prefill(engine, lambda: graphs.run(ids), 10)
        assert graphs.pending == {(0, 16)} and graphs.capture_pending() == (1, False)
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
        assert graphs.capture_pending() == (0, False)
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


def test_a_last_chunk_whose_bucket_passes_max_seq_len_runs_unpadded():
    """max_seq_len 1020 in pages of 16 gives 1024 positions of pages but 1020 of RoPE
    tables: a 990-token prompt's second chunk (478 tokens from 512) would pad to 1024. It
    runs unpadded instead, and gives the logits of an engine with room to pad."""
    ids = prompt(990, seed=9).tolist()
    results = []
    for max_seq_len in (1020, 2048):
        engine = megakernel.Engine.from_pretrained("random:tiny", device="cuda",
                                                   max_seq_len=max_seq_len, page_size=16)
        results.append([engine.generate(ids, max_new_tokens=6, ignore_eos=True,
                                        output_logits=True) for _ in range(2)])
    tight, roomy = results
    assert tight[0].token_ids == tight[1].token_ids
    assert relative_error(tight[0].logits, roomy[0].logits) < BF16


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
    """Engine.from_pretrained runs a dummy prompt per bucket on the GPU (a process's first
    library use, ~1 s, and its matmul shapes, paid at load) and one decode launch. It
    captures no graph, holds no page, and a poisoned cache is all NaN again; the first
    generation then matches a second one."""
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cuda", backend=backend,
                                               max_seq_len=256, page_size=16,
                                               poison_cache=True)
    kv = engine.kv_cache
    if backend == "megakernel":   # one decode launch at load, the process's first
        assert engine.backend.launches == 1
    prompt_backend = engine.backend if backend == "torch" else engine.backend._prefill_backend
    assert prompt_backend is not None and prompt_backend._prompt_graphs is None
    assert kv.pages() == []
    assert torch.isnan(kv.k).all() and torch.isnan(kv.v).all()
    ids = prompt(20, seed=7).tolist()
    first = engine.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert engine.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids == first.token_ids


@pytest.fixture(scope="module")
def ops(engine):
    ops = fused_ops(engine.backend)
    if ops is None:
        pytest.skip("the megakernel extension is not built for this GPU")
    return ops


def bf16_ulps_apart(out: torch.Tensor, want: torch.Tensor, ulps: int = 1) -> bool:
    """Whether every element of out is within `ulps` bf16 units of want's last place."""
    out, want = out.float(), want.float()
    return bool(((out - want).abs() <= ulps * 2.0 ** -7 * want.abs() + 1e-30).all())


@pytest.mark.parametrize("nq,nkv,hd", [(32, 8, 64), (8, 8, 128)])
def test_rope_append_rounds_as_the_torch_ops(ops, nq, nkv, hd):
    """The fused RoPE and cache append against prompt_prefill's PyTorch form, bit for bit:
    q and k rotated, v copied, into the slots of positions 5..11 through a shuffled page
    table; a page outside the cache is skipped; no other slot is written."""
    T, half, ps, start = 7, hd // 2, 4, 5
    g = torch.Generator(device="cuda").manual_seed(nq + hd)
    qkv = torch.randn(T, (nq + 2 * nkv) * hd, device="cuda", generator=g).bfloat16()
    angles = torch.rand(T, half, device="cuda", generator=g) * 6.3
    cos, sin = angles.cos(), angles.sin()
    qk = qkv[:, :(nq + nkv) * hd].float().view(T, nq + nkv, 2, half)
    rope_c = torch.stack([cos, cos], dim=1).unsqueeze(1)
    rope_s = torch.stack([-sin, sin], dim=1).unsqueeze(1)
    rotated = (qk * rope_c + qk.flip(2) * rope_s).bfloat16().view(T, nq + nkv, hd)
    values = qkv[:, (nq + nkv) * hd:].reshape(T, nkv, hd)
    pos = torch.arange(start, start + T, device="cuda")
    for table in ([3, 0, 5, 1, 4, 2], [3, 99, 5, 1, 4, 2]):     # positions 5-7 in page 99
        table = torch.tensor(table, dtype=torch.int32, device="cuda")
        k_cache = torch.full((6, ps, nkv, hd), float("nan"), dtype=torch.bfloat16,
                             device="cuda")
        v_cache = k_cache.clone()
        q = torch.empty(T, nq, hd, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(T, nkv, hd, dtype=torch.bfloat16, device="cuda")
        ops.prefill_rope_append(qkv, cos, sin, table, start, k_cache, v_cache, q, k)
        assert torch.equal(q, rotated[:, :nq]) and torch.equal(k, rotated[:, nq:])
        cached = table[pos // ps] < 6
        page, offset = table[pos // ps][cached].long(), (pos % ps)[cached]
        assert torch.equal(k_cache[page, offset], rotated[cached, nq:])
        assert torch.equal(v_cache[page, offset], values[cached])
        written = torch.zeros(6, ps, dtype=torch.bool, device="cuda")
        written[page, offset] = True
        assert torch.isnan(k_cache[~written].float()).all()
        assert torch.isnan(v_cache[~written].float()).all()
        assert int(cached.sum()) == (T if int(table[1]) == 0 else T - 3)
        # The start read on the device (a windowed graph's): the same writes.
        k_dev, v_dev = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache,
                                                                              float("nan"))
        q_dev, k_out = torch.empty_like(q), torch.empty_like(k)
        ops.prefill_rope_append(qkv, cos, sin, table, 0, k_dev, v_dev, q_dev, k_out,
                                torch.tensor([start], device="cuda"))
        assert torch.equal(q_dev, q) and torch.equal(k_out, k)
        assert torch.equal(k_dev.isnan(), k_cache.isnan()) and torch.equal(
            k_dev.nan_to_num(), k_cache.nan_to_num())
        assert torch.equal(v_dev.nan_to_num(), v_cache.nan_to_num())
    # Device-read positions past the page table are skipped, not read out of bounds:
    # positions 18-24 are entries 4, 4, 5, 5, 5, 5 and 6 of a 6-entry table.
    k_cache.fill_(float("nan"))
    ops.prefill_rope_append(qkv, cos, sin, table, 0, k_cache, k_cache.clone(), q, k,
                            torch.tensor([18], device="cuda"))
    assert int((~k_cache.float().isnan().view(6 * ps, -1).all(1)).sum()) == 6


def test_silu_mul_and_add_rms_norm_against_the_torch_ops(ops):
    """SiLU times up, and the residual add with the RMSNorm after it, against the PyTorch
    ops prompt_prefill uses: the add exact, each bf16 output within one unit of the last
    place (the exp and the norm's sum of squares are computed in another order)."""
    T, I, H = 5, 96, 80
    g = torch.Generator(device="cuda").manual_seed(1)
    gate_up = (torch.randn(T, 2 * I, device="cuda", generator=g) * 4).bfloat16()
    act = torch.empty(T, I, dtype=torch.bfloat16, device="cuda")
    ops.prefill_silu_mul(gate_up, act)
    want = (F.silu(gate_up[:, :I].float()) * gate_up[:, I:].float()).bfloat16()
    assert bf16_ulps_apart(act, want)

    x = torch.randn(T, H, device="cuda", generator=g) * 3
    delta = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    weight = torch.rand(H, device="cuda", generator=g) + 0.5
    out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
    summed = x + delta.float()
    ops.prefill_add_rms_norm(x, delta, weight, 1e-5, out)
    assert torch.equal(x, summed)
    assert bf16_ulps_apart(out, F.rms_norm(summed, (H,), weight, 1e-5).bfloat16())
    ops.prefill_add_rms_norm(x, None, weight, 1e-5, out)         # no delta: x unchanged
    assert torch.equal(x, summed)
    with pytest.raises(RuntimeError, match="megakernel: 'gate_up' must be"):
        ops.prefill_silu_mul(gate_up, torch.empty(T, I + 1, dtype=torch.bfloat16,
                                                  device="cuda"))


@pytest.mark.parametrize("start", [0, 48])
def test_a_fused_chunk_matches_the_torch_ops(engine, ops, start):
    """A chunk through the fused kernels against the same chunk through the PyTorch ops,
    first or after 48 cached positions: logits and every layer's K/V within bf16
    rounding."""
    before = prompt(48, seed=11) if start else None
    ids = prompt(21, seed=3)
    want = prefill(engine, lambda: prefill_chunk(engine.backend, ids, start, fused=False),
                   start + 21, before=before)
    got = prefill(engine, lambda: prefill_chunk(engine.backend, ids, start, fused=True),
                  start + 21, before=before)
    for g, w in zip(got, want):
        assert relative_error(g, w) < BF16
