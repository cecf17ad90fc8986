"""Per block, the time between an instruction's signal and the start of the block's next
wait (the controller's hand-over: profile record stores and the next instruction's L2
prefetch), per L2 prefetch budget, from profiled single steps (MEGAKERNEL_PROFILE build).

    MODEL=llama-3.2-1b python3 scripts/dev/handover_gaps.py 0 65536"""
import os
import sys

import numpy as np

from dev_model import profiled_step, random_backend
from megakernel.instructions import OPCODES
from megakernel.profiling import KERNEL_PROFILE_FIELDS as F

model = os.environ.get("MODEL", "llama-3.2-1b")
cfg, mk = random_backend(model, 1024, profile=True)
budgets = [int(a) for a in sys.argv[1:]] or [0, mk.ext.DEFAULT_PREFETCH_BYTES]
names = {op: spec.name for op, spec in OPCODES.items()}


for budget in budgets:
    mk.prefetch_bytes = budget
    for pos in range(32, 40):
        profiled_step(mk, pos)
    steps, gaps, waits, by_next = [], [], [], {}
    for pos in range(40, 56):
        raw = profiled_step(mk, pos)
        steps.append(raw[:, F["end_ns"]].max() - raw[:, F["start_ns"]].min())
        waits.append((raw[:, F["ready_ns"]] - raw[:, F["start_ns"]]).sum() / 1e3)
        order = np.lexsort((raw[:, F["start_ns"]], raw[:, F["block"]]))
        r = raw[order]
        same = r[1:, F["block"]] == r[:-1, F["block"]]
        gap = (r[1:, F["start_ns"]] - r[:-1, F["end_ns"]])[same]
        gaps.append(gap.sum() / 1e3)
        for op, g in zip(r[:-1, F["opcode"]][same], gap):
            by_next.setdefault(names.get(int(op), str(op)), []).append(g)
    blocks = len(np.unique(raw[:, F["block"]]))
    print(f"{model} prefetch {budget // 1024:>4} KB: step {np.median(steps) / 1e3:.1f} us, "
          f"hand-over per block {np.median(gaps) / blocks:.2f} us, "
          f"wait per block {np.median(waits) / blocks:.2f} us", flush=True)
    for name, g in sorted(by_next.items()):
        g = np.asarray(g)
        print(f"    after {name:<22} median {np.median(g):6.0f} ns  p90 "
              f"{np.percentile(g, 90):6.0f} ns  n {len(g) // 16}")
