"""topk_partial: the block's top-k candidates for top-k sampling. Over rows [row_begin,
row_begin + row_count) of logits[t], the sampling.top_k largest logits (ties repeated;
-inf for slots past the rows) into slots [0, top_k) of the block's MAX_TOP_K slots of
topk_values[t], in any order: topk_threshold needs only the multiset. The k-th largest
logit of the step is the k-th largest of all blocks' candidates. topk_ties[t, block]: how
many of the rows equal to the block's k-th largest the slots leave out (0 where the block
has at most top_k rows), which top-p among the top k counts.
"""
import torch

from .base import OpSpec, register

# Candidate slots per block (csrc/instruction_layout.h: kMaxSampleTopK): the largest top_k
# the device serves.
MAX_TOP_K = 64


def reference(instr, s):
    r0, n, b = instr.args["row_begin"], instr.args["row_count"], instr.block_index
    k = s.sampling.top_k
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        logits = s.buffers["logits"][t, r0:r0 + n]
        top = torch.topk(logits, min(k, n)).values
        slots = s.buffers["topk_values"][t, b * MAX_TOP_K:b * MAX_TOP_K + k]
        slots.fill_(float("-inf"))
        slots[:len(top)] = top
        omitted = int((logits == top[-1]).sum() - (top == top[-1]).sum()) if n > k else 0
        s.buffers["topk_ties"][t, b] = omitted


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * (instr.args["row_count"] + MAX_TOP_K + 1) * 4


TOPK_PARTIAL = register(OpSpec("topk_partial", 11, ("row_begin", "row_count"), reference,
                               cost, __doc__))
