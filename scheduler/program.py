"""Compile one decode step of a Llama model into an instruction stream.

build_program() emits the whole forward pass as a DAG in one topological order:

    embed
    per layer:  rms_qkv_rope x Nq -> attention_partial x (nkv * P) -> attention_reduce x nq
                -> o_proj_residual x No -> rms_gate_up_silu x Ng -> down_proj_residual x Nd
    rms_lm_head x Nl -> argmax_reduce

With one partition (P = 1) attention_partial writes attn_out itself and no
attention_reduce follows. With whole_context_attention, each attention_partial covers the
whole context for one query head and a slice of its output dims, so there is no reduce
stage either (one dependency stage less per layer; every block then reads the whole
context, so this is for short contexts).

Each stage signals one counter per layer; every instruction of the next stage waits until
that counter holds the stage's block count (times the step epoch). These stage barriers
also order every write-after-read on the shared activations (hidden is updated in place
only after every reader of the previous value has signalled). Matrices are cut into
blocks sized from the SM count so that every SM has work and the last wave is full.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from megakernel.instructions import (
    ARGMAX_REDUCE, ATTENTION_PARTIAL, ATTENTION_REDUCE, DOWN_PROJ_RESIDUAL, EMBED,
    HEADER_FIELDS, L2_PREFETCH_FIELDS, L2_PREFETCH_WORD, MAX_WAITS, NO_COUNTER, O_PROJ_RESIDUAL,
    OPCODES, RMS_GATE_UP_SILU, RMS_LM_HEAD, RMS_QKV_ROPE, WORDS, Instruction, L2Prefetch,
)

# Fixed cost of one instruction (claim, waits, signal, pipeline fill), in bytes of weight
# streaming it is worth on one SM. Trades more, smaller blocks (better balance) against
# per-instruction overhead when choosing block sizes.
INSTRUCTION_OVERHEAD_BYTES = 32768

# How the kernel's mat-vec ops spread a block over warps (csrc/common.cuh): warp w takes
# passes w, w + MATVEC_WARPS, ... (a round = one pass per warp), and a pass streams each
# weight row in load round trips of MATVEC_LOAD_BYTES (32 lanes x kMatvecUnroll x 16 B).
MATVEC_WARPS = 15
MATVEC_LOAD_BYTES = 4096
# A block's last round, when it leaves warps idle, is bound by latency, not bandwidth:
# each of its load round trips costs at least this many bytes of one SM's streaming
# (~0.7 us at its ~23 GB/s share). Fitted: 16 KB splits only llama-3.1-8b's down_proj
# into two waves of full rounds, the one change a sweep of block sizes measured faster
# (benchmarks/RESULTS.md, entry 18); 24 KB would also split its o_proj, which measured
# slower.
PARTIAL_ROUND_TRIP_BYTES = 16384


@dataclass(frozen=True)
class BufferSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Program:
    """A compiled decode step.

    instructions: [N, WORDS] int32 in topological order. counter_targets[c]: signals
    counter c receives per launch (consumers wait for target * epoch). buffers: the
    activations the stream reads and writes, by name. steps_per_launch: decode steps the
    stream chains (scheduler/chain.py), each on its own token row; the byte counts below
    are per launch.
    """
    config: object
    num_sms: int
    num_tokens: int
    page_size: int
    attn_partitions: int
    lm_head_blocks: int
    instructions: torch.Tensor
    counter_names: list[str]
    counter_targets: list[int]
    buffers: dict[str, BufferSpec]
    dtype_bytes: int = 2
    decoded: list[Instruction] = field(default_factory=list, repr=False)
    steps_per_launch: int = 1

    @property
    def num_instructions(self) -> int:
        return int(self.instructions.shape[0])

    @property
    def num_counters(self) -> int:
        return len(self.counter_targets)

    def instruction_list(self) -> list[Instruction]:
        if not self.decoded:
            self.decoded = [Instruction.decode(row) for row in self.instructions.tolist()]
        return self.decoded

    def opcode_counts(self) -> dict[str, int]:
        return dict(Counter(OPCODES[int(op)].name for op in self.instructions[:, 0]))

    def weight_bytes_per_step(self) -> int:
        """Bytes the stream moves per step, KV reads excluded (see kv_bytes_per_step)."""
        return sum(i.spec.cost(i, self.config, self.dtype_bytes)
                   for i in self.instruction_list())

    def kv_bytes_per_step(self, context_len: int) -> int:
        """K and V bytes attention reads for one token with `context_len` positions."""
        c = self.config
        return 2 * c.num_layers * context_len * c.kv_size * self.dtype_bytes

    def bytes_per_step(self, context_len: int) -> int:
        return self.weight_bytes_per_step() + self.kv_bytes_per_step(context_len)

    def summary(self) -> str:
        """Human-readable description: instructions per opcode, bytes, counters."""
        lines = [f"program: {self.num_instructions} instructions, {self.num_counters} counters, "
                 f"built for {self.num_sms} SMs, {self.num_tokens} token(s) per launch in "
                 f"{self.steps_per_launch} step(s)",
                 f"  attention partitions per KV head: {self.attn_partitions}, "
                 f"page_size {self.page_size}, LM-head blocks {self.lm_head_blocks}"]
        by_op: dict[str, list[int]] = {}
        for instr in self.instruction_list():
            by_op.setdefault(instr.spec.name, []).append(
                instr.spec.cost(instr, self.config, self.dtype_bytes))
        lines.append(f"  {'opcode':<20} {'count':>7} {'bytes/step':>14} {'bytes/instr':>12}")
        for name, costs in by_op.items():
            lines.append(f"  {name:<20} {len(costs):>7} {sum(costs):>14,} "
                         f"{sum(costs) // len(costs):>12,}")
        total = self.weight_bytes_per_step()
        lines.append(f"  bytes moved per step (weights + activations): {total:,} "
                     f"({total / 1e9:.3f} GB); KV adds {self.kv_bytes_per_step(1):,} "
                     f"bytes per token of context")
        lines.append("  counters (per-step target): "
                     + counter_summary(self.counter_names, self.counter_targets))
        return "\n".join(lines)

    def without_wait(self, index: int) -> "Program":
        """A copy with instruction `index`'s waits removed (to prove the checks catch it)."""
        rows = self.instructions.clone()
        for w in range(2):
            rows[index, 2 + 2 * w] = -1
            rows[index, 3 + 2 * w] = 0
        return Program(**{**self.__dict__, "instructions": rows, "decoded": []})


