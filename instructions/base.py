"""The instruction record and the machine state its reference semantics act on.

Every instruction is a fixed record of WORDS int32 words. The first HEADER_WORDS words
are common to all opcodes (what to wait on, what to signal, which tokens); the next ones
are named per opcode, in the order each opcode module lists them; the last
L2_PREFETCH_WORDS are again common: an optional L2 prefetch (L2Prefetch). This module is
the single definition of that layout: csrc/instruction_layout.h is generated from it
(codegen.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

WORDS = 32
MAX_WAITS = 2
NO_COUNTER = -1

# Header word names, in order. Waits are (counter index, target per step); a consumer of
# step `epoch` (1-based) waits until counter >= target * epoch, so counters grow
# monotonically across steps and never need a reset launch.
HEADER_FIELDS = (
    "opcode",
    "layer",
    "wait0_counter", "wait0_target",
    "wait1_counter", "wait1_target",
    "signal_counter",
    "token_begin",     # first token (row of the step's token batch) this instruction serves
    "token_count",     # tokens it serves; 1 for a decode step
    "block_index",     # index of this block among the opcode's blocks in the layer
)
HEADER_WORDS = len(HEADER_FIELDS)

# Trailer words, common to every opcode: an L2 prefetch of a later instruction's weights
# that the controller issues while this instruction runs (see L2Prefetch).
L2_PREFETCH_FIELDS = ("opcode", "layer", "row_begin", "row_count", "run0_begin", "run0_end",
                      "run1_begin", "run1_end")
L2_PREFETCH_WORDS = len(L2_PREFETCH_FIELDS)
L2_PREFETCH_WORD = WORDS - L2_PREFETCH_WORDS      # first trailer word
MAX_ARGS = L2_PREFETCH_WORD - HEADER_WORDS
# The first args of an op whose OpSpec streams_weight_rows, so the kernel finds them at the
# same words for every such op (instruction_layout.h: row_block).
ROW_BLOCK_ARGS = ("row_begin", "row_count")


@dataclass(frozen=True)
class L2Prefetch:
    """Bytes [run0_begin, run0_end) of the first weight run and [run1_begin, run1_end) of
    the second that the `opcode` instruction of `layer` over rows [row_begin, row_begin +
    row_count) would stream (gate_up: its gate rows, then its up rows; the other row-block
    ops have one run), prefetched into L2 by the controller while the carrying instruction
    runs; an empty range prefetches nothing. A hint: it changes no result, and the kernel
    skips one whose layer or rows are out of range. `opcode` must be one whose OpSpec
    streams_weight_rows."""
    opcode: int
    layer: int
    row_begin: int
    row_count: int
    run0_begin: int
    run0_end: int
    run1_begin: int = 0
    run1_end: int = 0

    def words(self) -> list[int]:
        spec = OPCODES.get(self.opcode)
        if spec is None or not spec.streams_weight_rows:
            raise ValueError(f"L2 prefetch of opcode {self.opcode}: only opcodes that stream "
                             f"weight rows ({', '.join(s.name for s in row_block_specs())})")
        ranges = ((self.run0_begin, self.run0_end), (self.run1_begin, self.run1_end))
        if (self.row_count < 1 or min(min(r) for r in ranges) < 0
                or all(end <= begin for begin, end in ranges)):
            raise ValueError(f"empty or negative L2 prefetch: {self}")
        return [self.opcode, self.layer, self.row_begin, self.row_count, self.run0_begin,
                self.run0_end, self.run1_begin, self.run1_end]


class ScheduleError(RuntimeError):
    """An instruction ran before the counters it waits on reached their targets."""


@dataclass
class Instruction:
    opcode: int
    layer: int = 0
    waits: tuple[tuple[int, int], ...] = ()
    signal: int = NO_COUNTER
    token_begin: int = 0
    token_count: int = 1
    block_index: int = 0
    args: dict[str, int] = field(default_factory=dict)
    l2_prefetch: L2Prefetch | None = None

    @property
    def spec(self) -> "OpSpec":
        return OPCODES[self.opcode]

    def encode(self) -> list[int]:
        spec = self.spec
        if len(self.waits) > MAX_WAITS:
            raise ValueError(f"{spec.name}: at most {MAX_WAITS} waits")
        if set(self.args) != set(spec.args):
            raise ValueError(f"{spec.name}: args {sorted(self.args)} != {sorted(spec.args)}")
        waits = list(self.waits) + [(NO_COUNTER, 0)] * (MAX_WAITS - len(self.waits))
        words = [self.opcode, self.layer, waits[0][0], waits[0][1], waits[1][0], waits[1][1],
                 self.signal, self.token_begin, self.token_count, self.block_index]
        words += [int(self.args[name]) for name in spec.args]
        words += [0] * (L2_PREFETCH_WORD - len(words))
        words += self.l2_prefetch.words() if self.l2_prefetch else [0] * L2_PREFETCH_WORDS
        return words

    @classmethod
    def decode(cls, words) -> "Instruction":
        words = [int(w) for w in words]
        spec = OPCODES[words[0]]
        waits = tuple((words[2 + 2 * i], words[3 + 2 * i]) for i in range(MAX_WAITS)
                      if words[2 + 2 * i] != NO_COUNTER)
        args = {name: words[HEADER_WORDS + i] for i, name in enumerate(spec.args)}
        trailer = words[L2_PREFETCH_WORD:]
        prefetch = L2Prefetch(*trailer) if trailer[0] != 0 else None
        return cls(opcode=words[0], layer=words[1], waits=waits, signal=words[6],
                   token_begin=words[7], token_count=words[8], block_index=words[9],
                   args=args, l2_prefetch=prefetch)

    def __str__(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.args.items())
        waits = ",".join(f"c{c}>={t}" for c, t in self.waits) or "-"
        text = (f"{self.spec.name:<20} L{self.layer:<3} wait[{waits}] signal c{self.signal} "
                f"{args}")
        if self.l2_prefetch:
            q = self.l2_prefetch
            text += (f" l2_prefetch={OPCODES[q.opcode].name} L{q.layer} rows {q.row_begin}"
                     f"+{q.row_count} bytes [{q.run0_begin}, {q.run0_end}) "
                     f"[{q.run1_begin}, {q.run1_end})")
        return text


class Sampling(NamedTuple):
    """How a launch draws each step's token: from softmax(logits * inv_temperature) over
    the top_k largest logits (0: over all of them), then over the top_p nucleus of those
    (1.0: all), as sampling.masked_scores applies them, with the Gumbel noise fixed by seed
    and the step's position (gumbel_noise)."""
    inv_temperature: float
    seed: int
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class MachineState:
    """Everything an instruction may read or write, as plain tensors.

    buffers: activations by name (see scheduler.program.BUFFERS); k_cache, v_cache:
    [L, num_pages, page_size, n_kv_heads, head_dim]; page_table: [batch, max_pages]
    int32; token_ids, positions: [T] int64, the step's tokens and their positions
    (token_ids may be shorter: in a launch of chained decode steps every later token is
    the greedy token of the step before, see embed.py); counters: [num_counters] int64;
    epoch: 1-based launch number the counters count in.
    """
    config: object
    weights: object
    buffers: dict[str, torch.Tensor]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    counters: torch.Tensor
    epoch: int = 1
    # A launch that samples: sample_logits draws each step's token (gumbel_noise), among
    # the logits at or above sample_threshold with top-k or top-p; None: greedy.
    sampling: Sampling | None = None

    def check_waits(self, instr: Instruction) -> None:
        for counter, target in instr.waits:
            seen = int(self.counters[counter])
            if seen < target * self.epoch:
                raise ScheduleError(
                    f"{instr.spec.name} (layer {instr.layer}, block {instr.block_index}) ran "
                    f"with counter {counter} at {seen} < {target * self.epoch}")

    def ready(self, instr: Instruction) -> bool:
        return all(int(self.counters[c]) >= t * self.epoch for c, t in instr.waits)

    def signal(self, instr: Instruction) -> None:
        if instr.signal != NO_COUNTER:
            self.counters[instr.signal] += 1


