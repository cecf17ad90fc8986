"""Upper bound of letting QKV's weights stream right after down_proj (RESULTS, lead f):
the same program with each layer's rms_qkv_rope waiting on the layer before's gate_up
instead of its down_proj, so an SM that finished its down block starts its QKV block at
once. The math is then wrong (QKV reads hidden while down still writes it); only the time
means something. Same process, 128 back-to-back steps per program, two rounds.

    MODEL=llama-3.2-1b python3 scripts/dev/overlap_bound.py"""
import dataclasses
import os

import torch

from dev_model import back_to_back_ms, random_backend
from megakernel.scheduler import Program, build_program

model = os.environ.get("MODEL", "llama-3.2-1b")
MAX = 1024
cfg, mk = random_backend(model, MAX)
exact = build_program(cfg, num_sms=mk.num_sms, page_size=16, max_seq_len=MAX)

gate_up_done = {}   # layer -> (counter, target) of its gate_up stage
for name, target in zip(exact.counter_names, exact.counter_targets):
    if name.endswith(".gate_up"):
        gate_up_done[int(name[1:name.index(".")])] = (exact.counter_names.index(name), target)
instrs = []
for ins in exact.instruction_list():
    if ins.spec.name == "rms_qkv_rope" and ins.layer > 0:
        ins = dataclasses.replace(ins, waits=(gate_up_done[ins.layer - 1],))
    instrs.append(ins)
overlapped = Program(**{**exact.__dict__, "decoded": instrs,
                        "instructions": torch.tensor([i.encode() for i in instrs],
                                                     dtype=torch.int32)})


def ms_per_token(program, steps: int = 128) -> float:
    mk.load_program(program)
    ms, _ = back_to_back_ms(mk, torch.tensor(1, device="cuda"), 32, steps)
    mk.check_error()
    return ms


for _ in range(2):
    a, b = ms_per_token(exact), ms_per_token(overlapped)
    print(f"{model}: exact {a:.4f} ms/token, QKV overlapping down {b:.4f} "
          f"({(b - a) * 1e3:+.1f} us, {(b - a) * 1e3 / cfg.num_layers:+.2f} us per layer)")
