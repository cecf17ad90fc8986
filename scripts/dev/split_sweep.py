"""Block sizes per stage against time: the same program with stages cut into blocks of
the given rows (RoPE-free mat-vec stages: o_proj, gate_up, down, lm_head), against the
scheduler's own split. Same process, 128 back-to-back steps per program, two rounds;
the last token must match (rows are whole dot products, so bits do not change).

    MODEL=llama-3.1-8b python3 scripts/dev/split_sweep.py down=16 down=24 down=16+o_proj=16"""
import os
import sys

import megakernel.scheduler.program as program_module
from dev_model import program_times, program_with, random_backend

model = os.environ.get("MODEL", "llama-3.2-1b")
MAX = 1024
cfg, mk = random_backend(model, MAX)
H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
# (total, row_bytes) of each split_rows call in build_program, by stage.
STAGES = {"o_proj": (H, cfg.q_size * 2), "gate_up": (I, 4 * H), "down": (H, 2 * I),
          "lm_head": (V, 2 * H)}
original_split_rows = program_module.split_rows


def build(block_rows: dict):
    """build_program with the named stages cut into blocks of block_rows[stage] rows."""
    def split_rows(total, num_sms, row_bytes, unit=1, **model):
        for name, key in STAGES.items():
            if (total, row_bytes) == key and name in block_rows:
                rows = block_rows[name]
                return [(b, min(rows, total - b)) for b in range(0, total, rows)]
        return original_split_rows(total, num_sms, row_bytes, unit, **model)
    return program_with(cfg, mk.num_sms, MAX, {"split_rows": split_rows})


VARIANTS = {"scheduler's split": {}}
for spec in sys.argv[1:]:
    VARIANTS[spec] = {stage: int(rows) for stage, rows in
                      (item.split("=") for item in spec.split("+"))}
programs = {name: build(w) for name, w in VARIANTS.items()}
reference = None
for round_ in range(2):
    for name, prog in programs.items():
        [(_, ms, token)] = program_times(mk, prog, (32,), steps=128)
        reference = token if reference is None else reference
        blocks = prog.opcode_counts()
        print(f"{model} round {round_}: {name:<22} {ms:.4f} ms/token  (lm_head blocks "
              f"{prog.lm_head_blocks}, gate_up {blocks['rms_gate_up_silu'] // cfg.num_layers}, "
              f"down {blocks['down_proj_residual'] // cfg.num_layers}, o_proj "
              f"{blocks['o_proj_residual'] // cfg.num_layers}) last token "
              f"{'matches' if token == reference else 'DIFFERS'}", flush=True)
