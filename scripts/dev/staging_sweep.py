"""Sweep of the first-pass staging experiment (benchmarks/RESULTS.md, entry 7).

Needs first_pass_staging.patch (beside this file) applied to the tree and the extension
rebuilt: the patch adds the launch-time opcode mask `stage_ops` this script sets.

    git apply scripts/dev/first_pass_staging.patch && pip install --no-build-isolation -e .
    MODEL=llama-3.2-1b python3 scripts/dev/staging_sweep.py

For each mask and L2 prefetch budget: ms/token of 128 back-to-back decode steps (two
rounds), and whether tokens and logits are bit-identical to the first configuration."""
import json, os
import torch
from dev_model import random_backend, wait_for, wait_for_device

OUT = os.environ.get("OUT", "/tmp/out")
model = os.environ.get("MODEL", "llama-3.2-1b")
cfg, mk = random_backend(model, 1024)
if not hasattr(mk, "stage_ops"):
    raise SystemExit("apply scripts/dev/first_pass_staging.patch and rebuild first")
prompt = torch.randint(0, cfg.vocab_size, (32,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
out = mk.prefill(prompt, 0)
first = out.greedy_token.clone()
b = lambda *ops: sum(1 << o for o in ops)
configs = {"none": 0, "oproj": b(5), "qkv": b(2), "qkv+oproj": b(2, 5), "gateup": b(6),
           "down": b(7), "qkv+oproj+gateup": b(2, 5, 6), "all-but-lm": b(2, 5, 6, 7),
           "all": b(2, 5, 6, 7, 8)}
res = {}
def run(mask, prefetch, steps=128):
    mk.stage_ops, mk.prefetch_bytes = mask, prefetch
    pending = first.clone()
    for pos in range(32, 40):
        pending = mk.decode(pending, pos).greedy_token
    wait_for_device("the warm-up steps")
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    toks = []
    s.record()
    for pos in range(40, 40 + steps):
        o = mk.decode(pending, pos)
        pending = o.greedy_token
        toks.append(pending.clone())
    e.record()
    wait_for(e, "the timed steps")
    mk.check_error(int(pending))
    return s.elapsed_time(e) / steps, torch.stack(toks).tolist(), o.logits.clone()
ref_toks = None
for rep in range(2):
    for name, mask in configs.items():
        for prefetch in (64 << 10, 0):
            ms, toks, logits = run(mask, prefetch)
            if ref_toks is None:
                ref_toks, ref_logits = toks, logits
            same = toks == ref_toks and torch.equal(logits, ref_logits)
            key = f"{name}/pf{prefetch >> 10}"
            res.setdefault(key, []).append(round(ms, 4))
            res[key + "/identical"] = same
for k, v in res.items():
    if not k.endswith("identical"):
        print(f"{k:28s} {v}  identical={res[k + '/identical']}")
json.dump(res, open(f"{OUT}/sweep_{model}.json", "w"), indent=1)
