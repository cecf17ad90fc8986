"""Where the megakernel engine's time to first token goes (GPU).

    python3 scripts/dev/ttft_breakdown.py [--model random:llama-3.2-1b] [--prompt-tokens 32]

Prints generate()'s TTFT over several runs (with and without decode launches after the
prefill), then the prefill alone: the host's time to enqueue it, its device time (CUDA
events) and the time until its token is on the host; then the torch profiler's view of
one prefill: kernels launched, the ops with the most host time and the most calls.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import megakernel


def median_ms(values):
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()

    engine = megakernel.Engine.from_pretrained(args.model, device="cuda",
                                               max_seq_len=max(1024, args.prompt_tokens + 64))
    prompt = [10 + i % 1000 for i in range(args.prompt_tokens)]
    for new_tokens in (1, 9, 9):     # the first 9 warms up the decode programs
        engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
    for new_tokens in (1, 9):
        ttft = [engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).stats.ttft_ms
                for _ in range(args.runs)]
        print(f"generate, {new_tokens} new tokens: TTFT ms {median_ms(ttft)}")

    backend, kv = engine.backend, engine.kv_cache
    ids = torch.tensor(prompt, dtype=torch.int64, device="cuda")
    enqueue, device, host = [], [], []
    for _ in range(args.runs):
        kv.release()
        kv.reserve(len(prompt) + 16)
        backend.reset()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        out = backend.prefill(ids, 0)
        end.record()
        t1 = time.perf_counter()
        int(out.greedy_token)
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) * 1e3)
        device.append(start.elapsed_time(end))
        host.append((t2 - t0) * 1e3)
    print(f"prefill: enqueue {median_ms(enqueue)} ms, device {median_ms(device)} ms, "
          f"token on host {median_ms(host)} ms")

    kv.release()
    kv.reserve(len(prompt) + 16)
    backend.reset()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        int(backend.prefill(ids, 0).greedy_token)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"prefill: {len(kernels)} device events, "
          f"{sum(e.device_time for e in kernels) / 1e3:.2f} ms of device time")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="count", row_limit=25))


if __name__ == "__main__":
    main()