_LAYER_COUNTER = re.compile(r"(?P<prefix>(?:step\d+\.)?)L(?P<layer>\d+)\.(?P<stage>.+)")


@dataclass
class _LayerRun:
    """Consecutive layers [first, last] (of one chained step: prefix) whose counters have
    the same stages and targets."""
    prefix: str
    first: int
    last: int
    stages: list[str]

    def __str__(self) -> str:
        layers = f"{self.prefix}L{self.first}" + (
            f"-L{self.last} each" if self.last > self.first else "")
        return f"{layers}: {', '.join(self.stages)}"


def counter_summary(names: list[str], targets: list[int]) -> str:
    """Counters as `name=target`, with the runs of layers whose counters have the same
    stages and targets written once ("L1-L31 each: qkv=128, ..."), in stream order."""
    layers: list[_LayerRun | str] = []     # one entry per layer, or a counter of no layer
    for name, target in zip(names, targets):
        m = _LAYER_COUNTER.fullmatch(name)
        if m is None:
            layers.append(f"{name}={target}")
            continue
        prefix, layer, stage = m["prefix"], int(m["layer"]), f"{m['stage']}={target}"
        last = layers[-1] if layers else None
        if isinstance(last, _LayerRun) and (last.prefix, last.first) == (prefix, layer):
            last.stages.append(stage)
        else:
            layers.append(_LayerRun(prefix, layer, layer, [stage]))
    runs: list[_LayerRun | str] = []
    for entry in layers:
        last = runs[-1] if runs else None
        if (isinstance(entry, _LayerRun) and isinstance(last, _LayerRun)
                and (last.prefix, last.last + 1, last.stages)
                == (entry.prefix, entry.first, entry.stages)):
            last.last = entry.last
        else:
            runs.append(entry)
    return "; ".join(map(str, runs))


