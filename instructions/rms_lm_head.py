"""rms_lm_head: logits[t, rows] = lm_head[rows] @ RMSNorm(hidden[t], final_norm), and the
block's partial argmax (largest logit, lowest index on ties) into slot block_index.
"""
import torch

from .base import OpSpec, register, rms_norm


def reference(instr, s):
    cfg, w = s.config, s.weights
    r0, n, b = instr.args["row_begin"], instr.args["row_count"], instr.block_index
    head = w.lm_head[r0:r0 + n].float()
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        xn = rms_norm(s.buffers["hidden"][t], w.final_norm, cfg.rms_norm_eps)
        logits = head @ xn
        s.buffers["logits"][t, r0:r0 + n] = logits
        best = int(torch.argmax(logits))          # first maximal index
        s.buffers["argmax_value"][t, b] = logits[best]
        s.buffers["argmax_index"][t, b] = r0 + best


def cost(instr, cfg, dtype_bytes):
    n = instr.args["row_count"]
    return (n * cfg.hidden_size * dtype_bytes + cfg.hidden_size * dtype_bytes
            + instr.token_count * (cfg.hidden_size + n) * 4)


RMS_LM_HEAD = register(OpSpec("rms_lm_head", 8, ("row_begin", "row_count"),
                              reference, cost, __doc__,
                              streams_weight_rows=True))