@dataclass(frozen=True)
class OpSpec:
    """One opcode: its number, argument names, reference semantics and cost model.

    reference(instr, state) performs the op on MachineState (waits and signal are done by
    the interpreter around it). cost(instr, config, dtype_bytes) returns the bytes of
    device memory the op must move (weights read once + activations + KV).
    streams_weight_rows: the op streams rows [row_begin, row_begin + row_count) of its
    layer's weight matrix (its first two args), so an L2Prefetch can name its weights.
    """
    name: str
    code: int
    args: tuple[str, ...]
    reference: Callable[[Instruction, MachineState], None]
    cost: Callable[[Instruction, object, int], int]
    doc: str = ""
    streams_weight_rows: bool = False

    def __post_init__(self):
        if len(self.args) > MAX_ARGS:
            raise ValueError(f"{self.name}: too many args")
        if self.streams_weight_rows and self.args[:len(ROW_BLOCK_ARGS)] != ROW_BLOCK_ARGS:
            raise ValueError(f"{self.name}: a weight-row op's first args are "
                             f"{', '.join(ROW_BLOCK_ARGS)}")

    def make(self, **kw) -> Instruction:
        args = {k: kw.pop(k) for k in self.args}
        return Instruction(opcode=self.code, args=args, **kw)


OPCODES: dict[int, OpSpec] = {}


