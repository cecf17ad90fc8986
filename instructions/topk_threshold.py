"""topk_threshold: sample_threshold[t] = the sampling.top_k-th largest of the candidates the
num_blocks topk_partial blocks left in topk_values[t]: the k-th largest logit of the step,
at or above which sample_logits draws. One block.

With sampling.top_p < 1 as well, the nucleus among those tokens instead, as
sampling.masked_scores takes it: the survivors are the logits at or above the k-th largest
(all of its ties), each of mass exp((logit - largest) * inv_temperature), and the threshold
is the smallest survivor value whose larger survivors hold less than top_p of their mass.
The survivors above the k-th largest are the candidates above it (fewer than k, each row
once); those equal to it are the candidates equal to it plus the rows topk_ties says the
blocks whose k-th largest it is left out."""
import torch

from .base import OpSpec, register
from .topk_partial import MAX_TOP_K


def top_k_nucleus(candidates: torch.Tensor, ties: torch.Tensor, kth: torch.Tensor,
                  inv_temperature: float, top_p: float) -> torch.Tensor:
    """candidates [blocks, k] (topk_values' slots), ties [blocks] (topk_ties), kth the k-th
    largest of the candidates -> the threshold (a [] float32 tensor)."""
    above = candidates[candidates > kth].sort(descending=True).values
    # Rows equal to kth: in the slots, and those left out of blocks whose k-th largest it is.
    left_out = ties[(ties > 0) & (candidates[:, -1] == kth)]
    equal = int((candidates == kth).sum()) + int(left_out.sum())
    top = above[0] if len(above) else kth
    mass = torch.exp((above - top) * inv_temperature)
    above_kth = mass.sum()
    target = top_p * (above_kth + equal * torch.exp((kth - top) * inv_temperature))
    kept = [kth] if above_kth < target else []
    # The mass of the values strictly larger than each one (ties: the first of its run).
    larger = torch.cumsum(mass, 0) - mass
    first = torch.ones_like(above, dtype=torch.bool)
    first[1:] = above[1:] != above[:-1]
    kept += [v for v, m in zip(above[first], larger[first]) if m < target]
    # None only where the candidates are not numbers (a stage read before it was written).
    return torch.stack(kept).min() if kept else torch.tensor(float("inf"))


def reference(instr, s):
    n, k = instr.args["num_blocks"], s.sampling.top_k
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        candidates = s.buffers["topk_values"][t].view(-1, MAX_TOP_K)[:n, :k]
        kth = torch.topk(candidates.flatten(), k).values[-1]
        if s.sampling.top_p < 1.0:
            kth = top_k_nucleus(candidates, s.buffers["topk_ties"][t, :n], kth,
                                s.sampling.inv_temperature, s.sampling.top_p)
        s.buffers["sample_threshold"][t] = kth


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * (instr.args["num_blocks"] * (MAX_TOP_K + 1) + 1) * 4


TOPK_THRESHOLD = register(OpSpec("topk_threshold", 12, ("num_blocks",), reference, cost,
                                 __doc__))
