"""Engine: load a model once, then generate from single prompts.

    engine = Engine.from_pretrained("random:tiny")
    result = engine.generate("Hello", max_new_tokens=16)

A generate() call: validate every argument (nothing changes before that), reserve KV
pages for prompt + new tokens (exhaustion fails here, before any launch), prefill the
prompt, then decode. Greedy decoding chains the backend's steps_per_launch steps in one
launch, each step's token chosen on the device (the megakernel backend; one step per
launch elsewhere); so does temperature sampling, alone or with top-k up to MAX_TOP_K,
top-p or both, where the backend draws tokens on the device (the megakernel and reference
backends: scheduler.with_sampled_tokens); larger top-k launch one step at a time. Decode
is pipelined: launch i+1 is queued with the last token of launch i still on the device,
and only then are launch i's tokens read back for stop checks and streaming,
through host memory the kernel writes or a pinned copy, and an event behind launch i alone
(readback.TokenReadback), so the host never leaves the GPU idle between launches. Tokens
a launch decoded past a stop token are dropped.

generate_stream() returns the same generation as an iterator of text pieces
(generation_stream.py): it runs as the caller iterates, and generate() itself is that
iteration with a callback.

generate(..., reuse_prefix=True) keeps the K/V of the longest common prefix of its prompt
and the last generation's tokens (its prompt and every new token but the last) and
prefills only the rest: a conversation's next turn prefills only its new messages
(ChatSession, chat.py).

Every wait for the device is bounded. A launch that does not finish within the readback's
timeout (one that no kernel watchdog ended) raises DeviceHungError; the engine then marks
itself hung rather than block on the device, refuses new work while the launch runs, and
recovers by itself once the device is idle.
"""
from __future__ import annotations

import math
import operator
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .backends.base import Backend, check_step_count
from .errors import BackendUnavailableError, DeviceHungError, InvalidRequestError
from .generation_stream import GenerationStream
from .instructions import MAX_TOP_K, Sampling
from .kv_cache import PagedKVCache
from .loading import (load_tokenizer, load_weights, resolve_device, resolve_dtype,
                      resolve_model)
from .memory_check import check_model_fits
from .readback import TokenReadback, synchronize_or_raise, synchronize_within
from .sampling import check_seed, sample, validate_sampling
from .stop_strings import StopStringText, check_stop_strings

