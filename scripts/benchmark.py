"""Decode benchmark: the megakernel against per-op PyTorch and Hugging Face transformers.

One process, one device, one copy of the weights and one prompt for every backend:

    megakernel     the persistent CUDA kernel (Engine, backend 'megakernel')
    torch          per-op PyTorch, eager launches (Engine, backend 'torch')
    torch-graph    the same per-op decode step captured in one CUDA graph, replayed per step
    torch-compile  that step through torch.compile, then captured in one CUDA graph
    hf             transformers LlamaForCausalLM.generate, eager, on the same weights
    reference      the CPU interpreter of the instruction stream (CPU runs only)

    python scripts/benchmark.py                                   # 1B, 32 + 128 tokens
    python scripts/benchmark.py --context-sweep 128,1024,4096,16384 --plot sweep.png
    python scripts/benchmark.py --backends megakernel --profile out/profile
    python scripts/benchmark.py --backends megakernel,torch-compile --steps-per-launch 1,8

Timing: every backend runs two untimed warm-ups per context (the engine captures a prompt
length's CUDA graph after the first generation that prefills that length, so every timed
prefill replays it), then --repeats timed runs, interleaved across backends so drift hits
all alike. A run is the engine's own greedy loop (torch-graph / torch-compile: a copy of it
around the graph replay; hf: transformers' own generate loop, stamped by a streamer):
prefill, then the decode steps, argmax on the device, one host read per launch (the
megakernel chains --steps-per-launch greedy steps in one launch; the others run one step
per launch). TTFT is prompt in -> first token on the host; ms/token is (end - first
token) / (new tokens - 1), the clock read after a device synchronize. Bytes per token =
the weights a step must read (ModelConfig.weight_bytes_per_token) + K/V of the mean
context over the timed steps; the floor is those bytes at the faster of two probes timed
in the same process, a device-to-device copy (read + write bytes counted) and a read-only
stream (the extension's bulk-copy reads; a sum where it is not built). Without a GPU the
script runs the torch / reference / hf paths on random:tiny and names every backend it
skipped, with the reason.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

import megakernel
from megakernel.backends.base import check_step_count
from megakernel.engine import Engine, make_backend, megakernel_available
from megakernel.errors import InvalidRequestError
from megakernel.instructions import OPCODES
from megakernel.kv_cache import PagedKVCache
from megakernel.loading import RANDOM_PREFIX, load_model, save_pretrained
from megakernel.presets import PRESETS
from megakernel.readback import (DEFAULT_TIMEOUT_S, TokenReadback, synchronize_or_raise,
                                 synchronize_within, wait_or_raise)

ALL_BACKENDS = ("megakernel", "torch", "torch-graph", "torch-compile", "hf", "reference")
# Baselines every row is compared against (when they ran), with their table headers.
BASELINES = {"torch": "x torch", "torch-graph": "x graph", "torch-compile": "x compile",
             "hf": "x hf"}
GPU_DEFAULT_MODEL = "random:llama-3.2-1b"
CPU_DEFAULT_MODEL = "random:tiny"
DEFAULT_PAGE_SIZE = 16
# Bytes of each side of the copy probe (the read probe reads both sides): far beyond L2
# (50 MB on H100), so the probes stream HBM; on the CPU, small enough to keep tests fast.
PROBE_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
PROBE_ITERS = {"cuda": 20, "cpu": 5}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Command line -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"random:<preset> ({', '.join(PRESETS)}), a bare preset name, a "
                        f"checkpoint dir or hub id (default: {GPU_DEFAULT_MODEL} on a GPU, "
                        f"{CPU_DEFAULT_MODEL} without one)")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS),
                   help="comma list from: " + ", ".join(ALL_BACKENDS) + " (default: all; "
                        "those that cannot run here are reported as skipped)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens generated per run, EOS ignored (default 128)")
    p.add_argument("--context-sweep", default=None,
                   help="comma list of context lengths, e.g. 128,1024,4096,16384: for each, "
                        "prefill that many tokens, then time --new-tokens decode steps "
                        "(replaces --prompt-len)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per backend and "
                   "context (default 5; the median is reported)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed runs first (default 2; the first is followed by the "
                        "capture of the prompt's graph)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: "
                   "bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    p.add_argument("--steps-per-launch", default=None, metavar="N[,N...]",
                   help="greedy decode steps the megakernel chains per launch (default: the "
                        "backend's); several values time one megakernel row each, named "
                        "megakernel-sN")
    p.add_argument("--seed", type=int, default=0, help="weights seed (random: models) and "
                   "prompt seed")
    p.add_argument("--no-fp32-reference", action="store_true",
                   help="skip the float32 greedy run that low-precision backends' tokens are "
                        "also compared with")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of ms/token vs context per backend (needs matplotlib)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write per-instruction timelines of one decode step to DIR: "
                        "measured (megakernel built with MEGAKERNEL_PROFILE=1; the middle "
                        "step of one launch, at --steps-per-launch when it names one value) "
                        "and modeled (program cost model at the measured floor bandwidth)")
    return p


def _parse_backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in ALL_BACKENDS]
    if unknown:
        raise SystemExit(f"benchmark.py: unknown backend(s) {', '.join(unknown)} "
                         f"(choose from {', '.join(ALL_BACKENDS)})")
    if not names:
        raise SystemExit("benchmark.py: --backends is empty")
    return list(dict.fromkeys(names))


def _parse_steps(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"benchmark.py: --steps-per-launch must be integers, got "
                         f"'{text}'") from None
    if not steps:
        raise SystemExit("benchmark.py: --steps-per-launch is empty")
    for s in steps:
        try:
            check_step_count(s, "--steps-per-launch")
        except InvalidRequestError as e:
            raise SystemExit(f"benchmark.py: {e}") from None
    return list(dict.fromkeys(steps))


def _parse_contexts(args) -> list[int]:
    if args.context_sweep is None:
        contexts = [args.prompt_len]
    else:
        try:
            contexts = [int(c) for c in args.context_sweep.split(",") if c.strip()]
        except ValueError:
            raise SystemExit(f"benchmark.py: --context-sweep must be integers, got "
                             f"'{args.context_sweep}'") from None
    if not contexts or min(contexts) < 1:
        raise SystemExit("benchmark.py: context lengths / --prompt-len must be >= 1")
    return contexts


def _model_spec(model: str | None, device: torch.device) -> str:
    if model is None:
        return GPU_DEFAULT_MODEL if device.type == "cuda" else CPU_DEFAULT_MODEL
    if model in PRESETS and not os.path.exists(model):
        return RANDOM_PREFIX + model
    return model


# Environment ------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """Device, driver, library versions and the git commit the numbers belong to."""
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "megakernel": megakernel.__version__, "git_commit": _git_commit()}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 1e9, 1),
                   compute_capability=f"{props.major}.{props.minor}",
                   cuda_runtime=torch.version.cuda, driver=_driver_version())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine(),
                   cpu_threads=torch.get_num_threads())
    return env


def _git_commit() -> str:
    # A copy of the tree without .git (e.g. shipped to a GPU machine) can name its commit.
    if os.environ.get("MEGAKERNEL_GIT_COMMIT"):
        return os.environ["MEGAKERNEL_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=False)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                                check=False)
        dirty = "+local changes" if status.stdout.strip() else ""
        return head.stdout.strip() + dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is not None:
        try:
            out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        v = torch._C._cuda_getDriverVersion()       # CUDA driver API version, e.g. 13000
        return f"CUDA driver API {v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return None


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, bounded: a launch that never ends is an error."""
    synchronize_or_raise(device, DEFAULT_TIMEOUT_S, "its work")


