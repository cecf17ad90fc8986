"""o_proj_residual: merge the attention partitions, then the O-projection into the residual.

Every block first merges, for every query head, the partial outputs of the attention
partitions that hold tokens of the context (the first active_partitions() of them) by
log-sum-exp:  attn[h] = sum_p exp(lse_p - max lse) * out_p / sum_p exp(lse_p - max lse),
then  hidden[t, rows] += o_proj[layer, rows] @ attn. Merging in every block costs a few
KB of L2 reads per block and saves a whole dependency stage per layer. Each block owns
disjoint rows of the residual stream, so the update is in place.
"""
import torch

from .base import OpSpec, register


def active_partitions(position: int, page_size: int, num_partitions: int) -> int:
    """Partitions that hold at least one token for a token at `position` (see
    attention_partial.partition_range: they are always the first ones)."""
    num_pages = -(-(position + 1) // page_size)
    per_part = -(-num_pages // num_partitions)
    return -(-num_pages // per_part)


def merge_partitions(lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """lse [nq, P], out [nq, P, hd] float32 -> merged attention [nq * hd]."""
    weight = torch.exp(lse - lse.max(dim=1, keepdim=True).values)
    merged = (weight.unsqueeze(-1) * out).sum(1) / weight.sum(1, keepdim=True)
    return merged.reshape(-1)


def reference(instr, s):
    r0, n, l = instr.args["row_begin"], instr.args["row_count"], instr.layer
    nparts = instr.args["num_partitions"]
    w = s.weights.o_proj[l, r0:r0 + n].float()
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        k = active_partitions(int(s.positions[t]), s.k_cache.shape[2], nparts)
        attn = merge_partitions(s.buffers["attn_partial_lse"][t, :, :k],
                                s.buffers["attn_partial_out"][t, :, :k])
        s.buffers["hidden"][t, r0:r0 + n] += w @ attn


def cost(instr, cfg, dtype_bytes):
    # Partials are counted for every partition: the active ones depend on the context.
    n, nparts = instr.args["row_count"], instr.args["num_partitions"]
    partials = cfg.num_heads * nparts * (cfg.head_dim + 1) * 4
    return n * cfg.q_size * dtype_bytes + instr.token_count * (partials + 2 * n * 4)


O_PROJ_RESIDUAL = register(OpSpec("o_proj_residual", 5,
                                  ("row_begin", "row_count", "num_partitions"),
                                  reference, cost, __doc__))
