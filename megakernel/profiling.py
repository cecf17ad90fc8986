"""Per-instruction timelines of one megakernel step: records -> statistics, traces, plots.

A profile is a set of records, one per executed instruction, as an int64 array

    records [R, 4]: (sm, instruction, start_ns, end_ns)
    records [R, 5]: (sm, instruction, start_ns, end_ns, ready_ns)

sm: the SM that ran it; instruction: its index in Program.instructions (so
Program.instruction_list()[instruction] names it); start_ns: when the SM began on it (before
its dependency waits); end_ns: after its counter was signalled; ready_ns (optional): when its
waits were satisfied, so [start, ready) is spent spinning on counters and [ready, end) doing
the op. Times are %globaltimer nanoseconds (any common origin). Without the ready column the
wait time is taken as zero.

The kernel's own buffer (MEGAKERNEL_PROFILE builds, csrc/launcher.h kProfileWords) has a
different, wider layout; records_from_kernel_profile() is the one place that converts it.

Everything here is plain numpy/Python and runs on the CPU; matplotlib is imported only by
plot_timeline().
"""
from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field

import numpy as np

RECORD_COLUMNS = ("sm", "instruction", "start_ns", "end_ns", "ready_ns")
SM, INSTRUCTION, START, END, READY = range(5)

# The kernel's record (csrc/launcher.h, written in csrc/interpreter.cu): kProfileWords int64
# words per instruction, row = instruction index, rows of instructions that never ran are
# left as allocated (zero).
KERNEL_PROFILE_WORDS = 10
KERNEL_PROFILE_FIELDS = {"sm": 0, "block": 1, "opcode": 2, "layer": 3, "start_ns": 4,
                         "ready_ns": 5, "end_ns": 6, "instruction": 7, "op_end_ns": 8,
                         "signal_ns": 9}

# Chrome's trace viewer only honours a fixed set of color names ("cname"); Perfetto colors
# by slice name, which is the opcode name here, so both show one color per opcode.
_CHROME_COLORS = ("thread_state_running", "rail_load", "rail_animation", "good",
                  "thread_state_iowait", "rail_response", "cq_build_running", "yellow",
                  "olive", "thread_state_runnable", "rail_idle", "bad")


def records_from_kernel_profile(raw) -> np.ndarray:
    """Kernel profile buffer [N, KERNEL_PROFILE_WORDS] int64 (tensor or array) -> records
    [R, 5] int64 (sm, instruction, start_ns, end_ns, ready_ns) of the instructions that ran,
    sorted by start. A row whose end time is zero never ran (e.g. an aborted launch)."""
    raw = _as_int64(raw)
    if raw.ndim != 2 or raw.shape[1] != KERNEL_PROFILE_WORDS:
        raise ValueError(f"kernel profile must be [N, {KERNEL_PROFILE_WORDS}], "
                         f"got {list(raw.shape)}")
    f = KERNEL_PROFILE_FIELDS
    ran = raw[:, f["end_ns"]] > 0
    raw = raw[ran]
    out = np.stack([raw[:, f["sm"]], raw[:, f["instruction"]], raw[:, f["start_ns"]],
                    raw[:, f["end_ns"]], raw[:, f["ready_ns"]]], axis=1)
    return normalize_records(out)


def chained_step(raw, step: int, instructions_per_step: int) -> np.ndarray:
    """The kernel profile rows of step `step` of a launch of chained steps
    (scheduler/chain.py: step t is instructions [t * n, (t + 1) * n)), numbered as the
    one-step program's instructions: what every analysis here reads as one step.

    The step's window starts where the step before it ended (its last instruction's end):
    an SM that finished its share of that step early claimed this step's first
    instruction and waited through the other SMs' tail, which the step before counts (as
    idle time). Such an instruction's start and ready times are moved to that end."""
    raw = _as_int64(raw)
    f = KERNEL_PROFILE_FIELDS
    n = instructions_per_step
    if n < 1 or not 0 <= step < len(raw) // n:
        raise ValueError(f"no step {step} of {n} instructions in a profile of {len(raw)} rows")
    rows = raw[step * n:(step + 1) * n]
    ran = rows[:, f["end_ns"]] > 0
    rows[ran, f["instruction"]] -= step * n
    if step > 0:
        before = raw[(step - 1) * n:step * n, f["end_ns"]]
        if (before > 0).any():
            begin = before.max()
            for column in ("start_ns", "ready_ns"):
                rows[ran, f[column]] = np.maximum(rows[ran, f[column]], begin)
    return rows


