"""Why the first layer of a step takes longer than the others (benchmarks/RESULTS.md, entry
34: ~14 us on llama-3.2-1b), and what running several steps per launch would save.

    MODEL=llama-3.2-1b python3 scripts/dev/first_layer.py

Programs, timed over back-to-back launches from context 32 (ms per step):
  one step       the backend's program at that position (64 launches);
  first twice    one layer more, running layer 0's weights twice: if the first layer's
                 extra time belongs to being first (a cold start), this costs one ordinary
                 layer, not a first one;
  N steps        16 launches of N chained steps (scheduler/chain.py, decode_steps()): the
                 launch gap and the start of the kernel are paid once per N steps;
  LM head ...    8 steps per launch with the LM head cut to 10% of its rows (only the time
                 means anything), or carrying L2 prefetches of layer 0's weights (the
                 next step's first) while it runs.
On a MEGAKERNEL_PROFILE build, also each stage's share of the critical path (span), the
time from the stage before it to its first instruction's waits holding (lag), and its
instructions' median and slowest op time, for the first layers of the one-step program and
of a two-step launch's second copy, against the median over the later layers.

With NCU=1, only one launch of 8 chained steps after 4 unmeasured ones, inside the NVTX
range "measure", e.g. for the instruction cache's counters:

    M=sm__icc_requests.sum,sm__icc_requests_lookup_miss.sum
    M=$M,sm__icc_requests_lookup_miss_tag_miss.sum
    M=$M,smsp__warp_issue_stalled_no_instruction_per_warp_active.pct
    ncu --clock-control none --cache-control none --nvtx --nvtx-include "measure/" \\
        -k regex:megakernel --launch-count 1 --csv --page raw --metrics $M \\
        env NCU=1 python3 first_layer.py"""
import dataclasses
import os

import numpy as np
import torch

from dev_model import (back_to_back_ms, chained_ms, chained_profiles, random_backend,
                       wait_for_device)
from megakernel.instructions import (ARGMAX_REDUCE, DOWN_PROJ_RESIDUAL, EMBED, OPCODES,
                                    O_PROJ_RESIDUAL, RMS_GATE_UP_SILU, RMS_LM_HEAD,
                                    Instruction, L2Prefetch)
from megakernel.profiling import KERNEL_PROFILE_FIELDS as F
from megakernel.scheduler import build_program
from megakernel.scheduler.program import Program

STEPS = 64
CONTEXT = 32
NAMES = {op: spec.name for op, spec in OPCODES.items()}
STEP_LEVEL = (EMBED.code, RMS_LM_HEAD.code, ARGMAX_REDUCE.code)   # no layer of their own


def with_rows(program: Program, rows: torch.Tensor, names: list[str],
              targets: list[int]) -> Program:
    return Program(**{**program.__dict__, "instructions": rows, "counter_names": names,
                      "counter_targets": targets, "decoded": []})


def first_layer_twice(cfg, num_sms: int, max_len: int, whole: bool) -> Program:
    """The step of a model with one layer more, whose layers 0 and 1 both run layer 0's
    weights (and K/V slots)."""
    longer = dataclasses.replace(cfg, num_layers=cfg.num_layers + 1)
    program = build_program(longer, num_sms=num_sms, page_size=16, max_seq_len=max_len,
                            whole_context_attention=whole)
    rows = program.instructions.clone()
    layered = ~torch.isin(rows[:, 0], torch.tensor(STEP_LEVEL, dtype=rows.dtype))
    rows[layered, 1] = (rows[layered, 1] - 1).clamp(min=0)
    carried = rows[:, 24] != 0                                # trailer's opcode, layer
    rows[carried, 25] = (rows[carried, 25] - 1).clamp(min=0)
    return with_rows(program, rows, program.counter_names, program.counter_targets)


def lm_head_changed(program: Program, change) -> Program:
    """`program` with change(instruction, block) applied to each LM-head instruction."""
    rows = program.instructions.clone()
    for i in (rows[:, 0] == RMS_LM_HEAD.code).nonzero().flatten().tolist():
        instr = Instruction.decode(rows[i].tolist())
        change(instr, instr.block_index)
        rows[i] = torch.tensor(instr.encode(), dtype=rows.dtype)
    return with_rows(program, rows, program.counter_names, program.counter_targets)


def lm_head_carrying(program: Program, opcode: int, budget: int) -> Program:
    """LM-head block b carries the L2 prefetch of the first `budget` bytes of each run of
    layer 0's `opcode` block b: the next step's first weights, read under the LM head."""
    blocks = [i.args for i in program.instruction_list() if i.opcode == opcode and i.layer == 0]

    def carry(instr, b):
        if b < len(blocks):
            r0, n = blocks[b]["row_begin"], blocks[b]["row_count"]
            instr.l2_prefetch = L2Prefetch(opcode, 0, r0, n, 0, budget, 0, budget)
    return lm_head_changed(program, carry)


def lm_head_cut(program: Program, share: float) -> Program:
    """Each LM-head block streams only `share` of its rows (the time only means
    anything): how much of the next layer 0's extra time the LM head's bytes cause."""
    def cut(instr, _):
        instr.args["row_count"] = max(1, int(instr.args["row_count"] * share))
    return lm_head_changed(program, cut)


