"""sample_logits: the block's partial draw for temperature sampling. Over rows [row_begin,
row_begin + row_count) of logits[t], the largest score logit * inv_temperature +
gumbel_noise(seed, the step's position, row) (lowest index on ties) into slot
block_index of argmax_value / argmax_index, where the LM head left its greedy partial
argmax. argmax_reduce then picks a draw from softmax(logits / temperature): the Gumbel-max
draw, so sampled steps chain in one launch like greedy ones.

(inv_temperature, seed) are the launch's (MachineState.sampling); without them the score
is the logit itself and the op repeats the LM head's greedy partial argmax. With top-k
(sampling.top_k > 0) or top-p (sampling.top_p < 1), only logits at or above
sample_threshold[t] take part (topk_threshold.py, topp_select.py).
"""
import torch

from .base import OpSpec, gumbel_noise, register


def reference(instr, s):
    r0, n, b = instr.args["row_begin"], instr.args["row_count"], instr.block_index
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        logits = scores = s.buffers["logits"][t, r0:r0 + n]
        if s.sampling is not None:
            noise = gumbel_noise(s.sampling.seed, int(s.positions[t]), torch.arange(r0, r0 + n))
            scores = logits * s.sampling.inv_temperature + noise
            if s.sampling.top_k or s.sampling.top_p < 1.0:
                threshold = s.buffers["sample_threshold"][t]
                scores = scores.masked_fill(~(logits >= threshold), float("-inf"))
        best = int(torch.argmax(scores))          # first maximal index
        s.buffers["argmax_value"][t, b] = scores[best]
        s.buffers["argmax_index"][t, b] = r0 + best


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * (instr.args["row_count"] * 4 + 8)


SAMPLE_LOGITS = register(OpSpec("sample_logits", 10, ("row_begin", "row_count"),
                                reference, cost, __doc__))
