"""What sampling costs per decode step on the GPU, against greedy decoding: drawn on the
device where the engine can (temperature alone, with top-k, top-p or both, chained like
greedy steps, benchmarks/RESULTS.md entries 51 and 54-57), drawn between launches by the
engine's sampler, and by softmax + torch.multinomial in its place (the form it had before
entry 49).

    python3 scripts/dev/sampling_cost.py [--model random:llama-3.2-1b] [--rounds 2]
                                         [--modes multinomial,host,device]

Each case: 2 untimed generate() calls, then the median ms/token of 3 (32-token prompt,
128 new tokens). First, the top-k threshold alone: torch.topk over the vocabulary against
sampling.kth_largest (entry 53), us per call on the device.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import megakernel
import megakernel.engine as engine_module
from dev_model import device_us
from megakernel.sampling import kth_largest, masked_scores, sample


def multinomial_sample(logits, temperature, top_k, top_p, generator):
    """sampling.sample with softmax + torch.multinomial for the draw."""
    probs = torch.softmax(masked_scores(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


CASES = [("greedy", dict(temperature=0.0)), ("t0.8", dict(temperature=0.8)),
         ("t0.8 top_k 50", dict(temperature=0.8, top_k=50)),
         ("t0.8 top_p 0.9", dict(temperature=0.8, top_p=0.9)),
         ("t0.8 k50 p0.9", dict(temperature=0.8, top_k=50, top_p=0.9))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="multinomial,host,device",
                    help="comma-separated: multinomial, host, device")
    args = ap.parse_args()
    engine = megakernel.Engine.from_pretrained(args.model, device="cuda", max_seq_len=1024)
    prompt = list(range(10, 42))

    logits = torch.randn(engine.config.vocab_size, device="cuda")
    for label, kth in (("torch.topk", lambda x, k: torch.topk(x, k).values[-1]),
                       ("kth_largest", kth_largest)):
        print(f"top-k 50 threshold, {label:12s} us {device_us(lambda: kth(logits, 50)):.1f}")

    def ms_per_token(**kw):
        for _ in range(2):
            engine.generate(prompt, max_new_tokens=128, ignore_eos=True, seed=1, **kw)
        return statistics.median(
            engine.generate(prompt, max_new_tokens=128, ignore_eos=True, seed=1,
                            **kw).stats.ms_per_token for _ in range(3))

    # (label, the sampler between launches, whether the engine may draw on the device, the
    # cases).
    modes = (("multinomial", multinomial_sample, False, CASES[1:]),
             ("host", sample, False, CASES[1:]),
             ("device", sample, True, CASES))
    try:
        for _ in range(args.rounds):
            for label, sampler, on_device, cases in modes:
                if label not in args.modes.split(","):
                    continue
                engine_module.sample = sampler
                engine.backend.chains_sampling = on_device
                for name, kw in cases:
                    print(f"{label:12s} {name:16s} ms/token {ms_per_token(**kw):.3f}")
    finally:
        engine_module.sample = sample
        del engine.backend.chains_sampling


if __name__ == "__main__":
    main()