def normalize_records(records) -> np.ndarray:
    """Validate records [R, 4] or [R, 5] and return them as [R, 5] int64 sorted by
    (start, sm); a missing ready column becomes ready = start (no wait)."""
    r = _as_int64(records)
    if r.ndim != 2 or r.shape[1] not in (4, 5):
        raise ValueError(f"records must be [R, 4] or [R, 5], got {list(r.shape)}")
    if r.shape[0] == 0:
        raise ValueError("no records: nothing was profiled")
    if r.shape[1] == 4:
        r = np.concatenate([r, r[:, START:START + 1]], axis=1)
    if (r[:, END] < r[:, START]).any():
        bad = int(np.nonzero(r[:, END] < r[:, START])[0][0])
        raise ValueError(f"record {bad} ends before it starts: {r[bad].tolist()}")
    # Clamp rather than refuse: timer reads of different SMs may straddle a tick.
    r[:, READY] = np.clip(r[:, READY], r[:, START], r[:, END])
    order = np.lexsort((r[:, SM], r[:, START]))
    return np.ascontiguousarray(r[order])


def _as_int64(x) -> np.ndarray:
    if hasattr(x, "detach"):                     # torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.int64, copy=True)


# Naming ---------------------------------------------------------------------------------

def instruction_labels(program) -> tuple[list[str], list[str]]:
    """(opcode name, detailed label) per instruction index of `program` (a scheduler
    Program); the label reads like 'rms_gate_up_silu L3 #17 row_begin=1088 row_count=64'."""
    opcodes, labels = [], []
    for instr in program.instruction_list():
        name = instr.spec.name
        args = " ".join(f"{k}={v}" for k, v in instr.args.items())
        opcodes.append(name)
        labels.append(f"{name} L{instr.layer} #{instr.block_index}" + (f" {args}" if args
                                                                         else ""))
    return opcodes, labels


def _names(records: np.ndarray, opcode_names) -> list[str]:
    """Opcode name per record: opcode_names indexed by instruction (None: 'instruction')."""
    if opcode_names is None:
        return ["instruction"] * len(records)
    n = len(opcode_names)
    idx = records[:, INSTRUCTION]
    if ((idx < 0) | (idx >= n)).any():
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise ValueError(f"record names instruction {bad}, program has {n}")
    return [opcode_names[i] for i in idx.tolist()]


# Statistics -----------------------------------------------------------------------------

@dataclass
class OpcodeTime:
    """Time one opcode took over the step, summed over its instructions (all SMs)."""
    count: int
    total_ns: int        # sum of end - start
    wait_ns: int         # sum of ready - start (spinning on counters)
    share: float         # total_ns / sum of every record's end - start

    @property
    def compute_ns(self) -> int:
        return self.total_ns - self.wait_ns

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count


@dataclass
class ProfileSummary:
    """Where one step's time went.

    step_ns: first start to last end over all SMs. Per SM (arrays [num_sms], in the order
    of `sms`, SMs that ran nothing last with sm id -1): busy_ns is the union of its
    [start, end) intervals, wait_ns the part of those spent spinning on counters. Fractions
    are of step_ns: idle = no instruction at all; wait = inside an instruction but waiting;
    bubble = idle + wait, i.e. not doing an op.
    """
    step_ns: int
    sms: np.ndarray
    busy_ns: np.ndarray
    wait_ns: np.ndarray
    per_opcode: dict[str, OpcodeTime] = field(default_factory=dict)

    @property
    def num_sms(self) -> int:
        return len(self.sms)

    @property
    def idle_fraction(self) -> np.ndarray:
        return 1.0 - self.busy_ns / self.step_ns

    @property
    def wait_fraction(self) -> np.ndarray:
        return self.wait_ns / self.step_ns

    @property
    def bubble_fraction(self) -> np.ndarray:
        return self.idle_fraction + self.wait_fraction

    def fraction_stats(self, which: str = "bubble") -> dict[str, float]:
        """min / median / max over SMs of 'idle', 'wait' or 'bubble' fraction."""
        v = getattr(self, f"{which}_fraction")
        return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}

    def to_dict(self) -> dict:
        return {
            "step_ns": int(self.step_ns),
            "num_sms": self.num_sms,
            "per_opcode": {k: {"count": v.count, "total_ns": int(v.total_ns),
                               "wait_ns": int(v.wait_ns), "mean_ns": v.mean_ns,
                               "share": v.share} for k, v in self.per_opcode.items()},
            "idle_fraction": self.fraction_stats("idle"),
            "wait_fraction": self.fraction_stats("wait"),
            "bubble_fraction": self.fraction_stats("bubble"),
        }


