"""o_proj_residual: hidden[t, rows] += o_proj[layer, rows] @ attn_out[t].

Each block owns disjoint rows of the residual stream, so the update is in place.
"""
from .base import OpSpec, register


def reference(instr, s):
    r0, n, l = instr.args["row_begin"], instr.args["row_count"], instr.layer
    w = s.weights.o_proj[l, r0:r0 + n].float()
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        s.buffers["hidden"][t, r0:r0 + n] += w @ s.buffers["attn_out"][t]


def cost(instr, cfg, dtype_bytes):
    n = instr.args["row_count"]
    return n * cfg.q_size * dtype_bytes + instr.token_count * (cfg.q_size + 2 * n) * 4


O_PROJ_RESIDUAL = register(OpSpec("o_proj_residual", 5, ("row_begin", "row_count"),
                                  reference, cost, __doc__,
                                  streams_weight_rows=True))
