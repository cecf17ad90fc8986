"""Who finishes a stage last, and why: the same SMs every time (placement), the same row
blocks (the schedule), or neither (the memory system's noise)?

    MODEL=llama-3.2-1b python3 scripts/dev/sm_tails.py     # on a MEGAKERNEL_PROFILE build

Profiles LAUNCHES (6) launches of 8 chained greedy steps from position CONTEXT (32) and
reads steps 1-7 of each (step 0 starts cold). PREFETCH sets the backend's hand-over
prefetch budget (bytes); PLACES=1 also prints every place's mean op time. Prints:
  - per block, the controller's hand-over (the previous instruction's end on that SM ->
    this one's start: its L2 prefetch of this instruction) and the wait (start -> ready);
  - per opcode, over stage instances (step, layer, opcode): the op time (ready -> op
    finished), the tail (the stage's last signal - its median signal, what balancing
    could save), how the last block to signal splits into a late start (its ready - the
    stage's first ready) and a long op (its op - the median), and how much of the op
    times' spread the block's SM or its place in the stage (row block) explains, against
    what noise alone would ((keys - 1) / (samples - 1));
  - the slowest SMs and places per opcode, what the last block's SM ran before it, and
    how the SMs' mean op times correlate between opcodes."""
import os

import numpy as np

from dev_model import chained_profiles, random_backend
from megakernel.instructions import OPCODES
from megakernel.profiling import KERNEL_PROFILE_FIELDS as F, chained_step

LAUNCHES = int(os.environ.get("LAUNCHES", "6"))
STEPS = 8
CONTEXT = int(os.environ.get("CONTEXT", "32"))
NAMES = {op: spec.name for op, spec in OPCODES.items()}


def profiled_steps(mk, size: int) -> list[np.ndarray]:
    """Each launch's steps 1..STEPS-1 as records numbered like the one-step program."""
    steps = []
    for raw in chained_profiles(mk, STEPS, LAUNCHES, CONTEXT):
        for step in range(1, STEPS):
            rows = chained_step(raw, step, size)
            steps.append(rows[rows[:, F["end_ns"]] > 0])
    return steps


def explained(values: np.ndarray, keys: np.ndarray) -> tuple[float, float]:
    """Share of the variance of `values` explained by the mean per key, and what noise
    alone would explain (keys - 1) / (n - 1)."""
    total = values.var()
    if total == 0:
        return 0.0, 0.0
    means = {k: values[keys == k].mean() for k in np.unique(keys)}
    fitted = np.array([means[k] for k in keys])
    return float(fitted.var() / total), (len(means) - 1) / max(len(values) - 1, 1)


