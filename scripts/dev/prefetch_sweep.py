"""The L2 prefetch budget per instruction (KernelParams.prefetch_bytes) against time, in one
process: 128 back-to-back steps from context 32 per budget, two rounds; the last tokens
must agree.

    MODEL=llama-3.2-1b python3 scripts/dev/prefetch_sweep.py 32768 65536 131072"""
import os
import sys

import torch

from dev_model import back_to_back_ms, random_backend

model = os.environ.get("MODEL", "llama-3.2-1b")
cfg, mk = random_backend(model, 1024)
budgets = [int(a) for a in sys.argv[1:]] or [mk.ext.DEFAULT_PREFETCH_BYTES]
for round_ in range(2):
    tokens = set()
    for budget in budgets:
        mk.prefetch_bytes = budget
        ms, token = back_to_back_ms(mk, torch.tensor(1, device="cuda"), 32, 128)
        mk.check_error()
        tokens.add(int(token))
        print(f"{model} round {round_}: prefetch {budget // 1024:>4} KB  {ms:.4f} ms/token",
              flush=True)
    assert len(tokens) == 1, tokens
