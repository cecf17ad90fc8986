"""GPU memory an engine takes beyond its weights and its KV cache: what the load's memory
check (megakernel/memory_check.py) must leave free for activations, workspaces, programs
and prompt graphs.

    python3 scripts/dev/load_overhead.py [--models random:llama-3.2-1b,random:llama-3.1-8b]
                                         [--max-seq-len 4096]

Per model, in one process: the driver's free memory before the load, then the engine
loaded and run through what allocates (a 2600-token prompt: a long prefill chunk and
two short ones; greedy, top-k 40 and top-k 100 generations; the same prompt again,
replaying the graphs the first captured). Prints the weights' and the cache's bytes, and
what else the driver's free count and torch's peak allocation lost.
"""
from __future__ import annotations

import argparse
import gc

import torch

import megakernel
from megakernel.memory_check import kv_cache_bytes, weight_bytes

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="random:llama-3.2-1b,random:llama-3.1-8b")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    args = ap.parse_args()
    torch.cuda.init()
    print("model  weights+cache (MiB)  driver: used beyond (MiB)  torch peak beyond (MiB)  "
          "torch reserved beyond (MiB)")
    for model in args.models.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free_before, _ = torch.cuda.mem_get_info()
        engine = megakernel.Engine.from_pretrained(model, max_seq_len=args.max_seq_len)
        prompt = torch.randint(0, engine.config.vocab_size, (2600,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        for kw in (dict(), dict(temperature=0.8, top_k=40), dict(temperature=0.8, top_k=100),
                   dict()):
            engine.generate(prompt, max_new_tokens=64, ignore_eos=True, **kw)
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        planned = (weight_bytes(engine.config, engine.weights.dtype, args.max_seq_len)
                   + kv_cache_bytes(engine.config, args.max_seq_len, engine.kv_cache.page_size,
                                    engine.weights.dtype))
        print(f"{model}  {planned / MIB:.0f}  {(free_before - free_after - planned) / MIB:.0f}  "
              f"{(torch.cuda.max_memory_allocated() - planned) / MIB:.0f}  "
              f"{(torch.cuda.memory_reserved() - planned) / MIB:.0f}", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
