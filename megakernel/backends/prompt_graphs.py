"""Prompt prefills replayed from CUDA graphs: the time to first token without the host.

prefill_chunk() launches ~45 kernels per layer, and for a short prompt the host's
launching takes several times the GPU's work (benchmarks/RESULTS.md, entry 48). A graph
of it per chunk start and length bucket (a power of two, at least MIN_BUCKET tokens)
replays all of them in one launch: the chunk goes into the graph's token buffer padded
with token 0, and the logits come from the last real token. The padding's K/V lands at
positions past the chunk, which later chunks or the decode steps overwrite before any
step attends to them; only a bucket whose positions all have pages in the cache is used.

A chunk with no graph runs the plain path and leaves its (start, bucket) pending;
capture_pending() captures those graphs. The engine calls it after a generation's last
token (Engine.generate), so a capture (on an H100 ~30 ms, 80-110 for a process's first)
falls inside no time to first token: a bucket's first prompt runs the plain path, every
later one a replay (benchmarks/RESULTS.md, entry 72). A graph holds the addresses of the
weights, the cache and the RoPE tables: it is pending again if any of them moved. All
graphs share one memory pool (their replays never overlap).
"""
from __future__ import annotations

import torch

from .prompt_prefill import prefill_chunk

MIN_BUCKET = 16


def bucket_of(num_tokens: int) -> int:
    """The padded length of a prompt of num_tokens: the next power of two, at least
    MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (num_tokens - 1).bit_length())


class _Graph:
    def __init__(self, graph, token_ids, last_index, logits, addresses):
        self.graph, self.token_ids, self.last_index = graph, token_ids, last_index
        self.logits, self.addresses = logits, addresses


class PromptGraphs:
    """CUDA graphs of prefill_chunk(backend, ...) by (start, bucket); see the module doc."""

    def __init__(self, backend, max_tokens: int):
        self.backend = backend
        self.max_tokens = max_tokens     # longest prompt chunk (a power of two)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self.pending: set[tuple[int, int]] = set()   # (start, bucket) run without a graph
        self._pool = None
        self.captures = 0                # graphs captured so far (tests read it)

    def _addresses(self) -> tuple[int, ...]:
        w, kv = self.backend.weights, self.backend.kv_cache
        tensors = [getattr(w, name) for name in w.MATRIX_NAMES + ("rope_cos", "rope_sin")]
        return tuple(t.data_ptr() for t in tensors + [kv.k, kv.v, kv.page_table])

    def run(self, token_ids: torch.Tensor, start: int = 0) -> torch.Tensor | None:
        """The logits [V] of the chunk token_ids (int64 [T] on the device) prefilled at
        positions start.. through a graph, or None where no graph serves it (the caller
        then prefills without one; its (start, bucket) is left pending when a graph could
        serve it). The logits live in the graph's buffer until its next replay."""
        n = token_ids.shape[0]
        bucket = bucket_of(n)
        if bucket > self.max_tokens or start + bucket > self.backend.kv_cache.capacity():
            return None
        key = (start, bucket)
        entry = self._graphs.get(key)
        if entry is None or entry.addresses != self._addresses():
            self.pending.add(key)
            return None
        entry.token_ids[:n].copy_(token_ids)
        entry.token_ids[n:].zero_()
        entry.last_index.fill_(n - 1)
        entry.graph.replay()
        return entry.logits

    def capture_pending(self) -> int:
        """Capture the pending graphs whose positions have pages in the cache now (the
        others are dropped: a later chunk leaves them pending again). Each capture writes
        the K/V of its positions: call it when the cache's contents are no longer needed
        (after a generation). Returns how many were captured."""
        device = self.backend.kv_cache.device
        addresses = self._addresses()
        captured = 0
        for key in sorted(self.pending):
            start, bucket = key
            if start + bucket <= self.backend.kv_cache.capacity():
                # Replayed once here: a graph's first launch uploads it (~0.6 ms on an
                # H100), which would otherwise fall in the next prompt's TTFT.
                self._capture(key, device, addresses).graph.replay()
                captured += 1
        self.pending.clear()
        return captured

    def _capture(self, key: tuple[int, int], device, addresses) -> _Graph:
        start, bucket = key
        token_ids = torch.zeros(bucket, dtype=torch.int64, device=device)
        last_index = torch.zeros(1, dtype=torch.int64, device=device)
        # One run outside the capture, on a side stream, so that lazily created state
        # (library handles, workspaces) is not captured. It writes the K/V of positions
        # [start, start + bucket), which the replay that follows writes again.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            prefill_chunk(self.backend, token_ids, start, last_index)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = prefill_chunk(self.backend, token_ids, start, last_index)
        self._pool = graph.pool()
        self.captures += 1
        entry = _Graph(graph, token_ids, last_index, logits, addresses)
        self._graphs[key] = entry
        return entry