def block_cost(rows: int, row_bytes: int, rows_per_pass: int, loads_per_row: int) -> int:
    """Modelled time of one block of `rows` rows, in bytes of one SM's streaming: full
    rounds of warp passes at bandwidth, then a last round that leaves warps idle at
    latency (PARTIAL_ROUND_TRIP_BYTES per load round trip), then the overhead. A pass
    takes `rows_per_pass` of the rows; each row is `loads_per_row` weight rows streamed
    side by side (gate_up's gate and up rows; for qkv, whose unit is a RoPE pair, the two
    rows one warp pass takes, although the kernel pairs them by position, not by pair)."""
    round_rows = MATVEC_WARPS * rows_per_pass
    full_rounds, rest = divmod(rows, round_rows)
    cost = full_rounds * round_rows * row_bytes
    if rest:
        last_round = rest * row_bytes
        # The kernel gives a last round's rows to its warps rows_per_pass at a time
        # (csrc/common.cuh, RowPairs), so it leaves warps idle below a full round's rows.
        if -(-rest // rows_per_pass) < MATVEC_WARPS:
            trips = -(-row_bytes // (loads_per_row * MATVEC_LOAD_BYTES))
            last_round = max(last_round, trips * PARTIAL_ROUND_TRIP_BYTES)
        cost += last_round
    return cost + INSTRUCTION_OVERHEAD_BYTES


def split_rows(total: int, num_sms: int, row_bytes: int, unit: int = 1,
               max_rows: int | None = None, rows_per_pass: int = 1,
               loads_per_row: int = 1) -> list[tuple[int, int]]:
    """Cut `total` rows into (begin, count) blocks, count a multiple of `unit` (but the
    last), minimizing the modelled finish time: waves * block_cost (rows_per_pass and
    loads_per_row describe the op's warp passes there)."""
    units = -(-total // unit)
    best = None
    for units_per_block in range(1, units + 1):
        rows = units_per_block * unit
        if max_rows is not None and rows > max_rows and units_per_block > 1:
            break
        blocks = -(-units // units_per_block)
        waves = -(-blocks // num_sms)
        t = waves * block_cost(rows, row_bytes, rows_per_pass, loads_per_row)
        if best is None or t < best[0]:
            best = (t, rows)
        if blocks <= num_sms // 4:   # fewer blocks only idles more SMs
            break
    rows = best[1]
    return [(b, min(rows, total - b)) for b in range(0, total, rows)]


def split_qkv(cfg, num_sms: int, row_bytes: int) -> list[tuple[int, int, int]]:
    """(head, pair_begin, pair_count) blocks over the fused QKV's RoPE pairs, numbered
    head-major; a block may run on into the next heads, so the pairs divide evenly over
    the SMs (the cost model of split_rows, in units of one pair = two rows). At most
    head_dim pairs per block: the kernel's shared memory holds 2 * head_dim outputs."""
    half = cfg.head_dim // 2
    total = (cfg.num_heads + 2 * cfg.num_kv_heads) * half
    return [(g // half, g % half, n)
            for g, n in split_rows(total, num_sms, 2 * row_bytes, max_rows=cfg.head_dim,
                                   loads_per_row=2)]


# An attention block of KV head g can wait on the qkv blocks that feed its KV group instead
# of the whole qkv stage: a counter per group, which each qkv block signals for the group of
# its first head. A block that runs on into the next heads also feeds their group, so the
# attention of group g waits on every counter that one of its feeders signals; with blocks
# of at most two heads that is group g's and the group before it in head order (MAX_WAITS).
# On an H100 (benchmarks/RESULTS.md, entry 87) that takes 12-14 us off a llama-3.1-8b
# token and 6-8 off llama-3.2-3b (head_dim 128). On llama-3.2-1b (head_dim 64, a lighter
# attention stage) even waiting on its own group's counter alone, wrongly, gained only
# ~1 us: from head_dim 128 up.
KV_GROUP_WAITS_MIN_HEAD_DIM = 128


def qkv_block_kv_groups(cfg, head: int, pair_begin: int, pair_count: int) -> list[int]:
    """The KV groups whose attention reads a qkv block's outputs, in the order of its
    heads: group g is query heads [g * group_size, (g + 1) * group_size), key head g and
    value head g. The heads are block_pairs()'s (instructions/rms_qkv_rope.py), worked out
    without its per-pair tensors, which cost ~9 ms per 8B program."""
    half = cfg.head_dim // 2
    first = head * half + pair_begin
    groups = [h // cfg.group_size if h < cfg.num_heads
              else (h - cfg.num_heads) % cfg.num_kv_heads
              for h in range(first // half, (first + pair_count - 1) // half + 1)]
    return list(dict.fromkeys(groups))


def qkv_wait_groups(cfg, block_groups: list[list[int]]) -> list[list[int]] | None:
    """For each KV group g, the groups whose qkv counters its attention waits on (the
    first groups of the blocks that feed g; block_groups: qkv_block_kv_groups() of each
    block), or None where some group would need more than MAX_WAITS of them."""
    feeds = [[] for _ in range(cfg.num_kv_heads)]
    for groups in block_groups:
        for g in groups:
            feeds[g].append(groups[0])
    waits = [sorted(set(f), key=lambda c, g=g: (c != g, c)) for g, f in enumerate(feeds)]
    return waits if max(map(len, waits)) <= MAX_WAITS else None


def attention_partitions(cfg, num_sms: int, max_seq_len: int, page_size: int) -> int:
    """Partitions per KV head: nkv * P fills the SMs in one wave (never more than one
    wave, which would double the attention time), and never more than the pages."""
    max_pages = -(-max_seq_len // page_size)
    return max(1, min(num_sms // cfg.num_kv_heads, max_pages))


# Whole-context attention (build_program's whole_context_attention) reads every K/V row of
# the context in each of its blocks, where the split program's partitions read each row
# once and then pay the attention_reduce stage. On an H100 (benchmarks/RESULTS.md, entry
# 29) it was faster up to about 230 positions with head_dim 64 (llama-3.2-1b: 9-16 us per
# step against 16 partitions) and 70-130 with head_dim 128 (llama-3.2-3b, llama-3.1-8b;
# the more blocks, the earlier), slower beyond: 48 KB of K and V per block keeps inside
# both.
WHOLE_CONTEXT_KV_BYTES = 48 * 1024


def whole_context_limit(cfg, dtype_bytes: int = 2) -> int:
    """The positions [0, limit) that decode faster with whole-context attention."""
    return WHOLE_CONTEXT_KV_BYTES // (2 * cfg.head_dim * dtype_bytes)


# A layer's whole-context blocks each read their KV head's K and V rows of the whole
# context from L2: together at most this many bytes per token of context. On an H100
# (RESULTS entry 29) llama-3.1-8b ran 25-33 us per step faster with 64 blocks (64 x 512 B
# per token) than with 128 (128 x 512 B), while llama-3.2-1b's 128 blocks (128 x 256 B)
# tied with 64.
WHOLE_CONTEXT_L2_BYTES_PER_TOKEN = 32 * 1024


def whole_context_dim_slices(cfg, num_sms: int, dtype_bytes: int = 2) -> list[tuple[int, int]]:
    """(dim_begin, dim_count) of the output slices each query head's whole-context
    attention is cut into: whole 16-dim tiles (the tensor-core path's output rows), no
    more blocks than SMs, and within WHOLE_CONTEXT_L2_BYTES_PER_TOKEN."""
    tiles = cfg.head_dim // 16
    row_bytes = 2 * cfg.head_dim * dtype_bytes                  # one token's K and V row
    slices = min(tiles, num_sms // cfg.num_heads,
                 WHOLE_CONTEXT_L2_BYTES_PER_TOKEN // (cfg.num_heads * row_bytes))
    per_slice = -(-tiles // max(1, slices)) * 16
    return [(d, min(per_slice, cfg.head_dim - d)) for d in range(0, cfg.head_dim, per_slice)]


# The attention and o_proj stages move few bytes (o_proj is latency-bound), so the memory
# system has room under them: their instructions carry L2 prefetches of the same layer's
# gate_up weights (block b of either stage: gate_up block b; csrc/interpreter.cu:
# prefetch_carried), and gate_up, which streams at the device's limit, then finds part of
# its bytes in L2. Of each gate_up run (a block's gate rows, its up rows), gate_up's own
# hand-over prefetches the first HANDOVER_GATE_UP_BYTES; the attention blocks carry the
# next bytes of the gate run, EARLY_GATE_UP_L2_BYTES per layer over all of them, and as
# many of the up run counted back from its end; each o_proj block the next
# O_PROJ_GATE_UP_BYTES likewise. A warp reads a gate row with its up row, so one of the
# two is then in L2 and the other streams from memory: the memory stream runs all through
# gate_up instead of after its L2 reads. On an H100 (RESULTS entry 33, back-to-back steps
# at context 32): llama-3.2-1b's 128 attention blocks best at 96 KB per run (24 MB per
# layer; 128 and 160 KB less), 16 KB more under o_proj -10 us per step; llama-3.2-3b's 48
# blocks still gaining at 224 KB (21 MB), llama-3.1-8b's 64 at 192 KB (24 MB). More than
# the L2 keeps evicts bytes before gate_up reads them. The up rows from the end: -15 us
# per step on 1B, -20 on 3B, -35 on 8B.
HANDOVER_PREFETCH_BYTES = 64 * 1024    # the kernel's default prefetch_bytes (launcher.h)
HANDOVER_GATE_UP_BYTES = HANDOVER_PREFETCH_BYTES // 2   # per run: gate_up has two
EARLY_GATE_UP_L2_BYTES = 24 * 1024 * 1024
O_PROJ_GATE_UP_BYTES = 16 * 1024
# Past some context the attention streams enough K/V that the carried bytes slow it more
# than they save (llama-3.2-1b, split program: -26 us per step at 2048 tokens, -1 at 4096,
# +45 at 8000): no carried prefetch once a layer's K/V exceeds this.
EARLY_GATE_UP_MAX_KV_BYTES = 8 * 1024 * 1024


# Beyond early_gate_up_limit() the split program's attention streams its K/V, but its
# reduce stage (one block per query head) is latency-bound at every context, and so is
# o_proj where a block's weights fit the hand-over prefetch (its own bytes are then in L2
# or on their way before its wait ends: llama-3.2-1b's 64 KB blocks, not llama-3.2-3b's
# 144 KB or llama-3.1-8b's 256 KB). Those stages carry gate_up's prefetches instead ("late"
# carriers): reduce block h the LATE_REDUCE_GATE_UP_BYTES after the hand-over's share of
# each run of gate_up block h, then the o_proj blocks, where they may, the next
# LATE_O_PROJ_GATE_UP_BYTES of the blocks the reduce stage left, in order. On an H100
# (RESULTS entry 40, back-to-back steps against no carried prefetch): llama-3.2-1b -25 to
# -36 us per step from 4000 to 16000 tokens (reduce alone -11 to -18, o_proj alone -19 to
# -26); the reduce stage alone on llama-3.2-3b -12 to -14 at 4000, on llama-3.1-8b a tie;
# o_proj carriers there lose (3B +6, 8B +23 to +38).
LATE_REDUCE_GATE_UP_BYTES = 96 * 1024
LATE_O_PROJ_GATE_UP_BYTES = 48 * 1024

# Where o_proj's blocks fit the hand-over prefetch and the attention carries gate_up's
# bytes, those o_proj bytes land in L2 in the attention window too, beside the carried
# ones. The qkv stage leaves the memory system some room (its span is ~1.5x its bytes'
# time), so qkv block b carries the last QKV_O_PROJ_BYTES of o_proj block b: the half
# that the hand-over prefetch reaches last. On an H100 (RESULTS entry 41, back-to-back
# steps): llama-3.2-1b -2 to -5 us per step at context 32, -9 at 1024; the whole block
# (8 MB per layer) +5 to +8 at 32, -3 to -4 at 1024; past the early limit +6 at 8192
# tokens; on llama-3.2-3b and llama-3.1-8b, whose o_proj blocks stream, a tie at best
# (3B's last 16 KB of each block) and a loss otherwise (+23 to +150).
QKV_O_PROJ_BYTES = 32 * 1024


def early_gate_up_limit(cfg, dtype_bytes: int = 2) -> int:
    """The positions [0, limit) whose steps carry gate_up prefetches under the attention."""
    return EARLY_GATE_UP_MAX_KV_BYTES // (2 * cfg.kv_size * dtype_bytes)


def early_gate_up_ranges(run_bytes: int, attention_blocks: int) -> tuple[tuple[int, int], ...]:
    """([begin, end) of each gate_up run carried by an attention block, the same for an
    o_proj block), given the run's length and how many attention blocks carry one."""
    per_run = EARLY_GATE_UP_L2_BYTES // (2 * max(1, attention_blocks)) // 16384 * 16384
    attention_end = min(run_bytes, HANDOVER_GATE_UP_BYTES + per_run)
    o_proj_end = min(run_bytes, attention_end + O_PROJ_GATE_UP_BYTES)
    return (HANDOVER_GATE_UP_BYTES, attention_end), (attention_end, o_proj_end)


def carried_gate_up(layer: int, row_begin: int, row_count: int, row_bytes: int, begin: int,
                    end: int) -> L2Prefetch | None:
    """The L2 prefetch of bytes [begin, end) of a gate_up block's gate run (rows [row_begin,
    +row_count) of row_bytes each), cut at the run's end, and of as many bytes of its up
    run, as far from that run's end as they are from the hand-over's share; None when the
    run ends before `begin`."""
    run = row_count * row_bytes
    end = min(end, run)
    if end <= begin:
        return None
    skip = HANDOVER_GATE_UP_BYTES
    return L2Prefetch(RMS_GATE_UP_SILU.code, layer, row_begin, row_count, begin, end,
                      run - end + skip, run - begin + skip)


def decode_programs(max_seq_len: int, whole_context_positions: int,
                    early_gate_up_positions: int, split_partitions: int,
                    late_gate_up: bool = True):
    """The programs a backend decodes with, by the positions they serve: [(limit,
    whole_context_attention, early_gate_up, late_gate_up)] by rising limit; a position
    takes the first entry whose limit is above it (the last entry's at any other).
    Whole-context attention below whole_context_positions, unless the split program has
    one partition anyway (split_partitions: its attention_partitions()); then the split
    program with the early carried gate_up prefetches below early_gate_up_positions, and
    with the late ones (if late_gate_up) beyond."""
    early_end = min(early_gate_up_positions, max_seq_len)
    whole_end = min(whole_context_positions, max_seq_len) if split_partitions > 1 else 0
    plan = []
    if whole_end > 0:
        plan.append((whole_end, True, early_end >= whole_end, False))
    if whole_end < early_end < max_seq_len:
        plan.append((early_end, False, True, False))
    early = early_end >= max_seq_len
    return plan + [(max_seq_len, False, early, late_gate_up and not early)]


def build_program(cfg, num_sms: int, page_size: int, max_seq_len: int,
                  num_tokens: int = 1, dtype_bytes: int = 2,
                  whole_context_attention: bool = False,
                  early_gate_up: bool = True, late_gate_up: bool = False,
                  kv_group_waits: bool | None = None) -> Program:
    """Compile one decode step for `cfg` on a GPU with `num_sms` SMs.

    num_tokens is the number of tokens the step serves (1 for decode); max_seq_len bounds
    the context and so the attention partitions. early_gate_up: the attention and o_proj
    instructions carry L2 prefetches of gate_up's weights (for positions below
    early_gate_up_limit()), and where o_proj's blocks fit the hand-over prefetch the qkv
    instructions carry o_proj's; late_gate_up: the split program's reduce and, where their
    blocks fit the hand-over prefetch, o_proj instructions do (for positions beyond it).
    kv_group_waits: each attention block waits on its KV group's qkv blocks alone (None:
    from KV_GROUP_WAITS_MIN_HEAD_DIM up).
    """
    if num_sms < 1:
        raise ValueError("num_sms must be >= 1")
    if early_gate_up and late_gate_up:
        raise ValueError("early_gate_up and late_gate_up place the same prefetches: "
                         "choose one")
    L, H, I, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    T = num_tokens
    names: list[str] = []
    targets: list[int] = []
    instrs: list[Instruction] = []

    def counter(name: str) -> int:
        names.append(name)
        targets.append(0)
        return len(names) - 1

    def emit(spec, layer: int, waits, signal: int, block_index: int, **args):
        instrs.append(spec.make(layer=layer, waits=tuple(waits), signal=signal,
                                token_begin=0, token_count=T, block_index=block_index,
                                **args))
        targets[signal] += 1

    def done(c: int):
        """The wait that means: every producer of counter c has signalled this step."""
        return (c, targets[c])

    qkv_blocks = split_qkv(cfg, num_sms, H * dtype_bytes)
    if kv_group_waits is None:
        kv_group_waits = cfg.head_dim >= KV_GROUP_WAITS_MIN_HEAD_DIM
    qkv_groups = [qkv_block_kv_groups(cfg, *block) for block in qkv_blocks]
    # qkv_wait[g]: the groups whose counters the attention of KV group g waits on; None: one
    # counter for the whole qkv stage.
    qkv_wait = qkv_wait_groups(cfg, qkv_groups) if kv_group_waits else None
    parts = 1 if whole_context_attention else attention_partitions(cfg, num_sms, max_seq_len,
                                                                   page_size)
    slices = whole_context_dim_slices(cfg, num_sms, dtype_bytes)
    # o_proj, down_proj and the LM head pass two rows per warp (RowPairs); gate_up one
    # gate row with its up row.
    o_blocks = split_rows(H, num_sms, cfg.q_size * dtype_bytes, rows_per_pass=2)
    gu_blocks = split_rows(I, num_sms, 2 * H * dtype_bytes, loads_per_row=2)
    down_blocks = split_rows(H, num_sms, I * dtype_bytes, rows_per_pass=2)
    lm_blocks = split_rows(V, num_sms, H * dtype_bytes, rows_per_pass=2)

    attention_blocks = (cfg.num_heads * len(slices) if whole_context_attention
                        else cfg.num_kv_heads * parts)
    carried = early_gate_up_ranges(max(n for _, n in gu_blocks) * H * dtype_bytes,
                                   min(attention_blocks, len(gu_blocks)))

    # The late carriers: reduce block h carries gate_up block h, the o_proj blocks (if
    # theirs fit the hand-over prefetch) the blocks after those, in order.
    reduce_blocks = cfg.num_heads if parts > 1 else 0
    o_proj_carries = max(n for _, n in o_blocks) * cfg.q_size * dtype_bytes <= \
        HANDOVER_PREFETCH_BYTES
    qkv_carries = early_gate_up and o_proj_carries and carried[0][1] > carried[0][0]

    def o_proj_prefetch(layer: int, b: int) -> L2Prefetch | None:
        """What qkv block b prefetches while it runs: the last QKV_O_PROJ_BYTES of o_proj
        block b (see QKV_O_PROJ_BYTES)."""
        if not qkv_carries or b >= len(o_blocks):
            return None
        r0, n = o_blocks[b]
        run = n * cfg.q_size * dtype_bytes
        return L2Prefetch(O_PROJ_RESIDUAL.code, layer, r0, n, max(0, run - QKV_O_PROJ_BYTES),
                          run)

    def gate_up_prefetch(stage: str, layer: int, b: int) -> L2Prefetch | None:
        """What block b of `stage` ("attention", "reduce" or "o_proj") prefetches while it
        runs: a range of a gate_up block's gate run, and the bytes as far from the end of
        its up run as they are from the hand-over's share (early_gate_up_ranges() under
        the attention and o_proj; the late carriers above)."""
        if early_gate_up and stage != "reduce":
            begin, end = carried[0 if stage == "attention" else 1]
        elif late_gate_up and stage == "reduce":
            begin = HANDOVER_GATE_UP_BYTES
            end = begin + LATE_REDUCE_GATE_UP_BYTES
        elif late_gate_up and stage == "o_proj" and o_proj_carries:
            b += reduce_blocks
            begin = HANDOVER_GATE_UP_BYTES
            end = begin + LATE_O_PROJ_GATE_UP_BYTES
        else:
            return None
        if b >= len(gu_blocks):
            return None
        return carried_gate_up(layer, *gu_blocks[b], H * dtype_bytes, begin, end)

    c = counter("embed")
    emit(EMBED, 0, (), c, 0)
    prev = c
    # Layers 2 and on are layer 1 but for their layer number and counters (layer 0 differs
    # in waiting on the embed): emitted for layers 0 and 1, then copied (repeat_layer).
    for layer in range(min(L, 2)):
        if layer == 1:
            layer1_instruction, layer1_counter = len(instrs), len(names)
        if qkv_wait:
            c_qkv = [counter(f"L{layer}.qkv.kv{g}") for g in range(cfg.num_kv_heads)]
        else:
            c_qkv = [counter(f"L{layer}.qkv")] * cfg.num_kv_heads
        for b, (head, p0, n) in enumerate(qkv_blocks):
            emit(RMS_QKV_ROPE, layer, [done(prev)], c_qkv[qkv_groups[b][0]], b, head=head,
                 pair_begin=p0, pair_count=n, l2_prefetch=o_proj_prefetch(layer, b))

        def qkv_done(kv_head: int) -> list[tuple[int, int]]:
            """The waits of an attention block of kv_head on the qkv stage."""
            if not qkv_wait:
                return [done(c_qkv[0])]
            return [done(c_qkv[g]) for g in qkv_wait[kv_head]]
        c_attn = counter(f"L{layer}.attention")
        b = 0
        for kv_head in range(cfg.num_kv_heads):
            if whole_context_attention:
                # Every block computes its KV head's group (the tensor cores pad it to 8
                # heads anyway) and writes one head's slice of dims.
                for head in range(cfg.group_size):
                    for d0, nd in slices:
                        emit(ATTENTION_PARTIAL, layer, qkv_done(kv_head), c_attn, b,
                             kv_head=kv_head, partition=0, num_partitions=1, head_begin=head,
                             head_count=1, dim_begin=d0, dim_count=nd,
                             l2_prefetch=gate_up_prefetch("attention", layer, b))
                        b += 1
                continue
            for part in range(parts):
                emit(ATTENTION_PARTIAL, layer, qkv_done(kv_head), c_attn, b, kv_head=kv_head,
                     partition=part, num_partitions=parts, head_begin=0,
                     head_count=cfg.group_size, dim_begin=0, dim_count=cfg.head_dim,
                     l2_prefetch=gate_up_prefetch("attention", layer, b))
                b += 1
        attn_done = c_attn
        if parts > 1:     # one partition writes attn_out itself
            attn_done = counter(f"L{layer}.attention_reduce")
            for h in range(cfg.num_heads):
                emit(ATTENTION_REDUCE, layer, [done(c_attn)], attn_done, h, head_begin=h,
                     head_count=1, num_partitions=parts,
                     l2_prefetch=gate_up_prefetch("reduce", layer, h))
        c_o = counter(f"L{layer}.o_proj")
        for b, (r0, n) in enumerate(o_blocks):
            emit(O_PROJ_RESIDUAL, layer, [done(attn_done)], c_o, b, row_begin=r0, row_count=n,
                 l2_prefetch=gate_up_prefetch("o_proj", layer, b))
        c_gu = counter(f"L{layer}.gate_up")
        for b, (r0, n) in enumerate(gu_blocks):
            emit(RMS_GATE_UP_SILU, layer, [done(c_o)], c_gu, b, row_begin=r0, row_count=n)
        c_down = counter(f"L{layer}.down")
        for b, (r0, n) in enumerate(down_blocks):
            emit(DOWN_PROJ_RESIDUAL, layer, [done(c_gu)], c_down, b, row_begin=r0,
                 row_count=n)
        prev = c_down
    rows = [_encode(instrs)]
    if L > 2:
        layer_rows = _encode(instrs[layer1_instruction:])
        per_layer = len(names) - layer1_counter
        stages = [name.split(".", 1)[1] for name in names[layer1_counter:]]
        for layer in range(2, L):
            rows.append(repeat_layer(layer_rows, layer - 1, (layer - 1) * per_layer))
            names += [f"L{layer}.{stage}" for stage in stages]
            targets += targets[layer1_counter:layer1_counter + per_layer]
        prev += (L - 2) * per_layer
    tail = len(instrs)
    c_lm = counter("lm_head")
    for b, (r0, n) in enumerate(lm_blocks):
        emit(RMS_LM_HEAD, 0, [done(prev)], c_lm, b, row_begin=r0, row_count=n)
    c_arg = counter("argmax")
    emit(ARGMAX_REDUCE, 0, [done(c_lm)], c_arg, 0, num_blocks=len(lm_blocks))

    rows = torch.from_numpy(np.concatenate(rows + [_encode(instrs[tail:])]))
    f32 = torch.float32
    buffers = {
        "hidden": BufferSpec((T, H), f32),
        "q": BufferSpec((T, cfg.q_size), f32),
        "attn_partial_out": BufferSpec((T, cfg.num_heads, parts, cfg.head_dim), f32),
        "attn_partial_lse": BufferSpec((T, cfg.num_heads, parts), f32),
        "attn_out": BufferSpec((T, cfg.q_size), f32),
        "mlp_act": BufferSpec((T, I), f32),
        "logits": BufferSpec((T, V), f32),
        "argmax_value": BufferSpec((T, len(lm_blocks)), f32),
        "argmax_index": BufferSpec((T, len(lm_blocks)), torch.int32),
        "next_token": BufferSpec((T,), torch.int32),
    }
    return Program(config=cfg, num_sms=num_sms, num_tokens=T, page_size=page_size,
                   attn_partitions=parts, lm_head_blocks=len(lm_blocks), instructions=rows,
                   counter_names=names, counter_targets=targets, buffers=buffers,
                   dtype_bytes=dtype_bytes)


def _encode(instrs: list[Instruction]) -> np.ndarray:
    """Instructions as [len, WORDS] int32 rows."""
    return np.array([i.encode() for i in instrs], dtype=np.int32).reshape(-1, WORDS)


# The header words that name a counter: the two waits' and the signal's.
_COUNTER_WORDS = tuple(HEADER_FIELDS.index(f)
                       for f in ("wait0_counter", "wait1_counter", "signal_counter"))
_LAYER_WORD = HEADER_FIELDS.index("layer")
_PREFETCH_OPCODE_WORD = L2_PREFETCH_WORD + L2_PREFETCH_FIELDS.index("opcode")
_PREFETCH_LAYER_WORD = L2_PREFETCH_WORD + L2_PREFETCH_FIELDS.index("layer")


def move_counters(rows, offset) -> None:
    """Add `offset` (a number, or an array broadcast against rows[..., 0]) to every counter
    the encoded instructions `rows` (a numpy array or a torch tensor) wait on or signal, in
    place."""
    for w in _COUNTER_WORDS:
        column = rows[..., w]
        column += (column != NO_COUNTER) * offset


def repeat_layer(rows: np.ndarray, layers: int, counters: int) -> np.ndarray:
    """A copy of one layer's encoded instructions `layers` layers later, with every counter
    they wait on or signal `counters` later: their layer words, the layer of the weights
    their L2 prefetch carries and their counters moved, nothing else."""
    out = rows.copy()
    out[:, _LAYER_WORD] += layers
    move_counters(out, counters)
    carries = out[:, _PREFETCH_OPCODE_WORD] != 0
    out[carries, _PREFETCH_LAYER_WORD] += layers
    return out


def allocate_buffers(program: Program, device=None, poison: bool = True) -> dict[str, torch.Tensor]:
    """Allocate the program's activation buffers; float ones filled with NaN when poison,
    so a read of anything no instruction wrote shows up in the output."""
    out = {}
    for name, spec in program.buffers.items():
        if spec.dtype.is_floating_point and poison:
            out[name] = torch.full(spec.shape, math.nan, dtype=spec.dtype, device=device)
        else:
            out[name] = torch.zeros(spec.shape, dtype=spec.dtype, device=device)
    return out
