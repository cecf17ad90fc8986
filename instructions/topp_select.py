"""topp_select: one pass of the nucleus threshold's radix selection, one block
(csrc/ops/topp_sampling.cuh). The step's histogram of this pass, topp_hist[t, pass]
(topp_histogram), in units of the largest logit's mass, as float64; then it is cleared
for the next step. Pass 0 sets the target: top_p (float32) times the total mass. From the
highest bin down, the bin where the mass above the chosen digits plus the bins so far
reaches the target (or the lowest bin with mass) is the next digit; the digits, the mass
above them and the target go to topp_state[t]. After pass 3 the digits are the key of the
threshold: sample_threshold[t], the largest logit whose tokens and those above it hold
top_p of the probability.
"""
import torch

from .base import OpSpec, register
from .topp_histogram import RADIX_BINS, float_of_key


def reference(instr, s):
    pass_ = instr.args["pass_index"]
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        hist = s.buffers["topp_hist"][t, pass_ * RADIX_BINS:(pass_ + 1) * RADIX_BINS]
        bins = (hist.double() / 2 ** 32).tolist()
        hist.zero_()
        state = s.buffers["topp_state"][t]
        if pass_ == 0:
            prefix, above = 0, 0.0
            target = float(torch.tensor(s.sampling.top_p, dtype=torch.float32)) * sum(bins)
        else:
            prefix, above, target = int(state[0]), float(state[1]), float(state[2])
        digit, before, cum = None, above, above
        lowest, lowest_before = 0, above
        for d in range(RADIX_BINS - 1, -1, -1):
            if bins[d] > 0:
                lowest, lowest_before = d, cum
            if bins[d] > 0 and cum + bins[d] >= target:
                digit, before = d, cum
                break
            cum += bins[d]
        if digit is None:
            digit, before = lowest, lowest_before
        prefix |= digit << (24 - 8 * pass_)
        state[:3] = torch.tensor([prefix, before, target], dtype=torch.float64)
        if pass_ == 3:
            s.buffers["sample_threshold"][t] = float_of_key(prefix)


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * RADIX_BINS * 8 * 2


TOPP_SELECT = register(OpSpec("topp_select", 14, ("pass_index",), reference, cost, __doc__))
