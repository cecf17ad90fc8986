"""Does trimming the row blocks that sm_tails.py finds slow shorten the step?

    MODEL=llama-3.2-1b python3 scripts/dev/block_trim.py

The program rebuilt with a stage's blocks at some places made smaller, their rows given
one each to the blocks after them (the last block, often a short remainder, keeps its
rows), timed over back-to-back launches of 8 chained steps from context 32 in one process,
two rounds. Variants: STAGE:FIRST-LAST:ROWS, e.g. lm_head:0-4:20 (the LM head's blocks 0
to 4 lose 20 rows each)."""
import os

import megakernel.scheduler.program as program_module
from dev_model import chained_ms, program_with, random_backend

CONTEXT = 32
STEPS = 8
LAUNCHES = 16
VARIANTS = os.environ.get("VARIANTS", "lm_head:0-4:20 lm_head:0-4:40 gate_up:62-70:1").split()


def trimmed(blocks, first: int, last: int, rows: int):
    """(begin, count) blocks with blocks first..last `rows` smaller; the rows go one each
    to the blocks after them, wrapping to block 0, never to the last block."""
    counts = [n for _, n in blocks]
    moved = 0
    for i in range(first, last + 1):
        counts[i] -= rows
        moved += rows
    i = last + 1
    while moved:
        i %= len(counts) - 1
        if not first <= i <= last:
            counts[i] += 1
            moved -= 1
        i += 1
    out, begin = [], 0
    for n in counts:
        out.append((begin, n))
        begin += n
    return out


def variant_program(cfg, num_sms: int, max_len: int, spec: str):
    stage, places, rows = spec.split(":")
    first, last = map(int, places.split("-"))
    total = {"lm_head": cfg.vocab_size, "gate_up": cfg.intermediate_size}[stage]
    original = program_module.split_rows

    def split_rows(n, *args, **kw):
        blocks = original(n, *args, **kw)
        return trimmed(blocks, first, last, int(rows)) if n == total else blocks
    return program_with(cfg, num_sms, max_len, {"split_rows": split_rows},
                        whole_context_attention=True)


def main():
    model = os.environ.get("MODEL", "llama-3.2-1b")
    max_len = 1024
    cfg, mk = random_backend(model, max_len)
    base = mk.program_for(CONTEXT + STEPS)
    programs = [("as built", base)] + [(v, variant_program(cfg, mk.num_sms, max_len, v))
                                       for v in VARIANTS]
    assert programs[1][1].num_instructions == base.num_instructions
    print(f"{model}: ms per step, {LAUNCHES} launches of {STEPS} chained steps")
    for rnd in range(2):
        line = []
        for name, program in programs:
            mk.load_program(program)
            line.append(f"{name} {chained_ms(mk, STEPS, LAUNCHES, CONTEXT):.4f}")
        print(f"  round {rnd + 1}: " + ", ".join(line))


if __name__ == "__main__":
    main()
