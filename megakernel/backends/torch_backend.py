"""Per-op PyTorch execution of the same math: the decode baseline, and the prompt's path.

Runs on any device. Matmuls run in the weight dtype (what per-op inference does); the
residual stream, norms and softmax stay in float32, like the megakernel. It writes K/V
into the same PagedKVCache the other backends read, so a prompt prefilled here can be
decoded by the megakernel.

`forward(token_ids, positions, context_len)` uses only device tensors and static shapes,
so one decode step can be captured in a CUDA graph or compiled with torch.compile when
context_len is fixed (the benchmark does this). Prompts prefill through a leaner form of
the same math in chunks (prompt_prefill.py), replayed from CUDA graphs where they can be
(prompt_graphs.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megakernel.instructions.base import rms_norm

from .base import Backend, StepOutput
from .prompt_graphs import (MIN_BUCKET, PromptGraphs, padded_prompt_end, prefill_padded,
                            prompt_chunks, warm_up_buckets)
from .prompt_prefill import context_window, fused_ops, prefill_chunk

# Prompt tokens per prefill chunk: bounds the [chunk, context] attention scores in memory.
# A power of two: the largest prompt-graph bucket (prompt_graphs.py).
PREFILL_CHUNK = 512
# On CUDA, whose attention materializes no scores, a prompt's first tokens prefill in
# chunks of this many while that many remain: on an H100 a 1B prompt of 4096 tokens took
# 21 ms to its first token against 27 in chunks of 512, 8192 took 50 against 63
# (benchmarks/RESULTS.md, entry 93). Shorter prompts keep PREFILL_CHUNK's buckets, which
# pad less.
LONG_PREFILL_CHUNK = 2048


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] float32, cos/sin [T, hd/2] -> rotate-half RoPE."""
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], dim=-1)


