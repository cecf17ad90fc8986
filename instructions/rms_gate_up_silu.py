"""rms_gate_up_silu: mlp_act[t, rows] = silu(gate[rows] @ xn) * (up[rows] @ xn).

xn = RMSNorm(hidden[t], mlp_norm[layer]); gate rows are gate_up[layer, rows] and up rows
gate_up[layer, I + rows].
"""
import torch

from .base import OpSpec, register, rms_norm


def reference(instr, s):
    cfg, w, l = s.config, s.weights, instr.layer
    r0, n, inter = instr.args["row_begin"], instr.args["row_count"], cfg.intermediate_size
    gate = w.gate_up[l, r0:r0 + n].float()
    up = w.gate_up[l, inter + r0:inter + r0 + n].float()
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        xn = rms_norm(s.buffers["hidden"][t], w.mlp_norm[l], cfg.rms_norm_eps)
        s.buffers["mlp_act"][t, r0:r0 + n] = torch.nn.functional.silu(gate @ xn) * (up @ xn)


def cost(instr, cfg, dtype_bytes):
    n = instr.args["row_count"]
    return (2 * n * cfg.hidden_size * dtype_bytes + cfg.hidden_size * dtype_bytes
            + instr.token_count * (cfg.hidden_size + n) * 4)


RMS_GATE_UP_SILU = register(OpSpec("rms_gate_up_silu", 6, ("row_begin", "row_count"),
                                   reference, cost, __doc__,
                                   streams_weight_rows=True))
