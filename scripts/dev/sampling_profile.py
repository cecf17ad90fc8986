"""Where a sampled decode step's time goes from the LM head on: per stage (one counter's
instructions, in stream order), its span on the critical path, the lag from the stage
before it to its first wait satisfied, and its ops' time, from a MEGAKERNEL_PROFILE
build's per-instruction record of a launch of 8 chained sampled steps (steps 2-6, medians).

    MEGAKERNEL_PROFILE=1 python3 setup.py build_ext --inplace
    python3 scripts/dev/sampling_profile.py [--model random:llama-3.2-1b]
                                            [--cases greedy,temperature,top_k,top_p,top_k_top_p]

The profiling build is slower overall; compare stages with each other, not with
scripts/dev/sampling_cost.py's ms/token.
"""
from __future__ import annotations

import argparse
import statistics

import megakernel
from megakernel import profiling

CASES = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=0.8),
         "top_k": dict(temperature=0.8, top_k=50), "top_p": dict(temperature=0.8, top_p=0.9),
         "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.9)}
F = profiling.KERNEL_PROFILE_FIELDS


def stage_times(raw, program, n: int) -> list[tuple[str, int, dict[str, float]]]:
    """(counter name, blocks, {span, lag, op, op_max} in us) per stage from the LM head's on,
    for one step's rows (profiling.chained_step) of the chained `program`, n instructions
    per step, named by the first step's counters."""
    instrs = program.instruction_list()[:n]
    rows = raw[raw[:, F["end_ns"]] > 0]
    stages: dict[int, list] = {}
    for row in rows:
        stages.setdefault(instrs[int(row[F["instruction"]])].signal, []).append(row)
    first = {c: min(int(r[F["instruction"]]) for r in rs) for c, rs in stages.items()}
    order = sorted(stages, key=first.get)
    lm_head = next(i.signal for i in instrs if i.spec.name == "rms_lm_head")
    out, prev_end = [], None
    for c in order:
        rs = stages[c]
        end = max(int(r[F["end_ns"]]) for r in rs)
        if prev_end is not None and order.index(c) >= order.index(lm_head):
            ops = [int(r[F["op_end_ns"]]) - int(r[F["ready_ns"]]) for r in rs]
            out.append((program.counter_names[c], len(rs), {
                "span": (end - prev_end) / 1e3,
                "lag": (min(int(r[F["ready_ns"]]) for r in rs) - prev_end) / 1e3,
                "op": statistics.median(ops) / 1e3, "op_max": max(ops) / 1e3}))
        prev_end = end
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    engine = megakernel.Engine.from_pretrained(args.model, device="cuda", max_seq_len=1024,
                                               profile=True)
    backend = engine.backend
    steps = backend.steps_per_launch
    prompt = list(range(10, 42))
    for case in args.cases.split(","):
        kw = CASES[case]
        per_stage: dict[str, list] = {}
        names: list[str] = []
        for _ in range(3):
            # The prompt's token, then exactly one launch of chained steps.
            engine.generate(prompt, max_new_tokens=1 + steps, ignore_eos=True, seed=1, **kw)
            program = backend.program          # the launch's chained program
            n = program.num_instructions // steps
            raw = backend.last_profile().cpu()
            for step in range(2, steps - 1):
                one = profiling.chained_step(raw.clone(), step, n)
                for name, blocks, t in stage_times(one, program, n):
                    if name not in per_stage:
                        names.append(name)
                    per_stage.setdefault(name, []).append((blocks, t))
        print(f"== {case} ({args.model}, us, medians over {len(per_stage[names[0]])} steps)")
        print(f"{'stage':24s} {'blocks':>6s} {'span':>7s} {'lag':>7s} {'op':>7s} {'op_max':>7s}")
        total = 0.0
        for name in names:
            blocks = per_stage[name][0][0]
            med = {k: statistics.median(t[k] for _, t in per_stage[name])
                   for k in ("span", "lag", "op", "op_max")}
            total += med["span"]
            print(f"{name:24s} {blocks:6d} {med['span']:7.2f} {med['lag']:7.2f} "
                  f"{med['op']:7.2f} {med['op_max']:7.2f}")
        print(f"{'sum of spans':24s} {'':6s} {total:7.2f}")


if __name__ == "__main__":
    main()