def _median_probe_ms(device: torch.device, fn, iters: int) -> float:
    """Median time of fn() in ms over iters runs, after two untimed ones."""
    times = []
    for i in range(iters + 2):                   # the first two are warm-up
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            wait_or_raise(end, DEFAULT_TIMEOUT_S, "a bandwidth probe")
            ms = start.elapsed_time(end)
        else:
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
        if i >= 2:
            times.append(ms)
    return statistics.median(times)


def measure_bandwidth(device: torch.device) -> dict:
    """Two probes on a buffer far beyond L2: a device-to-device copy (read + write bytes
    counted) and a read-only one (the extension's bulk-copy reads where it is built, the
    fastest way this device was seen to read, benchmarks/RESULTS.md entry 42; else a
    float32 sum). A decode step reads its bytes, so its floor is at the faster of the two:
    the best rate this device was seen to move bytes at in this run."""
    nbytes = PROBE_BYTES[device.type]
    iters = PROBE_ITERS[device.type]
    # The copy's two sides are the halves of one buffer that the read probe reads whole:
    # the longer the stream, the less its start and end weigh in its rate.
    both = torch.empty(2 * nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    src, dst = both[:nbytes // 4], both[nbytes // 4:]
    copy_ms = _median_probe_ms(device, lambda: dst.copy_(src), iters)
    if device.type == "cuda" and megakernel_available()[0]:
        from megakernel import _C
        read_bytes = _C.read_probe(both)
        read_ms = _median_probe_ms(device, lambda: _C.read_probe(both), iters)
        what = "bulk copies into shared memory, one block per SM, read only"
    else:
        read_bytes = 2 * nbytes
        read_ms = _median_probe_ms(device, lambda: both.sum(), iters)
        what = f"{device.type} float32 sum, read only"
    copy = {"bytes_each_side": nbytes, "median_ms": copy_ms,
            "bytes_per_s": 2 * nbytes / (copy_ms / 1e3),
            "what": f"{device.type} copy, read + write"}
    read = {"bytes": read_bytes, "median_ms": read_ms,
            "bytes_per_s": read_bytes / (read_ms / 1e3), "what": what}
    floor_probe = "read" if read["bytes_per_s"] >= copy["bytes_per_s"] else "copy"
    return {"copy": copy, "read": read, "floor_probe": floor_probe,
            "floor_bytes_per_s": max(copy["bytes_per_s"], read["bytes_per_s"])}


# Runs -------------------------------------------------------------------------------------

@dataclass
class RunResult:
    tokens: list[int]
    ttft_ms: float
    ms_per_token: float


class SkipBackend(Exception):
    """This backend cannot run here; the message says why."""


class Runner:
    """One backend: prepare(context) once per context length, then run() per repeat."""
    name = "?"
    notes: list[str]

    def prepare(self, context: int, new_tokens: int) -> None:
        pass

    def run(self, prompt: list[int], new_tokens: int) -> RunResult:
        raise NotImplementedError

    def release(self) -> None:
        """Free per-context device state (graphs, compiled code)."""


class EngineRunner(Runner):
    """megakernel / torch / reference through Engine.generate, timed by its own stats."""

    def __init__(self, name, weights, tokenizer, max_seq_len, page_size, seed,
                 label: str | None = None, **options):
        self.name = label or name
        self.notes = []
        kv = PagedKVCache(weights.config, max_seq_len=max_seq_len, page_size=page_size,
                          dtype=weights.dtype, device=weights.device)
        backend = make_backend(name, weights, kv, max_seq_len, **options)
        if backend.steps_per_launch > 1:
            self.notes.append(f"{backend.steps_per_launch} greedy steps per launch")
        self.engine = Engine(weights, tokenizer, backend, kv, max_seq_len, seed)

    def run(self, prompt, new_tokens):
        r = self.engine.generate(prompt, max_new_tokens=new_tokens, temperature=0.0,
                                 ignore_eos=True)
        return RunResult(r.token_ids, r.stats.ttft_ms, r.stats.ms_per_token)


class GraphRunner(Runner):
    """The torch backend's decode step for one token, captured in one CUDA graph per
    context length (context_len fixed at the reserved length, device-side token and
    position), optionally through torch.compile first. The greedy loop mirrors
    Engine.generate: the next step is launched before the previous token is read, and
    that read waits for the previous step only (TokenReadback)."""

    def __init__(self, name, weights, max_seq_len, page_size, compile_model: bool):
        self.name = name
        self.notes = []
        self.compile = compile_model
        self.weights = weights
        self.device = weights.device
        self.page_size = page_size
        self.kv = self.backend = None
        self.max_seq_len = max_seq_len
        # Static step inputs/outputs: token [1], position [1], and the token produced at
        # each position, so a step's output survives the next replay until it is read.
        self.token = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.position = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.produced = torch.zeros(max_seq_len + 1, dtype=torch.int64, device=self.device)
        self.graph = None
        self.setup_s: dict[int, float] = {}

    def prepare(self, context, new_tokens):
        self.release()
        reserved = min(context + new_tokens + 1, self.max_seq_len)
        self.new_cache(reserved)
        t = time.perf_counter()
        try:
            self.graph = self._capture(self.make_step(reserved))
        except Exception as e:
            if not self.compile:
                raise
            # Compile-then-capture failed on this torch: let torch.compile manage the CUDA
            # graphs itself (cudagraph trees); K/V and weights are marked static so their
            # in-place updates do not make it fall back to plain launches.
            first = _one_line(e)
            self.release()
            step = self.make_step(reserved, mode="reduce-overhead")
            self.position.zero_()
            for _ in range(3):
                step()
            torch.cuda.synchronize(self.device)
            self.graph = _Replay(step)
            note = f"compile-then-capture failed ({first}); used mode='reduce-overhead'"
            if note not in self.notes:
                self.notes.append(note)
        self.setup_s[context] = time.perf_counter() - t

    def new_cache(self, reserved: int) -> None:
        """A KV pool of `reserved` positions, all reserved, and a torch backend on it. Sized
        per context: inductor may write the whole pool back after its in-place K/V update,
        and that copy must not grow with the sweep's largest context."""
        from megakernel.backends.torch_backend import TorchBackend

        self.kv = self.backend = None
        self.kv = PagedKVCache(self.weights.config, max_seq_len=reserved,
                               page_size=self.page_size, dtype=self.weights.dtype,
                               device=self.device)
        self.kv.reserve(reserved)
        self.backend = TorchBackend(self.weights, self.kv)

    def _capture(self, step) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (compiles, sets up cuBLAS workspaces) as capture requires.
        # The steps write K/V at positions 0..2, which every run's prefill overwrites.
        self.position.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize(self.device)
        return graph

    def make_step(self, context_len: int, mode: str | None = None):
        """The function the graph captures: one greedy decode step at the device-side
        position, leaving its token in produced[position] and token, then position += 1.
        With torch-compile the step is compiled (mode: torch.compile's mode)."""
        backend, token, position, produced = self.backend, self.token, self.position, self.produced

        def greedy_step(tok, pos):
            return torch.argmax(backend.forward(tok, pos, context_len)).view(1)

        step_fn = greedy_step
        if self.compile:
            torch._dynamo.reset()                # each context compiles its own static graph
            if mode == "reduce-overhead":
                mark = getattr(torch._dynamo, "mark_static_address", None)
                if mark is not None:
                    for t in (self.kv.k, self.kv.v, self.kv.page_table, *_tensors(backend.weights)):
                        mark(t)
            step_fn = torch.compile(greedy_step, dynamic=False, mode=mode)

        def step():
            nxt = step_fn(token, position)
            produced.index_copy_(0, position, nxt)
            token.copy_(nxt)
            position.add_(1)

        return step

    def run(self, prompt, new_tokens):
        device = self.device
        t_start = time.perf_counter()
        ids = torch.tensor(prompt, dtype=torch.int64, device=device)
        out = self.backend.prefill(ids, 0)
        pending = out.greedy_token.reshape(())
        self.token.copy_(pending.view(1))
        self.position.fill_(len(prompt))
        readback = TokenReadback(device)
        ticket = readback.push(pending)
        tokens: list[int] = []
        t_first = None
        pos = len(prompt)
        while True:
            launched = None
            if new_tokens - len(tokens) - 1 > 0:
                self.graph.replay()              # the step at `pos`, writes produced[pos]
                launched = self.produced[pos]
                next_ticket = readback.push(launched)
            token = readback.read(ticket)
            if t_first is None:
                t_first = time.perf_counter()
            tokens.append(token)
            if launched is None:
                break
            ticket = next_ticket
            pos += 1
        _sync(device)
        t_end = time.perf_counter()
        self.backend.capture_prompt_graphs()     # as Engine.generate, after the tokens
        n = len(tokens)
        return RunResult(tokens, (t_first - t_start) * 1e3,
                         (t_end - t_first) * 1e3 / (n - 1) if n > 1 else math.nan)

    def release(self):
        self.graph = None
        self.kv = self.backend = None
        if self.compile:
            torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _Replay:
    """Stands in for a CUDA graph when torch.compile manages its own graphs."""

    def __init__(self, step):
        self.replay = step


def _tensors(weights) -> list[torch.Tensor]:
    seen, out = set(), []
    for name in weights.MATRIX_NAMES + ("rope_cos", "rope_sin"):
        t = getattr(weights, name)
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class HFRunner(Runner):
    """transformers LlamaForCausalLM.generate (greedy, EOS disabled) on the same weights,
    written to a temporary checkpoint and loaded back; timed with a streamer that stamps
    the host clock when each new token reaches the host."""

    def __init__(self, weights, device):
        try:
            from transformers import LlamaForCausalLM
        except ImportError as e:
            raise SkipBackend(f"transformers is not installed ({e})") from None
        self.name = "hf"
        self.notes = []
        self.device = device
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        with tempfile.TemporaryDirectory(prefix="mk-bench-hf-") as tmp:
            save_pretrained(weights, tmp)
            model = LlamaForCausalLM.from_pretrained(tmp, dtype=weights.dtype)
        self.model = model.to(device).eval()
        # None in the call's config would be filled from the checkpoint's
        # generation_config (EOS included), so EOS is switched off on the model itself.
        self.model.generation_config.eos_token_id = None
        attn = getattr(self.model.config, "_attn_implementation", None) or "default"
        self.notes.append(f"attn_implementation={attn}, dynamic cache")

    def run(self, prompt, new_tokens):
        from transformers import GenerationConfig

        stamps: list[float] = []

        class Clock:                             # transformers' streamer protocol
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        ids = torch.tensor([prompt], dtype=torch.int64, device=self.device)
        t_start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=config, streamer=Clock())
        _sync(self.device)
        t_end = time.perf_counter()
        tokens = out[0, len(prompt):].tolist()
        if len(tokens) != new_tokens:
            raise RuntimeError(f"hf generated {len(tokens)} tokens, expected {new_tokens}")
        # stamps[0] is the prompt being "streamed"; stamps[1] the first new token.
        t_first = stamps[1]
        n = len(tokens)
        return RunResult(tokens, (t_first - t_start) * 1e3,
                         (t_end - t_first) * 1e3 / (n - 1) if n > 1 else math.nan)


def build_runners(names, weights, tokenizer, device, max_seq_len, page_size, seed,
                  skipped: dict[str, str],
                  megakernel_steps: list[int | None] = (None,)) -> list[Runner]:
    """A Runner per backend that can run here (the megakernel's once per steps-per-launch
    value, None: the backend's default); the others land in `skipped` with why."""
    runners = []
    for name in names:
        try:
            _check_runnable(name, weights, device)
            if name == "megakernel":
                for steps in megakernel_steps:
                    options = {} if steps is None else {"steps_per_launch": steps}
                    label = f"megakernel-s{steps}" if len(megakernel_steps) > 1 else None
                    runners.append(EngineRunner(name, weights, tokenizer, max_seq_len,
                                                page_size, seed, label=label, **options))
            elif name in ("torch", "reference"):
                runners.append(EngineRunner(name, weights, tokenizer, max_seq_len, page_size,
                                            seed))
            elif name in ("torch-graph", "torch-compile"):
                runners.append(GraphRunner(name, weights, max_seq_len, page_size,
                                           compile_model=name == "torch-compile"))
            elif name == "hf":
                runners.append(HFRunner(weights, device))
        except SkipBackend as e:
            skipped[name] = str(e)
        except Exception as e:                   # a backend that breaks must not stop the rest
            skipped[name] = f"failed to set up: {_one_line(e)}"
    return runners


def _check_runnable(name: str, weights, device: torch.device) -> None:
    if name == "megakernel":
        ok, reason = megakernel_available()
        if not ok:
            raise SkipBackend(reason)
        if device.type != "cuda":
            raise SkipBackend("the megakernel runs on CUDA devices only (this run is on the "
                              "CPU)")
        if weights.dtype != torch.bfloat16:
            raise SkipBackend(f"the megakernel runs bfloat16 weights, not {weights.dtype}")
    elif name in ("torch-graph", "torch-compile"):
        if device.type != "cuda":
            raise SkipBackend("CUDA graphs need a CUDA device (this run is on the CPU)")
        if name == "torch-compile":
            if importlib.util.find_spec("triton") is None:   # inductor's GPU code generator
                raise SkipBackend("torch.compile for CUDA needs triton, which is not "
                                  "installed")
    elif name == "reference" and device.type != "cpu":
        raise SkipBackend("the reference interpreter runs on the CPU only (this run is "
                          f"on {device.type}; use --device cpu)")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def make_prompt(length: int, config, seed: int) -> list[int]:
    """`length` seeded random token ids, avoiding BOS/EOS so no backend stops early."""
    g = torch.Generator().manual_seed(seed)
    avoid = set(config.eos_token_ids) | {config.bos_token_id}
    ids = torch.randint(0, config.vocab_size, (length + len(avoid) + 8,), generator=g).tolist()
    ids = [t for t in ids if t not in avoid]
    while len(ids) < length:
        ids += [t for t in torch.randint(0, config.vocab_size, (length,), generator=g).tolist()
                if t not in avoid]
    return ids[:length]


# Metrics ----------------------------------------------------------------------------------

def bytes_per_token(config, dtype_bytes: int, prompt_len: int, new_tokens: int) -> dict:
    """Bytes a decode step must read: the weights once + K/V of the mean attended context
    over the timed steps (positions prompt_len .. prompt_len + new_tokens - 2 attend to
    position + 1 tokens)."""
    weights = config.weight_bytes_per_token(dtype_bytes)
    mean_context = prompt_len + new_tokens / 2
    kv = 2 * config.num_layers * mean_context * config.num_kv_heads * config.head_dim * dtype_bytes
    return {"weights": weights, "kv": int(kv), "total": int(weights + kv),
            "mean_context": mean_context}


def summarize_runs(name, context, new_tokens, runs: list[RunResult], nbytes: dict,
                   floor_bw: float) -> dict:
    ms = [r.ms_per_token for r in runs]
    ttft = [r.ttft_ms for r in runs]
    med = statistics.median(ms)
    achieved = nbytes["total"] / (med / 1e3)
    return {
        "backend": name, "context": context, "prompt_tokens": context, "new_tokens": new_tokens,
        "repeats": len(runs),
        "ms_per_token": {"median": med, "min": min(ms), "max": max(ms), "all": ms},
        "tokens_per_s": 1e3 / med,
        "ttft_ms": {"median": statistics.median(ttft), "min": min(ttft), "max": max(ttft)},
        "bytes_per_token": nbytes["total"], "weight_bytes_per_token": nbytes["weights"],
        "kv_bytes_per_token": nbytes["kv"],
        "achieved_bytes_per_s": achieved, "floor_bandwidth_fraction": achieved / floor_bw,
        "x_floor": floor_bw / achieved,
        "deterministic": all(r.tokens == runs[0].tokens for r in runs),
        "tokens": runs[0].tokens,
    }


def add_speedups(rows: list[dict]) -> None:
    """speedup[baseline] = baseline ms/token / this row's ms/token, at the same context."""
    by_ctx: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_ctx.setdefault(r["context"], {})[r["backend"]] = r
    for r in rows:
        peers = by_ctx[r["context"]]
        r["speedup_vs"] = {b: peers[b]["ms_per_token"]["median"] / r["ms_per_token"]["median"]
                           for b in BASELINES if b in peers}


def fp32_reference_tokens(weights, tokenizer, prompt: list[int], new_tokens: int,
                          page_size: int) -> list[int]:
    """Greedy tokens of the same weights upcast to float32 (torch backend, float32 KV):
    the answer every low-precision backend approximates. On random weights, bf16
    backends drift apart after a while; how long each tracks float32 shows which one
    rounds less."""
    from megakernel.backends.torch_backend import TorchBackend
    from megakernel.kv_cache import PagedKVCache

    w32 = weights.to(dtype=torch.float32)
    max_len = len(prompt) + new_tokens + 1
    cache = PagedKVCache(w32.config, max_seq_len=max_len, page_size=page_size,
                         dtype=torch.float32, device=w32.device)
    engine = megakernel.Engine(w32, tokenizer, TorchBackend(w32, cache), cache, max_len)
    tokens = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).token_ids
    del engine, cache, w32
    gc.collect()
    return tokens


