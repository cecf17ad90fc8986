"""Launch gaps and raw per-instruction profiles of a model shape on one GPU (MODEL, a
preset name; default llama-3.2-1b).

    python3 scripts/dev/launch_gaps.py timing    # kernel alone, back to back, engine loop
    python3 scripts/dev/launch_gaps.py profile   # needs a MEGAKERNEL_PROFILE=1 build
    python3 scripts/dev/launch_gaps.py table RAW # stage table of a saved profile_raw.npy

timing: ms/token of 128 decode steps back to back (tokens fed on the device), one launch
alone, the torch-profiler kernel time, period and in-between GPU work of back-to-back
decode steps, the kernel time and gap of a loop that reads each token with int() (the
pre-readback pattern), and Engine.generate's ms/token. profile: the kernel's
raw profile buffer of 12 steps ($OUT/profile_raw.npy), then its stage table: the medians
over steps 4-11 of what profiling.stage_breakdown() reports per step, and the step time.
CONTEXT=N profiles the steps at positions N.. instead of 32.. (the cache then holds
whatever its pages hold: only the time counts).
Results go to $OUT (default /tmp/out)."""
import json, os, sys
import numpy as np


def stage_table(raws: np.ndarray, first_step: int = 4) -> str:
    """profiling.stage_breakdown() per step, medians (us) over steps first_step.., and the
    median step time."""
    from megakernel import profiling
    from megakernel.instructions import OPCODES

    names = {op: spec.name for op, spec in OPCODES.items()}
    steps = [profiling.stage_breakdown(raw, names) for raw in raws[first_step:]]
    table = {op: {field: float(np.median([s[op][field] for s in steps])) for field in cols}
             for op, cols in steps[0].items()}
    step_us = np.median([profiling.summarize(profiling.records_from_kernel_profile(raw)).step_ns
                         for raw in raws[first_step:]]) / 1e3
    return (profiling.format_stage_breakdown(table) +
            f"\nstep {step_us:.1f} us (median of steps {first_step}-{len(raws) - 1})")


if sys.argv[1] == "table":
    print(stage_table(np.load(sys.argv[2])))
    raise SystemExit(0)

import torch
from dev_model import back_to_back_ms, random_backend, wait_for, wait_for_device
from megakernel.backends.megakernel_backend import launch
from megakernel.engine import Engine

OUT = os.environ.get("OUT", "/tmp/out")
mode = sys.argv[1]
prof = mode == "profile"
CONTEXT = int(os.environ.get("CONTEXT", "32"))
MAX = max(1024, CONTEXT + 64)
cfg, mk = random_backend(os.environ.get("MODEL", "llama-3.2-1b"), MAX,
                         max_seq_len=(CONTEXT + 144 if prof else MAX), profile=prof)
w, cache = mk.weights, mk.kv_cache
prompt = torch.randint(0, cfg.vocab_size, (32,), device="cuda")
out = mk.prefill(prompt, 0)
pending = out.greedy_token.clone()
res = {}
if prof:
    raws = []
    for pos in range(CONTEXT, CONTEXT + 12):
        o = mk.decode(pending, pos)
        wait_for_device("a profiled step")
        pending = o.greedy_token.clone()
        raws.append(mk.last_profile().cpu().numpy().copy())
    np.save(f"{OUT}/profile_raw.npy", np.stack(raws))
    np.save(f"{OUT}/program_rows.npy", mk.program.instructions.numpy())
    print("saved", np.stack(raws).shape)
    print(stage_table(np.stack(raws)))
else:
    res["back_to_back_ms"], pending = back_to_back_ms(mk, pending, 32, 128)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for pos in range(168, 200):
        wait_for_device("the steps before a single launch")
        s.record()
        launch(mk.ext, mk.rows, mk.state, mk.buffers, mk.weights, cache.k, cache.v,
               cache.page_table, (5, pos), cfg.rms_norm_eps, mk.timeout_s)
        e.record()
        wait_for(e, "a single launch")
        ts.append(s.elapsed_time(e))
    res["single_launch_ms_median"] = float(np.median(ts))
    from torch.profiler import profile, ProfilerActivity

    def gpu_work(prof):
        """(start, end, name) of the GPU work a torch profiler recorded, in time order."""
        return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA)

    # What the GPU runs between the kernels of back-to-back decode() steps.
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for pos in range(168, 200):
            pending = mk.decode(pending, pos).greedy_token
        wait_for_device("the profiled back-to-back steps")
    kern = gpu_work(p)
    mks = [i for i, k in enumerate(kern) if "megakernel" in k[2]]
    res["b2b_kernel_us_median"] = float(np.median([kern[i][1] - kern[i][0] for i in mks]))
    res["b2b_period_us_median"] = float(np.median([kern[b][0] - kern[a][0]
                                                   for a, b in zip(mks, mks[1:])]))
    res["b2b_between_kernels"] = [(round(k[0] - kern[mks[-2]][1], 2), round(k[1] - k[0], 2),
                                   k[2][:40]) for k in kern[mks[-2] + 1:mks[-1]]]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for pos in range(200, 232):
            o = mk.decode(pending, pos)
            tok = int(pending)
            pending = o.greedy_token
        wait_for_device("the profiled steps read one by one")
    kern = gpu_work(p)
    res["kernels"] = [(a, b, n[:40]) for a, b, n in kern[-12:]]
    mks = [(a, b) for a, b, n in kern if "megakernel" in n]
    res["mk_kernel_us_median"] = float(np.median([b - a for a, b in mks]))
    res["mk_gap_us_median"] = float(np.median([mks[i + 1][0] - mks[i][1] for i in range(len(mks) - 1)]))
    eng = Engine(w, None, mk, cache, max_seq_len=MAX)
    ids = prompt.tolist()
    res["engine_ms_per_token"] = [eng.generate(ids, max_new_tokens=128, ignore_eos=True).stats.ms_per_token
                                  for _ in range(4)]
print(json.dumps(res, indent=1))
json.dump(res, open(f"{OUT}/diag_{mode}.json", "w"), indent=1)
