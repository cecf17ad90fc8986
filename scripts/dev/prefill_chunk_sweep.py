"""Time to first token of long prompts against the prefill's chunk sizes (GPU).

    python3 scripts/dev/prefill_chunk_sweep.py [--model random:llama-3.2-1b]
        [--chunks 512,1024,2048] [--long-chunks none] [--prompts 1024,4096,8192] [--runs 5]

Per pair of chunk size (torch_backend.PREFILL_CHUNK: the prompt graphs' largest bucket
follows it) and long chunk size (LONG_PREFILL_CHUNK, none: no long chunks), both patched
before the engine loads: an engine, then per prompt length two warm-up generations (the
first captures the prompt's graphs) and `runs` timed ones of one new token; prints the
median TTFT.
"""
from __future__ import annotations

import argparse
import gc
import statistics

import torch

import megakernel
from megakernel.backends import torch_backend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--chunks", default="512,1024,2048")
    ap.add_argument("--long-chunks", default="none")
    ap.add_argument("--prompts", default="1024,4096,8192")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    prompts = [int(n) for n in args.prompts.split(",")]
    print(f"{args.model} on {torch.cuda.get_device_name()}: median TTFT ms [min, max]")
    print("chunk   long  " + "  ".join(f"{n:>22}" for n in prompts))
    pairs = [(int(c), long) for c in args.chunks.split(",")
             for long in args.long_chunks.split(",")]
    for chunk, long in pairs:
        torch_backend.PREFILL_CHUNK = chunk
        torch_backend.LONG_PREFILL_CHUNK = 1 << 40 if long == "none" else int(long)
        engine = megakernel.Engine.from_pretrained(args.model, max_seq_len=max(prompts) + 64)
        row = []
        for n in prompts:
            prompt = torch.randint(0, engine.config.vocab_size, (n,),
                                   generator=torch.Generator().manual_seed(n)).tolist()
            times = [engine.generate(prompt, max_new_tokens=1).stats.ttft_ms
                     for _ in range(2 + args.runs)][2:]
            row.append(f"{statistics.median(times):8.2f} [{min(times):.2f}, {max(times):.2f}]")
        print(f"{chunk:>5}  {long:>5}  " + "  ".join(f"{r:>22}" for r in row), flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