def main():
    model = os.environ.get("MODEL", "llama-3.2-1b")
    kw = {"prefetch_bytes": int(os.environ["PREFETCH"])} if "PREFETCH" in os.environ else {}
    max_len = max(1024, CONTEXT + (LAUNCHES + 2) * STEPS + 16)
    cfg, mk = random_backend(model, max_len, profile=True, **kw)
    if not mk.ext.profiling_compiled():
        raise SystemExit("needs a MEGAKERNEL_PROFILE=1 build")
    program = mk.program_for(CONTEXT + STEPS)
    size = program.num_instructions
    steps = profiled_steps(mk, size)
    per_op: dict[int, dict[str, list]] = {}
    gaps: dict[int, list] = {}
    for raw in steps:
        # Per SM in time order: previous end -> this start (the controller's work after its
        # signal), this start -> ready (the wait).
        for sm in np.unique(raw[:, F["sm"]]):
            r = raw[raw[:, F["sm"]] == sm]
            r = r[np.argsort(r[:, F["start_ns"]])]
            for prev, row in zip(r[:-1], r[1:]):
                gaps.setdefault(int(row[F["opcode"]]), []).append(
                    (row[F["start_ns"]] - prev[F["end_ns"]],
                     row[F["ready_ns"]] - row[F["start_ns"]]))
    print("per block, medians / p90 (us): previous end -> start, start -> ready")
    for op, g in gaps.items():
        g = np.array(g) / 1e3
        print(f"  {NAMES[op]:<20} {np.median(g[:, 0]):.2f} / {np.percentile(g[:, 0], 90):.2f}"
              f"   {np.median(g[:, 1]):.2f} / {np.percentile(g[:, 1], 90):.2f}")
    for raw in steps:
        raw = raw[np.argsort(raw[:, F["instruction"]], kind="stable")]
        keys = raw[:, F["layer"]] * 100 + raw[:, F["opcode"]]
        for key in np.unique(keys):
            r = raw[keys == key]
            op = int(r[0, F["opcode"]])
            if len(r) < 8:
                continue
            ready, op_end, end = r[:, F["ready_ns"]], r[:, F["op_end_ns"]], r[:, F["end_ns"]]
            d = per_op.setdefault(op, {k: [] for k in ("op", "rel", "sm", "place", "tail",
                                                       "last_late", "last_excess",
                                                       "last_rows")})
            dur = (op_end - ready).astype(np.float64)
            med = np.median(dur)
            last = int(np.argmax(end))
            d["op"] += dur.tolist()
            d["rel"] += (dur / med - 1).tolist()
            d["sm"] += r[:, F["sm"]].tolist()
            d["place"] += (r[:, F["instruction"]] - r[:, F["instruction"]].min()).tolist()
            d["tail"].append(end.max() - np.median(end))
            d["last_late"].append(ready[last] - ready.min())
            d["last_excess"].append(dur[last] - med)
            d["last_rows"].append((raw, r[last]))
    sm_means = {}
    print(f"{model}: {len(steps)} steps of {LAUNCHES} launches x {STEPS} chained; us")
    print(f"  {'opcode':<20} {'op med':>7} {'op p90':>7} {'tail':>6} {'last: late':>11} "
          f"{'+op':>6}  {'by SM':>6} {'by place':>9} {'noise':>6}")
    for op, d in sorted(per_op.items(), key=lambda kv: -np.median(kv[1]["op"])):
        rel, sm, place = (np.array(d[k]) for k in ("rel", "sm", "place"))
        by_sm, noise = explained(rel, sm)
        by_place, _ = explained(rel, place)
        med = lambda k: np.median(d[k]) / 1e3  # noqa: E731
        print(f"  {NAMES[op]:<20} {med('op'):7.2f} {np.percentile(d['op'], 90) / 1e3:7.2f} "
              f"{med('tail'):6.2f} {med('last_late'):11.2f} {med('last_excess'):6.2f}  "
              f"{by_sm:6.2f} {by_place:9.2f} {noise:6.2f}")
        sm_means[op] = {s: rel[sm == s].mean() for s in np.unique(sm)}
    print("slowest SMs per opcode (mean op time over the instance's median - 1, %):")
    for op, means in sm_means.items():
        worst = sorted(means.items(), key=lambda kv: -kv[1])[:8]
        print(f"  {NAMES[op]:<20} " + " ".join(f"{s}:{100 * v:+.1f}" for s, v in worst))
    print("mean op time by place in the stage (us), the five slowest and the median:")
    for op, d in per_op.items():
        op_t, place = np.array(d["op"]), np.array(d["place"])
        means = sorted(((op_t[place == k].mean() / 1e3, int(k)) for k in np.unique(place)),
                       reverse=True)
        print(f"  {NAMES[op]:<20} " + " ".join(f"#{k}:{v:.2f}" for v, k in means[:5]) +
              f"  median {np.median([v for v, _ in means]):.2f}")
        if os.environ.get("PLACES") == "1":    # every place, in order
            by_place = sorted((k, v) for v, k in means)
            print("    " + " ".join(f"{v:.2f}" for _, v in by_place))
    print("the last block to signal: what its SM ran before (us from the stage's first "
          "ready: the previous instruction's end, this one's start and ready), first 6:")
    for op, d in per_op.items():
        for raw, row in d["last_rows"][:6]:
            same = raw[raw[:, F["sm"]] == row[F["sm"]]]
            same = same[same[:, F["end_ns"]] <= row[F["start_ns"]] + 1000]
            prev = same[np.argmax(same[:, F["end_ns"]])] if len(same) else None
            stage = raw[(raw[:, F["opcode"]] == op) & (raw[:, F["layer"]] == row[F["layer"]])]
            t0 = stage[:, F["ready_ns"]].min()
            rel = lambda x: (int(x) - int(t0)) / 1e3  # noqa: E731
            before = (f"{NAMES[int(prev[F['opcode']])]} L{prev[F['layer']]} ended "
                      f"{rel(prev[F['end_ns']]):+.2f}" if prev is not None else "nothing")
            print(f"  {NAMES[op]:<20} L{row[F['layer']]:<2} sm {row[F['sm']]:<3} {before}; "
                  f"start {rel(row[F['start_ns']]):+.2f} ready {rel(row[F['ready_ns']]):+.2f} "
                  f"op {(row[F['op_end_ns']] - row[F['ready_ns']]) / 1e3:.2f}")
    ops = [op for op in sm_means if len(sm_means[op]) >= 100]
    if len(ops) >= 2:
        sms = sorted(set.intersection(*(set(sm_means[op]) for op in ops)))
        mat = np.array([[sm_means[op][s] for s in sms] for op in ops])
        corr = np.corrcoef(mat)
        print("correlation of the per-SM means between opcodes:")
        for i, op in enumerate(ops):
            print(f"  {NAMES[op]:<20} " + " ".join(f"{c:+.2f}" for c in corr[i]))


if __name__ == "__main__":
    main()
