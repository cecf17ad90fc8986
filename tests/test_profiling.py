"""megakernel.profiling on synthetic records: conversion from the kernel's buffer, the
per-opcode and idle/wait/bubble math, the Chrome trace, the timeline PNG and the modeled
schedule."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from megakernel import profiling
from megakernel.presets import PRESETS
from megakernel.scheduler import build_program

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Two SMs, four instructions, times in ns: (sm, instruction, start, end, ready).
#   SM 0: #0 [0, 100) no wait;        #2 [100, 300) waits until 150
#   SM 1: #1 [0, 50)  no wait;        #3 [200, 400) waits until 250  (idle 50..200)
RECORDS = np.array([[0, 0, 0, 100, 0],
                    [1, 1, 0, 50, 0],
                    [0, 2, 100, 300, 150],
                    [1, 3, 200, 400, 250]], dtype=np.int64)
NAMES = ["embed", "matvec", "matvec", "attention"]


def test_normalize_fills_ready_and_sorts():
    four = RECORDS[::-1, :4]
    r = profiling.normalize_records(four)
    assert r.shape == (4, 5) and r.dtype == np.int64
    assert r[:, profiling.START].tolist() == [0, 0, 100, 200]
    assert (r[:, profiling.READY] == r[:, profiling.START]).all()


@pytest.mark.parametrize("bad, match", [
    (np.zeros((3, 3), dtype=np.int64), r"\[R, 4\] or \[R, 5\]"),
    (np.zeros((0, 4), dtype=np.int64), "no records"),
    (np.array([[0, 0, 10, 5]]), "ends before it starts"),
])
def test_normalize_refuses_bad_records(bad, match):
    with pytest.raises(ValueError, match=match):
        profiling.normalize_records(bad)


def test_ready_is_clamped_into_the_interval():
    r = profiling.normalize_records([[0, 0, 100, 200, 50], [0, 1, 200, 300, 400]])
    assert r[:, profiling.READY].tolist() == [100, 300]


def _kernel_buffer():
    """A [N, KERNEL_PROFILE_WORDS] buffer as the kernel writes it: row = instruction, one
    row never ran."""
    f = profiling.KERNEL_PROFILE_FIELDS
    raw = np.zeros((5, profiling.KERNEL_PROFILE_WORDS), dtype=np.int64)
    for sm, idx, start, end, ready in RECORDS.tolist():
        row = raw[idx]
        row[f["sm"]], row[f["block"]], row[f["opcode"]], row[f["layer"]] = sm, sm, 7, 3
        t0 = 10**9                               # %globaltimer has an arbitrary origin
        row[f["start_ns"]], row[f["ready_ns"]], row[f["end_ns"]] = t0 + start, t0 + ready, t0 + end
        row[f["instruction"]] = idx
    return raw                                   # row 4 stays zero: not executed


def test_records_from_kernel_profile():
    r = profiling.records_from_kernel_profile(_kernel_buffer())
    expected = profiling.normalize_records(RECORDS + np.array([0, 0, 10**9, 10**9, 10**9]))
    assert r.tolist() == expected.tolist()
    torch = pytest.importorskip("torch")
    assert profiling.records_from_kernel_profile(torch.from_numpy(_kernel_buffer())).tolist() \
        == expected.tolist()
    with pytest.raises(ValueError, match="kernel profile must be"):
        profiling.records_from_kernel_profile(np.zeros((4, 5), dtype=np.int64))


def test_a_chained_step_reads_as_one_step():
    one = _kernel_buffer()
    n = len(one)
    chained = np.concatenate([one, one, one])
    f = profiling.KERNEL_PROFILE_FIELDS
    ran = chained[:, f["end_ns"]] > 0
    chained[ran, f["instruction"]] += np.repeat(np.arange(3) * n, n)[ran]
    for t in (1, 2):                                 # each step later than the one before
        chained[t * n:(t + 1) * n][ran[:n], f["start_ns"]:f["end_ns"] + 1] += 10**6 * t
    assert profiling.chained_step(chained, 0, n).tolist() == one.tolist()
    step = profiling.chained_step(chained, 1, n)
    expected = one.copy()
    expected[ran[:n], f["start_ns"]:f["end_ns"] + 1] += 10**6
    assert step.tolist() == expected.tolist()
    # A step's instruction that started before the step before it ended starts at that end.
    begin = chained[n:2 * n, f["start_ns"]][ran[:n]].min()
    chained[:n][ran[:n], f["end_ns"]] = begin + 5
    first = profiling.chained_step(chained, 1, n)[ran[:n]]
    assert first[:, f["start_ns"]].min() == begin + 5
    assert (first[:, f["start_ns"]] <= first[:, f["ready_ns"]]).all()
    assert (first[:, f["ready_ns"]] <= first[:, f["end_ns"]]).all()
    with pytest.raises(ValueError, match="no step 3"):
        profiling.chained_step(chained, 3, n)


def test_kernel_record_layout_matches_csrc():
    """KERNEL_PROFILE_FIELDS reads the words csrc/interpreter.cu writes."""
    launcher = (CSRC / "launcher.h").read_text()
    words = re.search(r"kProfileWords\s*=\s*(\d+)", launcher)
    assert words is not None, "csrc/launcher.h no longer defines kProfileWords"
    assert int(words.group(1)) == profiling.KERNEL_PROFILE_WORDS
    interpreter = CSRC / "interpreter.cu"
    if not interpreter.exists():
        pytest.skip("csrc/interpreter.cu not present")
    writes = dict(re.findall(r"rec\[(\d+)\]\s*=\s*([^;]+);", interpreter.read_text()))
    if not writes:
        pytest.skip("interpreter.cu writes no profile record")
    expected_source = {"sm": "smid", "block": "blockIdx", "opcode": "kOpcode",
                       "layer": "kLayer", "start_ns": "t_start", "ready_ns": "t_ready",
                       "end_ns": "global_timer_ns", "instruction": "index",
                       "op_end_ns": "op_end_ns", "signal_ns": "t_passed_b"}
    for name, word in profiling.KERNEL_PROFILE_FIELDS.items():
        assert expected_source[name] in writes[str(word)], (name, writes[str(word)])


def test_summary_per_sm_fractions():
    s = profiling.summarize(RECORDS, NAMES)
    assert s.step_ns == 400
    assert s.sms.tolist() == [0, 1]
    assert s.busy_ns.tolist() == [300, 250]
    assert s.wait_ns.tolist() == [50, 50]
    assert s.idle_fraction.tolist() == pytest.approx([0.25, 0.375])
    assert s.wait_fraction.tolist() == pytest.approx([0.125, 0.125])
    assert s.bubble_fraction.tolist() == pytest.approx([0.375, 0.5])
    assert s.fraction_stats("bubble") == pytest.approx({"min": 0.375, "median": 0.4375,
                                                        "max": 0.5})


def test_summary_counts_sms_that_ran_nothing():
    s = profiling.summarize(RECORDS, NAMES, num_sms=4)
    assert s.num_sms == 4
    assert s.idle_fraction.tolist() == pytest.approx([0.25, 0.375, 1.0, 1.0])
    assert s.fraction_stats("idle") == pytest.approx({"min": 0.25, "median": 0.6875,
                                                      "max": 1.0})


def test_summary_per_opcode():
    s = profiling.summarize(RECORDS, NAMES)
    assert list(s.per_opcode) == ["embed", "matvec", "attention"]   # order of first start
    embed, matvec, attn = (s.per_opcode[n] for n in ("embed", "matvec", "attention"))
    assert (embed.count, embed.total_ns, embed.wait_ns) == (1, 100, 0)
    assert (matvec.count, matvec.total_ns, matvec.wait_ns, matvec.compute_ns) == (2, 250, 50, 200)
    assert matvec.mean_ns == 125
    assert (attn.count, attn.total_ns, attn.wait_ns) == (1, 200, 50)
    assert embed.share == pytest.approx(100 / 550)
    assert sum(t.share for t in s.per_opcode.values()) == pytest.approx(1.0)
    d = s.to_dict()
    assert json.loads(json.dumps(d))["per_opcode"]["matvec"]["total_ns"] == 250
    text = profiling.format_summary(s, "synthetic")
    assert "matvec" in text and "bubble" in text and "37.5%" in text


def test_summary_without_names_and_with_bad_index():
    s = profiling.summarize(RECORDS[:, :4])
    assert list(s.per_opcode) == ["instruction"] and s.wait_ns.tolist() == [0, 0]
    with pytest.raises(ValueError, match="names instruction 3"):
        profiling.summarize(RECORDS, NAMES[:3])


def test_overlapping_intervals_count_once():
    r = [[0, 0, 0, 100], [0, 1, 50, 150], [0, 2, 300, 400]]
    s = profiling.summarize(r)
    assert s.step_ns == 400 and s.busy_ns.tolist() == [250]
    assert s.idle_fraction.tolist() == pytest.approx([150 / 400])


def test_chrome_trace():
    labels = [f"label {i}" for i in range(4)]
    shifted = RECORDS + np.array([0, 0, 5000, 5000, 5000])      # any time origin
    trace = profiling.chrome_trace(shifted, NAMES, labels, title="t")
    trace = json.loads(json.dumps(trace))                  # serializable as is
    events = trace["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    slices = [e for e in events if e["ph"] == "X" and e["name"] != "wait"]
    waits = [e for e in events if e["ph"] == "X" and e["name"] == "wait"]
    assert {e["args"]["name"] for e in meta if e["name"] == "thread_name"} == {"SM 0", "SM 1"}
    assert len(slices) == 4 and len(waits) == 2
    by_instr = {e["args"]["instruction"]: e for e in slices}
    assert by_instr[2]["name"] == "matvec" and by_instr[2]["tid"] == 0
    assert by_instr[2]["ts"] == pytest.approx(0.1) and by_instr[2]["dur"] == pytest.approx(0.2)
    assert by_instr[2]["args"]["wait_ns"] == 50 and by_instr[2]["args"]["label"] == "label 2"
    assert by_instr[3]["ts"] == pytest.approx(0.2) and by_instr[3]["tid"] == 1
    w = next(e for e in waits if e["args"]["instruction"] == 3)
    assert w["ts"] == pytest.approx(0.2) and w["dur"] == pytest.approx(0.05)
    # One color per opcode, different opcodes differ.
    assert by_instr[1]["cname"] == by_instr[2]["cname"] != by_instr[0]["cname"]
    assert trace["otherData"]["origin_ns"] == 5000


def _tiny_program():
    return build_program(PRESETS["tiny"], num_sms=8, page_size=16, max_seq_len=256,
                         dtype_bytes=4)


def test_write_chrome_trace_names_instructions_from_the_program(tmp_path):
    program = _tiny_program()
    opcodes, labels = profiling.instruction_labels(program)
    assert len(opcodes) == len(labels) == program.num_instructions
    assert opcodes[0] == "embed" and opcodes[-1] == "argmax_reduce"
    assert labels[1].startswith("rms_qkv_rope L0 #0 head=0")
    records = profiling.model_records(program, 1e12)
    path = profiling.write_chrome_trace(tmp_path / "sub" / "trace.json", records, program)
    trace = json.loads(Path(path).read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] != "wait"]
    assert len(slices) == program.num_instructions
    assert {e["name"] for e in slices} == set(program.opcode_counts())


def test_model_records_respect_dependencies_and_sms():
    program = _tiny_program()
    r = profiling.model_records(program, 1e12, context_len=100)
    assert sorted(r[:, profiling.INSTRUCTION].tolist()) == list(range(program.num_instructions))
    assert set(r[:, profiling.SM].tolist()) <= set(range(program.num_sms))
    # One instruction at a time per SM.
    for sm in range(program.num_sms):
        rows = r[r[:, profiling.SM] == sm]
        assert (rows[1:, profiling.START] >= rows[:-1, profiling.END]).all()
    # Ready only after every producer of a waited counter has ended.
    end = {int(i): int(e) for i, e in zip(r[:, profiling.INSTRUCTION], r[:, profiling.END])}
    ready = {int(i): int(t) for i, t in zip(r[:, profiling.INSTRUCTION], r[:, profiling.READY])}
    instrs = program.instruction_list()
    producers: dict[int, list[int]] = {}
    for i, ins in enumerate(instrs):
        producers.setdefault(ins.signal, []).append(i)
    for i, ins in enumerate(instrs):
        for counter, _ in ins.waits:
            assert ready[i] >= max(end[p] for p in producers[counter])
    # Longer context: attention reads more K/V, so the step is not shorter.
    short = profiling.summarize(profiling.model_records(program, 1e12, context_len=1))
    long = profiling.summarize(profiling.model_records(program, 1e12, context_len=256))
    assert long.step_ns > short.step_ns


def test_plot_timeline(tmp_path):
    pytest.importorskip("matplotlib")
    path = profiling.plot_timeline(tmp_path / "t.png", RECORDS, NAMES, title="synthetic")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_stage_breakdown_splits_the_critical_path():
    """Two layers of two stages (opcodes 2 then 3), two instructions per stage (the second
    one's op 1 us longer); every number below is chosen so each column has one right
    answer."""
    f = profiling.KERNEL_PROFILE_FIELDS
    raw = np.zeros((9, profiling.KERNEL_PROFILE_WORDS), dtype=np.int64)
    t = 1000
    index = 0
    for layer in range(2):
        for op in (2, 3):
            for k in range(2):
                row = raw[index]
                row[f["opcode"]], row[f["layer"]], row[f["instruction"]] = op, layer, index
                ready = t + 500 + 100 * k            # waits hold 500 ns after the stage before
                op_end = ready + 3000 + 1000 * k     # op 3 us, the second 4 us
                row[f["start_ns"]], row[f["ready_ns"]] = t, ready
                row[f["op_end_ns"]] = op_end
                row[f["signal_ns"]] = op_end + 200   # barrier 0.2 us
                row[f["end_ns"]] = op_end + 600      # signal 0.4 us
                index += 1
            t += 500 + 100 + 4600                    # next stage: 0.5 us after the last end
    table = profiling.stage_breakdown(raw, {2: "a", 3: "b"})   # row 8 never ran
    assert list(table) == ["a", "b"]
    for name in ("a", "b"):
        assert table[name]["op"] == pytest.approx(3.5)
        assert table[name]["op_max"] == pytest.approx(4.0)
        assert table[name]["barrier"] == pytest.approx(0.2)
        assert table[name]["signal"] == pytest.approx(0.4)
        assert table[name]["span"] == pytest.approx(5.2)
        assert table[name]["lag"] == pytest.approx(0.5)
    assert "span us" in profiling.format_stage_breakdown(table)
    assert "op max" in profiling.format_stage_breakdown(table)


def test_layer_spans_cut_the_critical_path_by_layer():
    """embed, two layers of two stages and an LM head stage that carries layer 0 again;
    layer 0's second stage ends 3 us late, so its span is 3 us longer than layer 1's."""
    f = profiling.KERNEL_PROFILE_FIELDS
    stages = [(0, 1, 1000), (0, 2, 6000), (0, 3, 14000), (1, 2, 19000), (1, 3, 24000),
              (0, 8, 60000)]                          # (layer, opcode, end_ns)
    raw = np.zeros((2 * len(stages) + 1, profiling.KERNEL_PROFILE_WORDS), dtype=np.int64)
    for index in range(2 * len(stages)):              # two instructions per stage
        layer, op, end = stages[index // 2]
        row = raw[index]
        row[f["layer"]], row[f["opcode"]], row[f["instruction"]] = layer, op, index
        row[f["end_ns"]] = end - 500 * (index % 2 == 0)   # the stage ends with its last
    # The last row never ran.
    spans = profiling.layer_spans(raw, {1: "embed", 2: "a", 3: "b", 8: "head"})
    assert [label for label, _ in spans] == ["layer 0", "layer 1", "head"]
    assert [us for _, us in spans] == pytest.approx([13.0, 10.0, 36.0])
    line = profiling.format_layer_spans(spans)
    assert "layer 0 13.00" in line and "layers 1-1 median 10.00 [10.00, 10.00]" in line
    assert line.endswith("head 36.00")
    assert profiling.layer_spans(raw[-1:], {}) == []
