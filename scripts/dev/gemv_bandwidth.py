"""What a library mat-vec reads per second at this model's row lengths: torch.mv (cuBLAS)
over bf16 matrices with the LM head's, gate_up's and down's row lengths, each stacked over
the layers into one large matrix so launch gaps do not count, against a device copy.
The megakernel's stages are compared with these (scripts/dev/stage_tails.py gives their
op times).

    MODEL=llama-3.2-1b python3 scripts/dev/gemv_bandwidth.py"""
import os

import torch

from dev_model import wait_for
from megakernel.presets import PRESETS

cfg = PRESETS[os.environ.get("MODEL", "llama-3.2-1b")]
L, H, I, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
SHAPES = {"lm_head": (V, H), "gate_up x layers": (L * 2 * I, H), "down x layers": (L * H, I),
          "qkv x layers": (L * (cfg.q_size + 2 * cfg.kv_size), H)}


def median_ms(fn, iters: int = 20) -> float:
    times = []
    for i in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        wait_for(end, "a timed mat-vec")
        if i >= 3:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


g = torch.Generator(device="cuda").manual_seed(0)
for name, (rows, k) in SHAPES.items():
    w = torch.randn(rows, k, generator=g, device="cuda").to(torch.bfloat16)
    x = torch.randn(k, generator=g, device="cuda").to(torch.bfloat16)
    ms = median_ms(lambda w=w, x=x: torch.mv(w, x))
    nbytes = w.numel() * 2
    print(f"{name:<18} [{rows} x {k}] {nbytes / 1e6:8.1f} MB  torch.mv {ms * 1e3:8.1f} us  "
          f"{nbytes / ms / 1e9:.3f} TB/s", flush=True)
    del w
src = torch.empty(256 * 2 ** 20, dtype=torch.float32, device="cuda")
dst = torch.empty_like(src)
ms = median_ms(lambda: dst.copy_(src))
print(f"copy (read + write) {2 * src.numel() * 4 / ms / 1e9:.3f} TB/s")
