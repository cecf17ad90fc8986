"""attention_partial: decode attention of query heads of one KV head's group over one
partition.

The token's context (positions 0..pos) is cut into num_partitions runs of whole pages,
pages_per_partition = ceil(ceil((pos+1) / page_size) / num_partitions); partition p covers
pages [p*ppp, (p+1)*ppp). The split is decided at run time from the position, so one
program serves every context length. The instruction covers the group's heads
[head_begin, head_begin + head_count) and output dims [dim_begin, dim_begin + dim_count).
Each of those heads writes those dims of its normalized partial output, and its
log-sum-exp; an empty partition writes out = 0, lse = -inf. With one partition
(num_partitions == 1) the output is the head's attention itself: it goes to attn_out and
no attention_reduce follows.
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
    a = instr.args
    kv_head, part, nparts = a["kv_head"], a["partition"], a["num_partitions"]
    hd, g = cfg.head_dim, cfg.group_size
    dims = slice(a["dim_begin"], a["dim_begin"] + a["dim_count"])
    heads = range(kv_head * g + a["head_begin"], kv_head * g + a["head_begin"] + a["head_count"])
    out_buf, lse_buf = s.buffers["attn_partial_out"], s.buffers["attn_partial_lse"]
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        begin, end = partition_range(int(s.positions[t]), s.k_cache.shape[2], part, nparts)
        if begin == end:        # never the only partition: the token itself is in it
            for h in heads:
                out_buf[t, h, part, dims] = 0.0
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
            out = ((p @ v) / total)[dims]
            if nparts == 1:
                s.buffers["attn_out"][t, h * hd:(h + 1) * hd][dims] = out
                continue
            out_buf[t, h, part, dims] = out
            lse_buf[t, h, part] = m + torch.log(total)


def cost(instr, cfg, dtype_bytes):
    # KV bytes depend on the context length; the program's cost report adds them per
    # token of context (see scheduler.program.Program.bytes_per_step).
    a = instr.args
    return instr.token_count * a["head_count"] * (cfg.head_dim + a["dim_count"]) * 4


ATTENTION_PARTIAL = register(OpSpec("attention_partial", 3,
                                    ("kv_head", "partition", "num_partitions", "head_begin",
                                     "head_count", "dim_begin", "dim_count"),
                                    reference, cost, __doc__))
