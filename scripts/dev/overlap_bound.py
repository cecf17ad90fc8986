"""Upper bounds of removing a stage barrier, measured on the real kernel with the math
made wrong on purpose (only the time means something). Same process, 128 back-to-back
steps per program, two rounds.

- "QKV overlapping down" (RESULTS, entry 16): each layer's rms_qkv_rope waits on the layer
  before's gate_up instead of its down_proj, so an SM that finished its down block starts
  its QKV block at once (QKV then reads hidden while down still writes it).
- "no reduce stage" (entry 20): the attention_reduce instructions are dropped and o_proj
  waits on attention_partial directly: what merging the partitions without a stage of
  its own could save at most (o_proj then reads a stale attn_out).

    MODEL=llama-3.2-1b python3 scripts/dev/overlap_bound.py"""
import dataclasses
import os

import torch

from dev_model import program_times, random_backend
from megakernel.scheduler import Program, build_program

model = os.environ.get("MODEL", "llama-3.2-1b")
MAX = 1024
cfg, mk = random_backend(model, MAX)
exact = build_program(cfg, num_sms=mk.num_sms, page_size=16, max_seq_len=MAX)


def stage_done(suffix: str) -> dict:
    """layer -> (counter, per-step target) of the layer's stage named `suffix`."""
    return {int(name[1:name.index(".")]): (exact.counter_names.index(name), target)
            for name, target in zip(exact.counter_names, exact.counter_targets)
            if name.endswith(suffix)}


def with_instructions(instrs: list, targets: list) -> Program:
    return Program(**{**exact.__dict__, "decoded": instrs, "counter_targets": targets,
                      "instructions": torch.tensor([i.encode() for i in instrs],
                                                   dtype=torch.int32)})


gate_up_done, attention_done = stage_done(".gate_up"), stage_done(".attention")
reduce_counters = {c for c, _ in stage_done(".attention_reduce").values()}

qkv_early = with_instructions(
    [dataclasses.replace(i, waits=(gate_up_done[i.layer - 1],))
     if i.spec.name == "rms_qkv_rope" and i.layer > 0 else i
     for i in exact.instruction_list()], exact.counter_targets)

no_reduce = with_instructions(
    [dataclasses.replace(i, waits=(attention_done[i.layer],))
     if i.spec.name == "o_proj_residual" else i
     for i in exact.instruction_list() if i.spec.name != "attention_reduce"],
    [0 if c in reduce_counters else t for c, t in enumerate(exact.counter_targets)])


def ms_per_token(program) -> float:
    [(_, ms, _)] = program_times(mk, program, (32,), steps=128)
    return ms


for _ in range(2):
    a = ms_per_token(exact)
    for name, program in (("QKV overlapping down", qkv_early), ("no reduce stage", no_reduce)):
        b = ms_per_token(program)
        print(f"{model}: exact {a:.4f} ms/token, {name} {b:.4f} ({(b - a) * 1e3:+.1f} us, "
              f"{(b - a) * 1e3 / cfg.num_layers:+.2f} us per layer)", flush=True)
