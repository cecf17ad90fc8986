"""Where the time goes when a prompt chunk prefills after a kept prefix (a chat turn's new
tokens at an arbitrary position, with no prompt graph of that start).

    python3 scripts/dev/kept_prefix_prefill.py [--model random:llama-3.2-1b] [--history 480]
                                               [--chunk 25] [--repeats 20]

Prefills `history` random tokens, then times prefill_chunk() of `chunk` more tokens at
position `history`, padded to its bucket as PromptGraphs.run does without a graph: the
host's time to return (launches) and the time until the device has finished, medians over
repeats; then a torch.profiler table of one call (host time by op, device time by kernel).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import megakernel
from megakernel.backends.prompt_graphs import prefill_padded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--history", type=int, default=480)
    ap.add_argument("--chunk", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    engine = megakernel.Engine.from_pretrained(args.model, max_seq_len=4096)
    backend = engine.backend
    prompt_backend = getattr(backend, "_prefill_backend", None) or backend
    engine.kv_cache.reserve(args.history + 512)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, engine.config.vocab_size, (args.history + args.chunk,),
                        generator=gen).cuda()
    prompt_backend.prefill(ids[:args.history], 0)
    chunk = ids[args.history:]

    def run():
        return prefill_padded(prompt_backend, chunk, args.history)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    host, total = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1000)
        total.append((t2 - t0) * 1000)
    print(f"{args.model}: {args.chunk} tokens at position {args.history}: host "
          f"{statistics.median(host):.2f} ms, until done {statistics.median(total):.2f} ms "
          f"(medians of {args.repeats})")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                    max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10,
                                    max_name_column_width=60))


if __name__ == "__main__":
    main()
