"""embed: hidden[t] = embed_tokens[token_ids[t]] (the residual stream starts in float32)."""
from .base import OpSpec, register


def reference(instr, s):
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        s.buffers["hidden"][t] = s.weights.embed[int(s.token_ids[t])].float()


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * cfg.hidden_size * (dtype_bytes + 4)


EMBED = register(OpSpec("embed", 1, (), reference, cost, __doc__))
