"""The decode step as ONE persistent CUDA kernel (csrc/interpreter.cu) interpreting the
compiled instruction stream; prefill goes through the torch per-op path into the same
paged KV cache.

Per decode step the host launches once and writes nothing to the device: the position is
a launch argument, and so is the token, as an int or as a pointer to the device int64 a
previous step left it in (the kernel reads it; no copy kernel runs between steps). The
kernel's dependency counters and queue head are never reset between steps: launch
`epoch` (1-based) waits for target * epoch. After an error the backend zeroes them and
restarts at epoch 1.

A launch may chain several greedy decode steps (decode_steps(); scheduler/chain.py):
each step's token is the argmax of the step before, chosen on the device, so the kernel's
start and the gap between launches are paid once for all of them. Sampled steps
(temperature, with top-k and top-p too) chain the same way, through programs that draw the
token on the device (scheduler.with_sampled_tokens), built at the first sampled request.

Errors cost no extra sync. The last block of every launch writes the (last step's) greedy
token, or -code after a fault, (a) into a ring of device result slots
(StepOutput.greedy_token is a view of this launch's slot, so a token read back after the
next launch is still its own) and (b) every step's token into a ring in mapped pinned host
memory, next to the error code (StepOutput.greedy_token_host, StepsOutput.tokens_host), so
the host reads a finished launch's tokens with no copy queued behind the kernel.
`backend.check_error()` reads host memory only; the full error record is read (one sync)
only when there is an error to report.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megakernel.errors import BackendUnavailableError, InvalidRequestError, KernelFaultError
from megakernel.instructions import OPCODES, Sampling
from megakernel.readback import DEFAULT_TIMEOUT_S as HOST_WAIT_TIMEOUT_S
from megakernel.readback import synchronize_or_raise

from .base import (MAX_STEPS_PER_LAUNCH, Backend, StepOutput, StepsOutput,
                   check_step_count)

DEFAULT_TIMEOUT_S = 1.0
# Greedy decode steps per launch by default (decode_steps(); Engine.generate). On an H100
# (benchmarks/RESULTS.md, entries 35 and 36), 1 against 8 steps, ms/token: llama-3.2-1b
# 0.999 / 0.999 at context 32, 1.004 / 0.997 at 128, 1.171 / 1.162 at 8192;
# llama-3.2-3b 2.475 / 2.471; llama-3.1-8b 5.412 / 5.397 (before entry 36's shared code,
# 1B: 1.022 / 1.010, and 16 steps 1.009). More steps gain little and stream tokens in
# larger bursts (and decode more past a stop token).
DEFAULT_STEPS_PER_LAUNCH = 8

# Buffers the kernel reads and writes, in the binding's argument order.
BUFFER_NAMES = ("hidden", "q", "attn_partial_out", "attn_partial_lse", "attn_out", "mlp_act",
                "logits", "argmax_value", "argmax_index", "next_token")
# The sampled programs' own buffers (scheduler.with_sampled_tokens), where they have them.
SAMPLING_BUFFER_NAMES = ("topk_values", "topk_ties", "topp_hist", "topp_state",
                         "sample_threshold")


def load_extension():
    """The compiled megakernel._C, or BackendUnavailableError with a one-line reason."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("megakernel backend needs CUDA, and torch sees no GPU")
    # Named before the import, so an unsupported GPU is reported as such even where the
    # extension was never built for it.
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        raise BackendUnavailableError(f"the megakernel needs an sm_90 GPU (H100/H200); this "
                                      f"GPU is sm_{major}{minor}")
    try:
        from megakernel import _C
    except ImportError as e:
        raise BackendUnavailableError(
            f"megakernel CUDA extension is not built ({e}); reinstall with nvcc available: "
            "pip install --no-build-isolation -e .") from None
    try:
        _C.check_device()
    except RuntimeError as e:
        raise BackendUnavailableError(str(e).splitlines()[0]) from None
    return _C


