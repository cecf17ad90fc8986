"""The compiled program: topological order, counters, and the random-order check that
proves every dependency the GPU relies on is declared."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megakernel.config import ModelConfig
from megakernel.instructions import O_PROJ_RESIDUAL, RMS_GATE_UP_SILU, Sampling, ScheduleError
from megakernel.kv_cache import PagedKVCache
from megakernel.backends.reference_backend import ReferenceBackend
from megakernel.instructions.rms_qkv_rope import block_rows
from megakernel.presets import PRESETS, random_weights
from megakernel.scheduler import (build_program, chain_prefix, chain_steps, decode_programs,
                                  program_kind, split_qkv, whole_context_limit,
                                  with_sampled_tokens)
from megakernel.scheduler.program import (EARLY_GATE_UP_L2_BYTES, counter_summary,
                                          early_gate_up_limit)
from tolerances import RELATIVE_TOLERANCE, relative_error

CONFIGS = {
    "gqa1-hd64": dict(num_heads=2, num_kv_heads=2, head_dim=64),
    "gqa2-hd64": dict(num_heads=4, num_kv_heads=2, head_dim=64),
    "gqa4-hd128": dict(num_heads=4, num_kv_heads=1, head_dim=128),
    "gqa8-hd64": dict(num_heads=8, num_kv_heads=1, head_dim=64),
}
PROMPT = [5, 9, 1, 30, 77, 12, 4, 100, 18, 3, 64, 2, 8]


def small_config(**kw) -> ModelConfig:
    hidden = kw["num_heads"] * kw["head_dim"]
    return ModelConfig(vocab_size=211, hidden_size=hidden, intermediate_size=136,
                       num_layers=2, rms_norm_eps=1e-5, **kw)


def run_tokens(weights, tokens, order_seed=None, program=None, num_sms=5):
    """Feed `tokens` through the instruction stream; returns logits [n, V]."""
    cache = PagedKVCache(weights.config, max_seq_len=32, page_size=4, dtype=torch.float32,
                         shuffle_seed=7, poison=True)
    cache.reserve(len(tokens))
    backend = ReferenceBackend(weights, cache, num_sms=num_sms, order_seed=order_seed,
                               program=program)
    outs = []
    for pos, tok in enumerate(tokens):
        outs.append(backend.decode(torch.tensor(tok), pos).logits.clone())
    return torch.stack(outs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_orders_equal_in_order(name):
    weights = random_weights(small_config(**CONFIGS[name]), seed=3, init_std=0.1)
    expected = run_tokens(weights, PROMPT)
    assert torch.isfinite(expected).all()
    for seed in range(4):
        got = run_tokens(weights, PROMPT, order_seed=seed)
        assert torch.equal(got, expected), f"order seed {seed} changed the result"


def test_a_deep_model_gives_the_per_op_logits():
    """build_program emits layers 0 and 1 and copies layer 1 for the others
    (program.repeat_layer): a 5-layer model through the instruction stream, in order and in
    a random one, gives the per-op torch backend's logits."""
    from megakernel.backends.torch_backend import TorchBackend

    cfg = dataclasses.replace(small_config(**CONFIGS["gqa2-hd64"]), num_layers=5)
    weights = random_weights(cfg, seed=3, init_std=0.1)
    program = _program(weights)
    assert {i.layer for i in program.instruction_list()
            if i.spec.name == "rms_qkv_rope"} == set(range(5))
    tokens = PROMPT[:6]
    cache = PagedKVCache(cfg, max_seq_len=32, page_size=4, dtype=torch.float32)
    cache.reserve(len(tokens))
    per_op = TorchBackend(weights, cache)
    expected = torch.stack([per_op.decode(torch.tensor(tok), pos).logits.clone()
                            for pos, tok in enumerate(tokens)])
    for seed in (None, 0):
        got = run_tokens(weights, tokens, order_seed=seed, program=program)
        assert relative_error(got, expected) < RELATIVE_TOLERANCE[torch.float32], seed
    # The L2 prefetches, a hint no result shows, each carry their own layer's weights.
    for whole in (True, False):
        deep = build_program(PRESETS["llama-3.2-1b"], num_sms=132, page_size=16,
                             max_seq_len=2048, whole_context_attention=whole)
        carriers = [i for i in deep.instruction_list() if i.l2_prefetch]
        assert {i.layer for i in carriers} == set(range(16))
        assert all(i.l2_prefetch.layer == i.layer for i in carriers)


def _program(weights, num_sms=5):
    return build_program(weights.config, num_sms=num_sms, page_size=4, max_seq_len=32,
                         dtype_bytes=4)


@pytest.mark.parametrize("opcode", ["attention_partial", "o_proj_residual",
                                    "down_proj_residual", "rms_lm_head"])
def test_random_order_catches_a_removed_dependency(opcode):
    """Drop the wait of one instruction: some random order must now give another answer
    (or run it before its inputs exist), otherwise the check could not catch a race."""
    weights = random_weights(small_config(**CONFIGS["gqa2-hd64"]), seed=3, init_std=0.1)
    program = _program(weights)
    victim = next(i for i, ins in enumerate(program.instruction_list())
                  if ins.spec.name == opcode and ins.layer == weights.config.num_layers - 1
                  or (ins.spec.name == opcode == "rms_lm_head"))
    broken = program.without_wait(victim)
    expected = run_tokens(weights, PROMPT[:6], program=program)
    caught = False
    for seed in range(8):
        got = run_tokens(weights, PROMPT[:6], order_seed=seed, program=broken)
        if not torch.equal(got, expected):
            caught = True
            break
    assert caught, f"removing the wait of {opcode} went unnoticed"