BACKENDS = ("megakernel", "torch", "reference")
# How long recovery after an error waits for the device before it calls it hung.
RECOVER_TIMEOUT_S = 10.0
DEFAULT_PAGE_SIZE = 16
# max_seq_len when none is given, for models trained on longer contexts: the KV cache is
# allocated whole at load, and 4096 tokens of it take 128 MiB on Llama-3.2-1B, 512 MiB on
# 8B (bf16).
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_NEW_TOKENS = 128
# Where the load's warm-up decode launch runs: a short position, like most first steps'
# (the warm-up prompt wrote the positions before it).
WARM_UP_DECODE_POSITION = 32


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float            # prompt in -> first new token on the host
    ms_per_token: float       # mean decode step after the first token
    tokens_per_s: float       # 1000 / ms_per_token
    total_ms: float
    backend: str
    reused_tokens: int = 0    # prompt tokens whose K/V came from the last generation's

    def as_json(self) -> dict:
        """The fields as a JSON object: NaN (one new token has no ms/token) as null, where
        JSON has no NaN."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}

    def line(self) -> str:
        reused = f" ({self.reused_tokens} cached)" if self.reused_tokens else ""
        return (f"[{self.backend}] prompt {self.prompt_tokens} tok{reused}, generated "
                f"{self.new_tokens} tok | TTFT {self.ttft_ms:.2f} ms | "
                f"{self.ms_per_token:.3f} ms/token | {self.tokens_per_s:.1f} tok/s")


@dataclass
class GenerationResult:
    token_ids: list[int]                  # new tokens only
    text: str
    prompt_token_ids: list[int]
    finish_reason: str                    # "stop" (stop token) or "length"
    stats: GenerationStats
    logits: torch.Tensor | None = field(default=None, repr=False)  # [n_new, V] float32


def megakernel_available() -> tuple[bool, str]:
    """(usable, reason) for the CUDA backend on this machine."""
    from .backends.megakernel_backend import load_extension

    try:
        load_extension()
    except BackendUnavailableError as e:
        return False, str(e)
    return True, ""


class Engine:
    def __init__(self, weights, tokenizer, backend: Backend, kv_cache: PagedKVCache,
                 max_seq_len: int, seed: int = 0):
        self.weights = weights
        self.config = weights.config
        self.tokenizer = tokenizer
        self.backend = backend
        self.kv_cache = kv_cache
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.device = kv_cache.device
        self.readback = TokenReadback(self.device)
        self.recover_timeout_s = RECOVER_TIMEOUT_S
        self.hung = False   # a launch did not finish in time and may still be running
        # Capture each prompt bucket's prefill graph after the generation that first ran
        # it without one (prompt_graphs.py); off for a one-generation process.
        self.prompt_graphs = True
        # The tokens whose K/V the cache holds at positions 0.. after the last generation
        # (empty after an error, or once a graph capture has written over them).
        self._cached_ids: list[int] = []
        # The last generation started, run as its stream is iterated; the next one ends it
        # first if it is still open.
        self._stream: GenerationStream | None = None

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # Construction ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, device=None, backend: str | None = None,
                        dtype=None, max_seq_len: int | None = None,
                        page_size: int | None = None,
                        seed: int = 0, progress: Callable[[int, int], None] | None = None,
                        steps_per_launch: int | None = None, prompt_graphs: bool = True,
                        **backend_options) -> "Engine":
        """Load `model` (a local checkpoint dir, a hub id, or random:<preset>) and build
        the backend. device: 'cuda'/'cpu' (default: cuda when available). backend:
        megakernel | torch | reference (default: megakernel where it can run, else torch).
        dtype: torch dtype or name (default bfloat16 on CUDA, float32 on CPU).
        steps_per_launch: greedy (or device-sampled: see generate) decode steps chained in
        one launch (megakernel and reference backends; default: the backend's, 8 for the
        megakernel). prompt_graphs: on CUDA, after a generation whose prompt (or a chunk
        of it) had no CUDA graph of its length bucket, capture one (tens of ms, after the
        last token), which later prompts of that bucket replay; pass False in a process
        that generates once. max_seq_len: the longest prompt plus new tokens, which sizes
        the KV cache (default: the model's max_position_embeddings, or its sliding
        attention window if shorter, at most DEFAULT_MAX_SEQ_LEN); larger than either, or
        than the device's free memory holds beside the weights, it is refused before
        loading."""
        device = resolve_device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device 'cuda' requested but CUDA is not available")
        if backend is None:
            backend = ("megakernel" if device.type == "cuda" and megakernel_available()[0]
                       else "torch")
        if backend not in BACKENDS:
            raise InvalidRequestError(f"unknown backend '{backend}' (choose from "
                                      f"{', '.join(BACKENDS)})")
        dtype = resolve_dtype(dtype, device)
        if backend == "megakernel":
            ok, reason = megakernel_available()
            if not ok:
                raise BackendUnavailableError(f"backend 'megakernel' unavailable: {reason}")
            if device.type != "cuda":
                raise BackendUnavailableError("backend 'megakernel' runs on CUDA devices only")
            if dtype != torch.bfloat16:
                raise InvalidRequestError("backend 'megakernel' runs bfloat16 weights; "
                                          "pass dtype=torch.bfloat16")
        if backend == "reference" and device.type != "cpu":
            raise InvalidRequestError("backend 'reference' runs on the CPU; pass device='cpu'")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
            raise InvalidRequestError(f"max_seq_len must be an integer >= 2, got {max_seq_len}")
        if steps_per_launch is not None:
            check_step_count(steps_per_launch, "steps_per_launch")
            if backend == "torch" and steps_per_launch != 1:
                raise InvalidRequestError("backend 'torch' decodes one step per launch; "
                                          "steps_per_launch needs megakernel or reference")
            if backend != "torch":
                backend_options["steps_per_launch"] = steps_per_launch
        if seed is None:
            raise InvalidRequestError("seed must be an integer, got None")
        seed = check_seed(seed)
        page_size = DEFAULT_PAGE_SIZE if page_size is None else page_size
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise InvalidRequestError(f"page_size must be a positive integer, got {page_size}")

        config, source = resolve_model(model)
        max_seq_len = resolve_max_seq_len(max_seq_len, config)
        check_model_fits(config, max_seq_len, page_size, dtype, device)
        weights = load_weights(config, source, device=device, dtype=dtype,
                               max_positions=max_seq_len, seed=seed, progress=progress)
        tokenizer = load_tokenizer(config, source)
        kv_cache = PagedKVCache(weights.config, max_seq_len=max_seq_len, page_size=page_size,
                                dtype=dtype, device=device,
                                shuffle_seed=backend_options.pop("shuffle_pages_seed", None),
                                poison=backend_options.pop("poison_cache", False))
        impl = make_backend(backend, weights, kv_cache, max_seq_len, **backend_options)
        engine = cls(weights, tokenizer, impl, kv_cache, max_seq_len, seed)
        engine.prompt_graphs = prompt_graphs
        if device.type == "cuda":
            engine._warm_up()
        return engine

    # Prompt handling -----------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, (bytes, bytearray)):
            raise InvalidRequestError("the prompt must be a string or a list of integer "
                                      "token ids, not bytes: decode it to a string first")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "this model has no tokenizer: pass the prompt as a list of token ids")
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            ids = (self.tokenizer.apply_chat_template(prompt) if chat
                   else self.tokenizer.encode(prompt))
        else:
            if chat:
                raise InvalidRequestError("chat=True needs a text prompt")
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise InvalidRequestError(
                    "the prompt must be a string or a list of integer token ids") from None
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is out of range [0, {vocab})")
        return ids

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # Generation ------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int],
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
                 ignore_eos: bool = False, output_logits: bool = False,
                 stream: Callable[[int, str], None] | None = None,
                 chat: bool = False, reuse_prefix: bool = False,
                 stop: str | Sequence[str] | None = None) -> GenerationResult:
        """Generate up to max_new_tokens after `prompt` (text or token ids).

        temperature 0 is greedy; sampling with a seed is reproducible. stream(token_id,
        text_piece) is called once per new token, in order. Generation stops at the
        model's EOS (unless ignore_eos) or any of stop_token_ids; that token is included
        in token_ids. It also stops once the text contains one of the `stop` strings: the
        text ends before it (the streamed pieces too: text that may begin a stop string
        is held back until the next token settles it), and token_ids end with the token
        that completed it.

        reuse_prefix: keep the K/V of the prompt's longest common prefix with the last
        generation's tokens (its prompt and its new tokens but the last) and prefill only
        the rest (stats.reused_tokens counts the kept ones). The prompt then runs in other
        matmul shapes than a whole prefill would, so logits may differ in the last bits.
        """
        if stream is not None and not callable(stream):
            raise InvalidRequestError(f"stream must be a callable(token_id, text_piece), "
                                      f"got {stream!r}")
        steps = self._start(prompt, max_new_tokens, temperature, top_p, top_k, seed,
                            stop_token_ids, ignore_eos, output_logits, chat, reuse_prefix, stop,
                            text_pieces=stream is not None)
        try:
            for piece in steps:
                if stream is not None:
                    stream(steps.token_ids[-1], piece)
        except BaseException:
            steps.close()       # an error in stream(): the engine recovers, as from its own
            raise
        return steps.result

    def generate_stream(self, prompt: str | Sequence[int], **options) -> GenerationStream:
        """generate() as an iterator of text pieces, one per new token, in order:
        `for piece in engine.generate_stream(prompt, **options)`. Takes generate()'s
        options but `stream`, and checks them here, before anything runs. The stream's
        token_ids grow as tokens arrive; its result is generate()'s once the iteration has
        ended. Ending the iteration early (close(), a `with` block, or the next generation
        on this engine) ends the generation there, and the engine goes on."""
        if "stream" in options:
            raise InvalidRequestError("generate_stream() takes no stream callback: iterate it")
        return self._start(prompt, text_pieces=True, **options)

    def _start(self, prompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
               ignore_eos: bool = False, output_logits: bool = False, chat: bool = False,
               reuse_prefix: bool = False, stop: str | Sequence[str] | None = None,
               text_pieces: bool = False) -> GenerationStream:
        """Check a generation's arguments, end a stream still open, and return the
        generation as a stream that runs it as it is iterated."""
        validate_sampling(temperature, top_p, top_k)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, "
                                      f"got {max_new_tokens}")
        ids = self.encode_prompt(prompt, chat=chat)
        if len(ids) > self.max_seq_len:
            raise InvalidRequestError(f"prompt of {len(ids)} tokens is longer than "
                                      f"max_seq_len {self.max_seq_len}")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len {self.max_seq_len}")
        stop_strings = check_stop_strings(stop)
        if stop_strings and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        try:
            stops = {operator.index(t) for t in (stop_token_ids if stop_token_ids is not None
                                                 else ())}
        except TypeError:
            raise InvalidRequestError(f"stop_token_ids must be a list of integer token ids, "
                                      f"got {stop_token_ids!r}") from None
        seed = check_seed(seed)
        if not ignore_eos:
            stops |= set(self.config.eos_token_ids)
            if self.tokenizer is not None:
                stops |= set(self.tokenizer.eos_token_ids)

        if self._stream is not None:
            self._stream.end_for_another()
        self._stream = GenerationStream(self._run(
            ids, max_new_tokens, temperature, top_p, top_k, seed, stops, stop_strings,
            output_logits, reuse_prefix, text_pieces))
        return self._stream

    def _run(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
             top_k: int, seed: int | None, stops: set[int], stop_strings: tuple[str, ...],
             output_logits: bool, reuse_prefix: bool, text_pieces: bool):
        """The generation of checked arguments, a token at a time: yields (token_id,
        text piece, or None unless text_pieces or stop strings need it) as each token
        reaches the host, and returns the GenerationResult."""
        self._check_device_idle()
        reused = self.reusable_prefix(ids) if reuse_prefix else 0
        self._cached_ids = []       # until this generation has ended well
        # The last step's K/V lands at position len(ids) + max_new_tokens - 1 at most;
        # the pipelined extra step may write one further position, which must exist.
        # Pages also for the positions the backend's prompt path may write past the prompt
        # (its last chunk padded to a bucket), where max_seq_len allows.
        self.kv_cache.truncate(reused)
        prompt_end = reused + self.backend.prompt_positions(len(ids) - reused)
        self.kv_cache.reserve(min(max(len(ids) + max_new_tokens + 1, prompt_end),
                                  self.max_seq_len))
        self.backend.reset()
        self.readback.reset()     # a stop token may have left the step after it unread
        generator = None
        sample_seed = self.seed if seed is None else seed
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sample_seed)
        device_sampling = self._device_sampling(temperature, top_p, top_k, sample_seed)

        def choose(out):
            """The prefill's token on the device, and the host view it lands in (or None)."""
            if temperature == 0:
                return out.greedy_token.reshape(()), out.greedy_token_host
            return sample(out.logits, temperature, top_k, top_p, generator), None

        def launch(token, position: int, budget: int):
            """Decode steps from `token` (on the device) at `position`: greedy ones or ones
            drawn on the device, chained up to the backend's steps_per_launch in one launch,
            at most `budget`; else one step sampled between launches. Returns
            (steps, the device token that feeds the next launch, its readback ticket, the
            steps' logits [steps, V] copied on the device when output_logits)."""
            if temperature == 0 or device_sampling is not None:
                out = self.backend.decode_steps(token, position,
                                                min(self.backend.steps_per_launch, budget),
                                                sampling=device_sampling)
                nxt, host, step_logits = out.last_token.reshape(()), out.tokens_host, out.logits
            else:
                out = self.backend.decode(token, position)
                nxt = sample(out.logits, temperature, top_k, top_p, generator)
                host, step_logits = None, out.logits.reshape(1, -1)
            ticket = self.readback.push(nxt, host)
            copied = step_logits.detach().float().clone() if output_logits else None
            return step_logits.shape[0], nxt, ticket, copied

        new_tokens: list[int] = []
        logits: list[torch.Tensor] = []
        text = StopStringText(self.decode_text, stop_strings)
        t_start = time.perf_counter()
        finish = None
        try:
            prompt_tensor = torch.tensor(ids[reused:], dtype=torch.int64, device=self.device)
            out = self.backend.prefill(prompt_tensor, reused)
            pending, host = choose(out)             # device tensor, not yet read
            ticket, unread = self.readback.push(pending, host), 1
            if output_logits:
                logits.append(out.logits.detach().float().cpu().clone())
            t_first = None
            position = len(ids)
            while finish is None:
                # Launch the next steps before reading `ticket` back (pipelining).
                budget = min(max_new_tokens - len(new_tokens) - unread,
                             self.max_seq_len - position)
                launched = launch(pending, position, budget) if budget > 0 else None
                tokens = self.readback.read_tokens(ticket)
                self.backend.check_error(min(tokens))
                if t_first is None:
                    t_first = time.perf_counter()
                for i, token in enumerate(tokens):
                    new_tokens.append(token)
                    last = token in stops or (launched is None and i == len(tokens) - 1)
                    piece = None
                    if text_pieces or stop_strings:
                        piece = text.push(token, last)
                        last = last or text.stopped
                    yield token, piece
                    if last:
                        finish = "stop" if token in stops or text.stopped else "length"
                        break
                if finish is None:
                    unread, pending, ticket, step_logits = launched
                    if output_logits:
                        logits.extend(step_logits.cpu())
                    position += unread
            # The pipelined launch after a stop token may still run.
            synchronize_or_raise(self.device, self.readback.timeout_s, "a decode step")
            self.backend.check_error()
        except BaseException as error:
            # Ctrl-C, a stream closed early, a kernel fault or any other error: leave the
            # engine usable. An end the caller chose keeps the K/V of the tokens every
            # finished launch fed, for reuse_prefix (a chat turn stopped with Ctrl-C).
            early = isinstance(error, (GeneratorExit, KeyboardInterrupt))
            self._recover(keep=ids + new_tokens[:-1] if early and new_tokens else None)
            raise
        t_end = time.perf_counter()

        n = len(new_tokens)
        ttft_ms = (t_first - t_start) * 1000
        decode_ms = (t_end - t_first) * 1000
        ms_per_token = decode_ms / (n - 1) if n > 1 else float("nan")
        stats = GenerationStats(
            prompt_tokens=len(ids), new_tokens=n, ttft_ms=ttft_ms, ms_per_token=ms_per_token,
            tokens_per_s=1000.0 / ms_per_token if n > 1 and ms_per_token > 0 else float("nan"),
            total_ms=(t_end - t_start) * 1000, backend=self.backend.name,
            reused_tokens=reused)
        # The last new token was never fed to the model: its K/V is not in the cache.
        kept = ids + new_tokens[:-1]
        overwrote = False
        if reused:
            self.backend.drop_pending_prompt_graphs()
        if self.prompt_graphs:
            # After the last token (streamed already) and outside the stats: no time to
            # first token ever includes a capture. Waited for only when one was queued.
            try:
                captured, overwrote = self.backend.capture_prompt_graphs(len(kept))
                if captured:
                    synchronize_or_raise(self.device, self.readback.timeout_s,
                                         "the prompt graphs' capture")
            except BaseException:
                self._recover()
                raise
        self._cached_ids = [] if overwrote else kept
        return GenerationResult(
            token_ids=new_tokens,
            text=text.text if text.stopped else self.decode_text(new_tokens),
            prompt_token_ids=ids,
            finish_reason=finish, stats=stats,
            logits=torch.stack(logits[:n]) if output_logits else None)

    def chat_session(self, system: str | None = None):
        """A multi-turn conversation on this engine whose history stays in the KV cache
        (chat.ChatSession); needs a tokenizer with a chat template. One engine runs one
        sequence: a generate() between two turns makes the next turn prefill it all."""
        from .chat import ChatSession
        return ChatSession(self, system)

    def prepare(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> None:
        """Build ahead what generate() with these sampling settings launches, so that its
        first call's time to first token does not include it (greedy decoding is prepared
        at load; a sampling kind is otherwise built at its first use: +16 ms of TTFT on a
        1B model, benchmarks/RESULTS.md entry 66). On CUDA it also draws a token from dummy
        logits as the prompt's token is drawn, and runs one decode launch of the kind where
        the device draws the steps' tokens, so that a process's first use of those kernels
        is not inside a time to first token (entry 90). The launch writes pages of its own:
        what the cache kept for reuse_prefix is dropped."""
        validate_sampling(temperature, top_p, top_k)
        if temperature == 0:
            return
        if self._stream is not None:
            self._stream.end_for_another()
        sampling = self._device_sampling(temperature, top_p, top_k, self.seed)
        if sampling is not None:
            self.backend.prepare(sampling)
        if self.device.type != "cuda":
            return
        self._check_device_idle()

        def draw_and_launch():
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.seed)
            logits = torch.zeros(self.config.vocab_size, device=self.device)
            token = sample(logits, temperature, top_k, top_p, generator)
            self.readback.read(self.readback.push(token))
            if sampling is not None:
                # From position 0 a launch attends only to what it writes itself.
                self._warm_decode_launch(token, 0, sampling)

        try:
            self._on_scratch_pages(min(self.backend.steps_per_launch, self.max_seq_len),
                                   draw_and_launch)
        except BaseException:
            self._recover()
            raise

    def _warm_up(self) -> None:
        """Dummy prompts through the backend's prompt path at load, one per prompt bucket
        up to its warm_up_tokens, and the first token's selection and readback as
        generate() does them. A process's first use of the attention and GEMM libraries
        (and their lazily loaded kernels) took ~1 s, each new matmul shape ~3 ms more and
        the argmax's first use ~6 ms, inside its first generation's time to first token
        (benchmarks/RESULTS.md, entry 78). The pages they wrote get their initial contents
        back, so a poisoned cache stays poisoned."""
        num_tokens = min(self.backend.warm_up_tokens, self.max_seq_len)
        if num_tokens == 0:
            return

        def prompts_and_launch():
            logits = self.backend.warm_up(num_tokens)
            if logits is not None:
                token = torch.argmax(logits)
                self.readback.read(self.readback.push(token))
                self._warm_decode_launch(token, WARM_UP_DECODE_POSITION)

        self._on_scratch_pages(num_tokens, prompts_and_launch)
        synchronize_or_raise(self.device, self.readback.timeout_s, "the warm-up prompt")

    def _on_scratch_pages(self, positions: int, work: Callable[[], None]) -> None:
        """work() on pages for positions [0, positions) of its own, which then get their
        initial contents back (a poisoned cache stays poisoned) and go back to the pool.
        What the cache kept for reuse_prefix is dropped."""
        self._cached_ids = []
        self.kv_cache.release()
        self.kv_cache.reserve(positions)
        pages = self.kv_cache.pages()
        work()
        self.kv_cache.wipe(pages)
        self.kv_cache.release()

    def _warm_decode_launch(self, token: torch.Tensor, position: int,
                            sampling: Sampling | None = None) -> None:
        """One decode launch (greedy, or drawn with `sampling`) from `token` at `position`
        or before it, queued and read back as generate() does it (the caller reserved the
        pages and wipes them after): a process's first launch of a kernel (its module
        loaded, its mapped results read) would otherwise fall inside a time to first
        token (benchmarks/RESULTS.md, entry 90)."""
        steps = self.backend.steps_per_launch
        position = min(position, self.kv_cache.capacity() - steps)
        if position < 0:
            return
        out = self.backend.decode_steps(token, position, steps, sampling=sampling)
        tokens = self.readback.read_tokens(
            self.readback.push(out.last_token.reshape(()), out.tokens_host))
        self.backend.check_error(min(tokens))
        self.backend.reset()
        self.readback.reset()

    def _device_sampling(self, temperature: float, top_p: float, top_k: int,
                         seed: int) -> Sampling | None:
        """The Sampling a launch draws tokens with on the device, or None (greedy, or drawn
        between launches by sampling.sample).

        Temperature sampling, alone, with top-k up to MAX_TOP_K, with top-p or with both, is
        drawn on the device where the backend can, so its steps chain like greedy ones;
        larger k run between launches, and so do temperatures whose inverse a float32 does
        not hold. The prompt's token is drawn by sampling.sample either way."""
        device_top_k = 0 if top_k >= self.config.vocab_size else top_k
        if (temperature > 0 and device_top_k <= MAX_TOP_K and self.backend.chains_sampling
                and 0 < 1.0 / temperature <= torch.finfo(torch.float32).max):
            return Sampling(1.0 / temperature, int(seed) & ((1 << 63) - 1), device_top_k,
                            float(top_p))
        return None

    def reusable_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of the prompt `ids` would keep their K/V from the last
        generation with reuse_prefix=True: their common prefix with its tokens, short of
        the last prompt token at least (the prompt path must run one token for the first
        new token's logits)."""
        cached, n = self._cached_ids, 0
        limit = min(len(ids) - 1, len(cached))
        while n < limit and ids[n] == cached[n]:
            n += 1
        return n

    def _check_device_idle(self) -> None:
        """Refuse new work while a launch that did not finish in time still runs; once the
        device is idle again, recover and go on."""
        if not self.hung:
            return
        if not synchronize_within(self.device, 0.0):
            raise DeviceHungError("the device is still running a launch that did not finish "
                                  "in time; a kernel that never ends clears only when the "
                                  "process exits")
        self.hung = False
        self._recover()

    def _recover(self, keep: list[int] | None = None) -> None:
        """Leave the engine usable after an error: wait for the device (at most
        recover_timeout_s), then reset the backend, the readback and the KV pages. A device
        still busy then is marked hung, and nothing that would wait for it is touched.
        keep: the tokens whose K/V the cache holds at positions [0, len(keep)), kept for
        reuse_prefix once every launch has finished without a fault."""
        try:
            idle = synchronize_within(self.device, self.recover_timeout_s)
        except Exception:
            idle = True     # a device fault: the resets below report it if it persists
            keep = None
        if not idle:
            self.hung = True
            return
        if keep:
            try:
                self.backend.check_error()
            except Exception:
                keep = None
        self.backend.reset()
        self.readback.reset()
        self.kv_cache.truncate(len(keep) if keep else 0)
        self._cached_ids = keep or []


def resolve_max_seq_len(max_seq_len: int | None, config) -> int:
    """The KV cache's length: `max_seq_len`, or by default the model's
    max_position_embeddings up to DEFAULT_MAX_SEQ_LEN. Positions past the model's limit
    are refused: its RoPE was not trained for them. So are sequences longer than a sliding
    attention window: within it the whole-sequence attention is exactly the model's."""
    limit, what = config.max_position_embeddings, "max_position_embeddings"
    if config.sliding_window is not None and config.sliding_window < limit:
        limit, what = config.sliding_window, "sliding_window"
    if max_seq_len is None:
        return min(DEFAULT_MAX_SEQ_LEN, limit)
    if max_seq_len > limit:
        raise InvalidRequestError(f"max_seq_len {max_seq_len} exceeds the model's "
                                  f"{what} ({limit})")
    return max_seq_len


def make_backend(name: str, weights, kv_cache, max_seq_len: int, **options) -> Backend:
    if name == "torch":
        from .backends.torch_backend import TorchBackend
        return TorchBackend(weights, kv_cache, **options)
    if name == "reference":
        from .backends.reference_backend import ReferenceBackend
        return ReferenceBackend(weights, kv_cache, **options)
    if name == "megakernel":
        from .backends.megakernel_backend import MegakernelBackend
        return MegakernelBackend(weights, kv_cache, max_seq_len, **options)
    raise InvalidRequestError(f"unknown backend '{name}'")


def generate(model: str, prompt, **kwargs) -> GenerationResult:
    """One-shot convenience: Engine.from_pretrained(model, ...) then generate(prompt, ...)."""
    load_keys = {"device", "backend", "dtype", "max_seq_len", "page_size", "seed", "progress",
                 "steps_per_launch", "prompt_graphs"}
    load_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in load_keys}
    load_kwargs.setdefault("prompt_graphs", False)     # one generation: no graph pays
    engine = Engine.from_pretrained(model, **load_kwargs)
    return engine.generate(prompt, **kwargs)
