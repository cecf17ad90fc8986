"""The scheduler's split attention (partitions + attention_reduce) against whole-context
attention (one head and a slice of its dims per block, no reduce stage): same process,
back-to-back steps from several contexts, two rounds; then both programs' logits for one
step at the same position and cache, which must agree.

    MODEL=llama-3.2-1b python3 scripts/dev/whole_context_attention.py
    MODEL=llama-3.1-8b CONTEXTS=32,64,96,128 STEPS=32 python3 scripts/dev/whole_context_attention.py

CONTEXTS: the first positions of the timed runs; STEPS: steps per run (default 64 in the
first round and 128 in the second); SLICES=1,2: also whole-context programs that cut each
head's dims into that many slices instead of the scheduler's choice (fewer blocks, fewer
redundant K/V reads)."""
import os

import torch

from dev_model import (format_times, program_times, program_with, random_backend,
                       wait_for_device)
from megakernel.scheduler import build_program

model = os.environ.get("MODEL", "llama-3.2-1b")
MAX = 2048
CONTEXTS = tuple(int(c) for c in os.environ.get("CONTEXTS", "32,256,512,1024").split(","))
STEPS = os.environ.get("STEPS")
cfg, mk = random_backend(model, MAX)
programs = {name: build_program(cfg, num_sms=mk.num_sms, page_size=16, max_seq_len=MAX,
                                whole_context_attention=whole)
            for name, whole in (("split", False), ("whole context", True))}


def with_slices(n: int):
    width = cfg.head_dim // n
    slices = [(d, width) for d in range(0, cfg.head_dim, width)]
    return program_with(cfg, mk.num_sms, MAX, {"whole_context_dim_slices": lambda *a: slices},
                        whole_context_attention=True)


for n in filter(None, os.environ.get("SLICES", "").split(",")):
    programs[f"whole, {n} slices"] = with_slices(int(n))
for round_ in range(2):
    for name, program in programs.items():
        times = program_times(mk, program, CONTEXTS,
                              steps=int(STEPS) if STEPS else 128 if round_ else 64)
        print(f"{model} round {round_}: {name:>17}  ms/token from context "
              + format_times(times), flush=True)

logits = {}
for name, program in programs.items():
    mk.load_program(program)
    out = mk.decode(torch.tensor(1, device="cuda"), 1500)
    wait_for_device("the compared step")
    mk.check_error()
    logits[name] = out.logits.float().clone()
split = logits.pop("split")
for name, other in logits.items():
    err = float((other - split).norm() / split.norm())
    print(f"{model}: logits at position 1500, {name} against split: relative difference "
          f"{err:.2e}, argmax {int(other.argmax())} / {int(split.argmax())}")
    assert err < 1e-3, (name, err)