def test_in_order_run_checks_waits():
    """A stream whose order is not topological fails loudly on the in-order run."""
    weights = random_weights(small_config(**CONFIGS["gqa2-hd64"]), seed=0)
    program = _program(weights)
    rows = program.instructions
    program.instructions = torch.cat([rows[1:2], rows[0:1], rows[2:]])  # qkv before embed
    program.decoded = []
    with pytest.raises(ScheduleError, match="rms_qkv_rope"):
        run_tokens(weights, PROMPT[:2], program=program)


def test_counters_are_epoch_scaled_and_never_reset():
    weights = random_weights(small_config(**CONFIGS["gqa4-hd128"]), seed=0)
    cache = PagedKVCache(weights.config, max_seq_len=32, page_size=4)
    cache.reserve(8)
    backend = ReferenceBackend(weights, cache, num_sms=3)
    for pos in range(3):
        backend.decode(torch.tensor(pos + 1), pos)
    targets = torch.tensor(backend.program.counter_targets)
    assert torch.equal(backend.state.counters, 3 * targets)


@pytest.mark.parametrize("num_sms", [1, 7, 132])
def test_program_structure(num_sms):
    cfg = small_config(**CONFIGS["gqa2-hd64"])
    program = build_program(cfg, num_sms=num_sms, page_size=4, max_seq_len=64)
    instrs = program.instruction_list()
    # Every waited-on counter is signalled only by instructions earlier in the stream,
    # and the wait target is the full per-step signal count (stage barrier).
    signalled = [0] * program.num_counters
    for ins in instrs:
        for counter, target in ins.waits:
            assert signalled[counter] == target == program.counter_targets[counter]
        signalled[ins.signal] += 1
    assert signalled == program.counter_targets
    # Matrix rows are covered exactly once per layer.
    rows = [0] * cfg.hidden_size
    for ins in instrs:
        if ins.spec.name == "o_proj_residual" and ins.layer == 0:
            for r in range(ins.args["row_begin"], ins.args["row_begin"] + ins.args["row_count"]):
                rows[r] += 1
    assert rows == [1] * cfg.hidden_size
    qkv_rows = torch.cat([block_rows(cfg, i.args["head"], i.args["pair_begin"],
                                     i.args["pair_count"])
                          for i in instrs if i.spec.name == "rms_qkv_rope" and i.layer == 0])
    assert sorted(qkv_rows.tolist()) == list(range(cfg.qkv_size))
    assert max(i.args["pair_count"] for i in instrs
               if i.spec.name == "rms_qkv_rope") <= cfg.head_dim
    assert program.opcode_counts()["argmax_reduce"] == 1
    assert program.instructions.dtype == torch.int32 and program.instructions.shape[1] == 32


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("num_sms", [5, 40])
def test_whole_context_attention_equals_the_split_program(name, num_sms):
    """Whole-context attention (each block the whole context, one head and a slice of its
    dims, no reduce stage) computes what the partitions and their reduce do, up to float
    rounding, in any order the dependencies allow."""
    weights = random_weights(small_config(**CONFIGS[name]), seed=3, init_std=0.1)
    cfg = weights.config
    whole = build_program(cfg, num_sms=num_sms, page_size=4, max_seq_len=32, dtype_bytes=4,
                          whole_context_attention=True)
    counts = whole.opcode_counts()
    assert "attention_reduce" not in counts and whole.attn_partitions == 1
    # Every (head, dim) of attn_out is written by exactly one block per layer.
    covered = torch.zeros(cfg.num_heads, cfg.head_dim, dtype=torch.int64)
    for ins in whole.instruction_list():
        if ins.spec.name == "attention_partial" and ins.layer == 0:
            a = ins.args
            h0 = a["kv_head"] * cfg.group_size + a["head_begin"]
            covered[h0:h0 + a["head_count"], a["dim_begin"]:a["dim_begin"] + a["dim_count"]] += 1
    assert bool((covered == 1).all())
    assert counts["attention_partial"] // cfg.num_layers <= max(num_sms, cfg.num_heads)
    expected = run_tokens(weights, PROMPT, num_sms=num_sms)
    got = run_tokens(weights, PROMPT, program=whole, num_sms=num_sms)
    assert relative_error(got, expected) < RELATIVE_TOLERANCE[torch.float32]
    for seed in range(2):
        assert torch.equal(run_tokens(weights, PROMPT, order_seed=seed, program=whole,
                                      num_sms=num_sms), got)


def test_one_partition_needs_no_reduce_stage():
    # With one partition (few SMs or pages) the split program's attention writes attn_out
    # itself, as whole-context attention does, and o_proj waits on attention directly.
    cfg = small_config(**CONFIGS["gqa2-hd64"])
    program = build_program(cfg, num_sms=1, page_size=4, max_seq_len=64)
    assert program.attn_partitions == 1
    assert "attention_reduce" not in program.opcode_counts()
    attention = {program.counter_names.index(f"L{layer}.attention")
                 for layer in range(cfg.num_layers)}
    assert all(ins.waits[0][0] in attention for ins in program.instruction_list()
               if ins.spec.name == "o_proj_residual")