def summarize(records, opcode_names=None, num_sms: int | None = None) -> ProfileSummary:
    """Statistics of one step. records: [R, 4|5] (see module doc); opcode_names: opcode
    name per instruction index (instruction_labels(program)[0]) or None; num_sms: SMs the
    kernel ran on, so SMs that claimed no instruction count as fully idle (default: the
    SMs seen in the records)."""
    r = normalize_records(records)
    names = _names(r, opcode_names)
    t0, t1 = int(r[:, START].min()), int(r[:, END].max())
    step_ns = max(t1 - t0, 1)

    sms = np.unique(r[:, SM])
    busy = np.zeros(len(sms), dtype=np.int64)
    wait = np.zeros(len(sms), dtype=np.int64)
    for i, sm in enumerate(sms.tolist()):
        rows = r[r[:, SM] == sm]
        busy[i] = _union_length(rows[:, START], rows[:, END])
        wait[i] = int((rows[:, READY] - rows[:, START]).sum())
    if num_sms is not None and num_sms > len(sms):
        extra = num_sms - len(sms)
        sms = np.concatenate([sms, np.full(extra, -1, dtype=np.int64)])
        busy = np.concatenate([busy, np.zeros(extra, dtype=np.int64)])
        wait = np.concatenate([wait, np.zeros(extra, dtype=np.int64)])

    durations = r[:, END] - r[:, START]
    waits = r[:, READY] - r[:, START]
    total = max(int(durations.sum()), 1)
    per_opcode: dict[str, OpcodeTime] = {}
    for name in dict.fromkeys(names):            # first-seen order: the step's order
        sel = np.array([n == name for n in names])
        d = int(durations[sel].sum())
        per_opcode[name] = OpcodeTime(count=int(sel.sum()), total_ns=d,
                                      wait_ns=int(waits[sel].sum()), share=d / total)
    return ProfileSummary(step_ns=step_ns, sms=sms, busy_ns=busy, wait_ns=wait,
                          per_opcode=per_opcode)


def stage_breakdown(raw, opcode_names: dict[int, str]) -> dict[str, dict[str, float]]:
    """Where a step's time goes, per opcode, from the kernel's own buffer (raw [N,
    KERNEL_PROFILE_WORDS]; opcode_names: opcode -> name). A stage is the instructions of
    one (layer, opcode); stages follow each other in stream order. Medians in us, over
    stages (span, lag) or over instructions (op, barrier, signal):

      span    last end of the stage - last end of the stage before it (its share of the
              step's critical path); the first stage of the step is left out
      lag     first instruction's waits satisfied - that previous last end (signal seen)
      op      waits satisfied -> compute warp 0 done with the op, per instruction
      op_max  the stage's slowest op (medians hide the few blocks with the real work,
              e.g. the attention partitions that hold tokens at short contexts)
      barrier op done -> the whole block past the barrier after it
      signal  barrier passed -> counter signalled (the release fence)
    """
    raw = _as_int64(raw)
    f = KERNEL_PROFILE_FIELDS
    raw = raw[raw[:, f["end_ns"]] > 0]
    raw = raw[np.argsort(raw[:, f["instruction"]], kind="stable")]
    keys = list(zip(raw[:, f["layer"]].tolist(), raw[:, f["opcode"]].tolist()))
    stages: dict[tuple[int, int], list[int]] = {}
    for row, key in enumerate(keys):
        stages.setdefault(key, []).append(row)
    per_op: dict[int, dict[str, list[float]]] = {}
    prev_end = None
    for (layer, op), rows in stages.items():
        r = raw[rows]
        end = int(r[:, f["end_ns"]].max())
        d = per_op.setdefault(op, {k: [] for k in ("span", "lag", "op", "op_max", "barrier",
                                                  "signal")})
        if prev_end is not None:
            d["span"].append(end - prev_end)
            d["lag"].append(int(r[:, f["ready_ns"]].min()) - prev_end)
        op_ns = r[:, f["op_end_ns"]] - r[:, f["ready_ns"]]
        d["op"] += op_ns.tolist()
        d["op_max"].append(int(op_ns.max()))
        d["barrier"] += (r[:, f["signal_ns"]] - r[:, f["op_end_ns"]]).tolist()
        d["signal"] += (r[:, f["end_ns"]] - r[:, f["signal_ns"]]).tolist()
        prev_end = end
    return {opcode_names.get(op, f"opcode {op}"):
            {k: float(np.median(v)) / 1e3 if v else float("nan") for k, v in d.items()}
            for op, d in per_op.items()}