class TorchBackend(Backend):
    name = "torch"
    _prompt_graphs: PromptGraphs | None = None   # CUDA only, made at the first prefill

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                context_len: int) -> torch.Tensor:
        """token_ids, positions: [T] int64 on the device; context_len: cache positions
        attended over (>= max(positions) + 1; page-rounded up inside). Appends K/V at
        `positions`. Returns logits [V] float32 of the last token."""
        c, w, kv = self.config, self.weights, self.kv_cache
        dt = w.dtype
        T, hd, nq, nkv = token_ids.shape[0], c.head_dim, c.num_heads, c.num_kv_heads
        ps = kv.page_size
        num_pages = -(-context_len // ps)
        pages = kv.page_table[0, :num_pages].long()
        slot_page = kv.page_table[0, positions // ps].long()
        slot_offset = positions % ps
        cos, sin = w.rope_cos[positions], w.rope_sin[positions]
        key_pos = torch.arange(num_pages * ps, device=positions.device)
        visible = key_pos.unsqueeze(0) <= positions.unsqueeze(1)           # [T, K]
        written = (key_pos <= positions.max()).view(-1, 1, 1)              # [K, 1, 1]

        x = w.embed[token_ids].float()                                     # [T, H]
        for layer in range(c.num_layers):
            xn = rms_norm(x, w.attn_norm[layer], c.rms_norm_eps)
            qkv = (xn.to(dt) @ w.qkv[layer].t()).float()
            q = apply_rope(qkv[:, :c.q_size].view(T, nq, hd), cos, sin)
            k = apply_rope(qkv[:, c.q_size:c.q_size + c.kv_size].view(T, nkv, hd), cos, sin)
            v = qkv[:, c.q_size + c.kv_size:].view(T, nkv, hd)
            # index_put_ on the whole pool (not on a per-layer view) so torch.compile
            # updates it in place instead of copying the pool every step.
            layer_index = torch.full_like(slot_page, layer)
            kv.k.index_put_((layer_index, slot_page, slot_offset), k.to(kv.k.dtype))
            kv.v.index_put_((layer_index, slot_page, slot_offset), v.to(kv.v.dtype))
            keys = kv.k[layer, pages].reshape(-1, nkv, hd).float()          # [K, nkv, hd]
            values = kv.v[layer, pages].reshape(-1, nkv, hd).float()
            # Slots past the context hold whatever the pool had (NaN when poisoned):
            # a zero softmax weight times NaN is still NaN, so clear them.
            keys = torch.where(written, keys, 0.0)
            values = torch.where(written, values, 0.0)
            attn = self._attention(q, keys, values, visible)               # [T, nq * hd]
            x = x + (attn.to(dt) @ w.o_proj[layer].t()).float()
            xn = rms_norm(x, w.mlp_norm[layer], c.rms_norm_eps)
            gate_up = (xn.to(dt) @ w.gate_up[layer].t()).float()
            act = F.silu(gate_up[:, :c.intermediate_size]) * gate_up[:, c.intermediate_size:]
            x = x + (act.to(dt) @ w.down[layer].t()).float()
        xn = rms_norm(x[-1], w.final_norm, c.rms_norm_eps)
        return (xn.to(dt) @ w.lm_head.t()).float()

    def _attention(self, q, keys, values, visible):
        """q [T, nq, hd], keys/values [K, nkv, hd] float32, visible [T, K] bool."""
        c = self.config
        T, g = q.shape[0], c.group_size
        qg = q.view(T, c.num_kv_heads, g, c.head_dim)
        scores = torch.einsum("tkgd,skd->tkgs", qg, keys) / math.sqrt(c.head_dim)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("tkgs,skd->tkgd", probs, values)
        return out.reshape(T, c.q_size)

    @property
    def long_chunk(self) -> int | None:
        """LONG_PREFILL_CHUNK on CUDA; None on the CPU, whose attention materializes the
        [chunk, context] scores."""
        return LONG_PREFILL_CHUNK if self.kv_cache.device.type == "cuda" else None

    @property
    def warm_up_tokens(self) -> int:
        return self.long_chunk or PREFILL_CHUNK

    def prompt_positions(self, num_tokens: int) -> int:
        """The last chunk runs padded to its bucket (prompt_graphs.py)."""
        return padded_prompt_end(num_tokens, PREFILL_CHUNK, self.long_chunk)

    def warm_up(self, num_tokens: int) -> torch.Tensor | None:
        """Every prompt bucket of at most num_tokens (and PREFILL_CHUNK) tokens once,
        through the padded path that a chunk without a graph takes (prompt_graphs.py), then
        a long chunk where num_tokens holds one, and short and long chunks after position
        0 on the fused path, so that their matmul shapes and kernels have all been met: a
        first use cost ~3 ms per new matmul shape and ~45 ms for the index of the last
        token's row."""
        device = self.kv_cache.device
        logits = None
        for bucket in warm_up_buckets(min(num_tokens, PREFILL_CHUNK)):
            logits = prefill_padded(self, torch.zeros(bucket, dtype=torch.int64, device=device))
        if self.long_chunk is not None and num_tokens >= self.long_chunk:
            logits = prefill_chunk(self, torch.zeros(self.long_chunk, dtype=torch.int64,
                                                     device=device))
        if fused_ops(self) is not None and num_tokens >= 2 * PREFILL_CHUNK:
            # Chunks after position 0 (a chat turn's new tokens), short and long, as
            # windowed graphs run them: their attention's kernels loaded here, not inside
            # the first turn's time to first token.
            for bucket in (MIN_BUCKET, PREFILL_CHUNK):
                window = context_window(bucket + PREFILL_CHUNK, self.kv_cache)
                prefill_padded(self, torch.zeros(bucket, dtype=torch.int64, device=device),
                               PREFILL_CHUNK, window)
        return logits

    def capture_prompt_graphs(self, keep_positions: int = 0) -> tuple[int, bool]:
        if self._prompt_graphs is None:
            return 0, False
        return self._prompt_graphs.capture_pending(keep_positions)

    def drop_pending_prompt_graphs(self) -> None:
        if self._prompt_graphs is not None:
            self._prompt_graphs.drop_pending_starts()

    def prefill(self, token_ids: torch.Tensor, start_position: int) -> StepOutput:
        """Tokens [T] at positions start_position.. in chunks (prompt_chunks(): on CUDA
        long ones first, then ones of PREFILL_CHUNK), each in few launches
        (prompt_prefill.py); on CUDA the short ones padded to their bucket and, where an
        earlier generation captured its graph, replayed from it (prompt_graphs.py)."""
        device = self.kv_cache.device
        token_ids = token_ids.to(device)
        logits = None
        for begin, length in prompt_chunks(token_ids.shape[0], PREFILL_CHUNK, self.long_chunk):
            chunk = token_ids[begin:begin + length]
            first = start_position + begin
            logits = None
            if device.type == "cuda":
                if self._prompt_graphs is None:
                    self._prompt_graphs = PromptGraphs(self, PREFILL_CHUNK)
                logits = self._prompt_graphs.run(chunk, first)
            if logits is None:
                logits = prefill_chunk(self, chunk, first)
        return StepOutput(logits=logits, greedy_token=torch.argmax(logits))

    def decode(self, token_id: torch.Tensor, position: int) -> StepOutput:
        device = self.kv_cache.device
        ids = token_id.reshape(1).to(device)
        positions = torch.full((1,), position, dtype=torch.int64, device=device)
        logits = self.forward(ids, positions, position + 1)
        return StepOutput(logits=logits, greedy_token=torch.argmax(logits))