def test_whole_context_limits_and_blocks_at_the_real_shapes():
    # 48 KB of K and V rows per block: 192 positions at head_dim 64, 96 at 128. A layer's
    # blocks read at most 32 KB of K/V per token of context: 128 blocks of 16 dims on 1B,
    # 64 of 64 dims on 8B, 48 on 3B.
    expected = {"llama-3.2-1b": (192, 128, 16), "llama-3.1-8b": (96, 64, 64),
                "llama-3.2-3b": (96, 48, 64)}
    for name, (limit, blocks, dims) in expected.items():
        cfg = PRESETS[name]
        program = build_program(cfg, num_sms=132, page_size=16, max_seq_len=4096,
                                whole_context_attention=True)
        attention = [i for i in program.instruction_list()
                     if i.spec.name == "attention_partial" and i.layer == 0]
        assert whole_context_limit(cfg) == limit
        assert len(attention) == blocks and {i.args["dim_count"] for i in attention} == {dims}


@pytest.mark.parametrize("name, whole, attention_range, o_proj_range", [
    # 128 attention blocks: 24 MB over 256 runs is 96 KB each after the hand-over's 32 KB.
    ("llama-3.2-1b", True, (32, 128), (128, 144)),
    ("llama-3.2-1b", False, (32, 128), (128, 144)),
    # 64 whole-context attention blocks: 192 KB per run.
    ("llama-3.1-8b", True, (32, 224), (224, 240)),
])
def test_attention_and_o_proj_carry_gate_up_prefetches(name, whole, attention_range,
                                                       o_proj_range):
    # Block b of the attention and of o_proj each carry an L2 prefetch of gate_up block b
    # of their layer: of its gate run the bytes after what gate_up's hand-over prefetches
    # (o_proj the 16 KB after the attention's), of its up run as many, as far from the
    # run's end as those are from the hand-over's share. Besides them only qkv carries
    # one, where o_proj's blocks fit the hand-over (test_qkv_carries_o_proj_prefetches).
    cfg = PRESETS[name]
    program = build_program(cfg, num_sms=132, page_size=16, max_seq_len=4096,
                            whole_context_attention=whole)
    instrs = program.instruction_list()
    carriers = {"attention_partial": attention_range, "o_proj_residual": o_proj_range}
    assert all(i.l2_prefetch is None for i in instrs
               if i.spec.name not in carriers and i.spec.name != "rms_qkv_rope")
    for layer in (0, cfg.num_layers - 1):
        gate_up = [(i.args["row_begin"], i.args["row_count"]) for i in instrs
                   if i.layer == layer and i.spec.name == "rms_gate_up_silu"]
        for stage, (begin_kb, end_kb) in carriers.items():
            carried = [i.l2_prefetch for i in instrs
                       if i.layer == layer and i.spec.name == stage]
            named = [(q.row_begin, q.row_count) for q in carried if q is not None]
            assert named == gate_up[:len(named)]
            assert len(named) == min(len(carried), len(gate_up))
            for q in filter(None, carried):
                run = q.row_count * cfg.hidden_size * 2
                begin, end = begin_kb * 1024, end_kb * 1024
                assert (q.opcode, q.layer) == (RMS_GATE_UP_SILU.code, layer)
                assert (q.run0_begin, q.run0_end) == (begin, end)
                assert (q.run1_begin, q.run1_end) == (run - end + 32768, run - begin + 32768)
    # Under the L2 budget: what the attention carries per layer.
    per_layer = sum(q.run0_end - q.run0_begin + q.run1_end - q.run1_begin for q in (
        i.l2_prefetch for i in instrs if i.layer == 0 and i.spec.name == "attention_partial"))
    assert per_layer <= EARLY_GATE_UP_L2_BYTES


@pytest.mark.parametrize("whole", [True, False])
def test_qkv_carries_o_proj_prefetches(whole):
    # llama-3.2-1b's 64 KB o_proj blocks fit the hand-over prefetch: qkv block b carries
    # the last 32 KB of o_proj block b of its layer. 3B's and 8B's o_proj blocks do not
    # fit: their qkv carries nothing.
    cfg = PRESETS["llama-3.2-1b"]
    instrs = build_program(cfg, num_sms=132, page_size=16, max_seq_len=4096,
                           whole_context_attention=whole).instruction_list()
    for layer in (0, cfg.num_layers - 1):
        o_proj = [(i.args["row_begin"], i.args["row_count"]) for i in instrs
                  if i.layer == layer and i.spec.name == "o_proj_residual"]
        carried = [i.l2_prefetch for i in instrs
                   if i.layer == layer and i.spec.name == "rms_qkv_rope"]
        assert len(carried) >= len(o_proj)
        assert all(q is None for q in carried[len(o_proj):])
        for q, (r0, n) in zip(carried, o_proj):
            run = n * cfg.q_size * 2
            assert run == 64 * 1024
            assert (q.opcode, q.layer, q.row_begin, q.row_count) == (
                O_PROJ_RESIDUAL.code, layer, r0, n)
            assert (q.run0_begin, q.run0_end, q.run1_begin, q.run1_end) == (
                run - 32 * 1024, run, 0, 0)
    for name in ("llama-3.2-3b", "llama-3.1-8b"):
        other = build_program(PRESETS[name], num_sms=132, page_size=16, max_seq_len=4096,
                              whole_context_attention=whole)
        assert all(i.l2_prefetch is None for i in other.instruction_list()
                   if i.spec.name == "rms_qkv_rope")


