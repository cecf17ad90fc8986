"""argmax_reduce: next_token[t] = index of the largest of the LM-head blocks' partial
maxima (the lowest index among equal maxima, like torch.argmax)."""
import torch

from .base import OpSpec, register


def reference(instr, s):
    n = instr.args["num_blocks"]
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        values = s.buffers["argmax_value"][t, :n]
        indices = s.buffers["argmax_index"][t, :n]
        # NaN counts as the largest value, as in torch.argmax, so a poisoned input
        # shows in the token instead of vanishing.
        nan = torch.isnan(values)
        best = nan if bool(nan.any()) else values == values.max()
        s.buffers["next_token"][t] = indices[best].min()


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * (instr.args["num_blocks"] * 8 + 4)


ARGMAX_REDUCE = register(OpSpec("argmax_reduce", 9, ("num_blocks",), reference, cost,
                                __doc__))
