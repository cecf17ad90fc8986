"""The scheduler's program against the same program with attention_reduce waiting only on
its own KV head's partitions (one counter per layer and KV head instead of one per layer),
same process, 64 back-to-back steps from several contexts, two rounds; the last tokens
must agree.

    MODEL=llama-3.2-1b python3 scripts/dev/finer_waits.py"""
import os

from megakernel.instructions import ATTENTION_PARTIAL, ATTENTION_REDUCE
from megakernel.scheduler.program import Program, build_program
from dev_model import format_times, program_times, random_backend

WAIT0_COUNTER, WAIT0_TARGET, SIGNAL = 2, 3, 6   # header words (instruction_layout.h)
KV_HEAD, HEAD_BEGIN = 10, 10                    # argument words of the two opcodes

model = os.environ.get("MODEL", "llama-3.2-1b")
CONTEXTS = (32, 1024, 8000)
MAX = 8192
cfg, mk = random_backend(model, MAX)


def per_kv_head_reduce_waits(program: Program) -> Program:
    rows = program.instructions.clone()
    names, targets = list(program.counter_names), list(program.counter_targets)
    group = cfg.num_heads // cfg.num_kv_heads
    fine: dict[tuple[int, int], int] = {}
    for i in range(rows.shape[0]):
        op, layer = int(rows[i, 0]), int(rows[i, 1])
        if op == ATTENTION_PARTIAL.code:
            key = (layer, int(rows[i, KV_HEAD]))
            if key not in fine:
                fine[key] = len(names)
                names.append(f"L{layer}.attention.kv{key[1]}")
                targets.append(0)
            targets[int(rows[i, SIGNAL])] -= 1
            rows[i, SIGNAL] = fine[key]
            targets[fine[key]] += 1
        elif op == ATTENTION_REDUCE.code:
            c = fine[(layer, int(rows[i, HEAD_BEGIN]) // group)]
            rows[i, WAIT0_COUNTER] = c
            rows[i, WAIT0_TARGET] = targets[c]
    return Program(**{**program.__dict__, "instructions": rows, "counter_names": names,
                      "counter_targets": targets, "decoded": []})


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
