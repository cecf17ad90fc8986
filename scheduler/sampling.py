"""Temperature sampling drawn on the device: a one-step program whose token is a draw
instead of the greedy argmax.

with_sampled_tokens(program) puts one sample_logits instruction per LM-head block (the
same rows and partial-argmax slot) between the LM head and argmax_reduce: they wait on
the whole LM head, and argmax_reduce waits on them instead, so the token it picks is a
draw from softmax(logits / temperature) for the (1 / temperature, seed) the launch gives
(instructions/sample_logits.py). The result chains like a greedy step (chain.py): sampled
decoding runs several steps per launch too.

With kind "top_k", two stages come first: one topk_partial per LM-head block (its rows'
k largest logits) and one topk_threshold (the step's k-th largest logit). With "top_p",
four pairs of stages: topp_histogram per LM-head block and one topp_select, each pair a
pass of the nucleus threshold's radix selection. The sample_logits blocks then draw among
the logits at or above the threshold (instructions/topk_partial.py, topk_threshold.py,
topp_histogram.py, topp_select.py); the launch gives k or p.

A program of its own rather than a stage in every program: greedy steps keep their
stages and run none of the sampling code (the noise inside the LM head's shared code made
them slower, benchmarks/RESULTS.md, entry 50).
"""
from __future__ import annotations

import torch

from megakernel.instructions import (ARGMAX_REDUCE, HEADER_FIELDS, MAX_TOP_K, NO_COUNTER,
                                     RMS_LM_HEAD, SAMPLE_LOGITS, TOPK_PARTIAL, TOPK_THRESHOLD,
                                     TOPP_HISTOGRAM, TOPP_SELECT, Instruction, Sampling)
from megakernel.instructions.topp_histogram import RADIX_BINS

from .program import BufferSpec, Program

_WORD = {name: i for i, name in enumerate(HEADER_FIELDS)}


KINDS = ("temperature", "top_k", "top_p")
TOP_P_PASSES = 4     # 8 bits of the 32-bit order keys per pass


def clear_sampling_state(buffers: dict) -> None:
    """Zero what a sampled program keeps zeroed between steps (each topp_select clears the
    histogram it read): a launch that stopped early may leave counts. For a backend's
    reset()."""
    if "topp_hist" in buffers:
        buffers["topp_hist"].zero_()


def program_kind(sampling) -> str | None:
    """Which program serves a launch's sampling (a Sampling, its fields, or None): None
    (greedy), or the kind of with_sampled_tokens."""
    if sampling is None:
        return None
    sampling = Sampling(*sampling)
    # With both, the top-k program's threshold stage takes the nucleus among the top k.
    return "top_k" if sampling.top_k else "top_p" if sampling.top_p < 1.0 else "temperature"


def with_sampled_tokens(program: Program, kind: str = "temperature") -> Program:
    """A copy of the one-step `program` whose argmax_reduce picks a temperature sample
    (kind "top_k": among the launch's top-k logits, or the nucleus of those where the
    launch's top_p < 1; "top_p": among its nucleus)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
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

    heads = [Instruction.decode(rows[i]) for i in lm_head]
    names, targets, added = list(program.counter_names), list(program.counter_targets), []

    def stage(spec, name: str, waits, blocks: list[dict]):
        """One instruction per entry of blocks (its block_index, token rows and args),
        all waiting on `waits`, signalling a new counter; returns the wait for them all."""
        names.append(name)
        targets.append(len(blocks))
        for b in blocks:
            added.append(spec.make(layer=0, waits=waits, signal=len(names) - 1, **b).encode())
        return (len(names) - 1, len(blocks))

    per_head = [dict(token_begin=h.token_begin, token_count=h.token_count,
                     block_index=h.block_index, **h.args) for h in heads]
    one_block = dict(token_begin=heads[0].token_begin, token_count=heads[0].token_count,
                     block_index=0)
    buffers = dict(program.buffers)
    T, B = program.num_tokens, program.lm_head_blocks
    if kind == "top_k":
        partial = stage(TOPK_PARTIAL, "topk", (wait,), per_head)
        wait = stage(TOPK_THRESHOLD, "topk_threshold", (partial,),
                     [{**one_block, "num_blocks": len(heads)}])
        buffers["topk_values"] = BufferSpec((T, B * MAX_TOP_K), torch.float32)
        buffers["topk_ties"] = BufferSpec((T, B), torch.int32)
    if kind == "top_p":
        for pass_index in range(TOP_P_PASSES):
            histograms = stage(TOPP_HISTOGRAM, f"topp_histogram{pass_index}", (wait,),
                               [{**b, "pass_index": pass_index} for b in per_head])
            wait = stage(TOPP_SELECT, f"topp_select{pass_index}", (histograms,),
                         [{**one_block, "pass_index": pass_index}])
        buffers["topp_hist"] = BufferSpec((T, TOP_P_PASSES * RADIX_BINS), torch.int64)
        buffers["topp_state"] = BufferSpec((T, 4), torch.float64)
    if kind != "temperature":
        buffers["sample_threshold"] = BufferSpec((T,), torch.float32)
    sample_counter, sample_target = stage(SAMPLE_LOGITS, "sample", (wait,), per_head)
    pick = rows[argmax].clone()
    pick[_WORD["wait0_counter"]] = sample_counter
    pick[_WORD["wait0_target"]] = sample_target
    instructions = torch.cat([rows[:argmax], torch.tensor(added, dtype=rows.dtype),
                              pick[None], rows[argmax + 1:]])
    return Program(**{**program.__dict__, "instructions": instructions,
                      "counter_names": names, "counter_targets": targets,
                      "buffers": buffers, "decoded": []})