def test_no_carried_prefetch_when_off_or_when_gate_up_runs_are_short():
    big = build_program(PRESETS["llama-3.2-1b"], num_sms=132, page_size=16, max_seq_len=4096,
                        early_gate_up=False)
    # A small model's gate_up runs end before the hand-over's own 32 KB.
    small = build_program(small_config(**CONFIGS["gqa2-hd64"]), num_sms=8, page_size=4,
                          max_seq_len=64)
    for program in (big, small):
        assert all(i.l2_prefetch is None for i in program.instruction_list())


def test_carried_prefetches_stop_where_a_layer_has_8_mb_of_kv():
    # K and V of one token and layer: 2 KB on llama-3.2-1b (8 KV heads of 64), 4 KB on
    # llama-3.2-3b and llama-3.1-8b (8 of 128).
    assert early_gate_up_limit(PRESETS["llama-3.2-1b"]) == 4096
    assert early_gate_up_limit(PRESETS["llama-3.2-3b"]) == 2048
    assert early_gate_up_limit(PRESETS["llama-3.1-8b"]) == 2048


@pytest.mark.parametrize("max_seq_len, whole, early, partitions, expected", [
    # The default 1B engine: whole-context attention, then split with the early carried
    # prefetches, then with the late ones.
    (8192, 192, 4096, 4, [(192, True, True, False), (4096, False, True, False),
                          (8192, False, False, True)]),
    # A short engine (the benchmark's 161 positions): every program carries the early
    # ones, also where max_seq_len ends before the whole-context limit.
    (161, 192, 4096, 4, [(161, True, True, False), (161, False, True, False)]),
    (3000, 192, 4096, 4, [(192, True, True, False), (3000, False, True, False)]),
    # Early ones switched off; and no whole-context program where the split one has one
    # partition.
    (8192, 0, 0, 4, [(8192, False, False, True)]),
    (8192, 192, 0, 4, [(192, True, False, False), (8192, False, False, True)]),
    (8192, 192, 4096, 1, [(4096, False, True, False), (8192, False, False, True)]),
    (8192, 192, 100, 4, [(192, True, False, False), (8192, False, False, True)]),
])
def test_decode_programs_by_position(max_seq_len, whole, early, partitions, expected):
    assert decode_programs(max_seq_len, whole, early, partitions) == expected
    # Late carriers switched off: the same programs, the last one carrying none.
    assert decode_programs(max_seq_len, whole, early, partitions, late_gate_up=False) == [
        (limit, w, e, False) for limit, w, e, _ in expected]


def late_carried(program) -> dict[str, list]:
    """{carrier opcode name: [(its block index, the carried gate_up block's index,
    L2Prefetch)]} of layer 0."""
    gate_up = {i.args["row_begin"]: i.block_index for i in program.instruction_list()
               if i.layer == 0 and i.spec.name == "rms_gate_up_silu"}
    out: dict[str, list] = {}
    for i in program.instruction_list():
        q = i.l2_prefetch
        if i.layer == 0 and q is not None:
            assert q.opcode == RMS_GATE_UP_SILU.code and q.layer == 0
            out.setdefault(i.spec.name, []).append((i.block_index, gate_up[q.row_begin], q))
    return out


def test_late_carriers_on_the_1b_shape():
    # The split program beyond the early limit: reduce block h carries gate_up block h
    # (96 KB of each run after the hand-over's 32 KB, the up run's counted back from its
    # end); o_proj's 64 KB blocks fit the hand-over prefetch, so o_proj block b carries
    # the next 48 KB of gate_up block 32 + b, up to the last block long enough.
    cfg = PRESETS["llama-3.2-1b"]
    program = build_program(cfg, num_sms=132, page_size=16, max_seq_len=8192,
                            early_gate_up=False, late_gate_up=True)
    carried = late_carried(program)
    assert set(carried) == {"attention_reduce", "o_proj_residual"}
    reduce, o_proj = carried["attention_reduce"], carried["o_proj_residual"]
    assert [(b, g) for b, g, _ in reduce] == [(h, h) for h in range(cfg.num_heads)]
    assert [(b, g) for b, g, _ in o_proj] == [(b, 32 + b) for b in range(len(o_proj))]
    gate_up = [i for i in program.instruction_list()
               if i.layer == 0 and i.spec.name == "rms_gate_up_silu"]
    # Every gate_up block carried once, but a last one shorter than the hand-over's share.
    assert len(reduce) + len(o_proj) == len(gate_up) - 1
    assert gate_up[-1].args["row_count"] * cfg.hidden_size * 2 <= 32 * 1024
    for _, g, q in reduce + o_proj:
        run = gate_up[g].args["row_count"] * cfg.hidden_size * 2
        share = 96 * 1024 if g < cfg.num_heads else 48 * 1024
        assert (q.run0_begin, q.run0_end) == (32768, 32768 + share)
        assert (q.run1_begin, q.run1_end) == (run - share, run)


@pytest.mark.parametrize("model", ["llama-3.2-3b", "llama-3.1-8b"])
def test_late_carriers_only_under_reduce_where_o_proj_streams(model):
    # o_proj blocks larger than the hand-over prefetch stream their own weights from
    # memory: only the reduce stage carries.
    cfg = PRESETS[model]
    program = build_program(cfg, num_sms=132, page_size=16, max_seq_len=8192,
                            early_gate_up=False, late_gate_up=True)
    carried = late_carried(program)
    assert set(carried) == {"attention_reduce"}
    assert len(carried["attention_reduce"]) == cfg.num_heads


