"""Paged KV cache: per-layer page pools, a page table and a host-side page allocator.

k, v: [num_layers, num_pages, page_size, n_kv_heads, head_dim] in the model dtype.
page_table: [batch, max_pages_per_seq] int32 on the cache's device; entry j of row b is
the page holding positions [j * page_size, (j + 1) * page_size) of sequence b. Pages are
handed out by a host allocator; running out is a KVCacheExhaustedError raised before any
work is launched.
"""
from __future__ import annotations

import contextlib
import random

import torch

from .errors import KVCacheExhaustedError


class PageAllocator:
    """Free list of page indices. With shuffle, pages come out in a seeded random order,
    so a sequence's pages are not contiguous (tests use it to prove the page table is
    honoured)."""

    def __init__(self, num_pages: int, shuffle_seed: int | None = None):
        self.num_pages = num_pages
        self._free = list(range(num_pages))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self._free)
        self._free.reverse()                # pop() hands out the front of the list

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise KVCacheExhaustedError(
                f"KV cache exhausted: need {count} more pages, {len(self._free)} free "
                f"of {self.num_pages}; raise max_seq_len or lower the request")
        return [self._free.pop() for _ in range(count)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class PagedKVCache:
    def __init__(self, config, max_seq_len: int, page_size: int = 16, batch: int = 1,
                 num_pages: int | None = None, dtype=torch.float32, device=None,
                 shuffle_seed: int | None = None, poison: bool = False):
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.config = config
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.max_pages_per_seq = -(-max_seq_len // page_size)
        self.num_pages = num_pages if num_pages is not None else batch * self.max_pages_per_seq
        shape = (config.num_layers, self.num_pages, page_size, config.num_kv_heads,
                 config.head_dim)
        self.fill = float("nan") if poison else 0.0
        self.k = torch.full(shape, self.fill, dtype=dtype, device=device)
        self.v = torch.full(shape, self.fill, dtype=dtype, device=device)
        self.page_table = torch.zeros((batch, self.max_pages_per_seq), dtype=torch.int32,
                                      device=device)
        self.allocator = PageAllocator(self.num_pages, shuffle_seed)
        self._pages: list[list[int]] = [[] for _ in range(batch)]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def capacity(self, seq: int = 0) -> int:
        """Positions sequence `seq` can hold with the pages it has now. Pages are whole, so
        the last one may reach past max_seq_len; those positions do not count (nothing may
        write them: the RoPE tables, for one, end at max_seq_len)."""
        return min(len(self._pages[seq]) * self.page_size, self.max_seq_len)

    def reserve(self, seq_len: int, seq: int = 0) -> None:
        """Make sure positions [0, seq_len) of sequence `seq` have pages."""
        if seq_len > self.max_seq_len:
            raise KVCacheExhaustedError(
                f"sequence of {seq_len} tokens exceeds the cache's max_seq_len "
                f"{self.max_seq_len}")
        need = -(-seq_len // self.page_size) - len(self._pages[seq])
        if need <= 0:
            return
        new = self.allocator.allocate(need)
        first = len(self._pages[seq])
        self._pages[seq].extend(new)
        self.page_table[seq, first:first + need] = torch.tensor(new, dtype=torch.int32)

    def truncate(self, seq_len: int, seq: int = 0) -> None:
        """Keep the pages of positions [0, seq_len) of sequence `seq` (and their data) and
        return the others to the pool."""
        keep = -(-seq_len // self.page_size)
        self.allocator.release(self._pages[seq][keep:])
        self._pages[seq] = self._pages[seq][:keep]

    def release(self, seq: int = 0) -> None:
        """Return sequence `seq`'s pages to the pool (the data is left in place)."""
        self.truncate(0, seq)

    def wipe(self, pages: list[int]) -> None:
        """Give `pages` their initial contents again (zeros, or NaN in a poisoned cache)."""
        index = torch.tensor(pages, dtype=torch.long, device=self.device)
        self.k.index_fill_(1, index, self.fill)
        self.v.index_fill_(1, index, self.fill)

    @contextlib.contextmanager
    def spared(self, first_entry: int, count: int, seq: int = 0):
        """Point page-table entries [first_entry, first_entry + count) of sequence `seq` at
        free pages while the block runs, then back: K/V written there meanwhile (a CUDA
        graph's capture) lands in those pages, not in the sequence's. Yields whether it
        could: False, and nothing changed, where the pool has fewer than `count` free."""
        if count <= 0:
            yield True
            return
        if count > self.allocator.num_free:
            yield False
            return
        scratch = self.allocator.allocate(count)
        entries = slice(first_entry, first_entry + count)
        saved = self.page_table[seq, entries].clone()
        self.page_table[seq, entries] = torch.tensor(scratch, dtype=torch.int32)
        try:
            yield True
        finally:
            self.page_table[seq, entries] = saved
            self.allocator.release(scratch)

    def pages(self, seq: int = 0) -> list[int]:
        return list(self._pages[seq])

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
