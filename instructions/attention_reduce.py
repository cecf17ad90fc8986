"""attention_reduce: merge the partitions' partial outputs of query heads by log-sum-exp.

attn_out[t, h] = sum_p exp(lse_p - lse_max) * out_p / sum_p exp(lse_p - lse_max), for
heads [head_begin, head_begin + head_count). Partition 0 is never empty, so lse_max is
finite.
"""
import torch

from .base import OpSpec, register


def reference(instr, s):
    hd = s.config.head_dim
    h0, nh, nparts = (instr.args["head_begin"], instr.args["head_count"],
                      instr.args["num_partitions"])
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        lse = s.buffers["attn_partial_lse"][t, h0:h0 + nh, :nparts]      # [nh, P]
        out = s.buffers["attn_partial_out"][t, h0:h0 + nh, :nparts]      # [nh, P, hd]
        weight = torch.exp(lse - lse.max(dim=1, keepdim=True).values)
        merged = (weight.unsqueeze(-1) * out).sum(1) / weight.sum(1, keepdim=True)
        s.buffers["attn_out"][t, h0 * hd:(h0 + nh) * hd] = merged.reshape(-1)


def cost(instr, cfg, dtype_bytes):
    nh, nparts = instr.args["head_count"], instr.args["num_partitions"]
    return instr.token_count * nh * (nparts * (cfg.head_dim + 1) * 4 + cfg.head_dim * 4)


ATTENTION_REDUCE = register(OpSpec("attention_reduce", 4,
                                   ("head_begin", "head_count", "num_partitions"),
                                   reference, cost, __doc__))
