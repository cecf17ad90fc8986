"""What a process's first prompt of each length costs after load (GPU).

    python3 scripts/dev/first_prompt_lengths.py [--model random:llama-3.2-1b]
        [--extra-warm-up 32,64,128] [--matmul]

Run it in a fresh process. After Engine.from_pretrained (whose warm-up runs), prefills a
dummy prompt of each length twice, unpadded, through prefill_chunk (pages reserved,
synchronized) and prints both times: a first run much slower than the second is a cost
paid once per process and length. --extra-warm-up prefills those lengths first. --matmul
first times a bare bf16 matmul [T, 2048] x [2048, 8192] at new T, first and second call
(cuBLAS's first use of a shape), before loading the model.
"""
from __future__ import annotations

import argparse
import time

import torch

import megakernel
from megakernel.backends.prompt_prefill import prefill_chunk

LENGTHS = (24, 32, 40, 50, 64, 100, 128, 200, 300, 450, 512, 700)


def timed_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def matmul_first_use() -> None:
    w = torch.randn(8192, 2048, dtype=torch.bfloat16, device="cuda")
    timed_ms(lambda: torch.randn(16, 2048, dtype=torch.bfloat16, device="cuda") @ w.t())
    for t in (24, 40, 50, 100, 200):
        x = torch.randn(t, 2048, dtype=torch.bfloat16, device="cuda")
        first, second = timed_ms(lambda: x @ w.t()), timed_ms(lambda: x @ w.t())
        print(f"matmul T={t}: first {first:.2f} ms, second {second:.2f}")


def prefill_ms(engine, n: int) -> float:
    """One unpadded prefill of n dummy tokens at position 0, synchronized, in ms."""
    backend = engine.backend
    if hasattr(backend, "_prompt_backend"):
        backend = backend._prompt_backend()
    kv = engine.kv_cache
    kv.reserve(n)
    try:
        return timed_ms(lambda: prefill_chunk(backend, torch.zeros(n, dtype=torch.int64,
                                                                   device="cuda")))
    finally:
        kv.release()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--extra-warm-up", default="", help="comma-separated prompt lengths")
    ap.add_argument("--matmul", action="store_true")
    args = ap.parse_args()
    if args.matmul:
        matmul_first_use()
    t0 = time.perf_counter()
    engine = megakernel.Engine.from_pretrained(args.model, device="cuda", max_seq_len=1024)
    print(f"load {(time.perf_counter() - t0) * 1e3:.0f} ms")
    for n in filter(None, args.extra_warm_up.split(",")):
        print(f"extra warm-up {n}: {prefill_ms(engine, int(n)):.1f} ms")
    runs = []
    for n in LENGTHS:
        first, second = prefill_ms(engine, n), prefill_ms(engine, n)
        runs.append(f"{n}: {first:.1f} / {second:.1f}")
    print("first / second prefill (ms): " + ", ".join(runs))


if __name__ == "__main__":
    main()
