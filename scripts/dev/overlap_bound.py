"""Upper bounds of removing a stage barrier, measured on the real kernel with the math
made wrong on purpose (only the time means something). Same process, 128 back-to-back
steps per program, two rounds.

Each "X overlapping P" program makes stage X wait on the stage before P instead of on P,
so an SM that finished its P block starts its X block at once, as if X's dependency on P
were as fine as it could be (X then reads P's output while P still writes it):

- "qkv overlapping down" (RESULTS, entry 16): each layer's rms_qkv_rope waits on the layer
  before's gate_up;
- "down overlapping gate_up", "gate_up overlapping o_proj", "o_proj overlapping reduce",
  "reduce overlapping attention", "attention overlapping qkv" (entry 28): the same for
  the other edges of a layer (attention of layer 0 keeps its wait);
- "down after the first k gate_up blocks" (entry 28): gate_up's blocks 0..k-1 signal a
  counter of their own and down_proj waits on it alone: the most that down's rounds
  waiting each on the gate_up blocks that feed them could save (round 0's inputs come
  from the first k blocks; the later rounds never wait);
- "layer 0's qkv without the embed wait" (entry 28): the embedding row read by every
  layer-0 QKV block itself instead of waiting for the embed instruction's hidden row;
- "one partition per KV head, no reduce" (entry 28): entry 13's program on the current
  kernel, attention_partitions() forced to 1 and the reduce stage dropped as below;
- "no reduce stage" (entry 20): the attention_reduce instructions are dropped and o_proj
  waits on attention_partial directly: what merging the partitions without a stage of
  its own could save at most (o_proj then reads a stale attn_out).

    MODEL=llama-3.2-1b python3 scripts/dev/overlap_bound.py"""
import dataclasses
import os

import torch


from dev_model import program_times, program_with, random_backend
from megakernel.scheduler import Program, build_program

model = os.environ.get("MODEL", "llama-3.2-1b")
MAX = 1024
cfg, mk = random_backend(model, MAX)
exact = build_program(cfg, num_sms=mk.num_sms, page_size=16, max_seq_len=MAX)


def stage_done(suffix: str, program: Program = exact) -> dict:
    """layer -> (counter, per-step target) of the layer's stage named `suffix`."""
    return {int(name[1:name.index(".")]): (program.counter_names.index(name), target)
            for name, target in zip(program.counter_names, program.counter_targets)
            if name.endswith(suffix)}


def with_instructions(instrs: list, targets: list, program: Program = exact,
                      names: list | None = None) -> Program:
    """`program` with these instructions, counter targets and (if given) counter names."""
    return Program(**{**program.__dict__, "decoded": instrs, "counter_targets": targets,
                      "counter_names": names or program.counter_names,
                      "instructions": torch.tensor([i.encode() for i in instrs],
                                                   dtype=torch.int32)})


def overlapping(opcode: str, earlier_stage: str, layer_offset: int = 0) -> Program:
    """`opcode`'s instructions wait on `earlier_stage` of their layer + layer_offset (the
    stage before their own producer) wherever that layer exists."""
    earlier = stage_done(earlier_stage)
    return with_instructions(
        [dataclasses.replace(i, waits=(earlier[i.layer + layer_offset],))
         if i.spec.name == opcode and i.layer + layer_offset in earlier else i
         for i in exact.instruction_list()], exact.counter_targets)


def without_reduce(program: Program) -> Program:
    done = stage_done(".attention", program)
    reduce = {c for c, _ in stage_done(".attention_reduce", program).values()}
    instrs = [dataclasses.replace(i, waits=(done[i.layer],))
              if i.spec.name == "o_proj_residual" else i
              for i in program.instruction_list() if i.spec.name != "attention_reduce"]
    return with_instructions(instrs, [0 if c in reduce else t
                                      for c, t in enumerate(program.counter_targets)], program)


def down_after_first_gate_up_blocks(k: int) -> Program:
    names, targets = list(exact.counter_names), list(exact.counter_targets)
    first = {}
    for layer, (c, _) in stage_done(".gate_up").items():
        first[layer] = len(names)
        names.append(f"L{layer}.gate_up.first{k}")
        targets.append(k)
        targets[c] -= k
    instrs = []
    for i in exact.instruction_list():
        if i.spec.name == "rms_gate_up_silu" and i.block_index < k:
            i = dataclasses.replace(i, signal=first[i.layer])
        elif i.spec.name == "down_proj_residual":
            i = dataclasses.replace(i, waits=((first[i.layer], k),))
        instrs.append(i)
    return with_instructions(instrs, targets, names=names)


gate_up_blocks = sum(i.spec.name == "rms_gate_up_silu" and i.layer == 0
                     for i in exact.instruction_list())
variants = {
    "qkv overlapping down": overlapping("rms_qkv_rope", ".gate_up", -1),
    "attention overlapping qkv": overlapping("attention_partial", ".down", -1),
    "reduce overlapping attention": overlapping("attention_reduce", ".qkv"),
    "o_proj overlapping reduce": overlapping("o_proj_residual", ".attention"),
    "gate_up overlapping o_proj": overlapping("rms_gate_up_silu", ".attention_reduce"),
    "down overlapping gate_up": overlapping("down_proj_residual", ".o_proj"),
    **{f"down after the first {k} gate_up blocks": down_after_first_gate_up_blocks(k)
       for k in (gate_up_blocks // 7, gate_up_blocks // 4, gate_up_blocks // 2)},
    "layer 0's qkv without the embed wait": with_instructions(
        [dataclasses.replace(i, waits=()) if i.spec.name == "rms_qkv_rope" and i.layer == 0
         else i for i in exact.instruction_list()], exact.counter_targets),
    "one partition per KV head, no reduce": without_reduce(program_with(
        cfg, mk.num_sms, MAX, {"attention_partitions": lambda *args: 1})),
    "no reduce stage": without_reduce(exact),
}


def ms_per_token(program) -> float:
    [(_, ms, _)] = program_times(mk, program, (32,), steps=128)
    return ms


for _ in range(2):
    a = ms_per_token(exact)
    for name, program in variants.items():
        b = ms_per_token(program)
        print(f"{model}: exact {a:.4f} ms/token, {name} {b:.4f} ({(b - a) * 1e3:+.1f} us, "
              f"{(b - a) * 1e3 / cfg.num_layers:+.2f} us per layer)", flush=True)
