"""What the dev scripts share: a model preset with seeded random bf16 weights, a paged KV
cache reserved to its length and the megakernel backend over them; the time of
back-to-back decode steps; the kernel profile of one step; and the device time of a call."""
import torch

import megakernel.scheduler.program as program_module
from megakernel.backends.megakernel_backend import MegakernelBackend
from megakernel.kv_cache import PagedKVCache
from megakernel.presets import PRESETS, random_weights
from megakernel.profiling import KERNEL_PROFILE_FIELDS
from megakernel.readback import synchronize_or_raise, wait_or_raise


# Bound on waiting for a batch of steps: a launch that never ends (say a kernel deadlocked
# in a barrier, which no watchdog ends) stops the script instead of hanging it.
STEPS_TIMEOUT_S = 120.0
PROFILE_END_NS = KERNEL_PROFILE_FIELDS["end_ns"]   # zero in the records of rows that never ran


def wait_for(event: torch.cuda.Event, what: str) -> None:
    """event.synchronize(), bounded by STEPS_TIMEOUT_S (DeviceHungError past it)."""
    wait_or_raise(event, STEPS_TIMEOUT_S, what)


def wait_for_device(what: str) -> None:
    """torch.cuda.synchronize() for the current stream, bounded by STEPS_TIMEOUT_S."""
    synchronize_or_raise("cuda", STEPS_TIMEOUT_S, what)


def program_with(cfg, num_sms: int, max_len: int, replaced: dict, **build_kw):
    """build_program (page size 16) with functions of scheduler.program replaced for this
    one build, e.g. {"attention_partitions": lambda *args: 1}."""
    originals = {name: getattr(program_module, name) for name in replaced}
    for name, fn in replaced.items():
        setattr(program_module, name, fn)
    try:
        return program_module.build_program(cfg, num_sms=num_sms, page_size=16,
                                            max_seq_len=max_len, **build_kw)
    finally:
        for name, fn in originals.items():
            setattr(program_module, name, fn)


def random_backend(model: str, max_len: int = 1024, **backend_kw):
    """(config, MegakernelBackend) for preset `model`: weights seed 0, cache page size 16
    with all max_len positions reserved; backend_kw go to the backend (max_seq_len
    defaults to max_len)."""
    cfg = PRESETS[model]
    weights = random_weights(cfg, seed=0, dtype=torch.bfloat16, device="cuda",
                             max_positions=max_len)
    cache = PagedKVCache(cfg, max_len, page_size=16, dtype=torch.bfloat16, device="cuda")
    cache.reserve(max_len)
    backend_kw.setdefault("max_seq_len", max_len)
    return cfg, MegakernelBackend(weights, cache, **backend_kw)


def back_to_back_ms(mk, pending, first_position: int, steps: int, warmup: int = 8):
    """ms/token of `steps` decode steps launched back to back (each step's token fed on the
    device), after `warmup` untimed ones from `first_position`; and the last token."""
    for pos in range(first_position, first_position + warmup):
        pending = mk.decode(pending, pos).greedy_token
    wait_for_device("the warm-up steps")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    timed = first_position + warmup
    start.record()
    for pos in range(timed, timed + steps):
        pending = mk.decode(pending, pos).greedy_token
    end.record()
    wait_for(end, "the timed steps")
    return start.elapsed_time(end) / steps, pending


def chained_ms(mk, steps: int, launches: int, context: int = 32, warmup: int = 2) -> float:
    """ms per step of `launches` back-to-back launches of `steps` chained greedy steps
    (decode_steps()) from position `context`, after `warmup` untimed ones."""
    token, position = torch.tensor(1, device=mk.weights.device), context
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(warmup + launches):
        if i == warmup:
            start.record()
        token = mk.decode_steps(token, position, steps).last_token
        position += steps
    end.record()
    wait_for(end, "the timed launches")
    mk.check_error()
    return start.elapsed_time(end) / (launches * steps)


def chained_profiles(mk, steps: int, launches: int, context: int = 32, warmup: int = 2):
    """The kernel profile (all rows, as numpy) of each of `launches` launches of `steps`
    chained greedy steps from position `context`, after `warmup` unrecorded ones, on a
    profiling backend (random_backend(..., profile=True), MEGAKERNEL_PROFILE build)."""
    token, position, profiles = torch.tensor(1, device=mk.weights.device), context, []
    for i in range(warmup + launches):
        token = mk.decode_steps(token, position, steps).last_token
        position += steps
        if i >= warmup:
            wait_for_device("the profiled launch")
            mk.check_error()
            profiles.append(mk.last_profile().cpu().numpy().copy())
    return profiles


def profiled_step(mk, position: int):
    """One decode step at `position` on a profiling backend (random_backend(...,
    profile=True), MEGAKERNEL_PROFILE build): its kernel profile records, as a numpy array
    [instructions that ran, PROFILE_WORDS]."""
    mk.decode(torch.tensor(1, device=mk.weights.device), position)
    wait_for_device("the profiled step")
    mk.check_error()
    raw = mk.last_profile().cpu().numpy().copy()
    return raw[raw[:, PROFILE_END_NS] > 0]


def program_times(mk, program, contexts, steps: int = 64):
    """Load `program` into backend `mk` and time `steps` back-to-back decode steps from each
    context: [(context, ms/token, last token)]."""
    mk.load_program(program)
    out = []
    for context in contexts:
        ms, token = back_to_back_ms(mk, torch.tensor(1, device=mk.weights.device), context,
                                    steps)
        mk.check_error()
        out.append((context, ms, int(token)))
    return out


def format_times(times) -> str:
    """program_times() as 'context: ms, ...'."""
    return ", ".join(f"{context}: {ms:.4f}" for context, ms, _ in times)


def device_us(fn, calls: int = 200) -> float:
    """Mean device time of fn() in microseconds, over `calls` calls after a warm-up."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls
