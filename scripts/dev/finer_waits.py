"""The scheduler's program against the same program with attention_reduce waiting only on
its own KV head's partitions (one counter per layer and KV head instead of one per layer),
same process, 64 back-to-back steps from several contexts, two rounds; the last tokens
must agree.

    MODEL=llama-3.2-1b python3 scripts/dev/finer_waits.py"""
import dataclasses
import os

import torch

from megakernel.instructions import ATTENTION_PARTIAL, ATTENTION_REDUCE
from megakernel.scheduler.program import Program, build_program
from dev_model import format_times, program_times, random_backend

model = os.environ.get("MODEL", "llama-3.2-1b")
CONTEXTS = (32, 1024, 8000)
MAX = 8192
cfg, mk = random_backend(model, MAX)


def per_kv_head_reduce_waits(program: Program) -> Program:
    names, targets = list(program.counter_names), list(program.counter_targets)
    fine: dict[tuple[int, int], int] = {}
    instrs = []
    for ins in program.instruction_list():
        if ins.spec is ATTENTION_PARTIAL:
            key = (ins.layer, ins.args["kv_head"])
            if key not in fine:
                fine[key] = len(names)
                names.append(f"L{ins.layer}.attention.kv{key[1]}")
                targets.append(0)
            targets[ins.signal] -= 1
            targets[fine[key]] += 1
            ins = dataclasses.replace(ins, signal=fine[key])
        elif ins.spec is ATTENTION_REDUCE:
            # Every partition of the layer comes before its reduce blocks: targets[c] is
            # final here.
            c = fine[(ins.layer, ins.args["head_begin"] // cfg.group_size)]
            ins = dataclasses.replace(ins, waits=((c, targets[c]),) + ins.waits[1:])
        instrs.append(ins)
    rows = torch.tensor([i.encode() for i in instrs], dtype=torch.int32)
    return Program(**{**program.__dict__, "instructions": rows, "counter_names": names,
                      "counter_targets": targets, "decoded": instrs})


base = build_program(cfg, num_sms=mk.num_sms, page_size=16, max_seq_len=MAX)
programs = {"stage waits": base, "per-KV-head reduce waits": per_kv_head_reduce_waits(base)}
for round_ in range(2):
    last = {}
    for name, program in programs.items():
        times = program_times(mk, program, CONTEXTS)
        for context, _, token in times:
            last.setdefault(context, set()).add(token)
        print(f"{model} round {round_}: {name:>26}  ms/token at context " + format_times(times),
              flush=True)
    assert all(len(tokens) == 1 for tokens in last.values()), last
