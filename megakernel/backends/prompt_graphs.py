"""Prompt prefills replayed from CUDA graphs: the time to first token without the host.

prefill_chunk() launches ~45 kernels per layer, and for a short prompt the host's
launching takes several times the GPU's work (benchmarks/RESULTS.md, entry 48). A graph
of it per chunk start and length bucket (a power of two, at least MIN_BUCKET tokens), or,
on the fused path for a chunk at a start that is not a multiple of the chunk size (a chat
turn's new tokens; a whole prompt's chunks start at multiples), per bucket and context
window (prompt_prefill.context_window: the chunk's start is read on the device, so one
graph serves every start in the window; entry 94),
replays all of them in one launch: the chunk goes into the graph's token buffer padded
with token 0, and the logits come from the last real token. The padding's K/V lands at
positions past the chunk, which later chunks or the decode steps overwrite before any
step attends to them; only a bucket whose positions all have pages in the cache is used.

A chunk with no graph runs the plain path on the same padded tokens (and window) and
leaves its key pending; capture_pending() captures those graphs. The engine calls it
after a generation's last token (Engine.generate), so a capture (on an H100 ~30 ms,
80-110 for a process's first) falls inside no time to first token, and the K/V the cache
keeps for the next generation are spared (PagedKVCache.spared): a bucket's first
prompt runs the plain path, every later one a replay (benchmarks/RESULTS.md, entry 72).
The plain path runs padded because cuBLAS pays ~3 ms the first time a process multiplies
a new shape, four shapes per prompt length: padded, a process sees only the buckets'
shapes, which the backend's warm-up runs at load (warm_up_buckets), and the first prompt
of a bucket gets the same bits its replays will (entry 78). A graph holds the addresses of
the weights, the cache and the RoPE tables: it is pending again if any of them moved. All
graphs share one memory pool (their replays never overlap).
"""
from __future__ import annotations

import torch

from .prompt_prefill import context_window, fused_ops, prefill_chunk

MIN_BUCKET = 16


