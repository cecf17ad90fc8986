"""topk_threshold: sample_threshold[t] = the sampling.top_k-th largest of the candidates the
num_blocks topk_partial blocks left in topk_values[t]: the k-th largest logit of the step,
at or above which sample_logits draws. One block."""
import torch

from .base import OpSpec, register
from .topk_partial import MAX_TOP_K


def reference(instr, s):
    n, k = instr.args["num_blocks"], s.sampling.top_k
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        candidates = s.buffers["topk_values"][t].view(-1, MAX_TOP_K)[:n, :k]
        s.buffers["sample_threshold"][t] = torch.topk(candidates.flatten(), k).values[-1]


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * (instr.args["num_blocks"] * MAX_TOP_K + 1) * 4


TOPK_THRESHOLD = register(OpSpec("topk_threshold", 12, ("num_blocks",), reference, cost,
                                 __doc__))