# Result slots in the ring StepOutput.greedy_token points into: the engine reads a step's
# token after launching the next one, so consecutive launches must use different slots.
# The kernel writes the same ring, MAX_STEPS_PER_LAUNCH tokens a slot, into host_status from
# word HOST_RESULT_WORD on (csrc/launcher.h: kHostResultWord, kHostResultSlots,
# kMaxLaunchSteps; checked in KernelState.create).
RESULT_SLOTS = 4
HOST_RESULT_WORD = 2


@dataclass
class KernelState:
    """Synchronization state of one program on the device (all int64).

    counters [num_counters]; queue [QUEUE_WORDS] (claims, finished blocks); error_record
    [ERROR_RECORD_WORDS]; results [RESULT_SLOTS]: greedy token or -error code, one slot per
    launch in turn; host_status [HOST_STATUS_WORDS] mapped pinned CPU memory (error code,
    epoch, then a ring of RESULT_SLOTS slots of every step's token). epoch: launches since
    the last reset (host side).
    """
    counters: torch.Tensor
    queue: torch.Tensor
    error_record: torch.Tensor
    results: torch.Tensor
    host_status: torch.Tensor
    epoch: int = 0

    @classmethod
    def create(cls, ext, num_counters: int, device) -> "KernelState":
        z = lambda n: torch.zeros(n, dtype=torch.int64, device=device)  # noqa: E731
        with torch.cuda.device(device):
            host_status = ext.alloc_host_status()
        ring = (getattr(ext, "HOST_RESULT_WORD", None), getattr(ext, "HOST_RESULT_SLOTS", None),
                getattr(ext, "MAX_LAUNCH_STEPS", None))
        if ring != (HOST_RESULT_WORD, RESULT_SLOTS, MAX_STEPS_PER_LAUNCH):
            raise RuntimeError(f"the extension's host result ring (word, slots, steps {ring}) "
                               "is not this module's: rebuild it")
        return cls(z(max(num_counters, 1)), z(ext.QUEUE_WORDS), z(ext.ERROR_RECORD_WORDS),
                   z(RESULT_SLOTS), host_status)

    @property
    def result(self) -> torch.Tensor:
        """[] int64 view of the last launch's result slot."""
        return self.results[(self.epoch - 1) % RESULT_SLOTS]

    @property
    def host_result(self) -> torch.Tensor:
        """[] int64 view of the last launch's (first step's) token in mapped host memory:
        valid once that launch has finished (an event recorded after it has completed)."""
        return self.host_tokens(1)[0]

    def host_tokens(self, steps: int) -> torch.Tensor:
        """[steps] int64 view of the last launch's tokens in mapped host memory, one per
        step: valid once that launch has finished."""
        first = HOST_RESULT_WORD + (self.epoch - 1) % RESULT_SLOTS * MAX_STEPS_PER_LAUNCH
        return self.host_status[first:first + steps]

    def host_error_code(self) -> int:
        """The error code the last finished launch wrote to host memory (no device sync)."""
        return int(self.host_status[0])

    def reset(self) -> None:
        """Zero counters, queue and error record and restart at epoch 1. Waits for the
        device first (bounded: DeviceHungError if it stays busy), so no running launch
        writes host_status after it is cleared."""
        synchronize_or_raise(self.counters.device, HOST_WAIT_TIMEOUT_S,
                             "the launches before a reset")
        for t in (self.counters, self.queue, self.error_record, self.results):
            t.zero_()
        self.host_status.zero_()
        self.epoch = 0


def _instruction_rows(instructions) -> torch.Tensor:
    if hasattr(instructions, "instructions"):        # a scheduler Program
        instructions = instructions.instructions
    if isinstance(instructions, torch.Tensor):
        return instructions.to(torch.int32)
    return torch.tensor([i.encode() for i in instructions], dtype=torch.int32)


def first_stuck_wait(rows: list[list[int]], counters: list[int], epoch: int):
    """(instruction, counter, target, seen) of the first instruction in stream order whose
    wait does not hold with the final counter values, or None.

    After a watchdog stop every instruction that could run has run, so this is the
    earliest broken dependency: the root cause, where the block that timed out first may
    be waiting downstream of it."""
    for i, row in enumerate(rows):
        for w in range(2):
            c, t = row[2 + 2 * w], row[3 + 2 * w]
            if c >= 0 and c < len(counters) and counters[c] < t * epoch:
                return i, c, t * epoch, counters[c]
    return None


