"""Bytes the memory system moves in one decode step, read from the hardware counters:
DRAM reads and writes and the SMs' L2 read sectors (hits, misses) per step, for programs
that differ only in their carried L2 prefetches (carried_prefetch_sweep.py's variants),
against the bytes the step must move. Run it under Nsight Compute, which profiles only
the steps inside the NVTX range "measure":

    ncu --clock-control none --cache-control none --nvtx --nvtx-include "measure/" \\
        -k regex:megakernel --csv --page raw --print-units base \\
        --metrics $(python3 hbm_traffic.py --metrics) \\
        env MODEL=llama-3.2-1b VARIANTS=none,scheduler python3 hbm_traffic.py > ncu.csv
    python3 hbm_traffic.py --report ncu.csv

The first command prints, per variant, the step's modeled bytes and its launches' order;
the second reads ncu's table and prints per variant the median over its steps.

Over time within one step (ncu's PM sampling, one sample per 1.5 us on an H100):

    ncu --clock-control none --cache-control none --nvtx --nvtx-include "measure/" \\
        -k regex:megakernel --launch-count 1 --section PmSampling \\
        --pm-sampling-interval 1000 -o pm env VARIANTS=scheduler python3 hbm_traffic.py
    ncu -i pm.ncu-rep --page raw --csv --print-metric-instances values > pm.csv
    python3 hbm_traffic.py --timeline pm.csv

prints the DRAM read throughput of each sample (% of peak) from the launch's first block
on, and the DRAM time the step leaves unused against its best sustained rate."""
import csv
import statistics
import sys

METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
           "lts__t_sectors_srcunit_tex_op_read.sum",
           "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum")
STEPS = 4            # measured steps per variant, after WARMUP unmeasured ones
WARMUP = 8
PLAN = "hbm_traffic plan:"


def measure() -> None:
    import torch

    from carried_prefetch_sweep import CONTEXTS, VARIANTS, build, mk, model
    from dev_model import wait_for_device

    position = CONTEXTS[0]
    for variant in VARIANTS:
        program = build(variant)
        mk.load_program(program)
        token = torch.tensor(1, device=mk.weights.device)
        for pos in range(position, position + WARMUP):
            token = mk.decode(token, pos).greedy_token
        wait_for_device("the warm-up steps")
        torch.cuda.nvtx.range_push("measure")
        for pos in range(position + WARMUP, position + WARMUP + STEPS):
            token = mk.decode(token, pos).greedy_token
        torch.cuda.nvtx.range_pop()
        wait_for_device("the measured steps")
        mk.check_error()
        modeled = program.bytes_per_step(position + WARMUP)
        print(f"{PLAN} {model} {variant} {STEPS} {modeled}", flush=True)


def report(path: str) -> None:
    """ncu's raw CSV (one row per profiled launch) against the plan lines the measuring
    run printed into the same file."""
    with open(path) as f:
        lines = f.read().splitlines()
    plan = [line.split()[2:] for line in lines if line.startswith(PLAN)]
    table = [line for line in lines if line.startswith('"')]
    reader = csv.DictReader(table)
    rows = [r for r in reader if "megakernel" in r.get("Kernel Name", "")]
    if len(rows) != sum(int(steps) for _, _, steps, _ in plan):
        raise SystemExit(f"{len(rows)} profiled launches for plan {plan}")
    print(f"{'model':<14} {'variant':<40} {'us':>7} {'DRAM read MB':>13} {'modeled MB':>11} "
          f"{'read/modeled':>12} {'DRAM write MB':>13} {'L2 read MB':>10} {'L2 hit':>7}")
    for model, variant, steps, modeled in plan:
        mine, rows = rows[:int(steps)], rows[int(steps):]

        def med(metric):
            return statistics.median(float(r[metric].replace(",", "")) for r in mine)

        read = med("dram__bytes_read.sum") / 1e6
        l2_read = med("lts__t_sectors_srcunit_tex_op_read.sum") * 32 / 1e6
        l2_hit = med("lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum") * 32 / 1e6
        print(f"{model:<14} {variant:<40} {med('gpu__time_duration.sum') / 1e3:>7.1f} "
              f"{read:>13.1f} {int(modeled) / 1e6:>11.1f} {read * 1e6 / int(modeled):>12.3f} "
              f"{med('dram__bytes_write.sum') / 1e6:>13.1f} {l2_read:>10.1f} "
              f"{l2_hit / max(l2_read, 1e-9):>7.1%}")


def sampled(header: list[str], values: list[str], metric: str) -> list[float]:
    """One PM-sampled metric's per-sample values from ncu's raw CSV row ("total (v; v; ...)")."""
    cell = values[next(i for i, h in enumerate(header) if h.endswith(metric))]
    inner = cell[cell.index("(") + 1:cell.rindex(")")]
    return [float(v.replace(",", "")) for v in inner.split(";")]


def timeline(path: str, per_line: int = 34) -> None:
    """DRAM read throughput per PM sample of the one profiled launch."""
    with open(path) as f:
        header, _units, values = list(csv.reader(f))[:3]
    interval_us = float(values[header.index("profiler__pmsampler_interval_time")].split()[0])
    read = sampled(header, values, "dramc__read_throughput.avg.pct_of_peak_sustained_elapsed")
    launched = sampled(header, values, "gr__ctas_launched_realtime.sum")
    active = sampled(header, values, "sm__cycles_active.avg")
    first = next(i for i, n in enumerate(launched) if n > 0)
    last = max(i for i, cycles in enumerate(active) if cycles > 0)
    step = read[first:last + 1]
    best = sorted(step)[int(0.95 * len(step))]       # the step's best sustained rate
    unused_us = sum(max(0.0, best - v) for v in step) / best * interval_us
    print(f"{len(step)} samples of {interval_us} us ({len(step) * interval_us:.1f} us); DRAM "
          f"read {statistics.mean(step):.1f}% of peak on average, {best:.1f}% sustained (95th "
          f"percentile): {unused_us:.1f} us of DRAM time unused")
    for i in range(0, len(step), per_line):
        print(f"{i * interval_us:7.1f} us: " + " ".join(f"{v:3.0f}" for v in step[i:i + per_line]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        report(sys.argv[2])
    elif sys.argv[1:2] == ["--timeline"]:
        timeline(sys.argv[2])
    elif sys.argv[1:2] == ["--metrics"]:
        print(",".join(METRICS))
    else:
        measure()
