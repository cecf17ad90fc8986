"""Attention partitions per KV head against time: the same program with
attention_partitions() forced to each count given, at several contexts. Same process,
64 back-to-back steps from each context, two rounds.

    MODEL=llama-3.2-1b python3 scripts/dev/partition_sweep.py 8 12 16"""
import os
import sys

import megakernel.scheduler.program as program_module
from dev_model import format_times, program_times, program_with, random_backend

model = os.environ.get("MODEL", "llama-3.2-1b")
CONTEXTS = (32, 1024, 8000)
MAX = 8192
cfg, mk = random_backend(model, MAX)


def build(parts: int):
    return program_with(cfg, mk.num_sms, MAX, {"attention_partitions": lambda *args: parts})


default = program_module.attention_partitions(cfg, mk.num_sms, MAX, 16)
programs = {p: build(p) for p in [default] + [int(a) for a in sys.argv[1:] if int(a) != default]}
for round_ in range(2):
    for parts, program in programs.items():
        times = program_times(mk, program, CONTEXTS)
        print(f"{model} round {round_}: {parts:>3} partitions per KV head"
              f"{' (default)' if parts == default else ''}  ms/token at context "
              + format_times(times), flush=True)