def row_block_specs() -> list[OpSpec]:
    """The opcodes an L2Prefetch can name, by opcode number."""
    return [OPCODES[c] for c in sorted(OPCODES) if OPCODES[c].streams_weight_rows]


def register(spec: OpSpec) -> OpSpec:
    if spec.code in OPCODES:
        raise ValueError(f"opcode {spec.code} registered twice")
    OPCODES[spec.code] = spec
    return spec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H] float32 -> x / rms(x) * weight, in float32 (the kernel's precision)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


_MASK64 = (1 << 64) - 1


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """mix64 of csrc/ops/sample_logits.cuh on int64 tensors holding uint64 bit patterns:
    additions and multiplications wrap the same way; right shifts are made logical by a
    mask."""
    def shr(x, k):
        return (x >> k) & ((1 << (64 - k)) - 1)

    def wrap(c):     # a uint64 constant as the int64 with the same bits
        return c - (1 << 64) if c >= 1 << 63 else c

    z = z + wrap(0x9E3779B97F4A7C15)
    z = (z ^ shr(z, 30)) * wrap(0xBF58476D1CE4E5B9)
    z = (z ^ shr(z, 27)) * wrap(0x94D049BB133111EB)
    return z ^ shr(z, 31)


def gumbel_noise(seed: int, position: int, rows: torch.Tensor) -> torch.Tensor:
    """The kernel's Gumbel noise for vocabulary rows [n] at a step's position (float32):
    -log(-log(u)) with u in (0, 1) on 24 bits from a hash of (seed, position, row), so the
    argmax of logits / temperature + noise is a draw from softmax(logits / temperature)."""
    seed_bits = seed & _MASK64
    seed_int = seed_bits - (1 << 64) if seed_bits >= 1 << 63 else seed_bits
    key = (torch.full_like(rows, position, dtype=torch.int64) << 32) | rows.to(torch.int64)
    h = _mix64(seed_int ^ _mix64(key))
    top24 = (h >> 40) & 0xFFFFFF
    u = (top24.to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def kv_slot(state: MachineState, position: int) -> tuple[int, int]:
    """(page, offset in page) of a token position of sequence 0 in the paged cache."""
    page_size = state.k_cache.shape[2]
    return int(state.page_table[0, position // page_size]), position % page_size
