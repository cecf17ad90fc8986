"""Several decode steps in one launch: a step's program repeated, the token of each
step chosen on the device and fed to the next.

Copy t of the step serves token row t of the activations (token_begin = t) and has
counters of its own; its embed waits on copy t - 1's argmax counter and embeds the token
that argmax chose (instructions/embed.py: a launch gives only step 0's token). Copy t runs
at the launch's position + t (csrc/common.cuh: step_position). The copies follow each
other in the stream, so the queue stays in topological order, and the chain of waits
orders everything copy t reads (the K/V rows the steps before it wrote) after its writes.

One launch of N steps pays the kernel's start and the gap between launches once for all
N (benchmarks/RESULTS.md, entries 35 and 36). A step whose argmax_reduce picks a sample
(sampling.py: with_sampled_tokens, with or without its top-k or top-p stages) chains the
same way.
"""
from __future__ import annotations

import torch

from megakernel.instructions import ARGMAX_REDUCE, EMBED, HEADER_FIELDS, NO_COUNTER

from .program import BufferSpec, Program, move_counters

_WORD = {name: i for i, name in enumerate(HEADER_FIELDS)}


def _token_rows(buffers: dict[str, BufferSpec], steps: int) -> dict[str, BufferSpec]:
    """The activations with one token row per step."""
    return {name: BufferSpec((steps, *spec.shape[1:]), spec.dtype)
            for name, spec in buffers.items()}


def chain_steps(program: Program, steps: int) -> Program:
    """`steps` copies of the one-token step `program` in one stream (program itself for
    one step)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if program.num_tokens != 1:
        raise ValueError(f"only a one-token step chains; this program serves "
                         f"{program.num_tokens} tokens")
    if steps == 1:
        return program
    rows = program.instructions
    opcodes = rows[:, _WORD["opcode"]]
    embeds = (opcodes == EMBED.code).nonzero().flatten()
    argmaxes = (opcodes == ARGMAX_REDUCE.code).nonzero().flatten()
    if len(embeds) != 1 or len(argmaxes) != 1:
        raise ValueError("a chained step needs exactly one embed and one argmax_reduce")
    embed, argmax = int(embeds[0]), int(argmaxes[0])
    if int(rows[embed, _WORD["wait0_counter"]]) != NO_COUNTER:
        raise ValueError("the step's embed already waits on a counter")
    argmax_counter = int(rows[argmax, _WORD["signal_counter"]])
    n = program.num_counters
    # All copies at once, [steps, N, words]: copy t's counters are the step's plus t * n.
    copies = rows.unsqueeze(0).repeat(steps, 1, 1)
    copy_index = torch.arange(steps, dtype=rows.dtype).view(steps, 1)
    move_counters(copies, copy_index * n)
    copies[:, :, _WORD["token_begin"]] = copy_index
    copies[1:, embed, _WORD["wait0_counter"]] = copy_index[:-1, 0] * n + argmax_counter
    copies[1:, embed, _WORD["wait0_target"]] = program.counter_targets[argmax_counter]
    return Program(**{**program.__dict__, "instructions": copies.reshape(-1, rows.shape[1]),
                      "num_tokens": steps, "steps_per_launch": steps,
                      "buffers": _token_rows(program.buffers, steps),
                      "counter_names": [f"step{t}.{name}" for t in range(steps)
                                        for name in program.counter_names],
                      "counter_targets": program.counter_targets * steps, "decoded": []})


def chain_prefix(chained: Program, steps: int) -> Program:
    """The first `steps` steps of a chained program: the same program as chain_steps() of
    its step for `steps`, its instructions a view of `chained`'s (a launch of fewer steps
    shares the rows already on the device)."""
    total = chained.steps_per_launch
    if not isinstance(steps, int) or not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps!r}")
    n = chained.num_instructions // total
    counters = chained.num_counters // total
    return Program(**{**chained.__dict__, "instructions": chained.instructions[:steps * n],
                      "num_tokens": steps, "steps_per_launch": steps,
                      "buffers": _token_rows(chained.buffers, steps),
                      "counter_names": chained.counter_names[:steps * counters],
                      "counter_targets": chained.counter_targets[:steps * counters],
                      "decoded": []})