def stage_rows(raw: np.ndarray, copy_size: int):
    """[(copy, layer, opcode, span, lag, op median, op max)] in stream order (us)."""
    raw = raw[np.argsort(raw[:, F["instruction"]], kind="stable")]
    stages: dict[tuple[int, int, int], np.ndarray] = {}
    for row in raw:
        key = (int(row[F["instruction"]]) // copy_size, int(row[F["layer"]]),
               int(row[F["opcode"]]))
        stages.setdefault(key, []).append(row)
    out, prev_end = [], None
    for key, rows in stages.items():
        r = np.array(rows)
        end = r[:, F["end_ns"]].max()
        ready = r[:, F["ready_ns"]].min()
        op = r[:, F["op_end_ns"]] - r[:, F["ready_ns"]]
        base = prev_end if prev_end is not None else r[:, F["start_ns"]].min()
        out.append((*key, (end - base) / 1e3, (ready - base) / 1e3, np.median(op) / 1e3,
                    op.max() / 1e3))
        prev_end = end
    return out


def print_stages(title: str, rows, copy: int) -> None:
    print(f"  {title}: stage, span, lag, op median, op max (us)")
    mine = [r for r in rows if r[0] == copy]
    for _, layer, op, span, lag, med, mx in mine:
        if op in STEP_LEVEL[:1] or layer <= 1 and op not in STEP_LEVEL:
            print(f"    L{layer} {NAMES[op]:<20} {span:7.2f} {lag:6.2f} {med:6.2f} {mx:6.2f}")
    later = {}
    for _, layer, op, *vals in mine:
        if layer >= 2 and op not in STEP_LEVEL:
            later.setdefault(op, []).append(vals)
    for op, vals in later.items():
        v = np.median(np.array(vals), axis=0)
        print(f"    L2+ {NAMES[op]:<19} {v[0]:7.2f} {v[1]:6.2f} {v[2]:6.2f} {v[3]:6.2f}")
    first = sum(r[3] for r in mine if r[1] == 0 and r[2] not in STEP_LEVEL)
    embed = sum(r[3] for r in mine if r[2] == EMBED.code)
    typical = np.median([sum(r[3] for r in mine if r[1] == layer and r[2] not in STEP_LEVEL)
                         for layer in range(2, max(r[1] for r in mine) + 1)])
    print(f"    layer 0 {first:.2f} us after the embed ({embed:.2f} from the first claim "
          f"or the argmax); a later layer {typical:.2f}")


def profile_of(mk, steps: int, launches: int = 4) -> np.ndarray:
    """The kernel profile of the last of `launches` back-to-back launches of `steps`
    chained steps."""
    raw = chained_profiles(mk, steps, 1, CONTEXT, warmup=launches - 1)[0]
    return raw[raw[:, F["end_ns"]] > 0]


def measure_one_launch(mk, steps: int = 8, warmup: int = 4) -> None:
    """`warmup` launches of `steps` chained steps, then one inside the NVTX range
    "measure", for Nsight Compute (NCU=1, see the module's docstring)."""
    token, position = torch.tensor(1, device=mk.weights.device), CONTEXT
    for i in range(warmup + 1):
        if i == warmup:
            torch.cuda.nvtx.range_push("measure")
        token = mk.decode_steps(token, position, steps).last_token
        position += steps
    torch.cuda.nvtx.range_pop()
    wait_for_device("the measured launch")
    mk.check_error()


def main():
    model = os.environ.get("MODEL", "llama-3.2-1b")
    if os.environ.get("NCU") == "1":
        measure_one_launch(random_backend(model, 1024)[1])
        return
    max_len = 1024
    profiling = os.environ.get("PROFILE", "1") != "0"
    cfg, mk = random_backend(model, max_len)
    profiling = profiling and mk.ext.profiling_compiled()
    one = mk.program_for(CONTEXT)
    whole = one.attn_partitions == 1 and one.opcode_counts().get("attention_reduce") is None
    twice = first_layer_twice(cfg, mk.num_sms, max_len, whole)
    print(f"{model}, {mk.num_sms} SMs, context {CONTEXT}: ms per step")
    for rnd in range(2):
        line = []
        for name, program in (("one step", one), ("first twice", twice)):
            mk.load_program(program)
            ms, _ = back_to_back_ms(mk, torch.tensor(1, device="cuda"), CONTEXT, STEPS)
            mk.check_error()
            line.append(f"{name} {ms:.4f}")
        mk.load_program(one)
        line += [f"{n} steps {chained_ms(mk, n, STEPS // 4, CONTEXT):.4f}" for n in (2, 4, 8, 16)]
        print(f"  round {rnd + 1}: " + ", ".join(line))
    variants = [("LM head 10% of rows", lm_head_cut(one, 0.1))]
    variants += [(f"LM head carries L0 {OPCODES[op].name} {kb} KB",
                  lm_head_carrying(one, op, kb * 1024))
                 for op, kb in ((RMS_GATE_UP_SILU.code, 32), (RMS_GATE_UP_SILU.code, 128),
                                (DOWN_PROJ_RESIDUAL.code, 64), (O_PROJ_RESIDUAL.code, 64))]
    print("LM-head variants, 8 steps per launch against the program as it is (ms per step):")
    for rnd in range(2):
        line = []
        for name, program in [("as it is", one)] + variants:
            mk.load_program(program)
            line.append(f"{name} {chained_ms(mk, 8, STEPS // 4, CONTEXT):.4f}")
        print(f"  round {rnd + 1}: " + ", ".join(line))
    if profiling:
        del mk
        torch.cuda.empty_cache()
        cfg, mk = random_backend(model, max_len, profile=True)
        mk.load_program(one)
        size = one.num_instructions
        print_stages("one step", stage_rows(profile_of(mk, 1), size), 0)
        print_stages("the second step of a two-step launch", stage_rows(profile_of(mk, 2), size),
                     1)
        for name, program in variants[:2]:
            mk.load_program(program)
            print_stages(f"{name}: the second step of a two-step launch",
                         stage_rows(profile_of(mk, 2), size), 1)


if __name__ == "__main__":
    main()
