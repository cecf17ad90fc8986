"""scripts/benchmark.py on the CPU: the torch and reference paths run on random:tiny, the
GPU-only backends are named as skipped with a reason, and the table, JSON, plot and
modeled profile come out with consistent numbers."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def _load_script():
    # The script is not a package module: load it from its path (registered in sys.modules
    # because its dataclasses look their module up there).
    name = "megakernel_benchmark_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_script()

NEW_TOKENS = 8
PROMPT_LEN = 6


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One main() run on the CPU with every backend requested; (stdout, json dict, dir)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--model", "random:tiny", "--prompt-len", str(PROMPT_LEN),
            "--new-tokens", str(NEW_TOKENS), "--repeats", "3", "--json", str(out / "r.json"),
            "--plot", str(out / "plot.png"), "--profile", str(out / "profile")]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert bench.main(argv) == 0
    return text.getvalue(), json.loads((out / "r.json").read_text()), out


def _row(results, backend):
    rows = [r for r in results["results"] if r["backend"] == backend]
    assert len(rows) == 1, f"expected one {backend} row, got {len(rows)}"
    return rows[0]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_rows_have_positive_timings(cpu_run, backend):
    text, results, _ = cpu_run
    row = _row(results, backend)
    ms = row["ms_per_token"]
    assert row["repeats"] == 3 and len(ms["all"]) == 3
    assert 0 < ms["min"] <= ms["median"] <= ms["max"]
    assert row["tokens_per_s"] == pytest.approx(1000 / ms["median"])
    assert row["ttft_ms"]["median"] > 0
    assert row["deterministic"] and len(row["tokens"]) == NEW_TOKENS
    # Printed in the table: name, context, and the median in the ms/token column.
    line = next(ln for ln in text.splitlines() if ln.startswith(backend + " "))
    assert f"{ms['median']:.3f} [" in line and f" {PROMPT_LEN} " in line


def test_bytes_and_bandwidth_are_consistent(cpu_run):
    _, results, _ = cpu_run
    from megakernel.presets import PRESETS

    cfg = PRESETS["tiny"]
    bandwidth = results["bandwidth"]
    copy_bw, read_bw = bandwidth["copy"]["bytes_per_s"], bandwidth["read"]["bytes_per_s"]
    assert copy_bw > 0 and read_bw > 0
    # The floor is at the faster probe: the best rate the device moved bytes at.
    floor_bw = bandwidth["floor_bytes_per_s"]
    assert floor_bw == max(copy_bw, read_bw)
    assert bandwidth["floor_probe"] == ("read" if read_bw >= copy_bw else "copy")
    row = _row(results, "torch")
    weights = cfg.weight_bytes_per_token(4)                  # float32 on the CPU
    mean_ctx = PROMPT_LEN + NEW_TOKENS / 2
    kv = 2 * cfg.num_layers * mean_ctx * cfg.num_kv_heads * cfg.head_dim * 4
    assert row["weight_bytes_per_token"] == weights
    assert row["bytes_per_token"] == int(weights + kv)
    achieved = row["bytes_per_token"] / (row["ms_per_token"]["median"] / 1e3)
    assert row["achieved_bytes_per_s"] == pytest.approx(achieved)
    assert row["floor_bandwidth_fraction"] == pytest.approx(achieved / floor_bw)
    floor = results["floor_ms_per_token"][str(PROMPT_LEN)]
    assert floor == pytest.approx(row["bytes_per_token"] / floor_bw * 1e3)
    assert row["x_floor"] == pytest.approx(row["ms_per_token"]["median"] / floor)


def test_speedups_and_token_check(cpu_run):
    text, results, _ = cpu_run
    torch_row, ref_row = _row(results, "torch"), _row(results, "reference")
    assert torch_row["speedup_vs"]["torch"] == pytest.approx(1.0)
    assert ref_row["speedup_vs"]["torch"] == pytest.approx(
        torch_row["ms_per_token"]["median"] / ref_row["ms_per_token"]["median"])
    (check,) = results["token_check"]
    assert check["reference"] == "torch"
    # Both run the same float32 math: identical greedy tokens.
    assert check["backends"]["reference"] == {"matching_leading": NEW_TOKENS,
                                              "total": NEW_TOKENS, "exact": True}
    assert f"reference {NEW_TOKENS}/{NEW_TOKENS}" in text


def test_gpu_backends_are_named_as_skipped_with_reasons(cpu_run):
    text, results, _ = cpu_run
    skipped = results["skipped"]
    for name in ("megakernel", "torch-graph", "torch-compile"):
        assert name in skipped and len(skipped[name]) > 10, skipped
        assert f"skipped {name}: {skipped[name]}" in text
    assert "CUDA" in skipped["torch-graph"]
    ran = {r["backend"] for r in results["results"]}
    assert ran.isdisjoint(skipped)
    assert set(bench.ALL_BACKENDS) == ran | set(skipped)


def test_json_metadata(cpu_run):
    _, results, _ = cpu_run
    env = results["environment"]
    for key in ("torch", "git_commit", "device"):
        assert env[key]
    assert env["device"] == "cpu"
    w = results["workload"]
    assert w["model"] == "random:tiny" and w["contexts"] == [PROMPT_LEN]
    assert w["new_tokens"] == NEW_TOKENS and w["greedy"] and w["ignore_eos"]


def test_hf_row_when_transformers_is_installed(cpu_run):
    pytest.importorskip("transformers")
    _, results, _ = cpu_run
    row = _row(results, "hf")
    assert row["ms_per_token"]["median"] > 0 and len(row["tokens"]) == NEW_TOKENS
    hf = results["token_check"][0]["backends"]["hf"]
    assert 0 <= hf["matching_leading"] <= NEW_TOKENS


def test_plot_and_modeled_profile_files(cpu_run):
    text, results, out = cpu_run
    if results["plot"] == str(out / "plot.png"):
        assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib" in results["plot"]["skipped"]
    prof = results["profile"]
    assert "measured_skipped" in prof            # no GPU: only the modeled timeline
    trace = json.loads((out / "profile" / "trace_modeled.json").read_text())
    assert any(e["ph"] == "X" and e["name"] == "rms_lm_head" for e in trace["traceEvents"])
    modeled = prof["modeled"]
    assert modeled["step_ns"] > 0
    assert 0 <= modeled["bubble_fraction"]["min"] <= modeled["bubble_fraction"]["max"] <= 1
    assert "rms_gate_up_silu" in modeled["per_opcode"]
    assert "modeled decode step" in text
    assert (out / "profile" / "profile_summary.json").exists()


def test_speedups_and_token_check_math():
    rows = [
        {"backend": "torch", "context": 10, "ms_per_token": {"median": 8.0},
         "tokens": [1, 2, 3, 4]},
        {"backend": "torch-graph", "context": 10, "ms_per_token": {"median": 2.0},
         "tokens": [1, 2, 3, 4]},
        {"backend": "megakernel", "context": 10, "ms_per_token": {"median": 0.5},
         "tokens": [1, 2, 9, 4]},
        {"backend": "megakernel", "context": 20, "ms_per_token": {"median": 1.0},
         "tokens": [5]},
    ]
    bench.add_speedups(rows)
    assert rows[2]["speedup_vs"] == {"torch": 16.0, "torch-graph": 4.0}
    assert rows[3]["speedup_vs"] == {}           # no baseline ran at context 20
    checks = bench.token_check(rows)
    assert checks[0]["reference"] == "torch" and not checks[0]["all_match"]
    assert checks[0]["backends"]["megakernel"] == {"matching_leading": 2, "total": 4,
                                                   "exact": False}
    assert checks[0]["backends"]["torch-graph"]["exact"]
    assert not checks[0]["all_match_except_hf"] and checks[0]["not_deterministic"] == []
    assert checks[1]["reference"] == "megakernel" and checks[1]["backends"] == {}
    assert checks[1]["all_match"]
    text = bench.format_token_check(checks)
    assert "MISMATCH" in text and "megakernel 2/4" in text and "torch-graph 4/4" in text
    # hf drifting alone is reported, not called a mismatch; repeats that differ are flagged.
    rows[1]["backend"], rows[1]["tokens"] = "hf", [1, 7, 3, 4]
    rows[0]["deterministic"] = False
    rows.pop(2)
    (check, _) = bench.token_check(rows)
    assert not check["all_match"] and check["all_match_except_hf"]
    assert check["not_deterministic"] == ["torch"]
    text = bench.format_token_check([check])
    assert "all match except hf" in text and "hf 1/4" in text and "NOT DETERMINISTIC" in text


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="unknown backend"):
        bench.main(["--device", "cpu", "--backends", "torch,nope"])
    with pytest.raises(SystemExit, match="context-sweep"):
        bench.main(["--device", "cpu", "--context-sweep", "12,abc"])
    for bad, message in (("1,x", "integers"), ("8,17", r"\[1, 16\], got 17"), (",", "empty")):
        with pytest.raises(SystemExit, match=message):
            bench.main(["--device", "cpu", "--steps-per-launch", bad])
    assert bench._parse_steps("8,1,8") == [8, 1] and bench._parse_steps(None) == [None]


def test_graph_loop_matches_the_engine_on_cpu():
    """The torch-graph greedy loop (static token/position tensors, one step per replay,
    tokens read one step late) gives the engine's tokens. A CUDA graph cannot be captured
    on the CPU, so the captured step is called directly in place of replay()."""
    from megakernel.loading import load_model

    weights, tokenizer = load_model("random:tiny", device="cpu", max_positions=128)
    prompt = bench.make_prompt(11, weights.config, seed=3)
    runner = bench.GraphRunner("torch-graph", weights, 64, 8, compile_model=False)
    runner.new_cache(11 + 20 + 1)
    runner.graph = bench._Replay(runner.make_step(11 + 20 + 1))
    got = runner.run(prompt, 20)
    expected = bench.EngineRunner("torch", weights, tokenizer, 64, 8, 0).run(prompt, 20)
    assert got.tokens == expected.tokens
    assert got.ttft_ms > 0 and got.ms_per_token > 0
    assert runner.produced[11:11 + 19].tolist() == expected.tokens[1:]


def test_bf16_tokens_are_compared_with_the_float32_model(tmp_path):
    """With bf16 weights the reference interpreter (float32 activations, like the
    megakernel) tracks the float32 model's greedy tokens at least as long as the per-op
    torch path, whose matmuls take bf16 inputs; the check reports both."""
    argv = ["--device", "cpu", "--model", "random:tiny", "--dtype", "bfloat16",
            "--prompt-len", "32", "--new-tokens", "48", "--repeats", "1", "--warmup", "0",
            "--backends", "torch,reference", "--json", str(tmp_path / "r.json")]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert bench.main(argv) == 0
    check = json.loads((tmp_path / "r.json").read_text())["token_check"][0]
    vs_fp32 = check["matching_leading_vs_fp32"]
    assert vs_fp32["reference"] == 48
    assert vs_fp32["reference"] >= vs_fp32["torch"]
    assert "vs the float32 model" in text.getvalue()


@pytest.mark.parametrize("steps_arg, profiled_steps", [("1", 1), ("1,8", None), (None, None)])
def test_profile_takes_the_one_steps_per_launch_value(monkeypatch, tmp_path, steps_arg,
                                                      profiled_steps):
    # One --steps-per-launch value sets the profiled launch's chain too (a one-step launch
    # profiles without a chain); several, or none, leave the engine's default.
    seen = []

    def fake_run_profile(out_dir, weights, tokenizer, device, prompt, max_seq_len, page_size,
                         seed, floor_bw, steps_per_launch=None):
        seen.append(steps_per_launch)
        return {"dir": out_dir}

    monkeypatch.setattr(bench, "run_profile", fake_run_profile)
    argv = ["--device", "cpu", "--model", "random:tiny", "--prompt-len", "4", "--new-tokens",
            "2", "--repeats", "1", "--warmup", "0", "--backends", "torch",
            "--profile", str(tmp_path / "profile")]
    if steps_arg is not None:
        argv += ["--steps-per-launch", steps_arg]
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(argv) == 0
    assert seen == [profiled_steps]