def layer_spans(raw, opcode_names: dict[int, str]) -> list[tuple[str, float]]:
    """Each layer's share of the critical path, from the kernel's own buffer (raw as for
    stage_breakdown): stages in stream order, cut wherever the layer changes; a segment's
    span is the last end of its last stage minus that of the segment before (the first
    segment's: minus the end of the step's first stage, as stage_breakdown leaves it out).
    [(label, us)]: "layer L" for a layer's first segment, the first stage's opcode name for
    a later one (the LM head's stages carry layer 0 again)."""
    raw = _as_int64(raw)
    f = KERNEL_PROFILE_FIELDS
    raw = raw[raw[:, f["end_ns"]] > 0]
    raw = raw[np.argsort(raw[:, f["instruction"]], kind="stable")]
    ends: dict[tuple[int, int], int] = {}            # (layer, opcode) -> last end, in order
    for layer, op, end in zip(raw[:, f["layer"]].tolist(), raw[:, f["opcode"]].tolist(),
                              raw[:, f["end_ns"]].tolist()):
        ends[(layer, op)] = max(end, ends.get((layer, op), end))
    segments: list[list] = []                        # [layer, first opcode, last end]
    for (layer, op), end in ends.items():
        if segments and segments[-1][0] == layer:
            segments[-1][2] = end
        else:
            segments.append([layer, op, end])
    if not segments:
        return []
    out, seen = [], set()
    prev_end = next(iter(ends.values()))
    for layer, op, end in segments:
        label = f"layer {layer}" if layer not in seen else opcode_names.get(op, f"opcode {op}")
        seen.add(layer)
        out.append((label, (end - prev_end) / 1e3))
        prev_end = end
    return out


def format_layer_spans(spans: list[tuple[str, float]]) -> str:
    """layer_spans() in one line: the first layer, the median and range of the others, and
    what follows the layers."""
    layers = [us for label, us in spans if label.startswith("layer ")]
    rest = [f"{label} {us:.2f}" for label, us in spans if not label.startswith("layer ")]
    parts = [f"{spans[0][0]} {spans[0][1]:.2f}"] if spans else []
    if len(layers) > 1:
        others = layers[1:]
        parts.append(f"layers 1-{len(layers) - 1} median {float(np.median(others)):.2f} "
                     f"[{min(others):.2f}, {max(others):.2f}]")
    return "  per layer (us of the critical path): " + ", ".join(parts + rest)


def format_stage_breakdown(table: dict[str, dict[str, float]]) -> str:
    lines = [f"  {'opcode':<20} {'span us':>8} {'lag':>6} {'op':>8} {'op max':>8} "
             f"{'barrier':>8} {'signal':>7}"]
    for name, d in table.items():
        lines.append(f"  {name:<20} {d['span']:>8.2f} {d['lag']:>6.2f} {d['op']:>8.2f} "
                     f"{d['op_max']:>8.2f} {d['barrier']:>8.2f} {d['signal']:>7.2f}")
    return "\n".join(lines)


