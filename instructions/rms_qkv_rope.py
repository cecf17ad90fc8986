"""rms_qkv_rope: RMSNorm(hidden) -> rows of the fused QKV mat-vec -> RoPE -> q / paged KV.

One block serves `pair_count` RoPE pairs of one head of the fused QKV output: rows
head*hd + pair_begin + i and head*hd + hd/2 + pair_begin + i (rotate-half pairs), so RoPE
needs nothing outside the block. Heads [0, nq) are queries (roped, written to buffer q),
[nq, nq+nkv) keys (roped, appended to k_cache), the rest values (appended to v_cache) at
the token's position in the page table.
"""
import torch

from .base import OpSpec, register, rms_norm, kv_slot


def block_rows(cfg, head: int, pair_begin: int, pair_count: int) -> torch.Tensor:
    """The fused-QKV row indices one block computes: [lo rows..., hi rows...]."""
    half = cfg.head_dim // 2
    lo = head * cfg.head_dim + pair_begin + torch.arange(pair_count)
    return torch.cat([lo, lo + half])


def reference(instr, s):
    cfg, w, l = s.config, s.weights, instr.layer
    head, p0, n = instr.args["head"], instr.args["pair_begin"], instr.args["pair_count"]
    rows = block_rows(cfg, head, p0, n)
    hd, nq, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        xn = rms_norm(s.buffers["hidden"][t], w.attn_norm[l], cfg.rms_norm_eps)
        out = w.qkv[l, rows].float() @ xn
        lo, hi = out[:n], out[n:]
        pos = int(s.positions[t])
        if head < nq + nkv:
            cos = w.rope_cos[pos, p0:p0 + n]
            sin = w.rope_sin[pos, p0:p0 + n]
            lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
        cols = torch.cat([torch.arange(p0, p0 + n), hd // 2 + torch.arange(p0, p0 + n)])
        vals = torch.cat([lo, hi])
        if head < nq:
            s.buffers["q"][t, head * hd + cols] = vals
        else:
            page, offset = kv_slot(s, pos)
            cache = s.k_cache if head < nq + nkv else s.v_cache
            kv_head = (head - nq) % nkv
            cache[l, page, offset, kv_head, cols] = vals.to(cache.dtype)


def cost(instr, cfg, dtype_bytes):
    rows = 2 * instr.args["pair_count"]
    return instr.token_count * (rows * cfg.hidden_size * dtype_bytes + cfg.hidden_size * 4
                                + rows * 4) + cfg.hidden_size * dtype_bytes


RMS_QKV_ROPE = register(OpSpec("rms_qkv_rope", 2, ("head", "pair_begin", "pair_count"),
                               reference, cost, __doc__))
