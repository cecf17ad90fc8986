"""Where a process's first generation spends its time to first token (GPU).

    python3 scripts/dev/first_generation.py [--model random:llama-3.2-1b] [--prompt-tokens 32]

Run it in a fresh process: the point is what the first prefill and the first decode
launch cost on top of later ones. For three rounds after load, prints the prefill's
wall time to a synchronized finish (no graph: backend.prefill alone captures none), the
host time of the decode launch's enqueue and its time to a synchronized finish; then the
first prefill of several new lengths; then three generate() calls on a prompt length no
round used, with each call's TTFT, its whole time (the first ends with the capture of its
prompt's graph) and when its first calls to prefill, decode_steps and read_tokens ran.
"""
from __future__ import annotations

import argparse
import time

import torch

import megakernel


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--generate-only", action="store_true",
                    help="only the generate() calls, first thing after load")
    args = ap.parse_args()

    t0 = time.perf_counter()
    engine = megakernel.Engine.from_pretrained(args.model, device="cuda", max_seq_len=1024)
    print(f"load {ms_since(t0):.1f} ms")
    backend, kv = engine.backend, engine.kv_cache
    n = args.prompt_tokens
    ids = torch.tensor([10 + i % 1000 for i in range(n)], dtype=torch.int64, device="cuda")
    steps = getattr(backend, "steps_per_launch", 1)
    for round_ in range(0 if args.generate_only else 3):
        kv.release()
        kv.reserve(n + steps + 1)
        backend.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = backend.prefill(ids, 0)
        torch.cuda.synchronize()
        prefill_ms = ms_since(t0)
        token = out.greedy_token.reshape(())
        t0 = time.perf_counter()
        if steps > 1:
            backend.decode_steps(token, n, steps)
        else:
            backend.decode(token, n)
        enqueue_ms = ms_since(t0)
        torch.cuda.synchronize()
        decode_ms = ms_since(t0)
        print(f"round {round_}: prefill {prefill_ms:.2f} ms; decode launch of {steps} steps: "
              f"enqueue {enqueue_ms:.2f} ms, done {decode_ms:.2f} ms")
    # Prompt lengths no round prefilled, each prefilled once (no graph: first use): does a
    # first run cost more for each new length, or once per new kernel choice?
    for length in () if args.generate_only else (17, 18, 19, 40, 41, 100, 101):
        kv.release()
        kv.reserve(length + 1)
        backend.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend.prefill(ids.repeat(4)[:length], 0)
        torch.cuda.synchronize()
        print(f"first prefill of {length} tokens: {ms_since(t0):.2f} ms")
    other = [11 + i % 900 for i in range(n + 3)]     # a length no round prefilled
    events = []
    for obj, name in ((backend, "prefill"), (backend, "decode_steps"),
                      (engine.readback, "read_tokens")):
        timed(obj, name, events)
    for call in range(3):
        events.clear()
        t_call = time.perf_counter()
        stats = engine.generate(other, max_new_tokens=16, ignore_eos=True).stats
        call_ms = ms_since(t_call)
        marks = ", ".join(f"{name} {(a - t_call) * 1e3:.1f}-{(b - t_call) * 1e3:.1f}"
                          for name, a, b in events[:4])
        print(f"generate call {call} ({len(other)}-token prompt): TTFT {stats.ttft_ms:.2f} ms, "
              f"{stats.ms_per_token:.3f} ms/token, whole call {call_ms:.1f} ms; first calls "
              f"(ms into it): {marks}")


def timed(obj, name, calls):
    """Wrap obj.name so that each call appends (name, start, end) to calls."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            calls.append((name, t0, time.perf_counter()))
    setattr(obj, name, wrapper)


if __name__ == "__main__":
    main()
