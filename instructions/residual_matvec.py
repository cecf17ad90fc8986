"""The residual mat-vec ops' shared form (o_proj_residual, down_proj_residual):
hidden[t, rows] += weight[layer, rows] @ source[t], rows [row_begin, row_begin +
row_count). Each block owns disjoint rows of the residual stream, so the update is in
place. The kernel runs both (and the LM head) through one instance of code
(csrc/ops/row_pair_matvec.cuh)."""
from typing import Callable

from .base import OpSpec, register


def residual_matvec(name: str, code: int, weight: str, source: str,
                    width: Callable[[object], int], doc: str) -> OpSpec:
    """Register the op `name` whose rows of hidden gain weights.<weight>[layer, rows] @
    buffers[source][t]; width(cfg): the length of source's rows."""

    def reference(instr, s):
        r0, n, l = instr.args["row_begin"], instr.args["row_count"], instr.layer
        w = getattr(s.weights, weight)[l, r0:r0 + n].float()
        for t in range(instr.token_begin, instr.token_begin + instr.token_count):
            s.buffers["hidden"][t, r0:r0 + n] += w @ s.buffers[source][t]

    def cost(instr, cfg, dtype_bytes):
        n, k = instr.args["row_count"], width(cfg)
        return n * k * dtype_bytes + instr.token_count * (k + 2 * n) * 4

    return register(OpSpec(name, code, ("row_begin", "row_count"), reference, cost, doc,
                           streams_weight_rows=True))