def decode_error(ext, record: list[int], counter_names=None, timeout_s=None,
                 rows: list[list[int]] | None = None, counters: list[int] | None = None,
                 epoch: int | None = None) -> KernelFaultError:
    """KernelFaultError from the kernel's error record (list of int64 words).

    With the program's rows, the final counters and the epoch, a timeout also names the
    first stuck instruction of the stream (record["root"])."""
    w = ext.ERROR_WORDS
    code = record[w["code"]]
    kinds = {v: k for k, v in ext.ERROR_CODES.items()}
    opcode = record[w["opcode"]]
    counter = record[w["counter"]]
    rec = {
        "code": code,
        "kind": kinds.get(code, f"unknown({code})"),
        "instruction": record[w["instruction"]],
        "opcode": opcode,
        "opcode_name": OPCODES[opcode].name if opcode in OPCODES else f"opcode {opcode}",
        "layer": record[w["layer"]],
        "counter": counter,
        "counter_name": (counter_names[counter]
                         if counter_names and 0 <= counter < len(counter_names) else None),
        "seen": record[w["seen"]],
        "target": record[w["target"]],
        "block": record[w["block"]],
    }
    where = (f"instruction {rec['instruction']} ({rec['opcode_name']}, layer {rec['layer']}, "
             f"block {rec['block']})")
    def counter_label(c):
        return f"counter {c} ({counter_names[c]})" if counter_names and 0 <= c < len(
            counter_names) else f"counter {c}"

    if rec["kind"] == "timeout":
        limit = f" within {timeout_s:g} s" if timeout_s is not None else ""
        msg = (f"megakernel watchdog: {where} waited on {counter_label(counter)}: saw "
               f"{rec['seen']}, needed {rec['target']}{limit}")
        stuck = (first_stuck_wait(rows, counters, epoch)
                 if rows is not None and counters is not None and epoch else None)
        if stuck is not None:
            i, c, target, seen = stuck
            op = rows[i][0]
            rec["root"] = {
                "instruction": i, "opcode": op,
                "opcode_name": OPCODES[op].name if op in OPCODES else f"opcode {op}",
                "layer": rows[i][1], "counter": c,
                "counter_name": (counter_names[c]
                                 if counter_names and 0 <= c < len(counter_names) else None),
                "seen": seen, "target": target}
            if i != rec["instruction"]:
                msg += (f"; the first stuck instruction of the stream is {i} "
                        f"({rec['root']['opcode_name']}, layer {rows[i][1]}) waiting on "
                        f"{counter_label(c)}: {seen} of {target}")
    else:
        msg = (f"megakernel fault '{rec['kind']}' at {where}: value {rec['seen']}, "
               f"limit {rec['target']}")
    return KernelFaultError(msg, rec)


