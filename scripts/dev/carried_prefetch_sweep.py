"""Where the carried L2 prefetches (instructions/base.py: L2Prefetch) pay: the scheduler's
whole-context program against copies whose instructions carry other prefetches, same
process, back-to-back steps from context 32, two rounds; the last tokens must agree.

    MODEL=llama-3.2-1b python3 scripts/dev/carried_prefetch_sweep.py
    MODEL=llama-3.1-8b VARIANTS=none,scheduler,attn:32:64 python3 scripts/dev/carried_prefetch_sweep.py
    SPLIT=1 CONTEXTS=1024,4096 VARIANTS=none,attn:32:128 python3 scripts/dev/carried_prefetch_sweep.py

SPLIT=1: the split program (attention partitions and the reduce stage, the long contexts'
program) instead; CONTEXTS: the first positions of the timed runs (default 32).

A variant is a '+'-joined list of carriers, each STAGE:BEGIN_KB:END_KB[:TARGET[:mirror]]:
the stage's block b (attn, qkv, o_proj; reduce in the split program) carries bytes
[BEGIN, END) KB of each weight run of block b of TARGET (gate_up, the default, down or
o_proj) of its layer; with 'mirror', of the up run as many bytes counted back from its end
(the scheduler's placement). 'none': no carried prefetch; 'scheduler': the program as built
with the early carriers; 'late': with the late ones (build_program(late_gate_up=True),
what the backend runs past the early limit); either, first, keeps its carriers under the
carriers after it (scheduler+qkv:0:64:o_proj). A '*' after a stage (o_proj*) makes it
carry only the TARGET blocks the earlier carriers left out; 'gu128' as a carrier builds
the program with gate_up cut into 128 blocks of equal rows first."""
import dataclasses
import os

import torch

from dev_model import format_times, program_times, program_with, random_backend
from megakernel.instructions import (ATTENTION_PARTIAL, ATTENTION_REDUCE, DOWN_PROJ_RESIDUAL,
                                     L2Prefetch, O_PROJ_RESIDUAL, RMS_GATE_UP_SILU,
                                     RMS_QKV_ROPE)
from megakernel.scheduler.program import Program, carried_gate_up, split_rows

model = os.environ.get("MODEL", "llama-3.2-1b")
SPLIT = os.environ.get("SPLIT", "0") == "1"
CONTEXTS = tuple(int(c) for c in os.environ.get("CONTEXTS", "32").split(","))
MAX = max(1024, max(CONTEXTS) + 512)
STEPS = int(os.environ.get("STEPS", "128"))
DEFAULT_VARIANTS = ("none,scheduler,attn:32:128,attn:0:128,attn:32:160,attn:32:192,"
                    "attn:32:128+o_proj*:32:128,gu128+attn:32:128,gu128+attn:32:160,"
                    "attn:32:128+o_proj:128:160,attn:32:128+qkv:128:160,"
                    "attn:32:128+o_proj:0:64:down")
VARIANTS = os.environ.get("VARIANTS", DEFAULT_VARIANTS).split(",")
STAGES = {"attn": ATTENTION_PARTIAL, "qkv": RMS_QKV_ROPE, "o_proj": O_PROJ_RESIDUAL,
          "reduce": ATTENTION_REDUCE}
TARGETS = {"gate_up": RMS_GATE_UP_SILU, "down": DOWN_PROJ_RESIDUAL, "o_proj": O_PROJ_RESIDUAL}
TARGET_CODES = {t.code for t in TARGETS.values()}
cfg, mk = random_backend(model, MAX)


def equal_gate_up_blocks(rows, num_sms, *args, **kw):
    """split_rows, but the intermediate rows in 128 blocks of equal size."""
    if rows != cfg.intermediate_size:
        return split_rows(rows, num_sms, *args, **kw)
    n = rows // 128
    return [(r, n) for r in range(0, rows, n)]


def build(variant: str) -> Program:
    carriers = variant.split("+")
    replaced = {"split_rows": equal_gate_up_blocks} if "gu128" in carriers else {}
    program = program_with(cfg, mk.num_sms, MAX, replaced, whole_context_attention=not SPLIT)
    if carriers[0] == "late":
        program = program_with(cfg, mk.num_sms, MAX, replaced,
                               whole_context_attention=not SPLIT, early_gate_up=False,
                               late_gate_up=True)
    if carriers[0] in ("scheduler", "late"):     # keep the program's own carriers
        instrs = program.instruction_list()
    else:
        instrs = [dataclasses.replace(i, l2_prefetch=None) for i in program.instruction_list()]
    blocks = {}                       # (target opcode, layer) -> [(row_begin, row_count)]
    for i in instrs:
        if i.opcode in TARGET_CODES:
            blocks.setdefault((i.opcode, i.layer), []).append(
                (i.args["row_begin"], i.args["row_count"]))
    covered = set()                   # (target opcode, layer, block) carried so far
    for carrier in carriers:
        if carrier in ("none", "gu128", "scheduler", "late"):
            continue
        stage, begin, end, *rest = carrier.split(":") + [""]
        begin, end = int(begin) * 1024, int(end) * 1024
        mirror = rest[1:2] == ["mirror"]
        leftovers = stage.endswith("*")
        spec, target = STAGES[stage.rstrip("*")], TARGETS[rest[0] or "gate_up"]
        seen = {}
        for n, i in enumerate(instrs):
            if i.opcode != spec.code:
                continue
            b = seen[i.layer] = seen.get(i.layer, -1) + 1
            todo = [k for k, _ in enumerate(blocks[(target.code, i.layer)])
                    if (target.code, i.layer, k) not in covered]
            k = (todo[b] if b < len(todo) else None) if leftovers else b
            if k is None or k >= len(blocks[(target.code, i.layer)]) or i.l2_prefetch:
                continue
            r0, rows = blocks[(target.code, i.layer)][k]
            if mirror:
                prefetch = carried_gate_up(i.layer, r0, rows, cfg.hidden_size * 2, begin, end)
                if prefetch is None:                  # a short last block: nothing left
                    continue
            else:
                second = (begin, end) if target is RMS_GATE_UP_SILU else (0, 0)  # one run
                prefetch = L2Prefetch(target.code, i.layer, r0, rows, begin, end, *second)
            instrs[n] = dataclasses.replace(i, l2_prefetch=prefetch)
        covered |= {(q.opcode, q.layer, blocks[(q.opcode, q.layer)].index(
            (q.row_begin, q.row_count))) for q in (i.l2_prefetch for i in instrs) if q}
    rows = torch.tensor([i.encode() for i in instrs], dtype=torch.int32)
    return Program(**{**program.__dict__, "instructions": rows, "decoded": instrs})


def main() -> None:
    programs = {v: build(v) for v in VARIANTS}
    for round_ in range(2):
        last = {}
        for name, program in programs.items():
            times = program_times(mk, program, CONTEXTS, steps=STEPS)
            for context, _, token in times:
                last.setdefault(context, set()).add(token)
            print(f"{model} round {round_}: {name:>32}  ms/token from context "
                  + format_times(times), flush=True)
        assert all(len(tokens) == 1 for tokens in last.values()), last


if __name__ == "__main__":
    main()