def _union_length(starts: np.ndarray, ends: np.ndarray) -> int:
    """Total length covered by intervals [starts[i], ends[i])."""
    order = np.argsort(starts, kind="stable")
    total, cur_s, cur_e = 0, None, None
    for s, e in zip(starts[order].tolist(), ends[order].tolist()):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def format_summary(summary: ProfileSummary, title: str = "profile") -> str:
    """Human-readable per-opcode times and per-SM bubble statistics."""
    s = summary
    lines = [f"{title}: step {s.step_ns / 1e3:.1f} us on {s.num_sms} SMs",
             (f"  {'opcode':<20} {'count':>6} {'total us':>10} {'share':>7} "
              f"{'mean us':>9} {'waiting':>8}")]
    for name, t in s.per_opcode.items():
        lines.append(f"  {name:<20} {t.count:>6} {t.total_ns / 1e3:>10.1f} "
                     f"{100 * t.share:>6.1f}% {t.mean_ns / 1e3:>9.2f} "
                     f"{100 * t.wait_ns / max(t.total_ns, 1):>7.1f}%")
    for which, what in (("idle", "no instruction"), ("wait", "waiting on counters"),
                        ("bubble", "idle + waiting")):
        st = s.fraction_stats(which)
        lines.append(f"  {which:<6} fraction per SM ({what}): min {100 * st['min']:.1f}%  "
                     f"median {100 * st['median']:.1f}%  max {100 * st['max']:.1f}%")
    return "\n".join(lines)


# Chrome / Perfetto trace ----------------------------------------------------------------

def chrome_trace(records, opcode_names=None, labels=None, title: str = "megakernel step",
                 layers=None) -> dict:
    """A Chrome trace-event dict (chrome://tracing, ui.perfetto.dev): one thread track per
    SM, one complete ('X') slice per instruction named by its opcode, with a nested 'wait'
    slice for the time spent on counters. Timestamps are microseconds from the step's first
    start. labels: detailed label per instruction index (shown in the slice's args)."""
    r = normalize_records(records)
    names = _names(r, opcode_names)
    t0 = int(r[:, START].min())
    colors = {n: _CHROME_COLORS[i % len(_CHROME_COLORS)]
              for i, n in enumerate(dict.fromkeys(names))}
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0,
                           "args": {"name": title}}]
    for sm in np.unique(r[:, SM]).tolist():
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": sm,
                       "args": {"name": f"SM {sm}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": sm,
                       "args": {"sort_index": sm}})
    for row, name in zip(r.tolist(), names):
        sm, idx, start, end, ready = row
        args = {"instruction": idx, "wait_ns": ready - start, "duration_ns": end - start}
        if labels is not None:
            args["label"] = labels[idx]
        if layers is not None:
            args["layer"] = layers[idx]
        events.append({"name": name, "cat": name, "ph": "X", "pid": 0, "tid": sm,
                       "ts": (start - t0) / 1e3, "dur": (end - start) / 1e3,
                       "cname": colors[name], "args": args})
        if ready > start:
            events.append({"name": "wait", "cat": "wait", "ph": "X", "pid": 0, "tid": sm,
                           "ts": (start - t0) / 1e3, "dur": (ready - start) / 1e3,
                           "cname": "grey", "args": {"instruction": idx}})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"title": title, "origin_ns": t0}}


