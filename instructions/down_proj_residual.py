"""down_proj_residual: hidden[t, rows] += down[layer, rows] @ mlp_act[t]."""
from .base import OpSpec, register


def reference(instr, s):
    r0, n, l = instr.args["row_begin"], instr.args["row_count"], instr.layer
    w = s.weights.down[l, r0:r0 + n].float()
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        s.buffers["hidden"][t, r0:r0 + n] += w @ s.buffers["mlp_act"][t]


def cost(instr, cfg, dtype_bytes):
    n = instr.args["row_count"]
    return (n * cfg.intermediate_size * dtype_bytes
            + instr.token_count * (cfg.intermediate_size + 2 * n) * 4)


DOWN_PROJ_RESIDUAL = register(OpSpec("down_proj_residual", 7, ("row_begin", "row_count"),
                                     reference, cost, __doc__,
                                     streams_weight_rows=True))