def leading_matches(got: list[int], expected: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                min(len(got), len(expected)))


def token_check(rows: list[dict], fp32_tokens: dict[int, list[int]] | None = None) -> list[dict]:
    """Per context: matching leading greedy tokens of every backend vs a reference one
    (torch when it ran: the others implement its math)."""
    checks = []
    for ctx in dict.fromkeys(r["context"] for r in rows):
        peers = {r["backend"]: r for r in rows if r["context"] == ctx}
        ref = "torch" if "torch" in peers else next(iter(peers))
        expected = peers[ref]["tokens"]
        result = {}
        for name, r in peers.items():
            if name == ref:
                continue
            got = r["tokens"]
            result[name] = {"matching_leading": leading_matches(got, expected),
                            "total": len(expected), "exact": got == expected}
        fp32 = (fp32_tokens or {}).get(ctx)
        vs_fp32 = ({name: leading_matches(r["tokens"], fp32) for name, r in peers.items()}
                   if fp32 is not None else None)
        checks.append({"context": ctx, "reference": ref, "backends": result,
                       "matching_leading_vs_fp32": vs_fp32,
                       "all_match": all(v["exact"] for v in result.values()),
                       # hf computes in its own order and precision: informational only.
                       "all_match_except_hf": all(v["exact"] for n, v in result.items()
                                                  if n != "hf"),
                       "not_deterministic": [n for n, r in peers.items()
                                             if not r.get("deterministic", True)]})
    return checks