def write_chrome_trace(path, records, program=None, title: str = "megakernel step") -> str:
    """Write chrome_trace() as JSON to `path`, naming instructions from `program`."""
    opcode_names = labels = None
    if program is not None:
        opcode_names, labels = instruction_labels(program)
    trace = chrome_trace(records, opcode_names, labels, title=title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(trace, f)
    return path


# PNG timeline ---------------------------------------------------------------------------

def plot_timeline(path, records, opcode_names=None, title: str = "megakernel step",
                  max_sms: int | None = None) -> str:
    """PNG timeline: one row per SM, one bar per instruction colored by opcode (waits
    hatched in grey). Needs matplotlib (imported here, so the rest of the module does not)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    r = normalize_records(records)
    names = _names(r, opcode_names)
    t0 = int(r[:, START].min())
    sms = np.unique(r[:, SM]).tolist()
    if max_sms is not None:
        sms = sms[:max_sms]
    row_of = {sm: i for i, sm in enumerate(sms)}
    order = list(dict.fromkeys(names))
    # tab20 without its greys, so no opcode looks like the grey of waiting.
    palette = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))
               if i not in (14, 15)]
    color = {n: palette[i % len(palette)] for i, n in enumerate(order)}

    height = min(max(3.0, 0.08 * len(sms) + 1.5), 24.0)
    fig, ax = plt.subplots(figsize=(16, height))
    bars: dict[tuple[str, int], list] = {}
    waits: dict[int, list] = {}
    for (sm, _, start, end, ready), name in zip(r.tolist(), names):
        if sm not in row_of:
            continue
        y = row_of[sm]
        bars.setdefault((name, y), []).append(((ready - t0) / 1e3, (end - ready) / 1e3))
        if ready > start:
            waits.setdefault(y, []).append(((start - t0) / 1e3, (ready - start) / 1e3))
    for (name, y), spans in bars.items():
        ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=color[name], linewidth=0)
    for y, spans in waits.items():
        ax.broken_barh(spans, (y - 0.4, 0.8), facecolors="0.85", linewidth=0)
    ax.set_xlabel("time since step start (us)")
    ax.set_ylabel("SM")
    ax.set_ylim(-1, len(sms))
    step = max(1, len(sms) // 16)
    ax.set_yticks(range(0, len(sms), step))
    ax.set_yticklabels([str(sms[i]) for i in range(0, len(sms), step)])
    ax.invert_yaxis()
    handles = [Patch(color=color[n], label=n) for n in order]
    handles.append(Patch(color="0.85", label="waiting on counters"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08),
              ncol=min(5, len(handles)), fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# Modeled profile --------------------------------------------------------------------------

def model_records(program, bandwidth_bytes_per_s: float, context_len: int = 1,
                  overhead_bytes: int | None = None) -> np.ndarray:
    """Records [N, 5] of an idealised step: what the dynamic queue would do if every SM
    streamed its instruction's bytes at bandwidth / num_sms and paid a fixed overhead per
    instruction. Claims follow the program order; an instruction starts when its SM is free
    and is ready when every counter it waits on has reached its target. A yardstick for a
    measured profile (and input for tests), not a measurement.

    context_len: positions attention reads (adds their K/V bytes to attention_partial).
    overhead_bytes: default scheduler.program.INSTRUCTION_OVERHEAD_BYTES.
    """
    from megakernel.instructions.attention_partial import partition_range
    from megakernel.scheduler.program import INSTRUCTION_OVERHEAD_BYTES

    if overhead_bytes is None:
        overhead_bytes = INSTRUCTION_OVERHEAD_BYTES
    cfg, nsm = program.config, program.num_sms
    per_sm_bytes_per_ns = bandwidth_bytes_per_s / nsm / 1e9
    kv_row = 2 * cfg.head_dim * program.dtype_bytes        # K and V of one position
    signals: dict[int, list[int]] = {}
    free = [(0, sm) for sm in range(nsm)]
    heapq.heapify(free)
    out = []
    for idx, instr in enumerate(program.instruction_list()):
        start, sm = heapq.heappop(free)
        ready = start
        for counter, target in instr.waits:
            times = sorted(signals.get(counter, ()))
            if len(times) < target:
                raise ValueError(f"instruction {idx} waits for {target} signals of counter "
                                 f"{counter}, only {len(times)} producers precede it")
            ready = max(ready, times[target - 1])
        nbytes = instr.spec.cost(instr, cfg, program.dtype_bytes)
        if instr.spec.name == "attention_partial":
            b, e = partition_range(context_len - 1, program.page_size,
                                   instr.args["partition"], instr.args["num_partitions"])
            nbytes += (e - b) * kv_row
        end = ready + round((nbytes + overhead_bytes) / per_sm_bytes_per_ns)
        signals.setdefault(instr.signal, []).append(end)
        heapq.heappush(free, (end, sm))
        out.append((sm, idx, start, end, ready))
    return normalize_records(np.array(out, dtype=np.int64))
