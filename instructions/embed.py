"""embed: hidden[t] = embed_tokens[token t] (the residual stream starts in float32).

Token t is token_ids[t]; in a launch of chained decode steps, which gives fewer tokens
than it has steps, every token past the given ones is the token of the step before
(next_token[t - 1], written by that step's argmax_reduce, which the embed waits on)."""
from .base import OpSpec, register


def step_token(s, t: int) -> int:
    """Token t of the launch in MachineState s."""
    if t < len(s.token_ids):
        return int(s.token_ids[t])
    return int(s.buffers["next_token"][t - 1])


def reference(instr, s):
    for t in range(instr.token_begin, instr.token_begin + instr.token_count):
        s.buffers["hidden"][t] = s.weights.embed[step_token(s, t)].float()


def cost(instr, cfg, dtype_bytes):
    return instr.token_count * cfg.hidden_size * (dtype_bytes + 4)


EMBED = register(OpSpec("embed", 1, (), reference, cost, __doc__))