def launch(ext, rows: torch.Tensor, state: KernelState, buffers: dict, weights, k_cache,
           v_cache, page_table, step_input, rms_norm_eps: float,
           timeout_s: float = DEFAULT_TIMEOUT_S, profile: torch.Tensor | None = None,
           num_blocks: int = 0, prefetch_bytes: int | None = None, steps: int = 1,
           sampling: Sampling | None = None) -> None:
    """One launch of `rows` [N, 32] int32 on the current stream; advances state.epoch.

    buffers: the program's activations by name (scheduler.program.BUFFERS). step_input:
    [2, T] int32 device tensor (token ids, positions), or (token, position) for `steps`
    chained steps of a program built for them (scheduler.chain_steps), the first step's
    token an int or a one-element int64 tensor on the device that the kernel reads
    (nothing is written to the device before the launch). prefetch_bytes: L2 prefetch
    budget per instruction for the next instruction's weights (None: the extension's
    default). sampling: a Sampling (or its fields) for a program's sample_logits, top-k and
    top-p instructions (scheduler.with_sampled_tokens); None: they keep the greedy argmax.
    Mutates buffers, k_cache, v_cache and state. When the extension refuses the launch
    (RuntimeError from its argument checks) nothing ran and state.epoch stays: the
    counters and queue head count launches that ran, so the next launch still matches them.
    """
    epoch = state.epoch + 1
    w = weights
    slot = (epoch - 1) % RESULT_SLOTS
    token_source, token, position = None, 0, 0
    if isinstance(step_input, tuple):
        (token, position), step_input = step_input, None
        if isinstance(token, torch.Tensor):
            token_source, token = token, 0
    ext.launch(rows, state.counters, state.queue, state.error_record,
               state.results[slot:slot + 1], profile, state.host_status, step_input,
               *(buffers[n] for n in BUFFER_NAMES),
               w.embed, w.attn_norm, w.qkv, w.o_proj, w.mlp_norm, w.gate_up, w.down,
               w.final_norm, w.lm_head, w.rope_cos, w.rope_sin, k_cache, v_cache, page_table,
               float(rms_norm_eps), int(epoch), int(timeout_s * 1e9), int(num_blocks),
               int(ext.DEFAULT_PREFETCH_BYTES if prefetch_bytes is None else prefetch_bytes),
               token_source, int(token), int(position), int(steps),
               *((0.0, 0, 0, 1.0) if sampling is None else Sampling(*sampling)),
               *(buffers.get(name) for name in SAMPLING_BUFFER_NAMES))
    state.epoch = epoch


def run_program(instructions, *, weights, buffers: dict, k_cache, v_cache, page_table,
                token_ids, positions, num_counters: int, state: KernelState | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, counter_names=None,
                num_blocks: int = 0, prefetch_bytes: int | None = None,
                sampling: Sampling | None = None) -> KernelState:
    """Run a (possibly hand-made) instruction stream once and wait for it (sampling: as
    MachineState.sampling).

    instructions: a Program, an [N, 32] int32 tensor or a list of Instruction. buffers,
    k_cache, v_cache, page_table: device tensors as in MachineState (weights bf16 on the
    device). token_ids, positions: [T] sequences. Raises KernelFaultError (after resetting
    `state`) when the kernel reported an error. Returns the state for a further run.
    """
    ext = load_extension()
    device = buffers["hidden"].device
    rows = _instruction_rows(instructions).to(device).contiguous()
    if state is None:
        state = KernelState.create(ext, num_counters, device)
    step_input = torch.tensor([list(map(int, token_ids)), list(map(int, positions))],
                              dtype=torch.int32, device=device)
    launch(ext, rows, state, buffers, weights, k_cache, v_cache, page_table, step_input,
           weights.config.rms_norm_eps, timeout_s, num_blocks=num_blocks,
           prefetch_bytes=prefetch_bytes, sampling=sampling)
    record = state.error_record.tolist()
    if record[ext.ERROR_WORDS["code"]] != 0:
        err = decode_error(ext, record, counter_names, timeout_s, rows.tolist(),
                           state.counters.tolist(), state.epoch)
        state.reset()
        raise err
    return state


@dataclass
class ProgramRun:
    """A program and what its launches use: its instruction rows on the device, its
    activation buffers, kernel state (counters, epoch) and profile buffer."""
    program: object
    rows: torch.Tensor
    buffers: dict
    state: KernelState
    profile: torch.Tensor | None


