"""rms_qkv_rope: RMSNorm(hidden) -> rows of the fused QKV mat-vec -> RoPE -> q / paged KV.

The fused QKV output is cut into rotate-half pairs: pair i of head h is rows h*hd + i and
h*hd + hd/2 + i, so RoPE needs nothing outside a block. Pairs are numbered head-major
(h * hd/2 + i); one block serves `pair_count` consecutive pairs starting at pair
`pair_begin` of head `head`, continuing into the following heads when it runs past the
head's end (blocks need not align with heads, so every SM can get an equal share). Heads
[0, nq) are queries (roped, written to buffer q), [nq, nq+nkv) keys (roped, appended to
k_cache), the rest values (appended to v_cache) at the token's position in the page table.
"""
import torch

from .base import OpSpec, register, rms_norm, kv_slot


def block_pairs(cfg, head: int, pair_begin: int, pair_count: int):
    """(heads, pairs-in-head) [pair_count] each: the pairs one block serves, in order."""
    half = cfg.head_dim // 2
    g = head * half + pair_begin + torch.arange(pair_count)
    return g // half, g % half


def block_rows(cfg, head: int, pair_begin: int, pair_count: int) -> torch.Tensor:
    """The fused-QKV row indices one block computes: [lo rows..., hi rows...]."""
    heads, pairs = block_pairs(cfg, head, pair_begin, pair_count)
    lo = heads * cfg.head_dim + pairs
    return torch.cat([lo, lo + cfg.head_dim // 2])


def reference(instr, s):
    cfg, w, l = s.config, s.weights, instr.layer
    head, p0, n = instr.args["head"], instr.args["pair_begin"], instr.args["pair_count"]
    rows = block_rows(cfg, head, p0, n)
    heads, pairs = block_pairs(cfg, head, p0, n)
    hd, nq, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        xn = rms_norm(s.buffers["hidden"][t], w.attn_norm[l], cfg.rms_norm_eps)
        out = w.qkv[l, rows].float() @ xn
        lo, hi = out[:n], out[n:]
        pos = int(s.positions[t])
        roped = heads < nq + nkv              # queries and keys are rotated, values not
        cos, sin = w.rope_cos[pos, pairs], w.rope_sin[pos, pairs]
        lo, hi = (torch.where(roped, lo * cos - hi * sin, lo),
                  torch.where(roped, hi * cos + lo * sin, hi))
        half = hd // 2
        is_q = heads < nq
        qcols = heads[is_q] * hd + pairs[is_q]
        s.buffers["q"][t, qcols] = lo[is_q]
        s.buffers["q"][t, qcols + half] = hi[is_q]
        if not is_q.all():
            page, offset = kv_slot(s, pos)
            for cache, m in ((s.k_cache, (heads >= nq) & roped), (s.v_cache, ~roped)):
                kv_heads = heads[m] - nq - (0 if cache is s.k_cache else nkv)
                cache[l, page, offset, kv_heads, pairs[m]] = lo[m].to(cache.dtype)
                cache[l, page, offset, kv_heads, pairs[m] + half] = hi[m].to(cache.dtype)


def cost(instr, cfg, dtype_bytes):
    rows = 2 * instr.args["pair_count"]
    return instr.token_count * (rows * cfg.hidden_size * dtype_bytes + cfg.hidden_size * 4
                                + rows * 4) + cfg.hidden_size * dtype_bytes


RMS_QKV_ROPE = register(OpSpec("rms_qkv_rope", 2, ("head", "pair_begin", "pair_count"),
                               reference, cost, __doc__))
