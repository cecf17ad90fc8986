"""attention_partial: decode attention of one KV head's query group over one partition.

The token's context (positions 0..pos) is cut into num_partitions runs of whole pages,
pages_per_partition = ceil(ceil((pos+1) / page_size) / num_partitions); partition p covers
pages [p*ppp, (p+1)*ppp). The split is decided at run time from the position, so one
program serves every context length. Each query head of the group writes its normalized
partial output and log-sum-exp; an empty partition writes out = 0, lse = -inf.
"""
import math

import torch

from .base import OpSpec, register


def partition_range(position: int, page_size: int, partition: int, num_partitions: int):
    """Token range [begin, end) of one partition for a token at `position`."""
    seq_len = position + 1
    num_pages = -(-seq_len // page_size)
    per_part = -(-num_pages // num_partitions)
    begin = partition * per_part * page_size
    end = min((partition + 1) * per_part * page_size, seq_len)
    return begin, max(begin, end)


def gather_pages(cache_layer, page_table_row, begin: int, end: int, kv_head: int):
    """cache_layer [num_pages, page_size, nkv, hd] -> [end - begin, hd] for one KV head."""
    page_size = cache_layer.shape[1]
    pos = torch.arange(begin, end)
    pages = page_table_row[pos // page_size].long()
    return cache_layer[pages, pos % page_size, kv_head]


def reference(instr, s):
    cfg, l = s.config, instr.layer
    kv_head, part, nparts = (instr.args["kv_head"], instr.args["partition"],
                             instr.args["num_partitions"])
    hd, g = cfg.head_dim, cfg.group_size
    out_buf, lse_buf = s.buffers["attn_partial_out"], s.buffers["attn_partial_lse"]
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        begin, end = partition_range(int(s.positions[t]), s.k_cache.shape[2], part, nparts)
        heads = range(kv_head * g, (kv_head + 1) * g)
        if begin == end:
            for h in heads:
                out_buf[t, h, part] = 0.0
                lse_buf[t, h, part] = -math.inf
            continue
        k = gather_pages(s.k_cache[l], s.page_table[0], begin, end, kv_head).float()
        v = gather_pages(s.v_cache[l], s.page_table[0], begin, end, kv_head).float()
        for h in heads:
            q = s.buffers["q"][t, h * hd:(h + 1) * hd]
            scores = (k @ q) / math.sqrt(hd)
            m = scores.max()
            p = torch.exp(scores - m)
            total = p.sum()
            out_buf[t, h, part] = (p @ v) / total
            lse_buf[t, h, part] = m + torch.log(total)


def cost(instr, cfg, dtype_bytes):
    # KV bytes depend on the context length; the program's cost report adds them per
    # token of context (see scheduler.program.Program.bytes_per_step).
    g, hd = cfg.group_size, cfg.head_dim
    return instr.token_count * g * hd * 4 * 2


ATTENTION_PARTIAL = register(OpSpec("attention_partial", 3,
                                    ("kv_head", "partition", "num_partitions"),
                                    reference, cost, __doc__))
