"""topp_histogram: one pass of the nucleus threshold's radix selection over the block's
rows [row_begin, row_begin + row_count) of logits[t] (csrc/ops/topp_sampling.cuh).

For every row whose order key (order_keys) matches the digits chosen so far
(topp_state[t, 0], the top 8 * pass bits), the row's mass exp((logit - M) *
inv_temperature) (float32), M the step's largest logit (the largest of the LM head's
partial maxima, argmax_value[t]), in 32.32 fixed point, rounded, is added to bin (key >>
(24 - 8 * pass)) & 255 of the step's histogram topp_hist[t, pass]. Integer sums do not
depend on the order the blocks add them in; topp_select clears the bins it reads.
"""
import torch

from .base import OpSpec, register

RADIX_BINS = 256


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """The float32 values' uint32 order keys (larger float, larger key) as int64."""
    u = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(u & 0x80000000 != 0, ~u & 0xFFFFFFFF, u | 0x80000000)


def float_of_key(key: int) -> float:
    """order_keys' inverse for one key."""
    u = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(torch.tensor([u - (1 << 32) if u >= 1 << 31 else u],
                              dtype=torch.int32).view(torch.float32))


def reference(instr, s):
    r0, n = instr.args["row_begin"], instr.args["row_count"]
    pass_ = instr.args["pass_index"]
    inv_temperature = torch.tensor(s.sampling.inv_temperature, dtype=torch.float32)
    shift = 24 - 8 * pass_
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        logits = s.buffers["logits"][t, r0:r0 + n]
        top = s.buffers["argmax_value"][t].max()
        keys = order_keys(logits)
        prefix = int(s.buffers["topp_state"][t, 0]) if pass_ else 0
        high = 0 if pass_ == 0 else (0xFFFFFFFF << (shift + 8)) & 0xFFFFFFFF
        chosen = (keys & high) == prefix
        mass = torch.exp((logits - top) * inv_temperature)
        fixed = (mass * 4294967296.0 + 0.5).to(torch.int64)
        bins = s.buffers["topp_hist"][t, pass_ * RADIX_BINS:(pass_ + 1) * RADIX_BINS]
        bins.index_add_(0, ((keys >> shift) & (RADIX_BINS - 1))[chosen], fixed[chosen])


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * (instr.args["row_count"] * 4 + RADIX_BINS * 8)


TOPP_HISTOGRAM = register(OpSpec("topp_histogram", 13, ("row_begin", "row_count", "pass_index"),
                                 reference, cost, __doc__))