# Output -----------------------------------------------------------------------------------

def format_table(rows: list[dict], floors: dict[int, float]) -> str:
    baselines = [b for b in BASELINES if any(r["backend"] == b for r in rows)]
    head = (f"{'backend':<14} {'context':>7} {'ms/token median [min, max]':>30} {'tok/s':>9} "
            f"{'TTFT ms':>9} {'GB/token':>9} {'TB/s':>6} {'x floor':>7}"
            + "".join(f" {BASELINES[b]:>10}" for b in baselines))
    lines = [head, "-" * len(head)]
    for ctx in dict.fromkeys(r["context"] for r in rows):
        for r in (r for r in rows if r["context"] == ctx):
            ms = r["ms_per_token"]
            span = f"{_fmt_ms(ms['median'])} [{_fmt_ms(ms['min'])}, {_fmt_ms(ms['max'])}]"
            cells = "".join(f" {_fmt_x(r['speedup_vs'].get(b)):>10}" for b in baselines)
            lines.append(f"{r['backend']:<14} {ctx:>7} {span:>30} {r['tokens_per_s']:>9.1f} "
                         f"{r['ttft_ms']['median']:>9.2f} {r['bytes_per_token'] / 1e9:>9.4f} "
                         f"{r['achieved_bytes_per_s'] / 1e12:>6.3f} "
                         f"{r['x_floor']:>6.3f}x" + cells)
        nbytes = next(r["bytes_per_token"] for r in rows if r["context"] == ctx)
        lines.append(f"{'(floor)':<14} {ctx:>7} {_fmt_ms(floors[ctx]):>30} "
                     f"{1e3 / floors[ctx]:>9.1f} {'':>9} {nbytes / 1e9:>9.4f}")
    return "\n".join(lines)


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _fmt_x(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def format_token_check(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        ctx = c["context"]
        if not c["backends"]:
            lines.append(f"tokens at context {ctx}: only {c['reference']} ran, nothing to "
                         "compare")
        else:
            if c["all_match"]:
                verdict = "all backends match"
            elif c["all_match_except_hf"]:
                verdict = "all match except hf"
            else:
                verdict = "MISMATCH"
            parts = []
            for name, v in c["backends"].items():
                part = f"{name} {v['matching_leading']}/{v['total']}"
                if not v["exact"] and name == "hf":
                    part += " (hf eager in low precision may drift on random weights)"
                parts.append(part)
            lines.append(f"tokens at context {ctx} vs {c['reference']}: {verdict}; matching "
                         "leading tokens: " + ", ".join(parts))
        if c.get("matching_leading_vs_fp32"):
            total = next(iter(c["backends"].values()), {}).get("total", "?")
            lines.append("  vs the float32 model: matching leading tokens: " + ", ".join(
                f"{n} {k}/{total}" for n, k in c["matching_leading_vs_fp32"].items()))
        if c["not_deterministic"]:
            lines.append(f"  NOT DETERMINISTIC across repeats at context {ctx}: "
                         + ", ".join(c["not_deterministic"]))
    return "\n".join(lines)


def write_plot(path: str, rows: list[dict], floors: dict[int, float], title: str) -> str | None:
    """PNG of ms/token vs context per backend with the bandwidth floor; returns why it
    was skipped, or None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["backend"] for r in rows):
        pts = sorted((r["context"], r["ms_per_token"]["median"], r["ms_per_token"]["min"],
                      r["ms_per_token"]["max"]) for r in rows if r["backend"] == name)
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    fx = sorted(floors)
    # A marker too, so the floor shows when only one context was measured.
    ax.plot(fx, [floors[c] for c in fx], "k--", marker="_", markersize=18,
            label="bandwidth floor (fastest measured probe)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(fx, [str(c) for c in fx])
    plain = matplotlib.ticker.FormatStrFormatter("%g")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode ms / token")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# Profile ----------------------------------------------------------------------------------

def run_profile(out_dir: str, weights, tokenizer, device, prompt: list[int], max_seq_len: int,
                page_size: int, seed: int, floor_bw: float,
                steps_per_launch: int | None = None) -> dict:
    """Timelines of one decode step: measured (profiling build of the megakernel; the
    middle step of a launch of steps_per_launch chained steps, None: the engine's) and
    modeled (the program's cost model at the measured floor bandwidth). Returns a summary
    dict; writes trace_*.json (Chrome / Perfetto) and timeline_*.png into out_dir."""
    from megakernel import profiling
    from megakernel.scheduler import build_program

    os.makedirs(out_dir, exist_ok=True)
    result: dict = {"dir": out_dir}
    context = len(prompt) + 1
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 132)
    program = None
    measured = None
    ok, reason = megakernel_available()
    if ok and weights.dtype != torch.bfloat16:
        ok, reason = False, f"the megakernel runs bfloat16 weights, not {weights.dtype}"
    if ok:
        try:
            options = {} if steps_per_launch is None else {"steps_per_launch": steps_per_launch}
            runner = EngineRunner("megakernel", weights, tokenizer, max_seq_len, page_size,
                                  seed, profile=True, **options)
            backend = runner.engine.backend
            steps = backend.steps_per_launch
            result["steps_per_launch"] = steps
            # The prefill's token, then exactly one launch of the engine's chained steps,
            # whose record remains: its middle step is the one a generation mostly runs.
            runner.run(prompt, 1 + steps)
            step = steps // 2
            context += step
            # A chain runs the program of its last step's position.
            program = backend.program_for(len(prompt) + steps - 1)
            raw = profiling.chained_step(backend.last_profile().cpu(), step,
                                         program.num_instructions)
            measured = profiling.records_from_kernel_profile(raw)
            print(f"profile: step {step + 1} of a launch of {steps} chained steps")
            num_sms = backend.num_sms
            opcode_names = {op: spec.name for op, spec in OPCODES.items()}
            result["stages"] = profiling.stage_breakdown(raw, opcode_names)
            print("per stage (medians over layers; span = share of the critical path):")
            print(profiling.format_stage_breakdown(result["stages"]))
            spans = profiling.layer_spans(raw, opcode_names)
            result["layer_spans"] = dict(spans)
            print(profiling.format_layer_spans(spans))
        except Exception as e:
            reason = f"profiling run failed: {_one_line(e)}"
    if measured is None:
        result["measured_skipped"] = reason
        print(f"profile: no measured timeline: {reason}")
    if program is None:
        program = build_program(weights.config, num_sms=num_sms, page_size=page_size,
                                max_seq_len=max_seq_len, dtype_bytes=weights.dtype.itemsize)
    names, _ = profiling.instruction_labels(program)
    modeled = profiling.model_records(program, floor_bw, context_len=context)
    for kind, records in (("measured", measured), ("modeled", modeled)):
        if records is None:
            continue
        title = (f"{kind} decode step, {weights.config.num_layers} layers, context {context}, "
                 f"{program.num_sms} SMs")
        summary = profiling.summarize(records, names, num_sms=program.num_sms)
        print(profiling.format_summary(summary, title))
        files = {"trace": profiling.write_chrome_trace(
            os.path.join(out_dir, f"trace_{kind}.json"), records, program, title=title)}
        try:
            files["timeline"] = profiling.plot_timeline(
                os.path.join(out_dir, f"timeline_{kind}.png"), records, names, title=title)
        except ImportError:
            print("profile: timeline PNG skipped: matplotlib is not installed")
        result[kind] = {**summary.to_dict(), "files": files}
    with open(os.path.join(out_dir, "profile_summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


# Main -------------------------------------------------------------------------------------

def run(args) -> dict:
    """Run the benchmark described by parsed `args`; prints as it goes, returns results."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark.py: --device cuda, but CUDA is not available")
    if args.repeats < 1 or args.new_tokens < 2 or args.warmup < 0:
        raise SystemExit("benchmark.py: need --repeats >= 1, --new-tokens >= 2, --warmup >= 0")
    names = _parse_backends(args.backends)
    contexts = _parse_contexts(args)
    megakernel_steps = _parse_steps(args.steps_per_launch)
    spec = _model_spec(args.model, device)
    max_seq_len = max(contexts) + args.new_tokens + 1

    env = environment(device)
    print(f"device: {env.get('gpu') or env.get('cpu')} ({device}), torch {env['torch']}, "
          f"commit {env['git_commit']}")
    t = time.perf_counter()
    weights, tokenizer = load_model(spec, device=device, dtype=args.dtype,
                                    max_positions=max_seq_len, seed=args.seed)
    cfg = weights.config
    dtype_bytes = weights.dtype.itemsize
    print(f"model: {spec} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}), {str(weights.dtype).removeprefix('torch.')}, loaded in "
          f"{time.perf_counter() - t:.1f} s; weights read per token "
          f"{cfg.weight_bytes_per_token(dtype_bytes) / 1e9:.4f} GB")

    bandwidth = measure_bandwidth(device)
    floor_bw = bandwidth["floor_bytes_per_s"]
    copy, read = bandwidth["copy"], bandwidth["read"]
    print(f"bandwidth: copy {copy['bytes_per_s'] / 1e12:.3f} TB/s ({copy['what']}), read "
          f"{read['bytes_per_s'] / 1e12:.3f} TB/s ({read['what']}), "
          f"{PROBE_BYTES[device.type] >> 20} MiB each side, {read['bytes'] >> 20} MiB read; "
          f"floors at the {bandwidth['floor_probe']}'s")
    if device.type == "cuda" and megakernel_available()[0]:
        from megakernel import _C
        if _C.profiling_compiled():
            print("warning: the extension was built with MEGAKERNEL_PROFILE=1; megakernel "
                  "timings include its bookkeeping")
            env["megakernel_profiling_build"] = True

    skipped: dict[str, str] = {}
    runners = build_runners(names, weights, tokenizer, device, max_seq_len, args.page_size,
                            args.seed, skipped, megakernel_steps)
    failures: list[dict] = []
    rows: list[dict] = []
    floors: dict[int, float] = {}
    fp32_tokens: dict[int, list[int]] = {}
    for ctx in contexts:
        prompt = make_prompt(ctx, cfg, args.seed)
        if not args.no_fp32_reference and weights.dtype != torch.float32:
            try:
                fp32_tokens[ctx] = fp32_reference_tokens(weights, tokenizer, prompt,
                                                         args.new_tokens, args.page_size)
            except torch.cuda.OutOfMemoryError:
                print(f"  float32 reference skipped at context {ctx}: out of memory")
                torch.cuda.empty_cache()
        nbytes = bytes_per_token(cfg, dtype_bytes, ctx, args.new_tokens)
        floors[ctx] = nbytes["total"] / floor_bw * 1e3
        print(f"\ncontext {ctx}: prompt {ctx} tokens, {args.new_tokens} new tokens, "
              f"{nbytes['total'] / 1e9:.4f} GB/token -> floor {floors[ctx]:.3f} ms/token "
              f"at {floor_bw / 1e12:.3f} TB/s")
        active = []
        for runner in runners:
            try:
                runner.prepare(ctx, args.new_tokens)
                for _ in range(args.warmup):
                    runner.run(prompt, args.new_tokens)
                active.append(runner)
            except Exception as e:
                failures.append({"backend": runner.name, "context": ctx,
                                 "error": _one_line(e)})
                print(f"  {runner.name}: failed at context {ctx}: {_one_line(e)}")
                _recover(runner, device)
        runs: dict[str, list[RunResult]] = {r.name: [] for r in active}
        for _ in range(args.repeats):
            for runner in list(active):          # interleaved: drift hits every backend
                try:
                    runs[runner.name].append(runner.run(prompt, args.new_tokens))
                except Exception as e:
                    failures.append({"backend": runner.name, "context": ctx,
                                     "error": _one_line(e)})
                    print(f"  {runner.name}: failed at context {ctx}: {_one_line(e)}")
                    active.remove(runner)
                    runs.pop(runner.name)
                    _recover(runner, device)
        for runner in runners:
            if runner.name in runs:
                row = summarize_runs(runner.name, ctx, args.new_tokens, runs[runner.name],
                                     nbytes, floor_bw)
                setup = getattr(runner, "setup_s", {}).get(ctx)
                if setup is not None:
                    row["setup_s"] = setup
                if runner.notes:
                    row["notes"] = list(runner.notes)
                rows.append(row)
                print(f"  {runner.name:<14} {row['ms_per_token']['median']:.3f} ms/token, "
                      f"TTFT {row['ttft_ms']['median']:.2f} ms"
                      + (f" (capture/compile {setup:.1f} s)" if setup is not None else ""))
            runner.release()

    add_speedups(rows)
    checks = token_check(rows, fp32_tokens)
    print()
    print(format_table(rows, floors) if rows else "no backend produced a result")
    print()
    if rows:
        print(format_token_check(checks))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for f in failures:
        print(f"failed {f['backend']} at context {f['context']}: {f['error']}")

    results = {
        "environment": env,
        "workload": {"model": spec, "dtype": str(weights.dtype).removeprefix("torch."),
                     "batch": 1, "contexts": contexts, "new_tokens": args.new_tokens,
                     "greedy": True, "ignore_eos": True, "repeats": args.repeats,
                     "warmup": args.warmup, "page_size": args.page_size, "seed": args.seed,
                     "backends_requested": names,
                     "megakernel_steps_per_launch": megakernel_steps},
        "bandwidth": bandwidth,
        "floor_ms_per_token": {str(c): v for c, v in floors.items()},
        "results": rows,
        "token_check": checks,
        "skipped": skipped,
        "failures": failures,
    }
    if args.plot:
        why = write_plot(args.plot, rows, floors, f"{spec} decode, batch 1") if rows else \
            "no results to plot"
        print(f"plot: {args.plot}" if why is None else f"plot skipped: {why}")
        results["plot"] = args.plot if why is None else {"skipped": why}
    if args.profile:
        print()
        prompt = make_prompt(contexts[0], cfg, args.seed)
        for runner in runners:                   # free the timed backends' memory first
            runner.release()
        # One --steps-per-launch value sets the profiled launch's too; several leave the
        # engine's default, the launch a generation runs.
        profile_steps = megakernel_steps[0] if len(megakernel_steps) == 1 else None
        results["profile"] = run_profile(args.profile, weights, tokenizer, device, prompt,
                                         max_seq_len, args.page_size, args.seed, floor_bw,
                                         profile_steps)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=_json_default)
        print(f"json: {args.json}")
    return results


def _recover(runner: Runner, device: torch.device) -> None:
    try:
        runner.release()
    except Exception:
        pass
    gc.collect()
    if device.type == "cuda":
        try:
            if synchronize_within(device, DEFAULT_TIMEOUT_S):  # else hung: free nothing
                torch.cuda.empty_cache()
        except Exception:
            pass


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