def test_late_carriers_need_a_reduce_stage_and_exclude_the_early_ones():
    cfg = PRESETS["llama-3.2-1b"]
    whole = build_program(cfg, num_sms=132, page_size=16, max_seq_len=8192,
                          whole_context_attention=True, early_gate_up=False, late_gate_up=True)
    # No reduce stage: only o_proj carries, its blocks from gate_up block 0 on.
    carried = late_carried(whole)
    assert set(carried) == {"o_proj_residual"}
    assert carried["o_proj_residual"][0][:2] == (0, 0)
    with pytest.raises(ValueError, match="choose one"):
        build_program(cfg, num_sms=132, page_size=16, max_seq_len=8192, late_gate_up=True)


def test_handover_prefetch_budget_is_the_kernels_default():
    import re
    from pathlib import Path
    from megakernel.scheduler.program import HANDOVER_PREFETCH_BYTES
    header = (Path(__file__).resolve().parents[1] / "csrc" / "launcher.h").read_text()
    found = re.search(r"kDefaultPrefetchBytes = (\d+) \* 1024;", header)
    assert found and int(found.group(1)) * 1024 == HANDOVER_PREFETCH_BYTES


def test_qkv_blocks_fill_every_sm_once_at_the_1b_shape():
    # Blocks run on across heads, so the 1536 RoPE pairs give 132 SMs one block each of
    # at most ceil(1536 / 132) = 12 pairs, instead of 96 whole half-heads of 16.
    cfg = PRESETS["llama-3.2-1b"]
    blocks = split_qkv(cfg, 132, cfg.hidden_size * 2)
    assert len(blocks) <= 132
    assert max(n for _, _, n in blocks) == 12
    assert sum(n for _, _, n in blocks) == (cfg.num_heads + 2 * cfg.num_kv_heads) * 32


def _kv_groups_of_rows(cfg, rows: torch.Tensor) -> set[int]:
    """The KV groups whose attention reads these fused-QKV rows."""
    heads = rows // cfg.head_dim
    return {int(h) // cfg.group_size if h < cfg.num_heads
            else (int(h) - cfg.num_heads) % cfg.num_kv_heads for h in heads}


@pytest.mark.parametrize("cfg, num_sms", [
    (PRESETS["llama-3.2-1b"], 132), (PRESETS["llama-3.1-8b"], 132),
    (small_config(**CONFIGS["gqa2-hd64"]), 5), (small_config(**CONFIGS["gqa2-hd64"]), 7)])
@pytest.mark.parametrize("whole", [True, False])
def test_attention_waits_only_on_the_qkv_blocks_of_its_kv_group(cfg, num_sms, whole):
    """Each qkv block signals one counter (its first head's KV group's), and each attention
    block waits on exactly the counters of the qkv blocks that write its KV group's query,
    key and value rows, for all of their producers."""
    program = build_program(cfg, num_sms=num_sms, page_size=16, max_seq_len=4096,
                            whole_context_attention=whole, kv_group_waits=True)
    instrs = [i for i in program.instruction_list() if i.layer == 1]
    qkv = [i for i in instrs if i.spec.name == "rms_qkv_rope"]
    feeders: dict[int, set[int]] = {}     # KV group -> counters of the blocks that feed it
    for i in qkv:
        rows = block_rows(cfg, i.args["head"], i.args["pair_begin"], i.args["pair_count"])
        for g in _kv_groups_of_rows(cfg, rows):
            feeders.setdefault(g, set()).add(i.signal)
    assert len({i.signal for i in qkv}) == cfg.num_kv_heads          # a counter per group
    assert max(map(len, feeders.values())) == 2                      # blocks run on
    for i in instrs:
        if i.spec.name == "attention_partial":
            assert {c for c, _ in i.waits} == feeders[i.args["kv_head"]]
            assert all(t == program.counter_targets[c] for c, t in i.waits)


def test_kv_group_waits_by_default_from_head_dim_128():
    for name, grouped in (("llama-3.2-1b", False), ("llama-3.2-3b", True),
                          ("llama-3.1-8b", True)):
        program = build_program(PRESETS[name], num_sms=132, page_size=16, max_seq_len=4096)
        counters = {i.signal for i in program.instruction_list()
                    if i.spec.name == "rms_qkv_rope" and i.layer == 0}
        assert len(counters) == (PRESETS[name].num_kv_heads if grouped else 1), name
    # Blocks of three heads (one SM: blocks of head_dim pairs) would feed some group from
    # three counters, one more than an instruction's waits: the stage keeps one counter.
    cfg = small_config(num_heads=4, num_kv_heads=4, head_dim=64)
    program = build_program(cfg, num_sms=1, page_size=4, max_seq_len=64, kv_group_waits=True)
    assert len({i.signal for i in program.instruction_list()
                if i.spec.name == "rms_qkv_rope" and i.layer == 0}) == 1


def test_random_order_catches_an_attention_wait_on_its_own_group_alone():
    """Drop the wait on the group before it from an attention block whose group a block of
    that group runs on into: some random order runs it before those rows exist."""
    weights = random_weights(small_config(**CONFIGS["gqa2-hd64"]), seed=3, init_std=0.1)
    program = build_program(weights.config, num_sms=5, page_size=4, max_seq_len=32,
                            dtype_bytes=4, kv_group_waits=True)
    instrs = program.instruction_list()
    victim = next(n for n, i in enumerate(instrs)
                  if i.spec.name == "attention_partial" and len(i.waits) == 2
                  and i.layer == weights.config.num_layers - 1)
    rows = program.instructions.clone()
    rows[victim] = torch.tensor(dataclasses.replace(instrs[victim],
                                                    waits=instrs[victim].waits[:1]).encode())
    broken = dataclasses.replace(program, instructions=rows, decoded=[])
    expected = run_tokens(weights, PROMPT[:6], program=program)
    assert any(not torch.equal(run_tokens(weights, PROMPT[:6], order_seed=seed,
                                          program=broken), expected)
               for seed in range(8)), "the attention ran before a block feeding its group"


