"""How far each stage's last block lags its typical block: per stage (opcode and layer) of
profiled single steps (MEGAKERNEL_PROFILE build), the spread of its instructions' signal
times and op times. A stage's successors wait for its last signal, so (last - median) is
what balancing its blocks better could save at most.

    MODEL=llama-3.2-1b python3 scripts/dev/stage_tails.py"""
import os

import numpy as np

from dev_model import profiled_step, random_backend
from megakernel.instructions import OPCODES
from megakernel.profiling import KERNEL_PROFILE_FIELDS as F

model = os.environ.get("MODEL", "llama-3.2-1b")
cfg, mk = random_backend(model, 1024, profile=True)
names = {op: spec.name for op, spec in OPCODES.items()}
tails, ops, spans = {}, {}, {}
for position in range(32, 56):
    raw = profiled_step(mk, position)
    if position < 40:
        continue                                   # warm-up steps
    for (opcode, layer) in {(int(o), int(l)) for o, l in raw[:, [F["opcode"], F["layer"]]]}:
        stage = raw[(raw[:, F["opcode"]] == opcode) & (raw[:, F["layer"]] == layer)]
        if len(stage) < 2:
            continue
        end, ready = stage[:, F["end_ns"]], stage[:, F["ready_ns"]]
        name = names.get(opcode, str(opcode))
        tails.setdefault(name, []).append(end.max() - np.median(end))
        ops.setdefault(name, []).append(np.median(end - ready))
        spans.setdefault(name, []).append((end.max() - ready.min()))
print(f"{model}: medians over layers and 16 steps (us)")
print(f"{'stage':<22} {'op':>7} {'span':>7} {'last - median signal':>21}")
for name in sorted(tails):
    print(f"{name:<22} {np.median(ops[name]) / 1e3:7.2f} {np.median(spans[name]) / 1e3:7.2f} "
          f"{np.median(tails[name]) / 1e3:21.2f}")