class MegakernelBackend(Backend):
    """Decode through the persistent kernel; prefill through TorchBackend.

    weights: bf16 Weights on an sm_90 GPU; kv_cache: bf16 PagedKVCache on the same device;
    max_seq_len bounds positions and sets the attention partitions of the program built
    for this GPU's SM count (or pass `program`). timeout_s bounds every dependency wait
    inside the kernel. profile=True (MEGAKERNEL_PROFILE builds) records per-instruction
    timestamps (last_profile()). prefetch_bytes: L2 prefetch budget per instruction.
    whole_context_positions: positions below it decode with a second program whose
    attention covers the whole context in every block and needs no reduce stage (faster at
    short contexts); None takes the scheduler's whole_context_limit() for the model, 0
    never does. early_gate_up_positions: positions below it decode with programs whose
    attention and o_proj instructions prefetch gate_up's weights into L2; None takes the
    scheduler's early_gate_up_limit(), 0 never does. late_gate_up: the split program beyond
    them has its reduce stage (and o_proj, where its blocks are small) carry those
    prefetches instead; False: it carries none. kv_group_waits: each attention block waits
    on the qkv blocks of its KV group alone; None takes the scheduler's choice for the model
    (KV_GROUP_WAITS_MIN_HEAD_DIM). A given `program` is used at every position.
    prefill_mode: "torch" (default) runs the prompt through TorchBackend in chunks;
    "decode" runs it through the kernel one token at a time (slow for long prompts, but
    every K/V then comes from the same float32-activation math as the reference
    interpreter's, which token-exact comparisons need). steps_per_launch: greedy (or
    device-sampled: see decode_steps()) decode steps Engine.generate chains per launch, 1
    to MAX_STEPS_PER_LAUNCH.
    """
    name = "megakernel"

    def __init__(self, weights, kv_cache, max_seq_len: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 program=None, profile: bool = False, prefetch_bytes: int | None = None,
                 prefill_mode: str = "torch", whole_context_positions: int | None = None,
                 early_gate_up_positions: int | None = None, late_gate_up: bool = True,
                 kv_group_waits: bool | None = None,
                 steps_per_launch: int = DEFAULT_STEPS_PER_LAUNCH):
        super().__init__(weights, kv_cache)
        if prefill_mode not in ("torch", "decode"):
            raise ValueError(f"prefill_mode must be 'torch' or 'decode', got {prefill_mode!r}")
        check_step_count(steps_per_launch, "steps_per_launch")
        self.steps_per_launch = steps_per_launch
        self.prefill_mode = prefill_mode
        self.ext = ext = load_extension()
        if weights.device.type != "cuda" or kv_cache.device.type != "cuda":
            raise BackendUnavailableError("megakernel backend needs weights and KV cache on CUDA")
        if weights.dtype != torch.bfloat16 or kv_cache.k.dtype != torch.bfloat16:
            raise BackendUnavailableError(
                f"megakernel backend needs bf16 weights and KV cache, got {weights.dtype} / "
                f"{kv_cache.k.dtype}")
        from megakernel.scheduler import (attention_partitions, build_program,
                                          decode_programs, early_gate_up_limit,
                                          whole_context_limit)

        device = weights.device
        with torch.cuda.device(device):
            self.num_sms = ext.sm_count()
        self.max_seq_len = max_seq_len
        self.timeout_s = timeout_s
        self.prefetch_bytes = prefetch_bytes
        self.profiling = profile
        if profile and not ext.profiling_compiled():
            raise BackendUnavailableError(
                "profiling needs the extension built with MEGAKERNEL_PROFILE=1")
        self.launches = 0          # kernel launches so far (one per decode or decode_steps)
        self._prefill_backend = None
        if program is not None:
            self.load_program(program)
            return
        if whole_context_positions is None:
            whole_context_positions = whole_context_limit(self.config)
        if early_gate_up_positions is None:
            early_gate_up_positions = early_gate_up_limit(self.config)
        for name, value in (("whole_context_positions", whole_context_positions),
                            ("early_gate_up_positions", early_gate_up_positions)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

        def build(whole: bool, early: bool, late: bool):
            return build_program(self.config, num_sms=self.num_sms,
                                 page_size=kv_cache.page_size, max_seq_len=max_seq_len,
                                 dtype_bytes=2, whole_context_attention=whole,
                                 early_gate_up=early, late_gate_up=late,
                                 kv_group_waits=kv_group_waits)

        plan = decode_programs(max_seq_len, whole_context_positions, early_gate_up_positions,
                               attention_partitions(self.config, self.num_sms, max_seq_len,
                                                    kv_cache.page_size), late_gate_up)
        self._install([(limit, self._program_run(build(whole, early, late)))
                       for limit, whole, early, late in plan])
        # Chaining a program takes 10-40 ms of CPU per run on a 1B model: done here, not
        # inside the first generation's time to first token (benchmarks/RESULTS.md, 66).
        self.prepare()

    def _program_run(self, program) -> ProgramRun:
        from megakernel.scheduler import allocate_buffers

        if program.page_size != self.kv_cache.page_size:
            raise ValueError(f"program built for page_size {program.page_size}, the cache "
                             f"has {self.kv_cache.page_size}")
        device = self.weights.device
        profile = None
        if self.profiling:
            profile = torch.zeros((program.num_instructions, self.ext.PROFILE_WORDS),
                                  dtype=torch.int64, device=device)
        return ProgramRun(
            program=program,
            rows=program.instructions.to(device=device, dtype=torch.int32).contiguous(),
            buffers=allocate_buffers(program, device=device, poison=False),
            state=KernelState.create(self.ext, program.num_counters, device),
            profile=profile)

    def _install(self, runs: list) -> None:
        """runs: (position limit, ProgramRun) by rising limit; a position decodes with the
        first run whose limit is above it (the last run's at any other)."""
        self._runs = runs
        # The sampling runs (scheduler.with_sampled_tokens of a run's program, of a kind in
        # scheduler.sampling.KINDS) by (index in runs, kind), built at their first use.
        self._sampled: dict[tuple[int, str], ProgramRun] = {}
        # Chained runs by (index in runs, kind, steps), kind None for greedy. Per index and
        # kind, the longest chain built holds the instruction rows and activations; a
        # shorter one built after it (a generation's last launch) is a view of them with a
        # kernel state of its own.
        self._chains: dict[tuple[int, str | None, int], ProgramRun] = {}
        self._use(runs[0][1])

    def _all_runs(self) -> list[ProgramRun]:
        runs = ([run for _, run in self._runs] + list(self._sampled.values())
                + list(self._chains.values()))
        return list({id(run): run for run in runs}.values())

    def _use(self, run: ProgramRun) -> None:
        # program, rows, buffers, state and profile name the run of the last decode (before
        # any, the run of position 0).
        self.program, self.rows, self.buffers = run.program, run.rows, run.buffers
        self.state, self.profile = run.state, run.profile

    def load_program(self, program) -> None:
        """Decode every position with `program` (a scheduler Program for this model) from
        now on: new activation buffers and kernel state, epoch restarting at 1."""
        self._install([(self.max_seq_len, self._program_run(program))])

    def program_for(self, position: int):
        """The program that decodes a token at `position`."""
        return self._run_for(position).program

    def _run_index(self, position: int) -> int:
        return next((i for i, (limit, _) in enumerate(self._runs) if position < limit),
                    len(self._runs) - 1)

    def _step_run(self, index: int, kind: str | None) -> ProgramRun:
        """The one-step run of runs[index]: its program (kind None), or the same drawing
        its token (a scheduler.with_sampled_tokens kind)."""
        from megakernel.scheduler import with_sampled_tokens

        if kind is None:
            return self._runs[index][1]
        if (index, kind) not in self._sampled:
            self._sampled[(index, kind)] = self._program_run(
                with_sampled_tokens(self._runs[index][1].program, kind))
        return self._sampled[(index, kind)]

    def _run_for(self, position: int, steps: int = 1, kind: str | None = None) -> ProgramRun:
        """The run that decodes `steps` chained steps from `position` (their tokens drawn,
        unless kind is None: see _step_run): the program of the last step's position
        (whole-context attention serves a chain only when it serves every step of it),
        chained."""
        return self._chain_run(self._run_index(position + steps - 1), kind, steps)

    def _chain_run(self, index: int, kind: str | None, steps: int) -> ProgramRun:
        """The run of `steps` chained steps of runs[index] (kind: as _step_run), built at
        its first use."""
        from megakernel.scheduler import chain_steps

        step = self._step_run(index, kind)
        if steps == 1:
            return step
        key = (index, kind, steps)
        if key not in self._chains:
            longest = max((n for i, k, n in self._chains if (i, k) == (index, kind)),
                          default=0)
            if longest < steps:
                longest = max(steps, self.steps_per_launch)
                self._chains[(index, kind, longest)] = self._program_run(
                    chain_steps(step.program, longest))
            if key not in self._chains:
                self._chains[key] = self._prefix_run(self._chains[(index, kind, longest)],
                                                     steps)
        return self._chains[key]

    def prepare(self, sampling: Sampling | None = None) -> None:
        """Build now, for every position, the programs that decode_steps(..., sampling)
        launches for steps_per_launch steps (one step each when it is 1), so that no
        launch builds them. Greedy ones are built at construction."""
        from megakernel.scheduler import program_kind

        kind = program_kind(sampling)
        for index in range(len(self._runs)):
            self._chain_run(index, kind, self.steps_per_launch)

    def _prefix_run(self, full: ProgramRun, steps: int) -> ProgramRun:
        """The first `steps` steps of the chained run `full`: views of its rows, activations
        and profile, and a kernel state of its own (its counters count its own launches)."""
        from megakernel.scheduler import chain_prefix

        program = chain_prefix(full.program, steps)
        n = program.num_instructions
        return ProgramRun(
            program=program, rows=full.rows[:n],
            buffers={name: buffer[:steps] for name, buffer in full.buffers.items()},
            state=KernelState.create(self.ext, program.num_counters, self.weights.device),
            profile=None if full.profile is None else full.profile[:n])

    # Backend interface ------------------------------------------------------------------
    def prefill(self, token_ids: torch.Tensor, start_position: int) -> StepOutput:
        """Prompt tokens [T] through the torch per-op path (or, with prefill_mode="decode",
        through the kernel token by token), into the same paged KV cache."""
        if self.prefill_mode == "decode":
            ids = token_ids.to(self.weights.device).reshape(-1)
            out = None
            for i in range(ids.shape[0]):
                out = self.decode(ids[i], start_position + i)
            return out
        return self._prompt_backend().prefill(token_ids, start_position)

    @property
    def warm_up_tokens(self) -> int:
        return self._prompt_backend().warm_up_tokens if self.prefill_mode == "torch" else 0

    def prompt_positions(self, num_tokens: int) -> int:
        if self.prefill_mode == "torch":
            return self._prompt_backend().prompt_positions(num_tokens)
        return num_tokens

    def warm_up(self, num_tokens: int) -> torch.Tensor | None:
        if self.prefill_mode == "torch":
            return self._prompt_backend().warm_up(num_tokens)
        return None

    def capture_prompt_graphs(self, keep_positions: int = 0) -> tuple[int, bool]:
        if self._prefill_backend is None:
            return 0, False
        return self._prefill_backend.capture_prompt_graphs(keep_positions)

    def drop_pending_prompt_graphs(self) -> None:
        if self._prefill_backend is not None:
            self._prefill_backend.drop_pending_prompt_graphs()

    def _prompt_backend(self):
        if self._prefill_backend is None:
            try:
                from .torch_backend import TorchBackend
            except ImportError as e:
                raise BackendUnavailableError(f"prefill needs the torch backend: {e}") from None
            self._prefill_backend = TorchBackend(self.weights, self.kv_cache)
        return self._prefill_backend

    def decode(self, token_id, position: int) -> StepOutput:
        """One token ([] int64 on the device, or an int) at `position` through the kernel.

        Returns views valid until the next call: logits [V] float32 and greedy_token []
        int64, which is negative when the kernel faulted (see check_error)."""
        self._launch(token_id, position, 1)
        return StepOutput(logits=self.buffers["logits"][0], greedy_token=self.state.result,
                          greedy_token_host=self.state.host_result)

    chains_sampling = True     # scheduler.with_sampled_tokens: top-k and top-p too

    def decode_steps(self, token_id, position: int, steps: int,
                     sampling: Sampling | None = None) -> StepsOutput:
        """`steps` chained greedy steps in one launch from token_id ([] int64 on the device,
        or an int) at positions position..position + steps - 1; with a Sampling
        (inv_temperature, seed, top_k, top_p), each step's token is drawn on the device
        instead from softmax(logits * inv_temperature) over the top_k largest logits, the
        top_p nucleus of those (or all of them) (scheduler.with_sampled_tokens), the draw
        fixed by seed and position.

        Returns views valid until the next call with as many steps: logits [steps, V], the
        last step's token on the device, and every step's token in host memory (negative
        when the kernel faulted, see check_error)."""
        self._launch(token_id, position, steps, sampling)
        return StepsOutput(logits=self.buffers["logits"], last_token=self.state.result,
                           tokens_host=self.state.host_tokens(steps))

    def _launch(self, token_id, position: int, steps: int,
                sampling: Sampling | None = None) -> None:
        check_step_count(steps, "steps")
        limit = min(self.max_seq_len, self.weights.rope_cos.shape[0])
        if not 0 <= position <= position + steps - 1 < limit:
            where = f"position {position}" + (f" + {steps} steps" if steps > 1 else "")
            raise InvalidRequestError(f"{where} is outside [0, {limit})")
        if isinstance(token_id, torch.Tensor):
            # Read by the kernel where it lies (a previous step's result slot): converted
            # only when it is not already a device int64.
            token = token_id.reshape(-1)[:1].to(device=self.weights.device, dtype=torch.int64)
        else:
            # A token on the device is checked by the kernel (a fault, see check_error);
            # one from the host is checked here, before anything is queued.
            token = int(token_id)
            if not 0 <= token < self.config.vocab_size:
                raise InvalidRequestError(
                    f"token {token} is outside the vocabulary [0, {self.config.vocab_size})")
        from megakernel.scheduler import program_kind

        self._use(self._run_for(position, steps, program_kind(sampling)))
        launch(self.ext, self.rows, self.state, self.buffers, self.weights, self.kv_cache.k,
               self.kv_cache.v, self.kv_cache.page_table, (token, position),
               self.config.rms_norm_eps, self.timeout_s, self.profile,
               prefetch_bytes=self.prefetch_bytes, steps=steps, sampling=sampling)
        self.launches += 1

    def check_error(self, greedy_token: int | None = None) -> None:
        """Raise KernelFaultError if a finished launch stopped on an error, then reset.

        Reads only host memory (the code the kernel's last block wrote to mapped pinned
        memory), so it adds no sync: call it after reading a step's token. A launch still
        running is checked by the next call. greedy_token: optionally the token value just
        read; a negative one means that launch faulted. On error, the device is
        synchronized (bounded: DeviceHungError if it stays busy) and the full record is
        read."""
        faulted = [run for run in self._all_runs() if run.state.host_error_code() != 0]
        if not faulted and (greedy_token is None or greedy_token >= 0):
            return
        synchronize_or_raise(self.weights.device, HOST_WAIT_TIMEOUT_S,
                             "the launches after a fault")
        code = self.ext.ERROR_WORDS["code"]
        run = next((r for r in self._all_runs() if int(r.state.error_record[code]) != 0),
                   None)
        if run is None:
            self.reset()
            raise KernelFaultError(f"megakernel returned token {greedy_token} without an "
                                   "error record", {})
        err = decode_error(self.ext, run.state.error_record.tolist(),
                           run.program.counter_names, self.timeout_s,
                           run.program.instructions.tolist(), run.state.counters.tolist(),
                           run.state.epoch)
        self.reset()
        raise err

    def reset(self) -> None:
        """Zero every program's counters, queue head and error record (epochs restart at
        1)."""
        from megakernel.scheduler import clear_sampling_state

        for run in self._all_runs():
            run.state.reset()
            clear_sampling_state(run.buffers)
        if self._prefill_backend is not None:
            self._prefill_backend.reset()

    def last_profile(self) -> torch.Tensor | None:
        """[N, PROFILE_WORDS] int64 per-instruction record of the last launch (profile=True):
        SM id, block, opcode, layer, wait start, waits satisfied, end (ns), index, op
        finished, barrier after the op passed (ns); see profiling.KERNEL_PROFILE_FIELDS."""
        return self.profile


__all__ = ["MegakernelBackend", "KernelState", "ProgramRun", "run_program", "launch",
           "load_extension", "decode_error", "BUFFER_NAMES",
           "DEFAULT_STEPS_PER_LAUNCH"]