def test_counter_summary_writes_alike_layers_once():
    names = ["embed", "L0.qkv", "L0.down", "L1.qkv", "L1.down", "L2.qkv", "L2.down", "lm_head"]
    assert counter_summary(names, [1, 8, 8, 8, 8, 8, 9, 4]) == (
        "embed=1; L0-L1 each: qkv=8, down=8; L2: qkv=8, down=9; lm_head=4")
    chained = [f"step{t}.{n}" for t in range(2) for n in ("embed", "L0.qkv", "L1.qkv")]
    assert counter_summary(chained, [1, 8, 8] * 2) == (
        "step0.embed=1; step0.L0-L1 each: qkv=8; step1.embed=1; step1.L0-L1 each: qkv=8")


def test_blocks_scale_with_sm_count():
    cfg = small_config(**CONFIGS["gqa2-hd64"])
    few = build_program(cfg, num_sms=2, page_size=4, max_seq_len=64)
    many = build_program(cfg, num_sms=64, page_size=4, max_seq_len=64)
    assert many.num_instructions > few.num_instructions


def test_matvec_warp_model_mirrors_the_kernel():
    # block_cost models the kernel's warp passes: its constants must be the kernel's.
    import re
    from pathlib import Path
    from megakernel.scheduler import program as program_module

    common = (Path(__file__).resolve().parents[1] / "csrc" / "common.cuh").read_text()

    def constant(name):
        return int(re.search(rf"constexpr int {name} = (\d+);", common).group(1))

    assert program_module.MATVEC_WARPS == constant("kComputeWarps")
    assert program_module.MATVEC_LOAD_BYTES == (constant("kWarpSize") * constant("kMatvecUnroll")
                                                * 16)


def test_a_last_round_with_idle_warps_costs_its_round_trips():
    from megakernel.scheduler.program import (INSTRUCTION_OVERHEAD_BYTES,
                                              PARTIAL_ROUND_TRIP_BYTES, block_cost)
    row = 28672   # llama-3.1-8b down_proj: 7 load round trips per row
    # 16 rows in pairs: one round in which every warp has a pass, so bytes decide.
    assert block_cost(16, row, 2, 1) == 16 * row + INSTRUCTION_OVERHEAD_BYTES
    # 32 rows: a full round of 30, then 2 warps alone for 7 round trips.
    assert block_cost(32, row, 2, 1) == (30 * row + 7 * PARTIAL_ROUND_TRIP_BYTES
                                         + INSTRUCTION_OVERHEAD_BYTES)
    # gate_up's rows are gate + up streamed side by side: 8 KB rows of 4 KB loads.
    assert block_cost(16, 8192, 1, 2) == (15 * 8192 + max(8192, PARTIAL_ROUND_TRIP_BYTES)
                                          + INSTRUCTION_OVERHEAD_BYTES)


@pytest.mark.parametrize("model, blocks", [
    # (o_proj, gate_up, down, lm_head) blocks per layer on 132 SMs: the splits that a
    # sweep of block sizes on an H100 measured fastest (benchmarks/RESULTS.md, entry 18).
    ("llama-3.2-1b", (128, 131, 128, 132)),
    ("llama-3.2-3b", (128, 131, 128, 132)),
    ("llama-3.1-8b", (128, 132, 256, 132)),
])
def test_block_counts_at_the_h100_shapes(model, blocks):
    cfg = PRESETS[model]
    counts = build_program(cfg, num_sms=132, page_size=16, max_seq_len=1024).opcode_counts()
    per_layer = tuple(counts[name] // cfg.num_layers for name in
                      ("o_proj_residual", "rms_gate_up_silu", "down_proj_residual"))
    assert per_layer + (counts["rms_lm_head"],) == blocks


def _chained_run(weights, prompt, steps_per_launch, launches, order_seed=None, chain=None):
    """The prompt one step at a time, then `launches` launches of `steps_per_launch` chained
    greedy steps (the program `chain` for them, if given): (tokens, logits [steps, V]) of
    the chained steps."""
    cache = PagedKVCache(weights.config, max_seq_len=32, page_size=4, dtype=torch.float32,
                         shuffle_seed=7, poison=True)
    cache.reserve(len(prompt) + steps_per_launch * launches)
    backend = ReferenceBackend(weights, cache, num_sms=5, order_seed=order_seed)
    if chain is not None:
        backend._chains[(steps_per_launch, None)] = (chain, backend._state_for(chain))
    out = backend.prefill(torch.tensor(prompt), 0)
    token, position, tokens, logits = out.greedy_token, len(prompt), [], []
    for _ in range(launches):
        out = backend.decode_steps(token, position, steps_per_launch)
        tokens += out.tokens_host.tolist()
        logits.append(out.logits.clone())
        token, position = out.last_token, position + steps_per_launch
    return tokens, torch.cat(logits)