def bucket_of(num_tokens: int) -> int:
    """The padded length of a prompt of num_tokens: the next power of two, at least
    MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (num_tokens - 1).bit_length())


def prefill_padded(backend, token_ids: torch.Tensor, start: int = 0,
                   window: int | None = None) -> torch.Tensor:
    """prefill_chunk() of token_ids (int64 [T] on the device) padded with token 0 to its
    bucket, as a graph of it runs: the logits [V] of the last real token. Positions
    [start, start + bucket) must have pages; the padding's K/V lands past the chunk.
    window: a fused later chunk's context window, as its graph's (default: its own)."""
    n = token_ids.shape[0]
    device = token_ids.device
    padded = torch.zeros(bucket_of(n), dtype=torch.int64, device=device)
    padded[:n].copy_(token_ids)
    last_index = torch.full((1,), n - 1, dtype=torch.int64, device=device)
    if window is None:
        return prefill_chunk(backend, padded, start, last_index)
    start_on_device = torch.full((1,), start, dtype=torch.int64, device=device)
    return prefill_chunk(backend, padded, start, last_index, start_on_device=start_on_device,
                         window=window)


def warm_up_buckets(max_tokens: int) -> list[int]:
    """The buckets of at most max_tokens tokens, smallest first: the prompt lengths a
    backend's warm-up runs so that no prompt's first prefill meets a new matmul shape."""
    buckets, bucket = [], MIN_BUCKET
    while bucket <= max_tokens:
        buckets.append(bucket)
        bucket *= 2
    return buckets


def prompt_chunks(num_tokens: int, chunk: int,
                  long_chunk: int | None = None) -> list[tuple[int, int]]:
    """(begin, length) of the chunks a prompt of num_tokens prefills in: first, where
    long_chunk is given, as many chunks of long_chunk tokens as fit (run unpadded, without
    graphs: long prompts are bound by the GPU's work, which larger chunks cut), then the
    rest in chunks of `chunk` tokens (a bucket), the last of them padded to its bucket."""
    spans, begin = [], 0
    if long_chunk is not None:
        while num_tokens - begin >= long_chunk:
            spans.append((begin, long_chunk))
            begin += long_chunk
    while begin < num_tokens:
        spans.append((begin, min(chunk, num_tokens - begin)))
        begin += chunk
    return spans


def padded_prompt_end(num_tokens: int, chunk: int, long_chunk: int | None = None) -> int:
    """The position after a prompt of num_tokens prefilled in prompt_chunks() with its
    last chunk padded to its bucket (a long one runs unpadded): the positions that need
    pages for that chunk to run padded, or from a graph."""
    begin, length = prompt_chunks(num_tokens, chunk, long_chunk)[-1]
    return begin + (length if length > chunk else bucket_of(length))


class _Graph:
    def __init__(self, graph, token_ids, last_index, logits, addresses, start_on_device):
        self.graph, self.token_ids, self.last_index = graph, token_ids, last_index
        self.logits, self.addresses = logits, addresses
        self.start_on_device = start_on_device     # a windowed graph's start, else None


class PromptGraphs:
    """CUDA graphs of prefill_chunk(backend, ...) by (start, bucket), and, for chunks at
    other starts than multiples of max_tokens on the fused path, by (bucket, window) at
    any start; see the module doc."""

    def __init__(self, backend, max_tokens: int):
        self.backend = backend
        self.max_tokens = max_tokens     # longest prompt chunk (a power of two)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self.pending: set[tuple[int, int]] = set()   # (start, bucket) run without a graph
        # Chunks at other starts on the fused path: (bucket, window) run without a graph.
        self._windowed: dict[tuple[int, int], _Graph] = {}
        self.pending_windows: set[tuple[int, int]] = set()
        self._pool = None
        self.captures = 0                # graphs captured so far (tests read it)

    def _addresses(self) -> tuple[int, ...]:
        w, kv = self.backend.weights, self.backend.kv_cache
        tensors = [getattr(w, name) for name in w.MATRIX_NAMES + ("rope_cos", "rope_sin")]
        return tuple(t.data_ptr() for t in tensors + [kv.k, kv.v, kv.page_table])

    def run(self, token_ids: torch.Tensor, start: int = 0) -> torch.Tensor | None:
        """The logits [V] of the chunk token_ids (int64 [T] on the device) prefilled at
        positions start.. padded to its bucket: through a graph, or, where the graph is not
        captured yet, through the plain path on the same padded tokens, which leaves its
        (start, bucket) pending. None where the bucket runs past the longest chunk or the
        cache's capacity (the caller then prefills the chunk unpadded). The logits
        live in the graph's buffer until its next replay."""
        n = token_ids.shape[0]
        bucket = bucket_of(n)
        kv = self.backend.kv_cache
        if bucket > self.max_tokens or start + bucket > kv.capacity():
            return None
        # A later chunk of a whole prompt starts at a multiple of the chunk size, which
        # recurs: keyed by its start. Any other start (a chat turn's new tokens) rarely
        # does: keyed by its window, on the fused path, where a graph serves any start.
        if start % self.max_tokens and fused_ops(self.backend) is not None:
            key = (bucket, context_window(start + bucket, kv))
            graphs, pending, window = self._windowed, self.pending_windows, key[1]
        else:
            key, graphs, pending, window = (start, bucket), self._graphs, self.pending, None
        entry = graphs.get(key)
        if entry is None or entry.addresses != self._addresses():
            pending.add(key)
            return prefill_padded(self.backend, token_ids, start, window)
        entry.token_ids[:n].copy_(token_ids)
        entry.token_ids[n:].zero_()
        entry.last_index.fill_(n - 1)
        if entry.start_on_device is not None:
            entry.start_on_device.fill_(start)
        entry.graph.replay()
        return entry.logits

    def capture_pending(self, keep_positions: int = 0) -> tuple[int, bool]:
        """Capture the pending graphs whose chunks could run now (the others are dropped: a
        later chunk leaves them pending again). A capture runs its chunk, which writes
        K/V: those of positions [0, keep_positions) go to spare pages meanwhile
        (PagedKVCache.spared), where the pool has enough free; a windowed graph runs at a
        start of its window whose positions the sequence holds past keep_positions, or
        else writes spare pages, or else waits for a later call. Call it after a
        generation. Returns (graphs captured, whether any capture wrote over positions
        [0, keep_positions))."""
        device = self.backend.kv_cache.device
        kv = self.backend.kv_cache
        ps = kv.page_size
        kept_entries = -(-keep_positions // ps)
        addresses = self._addresses()
        captured, overwrote = 0, False
        for start, bucket in sorted(self.pending):
            if start + bucket > kv.capacity():
                continue
            first = start // ps
            with kv.spared(first, min(kept_entries, -(-(start + bucket) // ps)) - first) as ok:
                # Replayed once here: a graph's first launch uploads it (~0.6 ms on an
                # H100), which would otherwise fall in the next prompt's TTFT.
                self._capture(start, bucket, None, device, addresses).graph.replay()
            captured += 1
            overwrote |= not ok
        for bucket, window in sorted(self.pending_windows):
            # A chunk whose window this is: the last one the sequence's own pages hold
            # past the kept positions, or else the window's last, its K/V in spare pages
            # (page-table entries past the sequence's pages are stale: they may name pages
            # it holds now).
            start = min(window, kv.capacity()) - bucket
            owned = start >= keep_positions and context_window(start + bucket, kv) == window
            if not owned:
                start = window - bucket
            first = start // ps
            with kv.spared(first, 0 if owned else -(-window // ps) - first) as ok:
                if ok:
                    self._capture(start, bucket, window, device, addresses).graph.replay()
                    captured += 1
        self.pending.clear()
        self.pending_windows.clear()
        return captured, overwrote

    def drop_pending_starts(self) -> None:
        """Forget the pending graphs keyed by a start past 0: after a generation that kept
        a prefix, whose chunks start where it ended, a position later prompts rarely start
        at again (windowed graphs serve any start and stay pending)."""
        self.pending = {key for key in self.pending if key[0] == 0}

    def _capture(self, start: int, bucket: int, window: int | None, device,
                 addresses) -> _Graph:
        token_ids = torch.zeros(bucket, dtype=torch.int64, device=device)
        last_index = torch.zeros(1, dtype=torch.int64, device=device)
        start_on_device = None
        options = {}
        if window is not None:
            start_on_device = torch.full((1,), start, dtype=torch.int64, device=device)
            options = dict(start_on_device=start_on_device, window=window)
        # One run outside the capture, on a side stream, so that lazily created state
        # (library handles, workspaces) is not captured. It writes the K/V of positions
        # [start, start + bucket), which the replay that follows writes again.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            prefill_chunk(self.backend, token_ids, start, last_index, **options)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = prefill_chunk(self.backend, token_ids, start, last_index, **options)
        self._pool = graph.pool()
        self.captures += 1
        entry = _Graph(graph, token_ids, last_index, logits, addresses, start_on_device)
        if window is None:
            self._graphs[(start, bucket)] = entry
        else:
            self._windowed[(bucket, window)] = entry
        return entry
