"""Temperature sampling drawn on the device: a one-step program whose token is a draw
instead of the greedy argmax.

with_sampled_tokens(program) puts one sample_logits instruction per LM-head block (the
same rows and partial-argmax slot) between the LM head and argmax_reduce: they wait on
the whole LM head, and argmax_reduce waits on them instead, so the token it picks is a
draw from softmax(logits / temperature) for the (1 / temperature, seed) the launch gives
(instructions/sample_logits.py). The result chains like a greedy step (chain.py): sampled
decoding runs several steps per launch too.

A program of its own rather than a stage in every program: greedy steps keep their
stages and run none of the sampling code (the noise inside the LM head's shared code made
them slower, benchmarks/RESULTS.md, entry 50).
"""
from __future__ import annotations

import torch

from megakernel.instructions import (ARGMAX_REDUCE, HEADER_FIELDS, NO_COUNTER, RMS_LM_HEAD,
                                     SAMPLE_LOGITS, Instruction)

from .program import Program

_WORD = {name: i for i, name in enumerate(HEADER_FIELDS)}


def with_sampled_tokens(program: Program) -> Program:
    """A copy of the one-step `program` whose argmax_reduce picks a temperature sample."""
    if program.steps_per_launch != 1:
        raise ValueError("sample the one-step program, then chain it")
    rows = program.instructions
    opcodes = rows[:, _WORD["opcode"]]
    lm_head = (opcodes == RMS_LM_HEAD.code).nonzero().flatten().tolist()
    argmaxes = (opcodes == ARGMAX_REDUCE.code).nonzero().flatten().tolist()
    if (opcodes == SAMPLE_LOGITS.code).any():
        raise ValueError("the program already samples")
    if not lm_head or len(argmaxes) != 1:
        raise ValueError("a sampled step needs an LM head and exactly one argmax_reduce")
    argmax = argmaxes[0]
    lm_counter = int(rows[lm_head[0], _WORD["signal_counter"]])
    wait = (int(rows[argmax, _WORD["wait0_counter"]]), int(rows[argmax, _WORD["wait0_target"]]))
    if (wait != (lm_counter, program.counter_targets[lm_counter])
            or int(rows[argmax, _WORD["wait1_counter"]]) != NO_COUNTER):
        raise ValueError("argmax_reduce must wait on the LM head alone")

    sample_counter = program.num_counters
    samples = []
    for i in lm_head:
        head = Instruction.decode(rows[i])
        samples.append(SAMPLE_LOGITS.make(
            layer=0, waits=(wait,), signal=sample_counter, token_begin=head.token_begin,
            token_count=head.token_count, block_index=head.block_index,
            **head.args).encode())
    pick = rows[argmax].clone()
    pick[_WORD["wait0_counter"]] = sample_counter
    pick[_WORD["wait0_target"]] = len(samples)
    instructions = torch.cat([rows[:argmax], torch.tensor(samples, dtype=rows.dtype),
                              pick[None], rows[argmax + 1:]])
    return Program(**{**program.__dict__, "instructions": instructions,
                      "counter_names": program.counter_names + ["sample"],
                      "counter_targets": program.counter_targets + [len(samples)],
                      "decoded": []})