@pytest.mark.parametrize("name", ["gqa2-hd64", "gqa4-hd128"])
def test_chained_steps_equal_one_step_per_launch(name):
    """Steps chained in one stream (each token the argmax of the step before, chosen inside
    the stream) give exactly the tokens and logits of one step per launch, in any order
    the dependencies allow."""
    weights = random_weights(small_config(**CONFIGS[name]), seed=3, init_std=0.1)
    expected = _chained_run(weights, PROMPT[:5], 1, 6)
    assert len(set(expected[0])) > 1
    for seed in (None, 0, 1):
        tokens, logits = _chained_run(weights, PROMPT[:5], 3, 2, order_seed=seed)
        assert tokens == expected[0] and torch.equal(logits, expected[1]), seed


def test_chain_structure():
    weights = random_weights(small_config(**CONFIGS["gqa2-hd64"]), seed=3)
    one = _program(weights)
    assert chain_steps(one, 1) is one
    three = chain_steps(one, 3)
    n = one.num_instructions
    assert three.num_instructions == 3 * n and three.num_counters == 3 * one.num_counters
    assert three.num_tokens == three.steps_per_launch == 3
    assert all(spec.shape[0] == 3 for spec in three.buffers.values())
    rows = three.instruction_list()
    for t in range(3):
        copy = rows[t * n:(t + 1) * n]
        assert {i.token_begin for i in copy} == {t} and {i.token_count for i in copy} == {1}
        assert {i.signal // one.num_counters for i in copy} == {t}
        embed = copy[0]
        assert embed.spec.name == "embed"
        if t:
            argmax = rows[t * n - 1]
            assert argmax.spec.name == "argmax_reduce"
            assert embed.waits == ((argmax.signal, 1),)
    two = chain_prefix(three, 2)
    expected = chain_steps(one, 2)
    assert torch.equal(two.instructions, expected.instructions)
    assert two.instructions.data_ptr() == three.instructions.data_ptr()
    assert (two.counter_names, two.counter_targets, two.buffers, two.num_tokens) == \
        (expected.counter_names, expected.counter_targets, expected.buffers, 2)
    with pytest.raises(ValueError, match="one-token"):
        chain_steps(three, 2)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        chain_prefix(three, 4)
    with pytest.raises(ValueError, match="positive"):
        chain_steps(one, 0)


def test_random_order_catches_a_chained_embed_without_its_wait():
    """The embed of a chained step must wait on the argmax before it: without that wait a
    random order embeds a token not chosen yet."""
    weights = random_weights(small_config(**CONFIGS["gqa2-hd64"]), seed=3, init_std=0.1)
    program = chain_steps(build_program(weights.config, num_sms=5, page_size=4, max_seq_len=32,
                                        dtype_bytes=4), 3)
    second_embed = program.num_instructions // 3
    assert program.instruction_list()[second_embed].spec.name == "embed"
    broken = program.without_wait(second_embed)
    expected = _chained_run(weights, PROMPT[:5], 3, 1)

    def differs(chain, seed):
        tokens, logits = _chained_run(weights, PROMPT[:5], 3, 1, order_seed=seed, chain=chain)
        return tokens != expected[0] or not torch.equal(logits, expected[1])

    assert not any(differs(program, seed) for seed in range(4))
    assert any(differs(broken, seed) for seed in range(4))


def test_sampled_program_structure():
    """with_sampled_tokens: one sample_logits per LM-head block (its rows and slot) after
    the LM head, waiting on all of it, and argmax_reduce waiting on them; it chains like a
    greedy step and refuses a chained or already sampled program."""
    weights = random_weights(small_config(**CONFIGS["gqa2-hd64"]), seed=3)
    one = _program(weights)
    sampled = with_sampled_tokens(one)
    rows = sampled.instruction_list()
    heads = [i for i in rows if i.spec.name == "rms_lm_head"]
    samples = [i for i in rows if i.spec.name == "sample_logits"]
    assert sampled.num_instructions == one.num_instructions + len(heads)
    assert [(i.args, i.block_index) for i in samples] == [(i.args, i.block_index) for i in heads]
    assert rows[-len(samples) - 1:-1] == samples and rows[-1].spec.name == "argmax_reduce"
    sample_counter = sampled.num_counters - 1
    assert sampled.counter_names[-1] == "sample"
    assert sampled.counter_targets[sample_counter] == len(samples)
    assert {i.waits for i in samples} == {((heads[0].signal, len(heads)),)}
    assert {i.signal for i in samples} == {sample_counter}
    assert rows[-1].waits == ((sample_counter, len(samples)),)
    assert rows[:-len(samples) - 1] == one.instruction_list()[:-1]
    three = chain_steps(sampled, 3)
    assert three.num_instructions == 3 * sampled.num_instructions
    with pytest.raises(ValueError, match="chain it"):
        with_sampled_tokens(chain_steps(one, 2))
    with pytest.raises(ValueError, match="already samples"):
        with_sampled_tokens(sampled)


def _sampled_tokens(weights, program, sampling, order_seed=None) -> list[int]:
    """PROMPT fed one step per launch through the sampled one-step `program` on the
    reference backend (in a random order with order_seed): each step's drawn token."""
    cache = PagedKVCache(weights.config, max_seq_len=32, page_size=4, dtype=torch.float32,
                         shuffle_seed=7, poison=True)
    cache.reserve(len(PROMPT))
    backend = ReferenceBackend(weights, cache, num_sms=5, order_seed=order_seed)
    backend._chains[(1, program_kind(sampling))] = (program, backend._state_for(program))
    return [int(backend.decode_steps(tok, pos, 1, sampling=sampling).last_token)
            for pos, tok in enumerate(PROMPT)]


def _check_sampled_orders(weights, program, sampling, victim: int) -> None:
    """Random orders of the sampled `program` give the in-order tokens, and without
    instruction victim's wait some order gives others (or reads a state not written yet)."""
    expected = _sampled_tokens(weights, program, sampling)
    assert all(_sampled_tokens(weights, program, sampling, seed) == expected
               for seed in range(3))
    broken = program.without_wait(victim)

    def differs(seed):
        try:
            return _sampled_tokens(weights, broken, sampling, seed) != expected
        except ValueError:      # a top-p pass read its state before any was written (NaN)
            return True

    assert any(differs(seed) for seed in range(8))


def test_random_order_catches_a_draw_before_the_lm_head():
    """A sample_logits that does not wait on the LM head reads logits not written yet (or
    the previous step's): some random order must give other tokens."""
    weights = random_weights(small_config(**CONFIGS["gqa2-hd64"]), seed=3, init_std=0.1)
    sampled = with_sampled_tokens(_program(weights))
    victim = next(i for i, ins in enumerate(sampled.instruction_list())
                  if ins.spec.name == "sample_logits")

    _check_sampled_orders(weights, sampled, Sampling(1 / 0.9, 5), victim)


def _sampled_program(kind: str):
    """A small model's weights, its one-step program, the program sampled with `kind`, its
    instructions, the LM-head ones, and the ones the sampling added, then argmax_reduce."""
    weights = random_weights(small_config(**CONFIGS["gqa2-hd64"]), seed=3, init_std=0.1)
    one = _program(weights)
    sampled = with_sampled_tokens(one, kind)
    rows = sampled.instruction_list()
    heads = [i for i in rows if i.spec.name == "rms_lm_head"]
    return weights, one, sampled, rows, heads, rows[len(one.instruction_list()) - 1:]


def test_top_k_program_structure():
    """with_sampled_tokens(kind="top_k"): topk_partial per LM-head block after the LM head,
    one topk_threshold after them, the sample_logits blocks after it, and the candidate
    buffers; a random order without the threshold's wait is caught."""
    weights, one, sampled, rows, heads, tail = _sampled_program("top_k")
    assert [i.spec.name for i in tail] == (["topk_partial"] * len(heads) + ["topk_threshold"]
                                           + ["sample_logits"] * len(heads) + ["argmax_reduce"])
    partial, threshold = tail[:len(heads)], tail[len(heads)]
    samples = tail[len(heads) + 1:-1]
    assert [(i.args, i.block_index) for i in partial] == [(i.args, i.block_index) for i in heads]
    assert {i.waits for i in partial} == {((heads[0].signal, len(heads)),)}
    assert threshold.waits == ((partial[0].signal, len(heads)),)
    assert threshold.args == {"num_blocks": len(heads)}
    assert {i.waits for i in samples} == {((threshold.signal, 1),)}
    assert sampled.counter_names[-3:] == ["topk", "topk_threshold", "sample"]
    assert sampled.buffers["topk_values"].shape == (1, one.lm_head_blocks * 64)
    assert sampled.buffers["topk_ties"].shape == (1, one.lm_head_blocks)
    assert chain_steps(sampled, 2).buffers["sample_threshold"].shape == (2,)

    _check_sampled_orders(weights, sampled, Sampling(1 / 0.9, 5, 3), rows.index(samples[0]))
    # With top-p too (the threshold stage's nucleus), without the threshold's wait.
    _check_sampled_orders(weights, sampled, Sampling(1 / 0.9, 5, 3, 0.7), rows.index(threshold))


def test_top_p_program_structure():
    """with_sampled_tokens(kind="top_p"): four passes of topp_histogram per LM-head block
    and one topp_select, each waiting on the stage before, then the sample_logits blocks;
    a random order without a pass's wait is caught."""
    weights, one, sampled, rows, heads, tail = _sampled_program("top_p")
    one_pass = ["topp_histogram"] * len(heads) + ["topp_select"]
    assert [i.spec.name for i in tail] == (one_pass * 4 + ["sample_logits"] * len(heads)
                                           + ["argmax_reduce"])
    stride = len(heads) + 1
    wait = (heads[0].signal, len(heads))
    for p in range(4):
        histograms, select = tail[p * stride:p * stride + len(heads)], tail[(p + 1) * stride - 1]
        assert {(i.waits, i.args["pass_index"]) for i in histograms} == {((wait,), p)}
        assert [(i.args["row_begin"], i.block_index) for i in histograms] == \
            [(i.args["row_begin"], i.block_index) for i in heads]
        assert select.waits == ((histograms[0].signal, len(heads)),)
        assert select.args == {"pass_index": p}
        wait = (select.signal, 1)
    assert {i.waits for i in tail[4 * stride:-1]} == {(wait,)}
    assert set(sampled.buffers) - set(one.buffers) == {
        "topp_hist", "topp_state", "sample_threshold"}
    # Top-k with top-p: the top-k program, whose threshold stage takes the nucleus.
    assert program_kind(Sampling(1.0, 0, 5, 0.9)) == "top_k"

    # Without the wait of pass 1's first histogram block.
    _check_sampled_orders(weights, sampled, Sampling(1 / 0.9, 5, 0, 0.7),
                          rows.index(tail[stride]))
