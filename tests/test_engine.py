"""The public API on the CPU: results, sampling, streaming, stop tokens, and every bad
input giving a clear error while the engine keeps working."""
from __future__ import annotations

import pytest
import torch

import megakernel
from megakernel.errors import (BackendUnavailableError, DeviceHungError, InvalidRequestError,
                               KVCacheExhaustedError)
from megakernel.instructions.base import gumbel_noise
from megakernel.kv_cache import PagedKVCache


@pytest.fixture(scope="module")
def engine():
    return megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend="torch",
                                             max_seq_len=128)


@pytest.fixture(scope="module")
def baseline(engine):
    return engine.generate("Hello", max_new_tokens=12, ignore_eos=True)


def test_result_fields(engine, baseline):
    r = baseline
    assert len(r.token_ids) == 12 and r.finish_reason == "length"
    assert r.prompt_token_ids == engine.tokenizer.encode("Hello")
    assert r.text == engine.tokenizer.decode(r.token_ids)
    assert r.stats.new_tokens == 12 and r.stats.prompt_tokens == len(r.prompt_token_ids)
    assert r.stats.ttft_ms > 0 and r.stats.ms_per_token > 0
    assert r.stats.tokens_per_s == pytest.approx(1000 / r.stats.ms_per_token)
    assert r.logits is None


def test_greedy_is_argmax_of_logits(engine, baseline):
    r = engine.generate("Hello", max_new_tokens=12, ignore_eos=True, output_logits=True)
    assert r.token_ids == baseline.token_ids
    assert r.logits.shape == (12, engine.config.vocab_size) and r.logits.dtype == torch.float32
    assert r.logits.argmax(-1).tolist() == r.token_ids


def test_token_id_prompt_equals_text_prompt(engine, baseline):
    r = engine.generate(engine.tokenizer.encode("Hello"), max_new_tokens=12, ignore_eos=True)
    assert r.token_ids == baseline.token_ids


def test_sampling_is_reproducible_and_seeded(engine):
    kw = dict(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    a = engine.generate("Hi", seed=1, **kw).token_ids
    assert engine.generate("Hi", seed=1, **kw).token_ids == a
    assert engine.generate("Hi", seed=2, **kw).token_ids != a


def test_top_k_and_top_p_restrict_the_choice(engine):
    greedy = engine.generate("Hi", max_new_tokens=8, ignore_eos=True).token_ids
    assert engine.generate("Hi", max_new_tokens=8, temperature=0.7, top_k=1,
                           ignore_eos=True, seed=3).token_ids == greedy
    assert engine.generate("Hi", max_new_tokens=8, temperature=0.7, top_p=1e-6,
                           ignore_eos=True, seed=3).token_ids == greedy
    r = engine.generate("Hi", max_new_tokens=8, temperature=5.0, top_k=3, seed=4,
                        ignore_eos=True, output_logits=True)
    for token, row in zip(r.token_ids, r.logits):
        assert token in torch.topk(row, 3).indices.tolist()


def test_stream_callback_gets_every_token(engine, baseline):
    seen, pieces = [], []
    engine.generate("Hello", max_new_tokens=12, ignore_eos=True,
                    stream=lambda t, s: (seen.append(t), pieces.append(s)))
    assert seen == baseline.token_ids
    assert "".join(pieces) == baseline.text


def test_stop_tokens(engine, baseline):
    stop = baseline.token_ids[4]
    first = baseline.token_ids.index(stop)
    r = engine.generate("Hello", max_new_tokens=12, stop_token_ids=[stop], ignore_eos=True)
    assert r.finish_reason == "stop" and r.token_ids == baseline.token_ids[:first + 1]


def test_eos_stops_unless_ignored(engine, baseline):
    import dataclasses

    eos = baseline.token_ids[3]
    first = baseline.token_ids.index(eos)
    with_eos = megakernel.Engine(engine.weights, engine.tokenizer, engine.backend,
                                 engine.kv_cache, engine.max_seq_len)
    with_eos.config = dataclasses.replace(engine.config, eos_token_ids=(eos,))
    r = with_eos.generate("Hello", max_new_tokens=12)
    assert r.finish_reason == "stop" and r.token_ids == baseline.token_ids[:first + 1]
    r = with_eos.generate("Hello", max_new_tokens=12, ignore_eos=True)
    assert r.finish_reason == "length" and r.token_ids == baseline.token_ids


BAD_REQUESTS = [
    (dict(prompt=""), "empty"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, 2, 10_000]), "out of range"),
    (dict(prompt=[1, -1]), "out of range"),
    (dict(prompt=[1.5]), "integer"),
    (dict(prompt="x" * 200), "longer than max_seq_len"),
    (dict(prompt="Hello", max_new_tokens=200), "exceeds max_seq_len"),
    (dict(prompt="Hello", max_new_tokens=0), "max_new_tokens"),
    (dict(prompt="Hello", temperature=-0.1), "temperature"),
    (dict(prompt="Hello", top_p=0.0), "top_p"),
    (dict(prompt="Hello", top_p=1.5), "top_p"),
    (dict(prompt="Hello", top_k=-1), "top_k"),
    (dict(prompt="Hello", chat=True), "chat template"),
    (dict(prompt=b"Hello"), "not bytes"),
    (dict(prompt="Hello", temperature=float("inf")), "finite"),
    (dict(prompt="Hello", max_new_tokens=4, stop_token_ids=["a"]), "stop_token_ids"),
    (dict(prompt="Hello", max_new_tokens=4, stop_token_ids=5), "stop_token_ids"),
    (dict(prompt="Hello", max_new_tokens=4, stop=5), "stop must be a string or a list"),
    (dict(prompt="Hello", max_new_tokens=4, seed="x"), "seed"),
    (dict(prompt="Hello", max_new_tokens=4, seed=1.5), "seed"),
    (dict(prompt="Hello", max_new_tokens=4, seed=1 << 64), "seed"),
    (dict(prompt="Hello", stream=5), "stream must be a callable"),
]


@pytest.mark.parametrize("kwargs,message", BAD_REQUESTS)
def test_bad_requests_fail_clearly_and_engine_keeps_working(engine, baseline, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.generate(**kwargs)
    again = engine.generate("Hello", max_new_tokens=12, ignore_eos=True)
    assert again.token_ids == baseline.token_ids


def test_integer_like_arguments_are_taken(engine, baseline):
    import numpy as np

    r = engine.generate(np.array(baseline.prompt_token_ids), max_new_tokens=12, ignore_eos=True,
                        stop_token_ids=torch.tensor([baseline.token_ids[5]]))
    assert r.token_ids == baseline.token_ids[:baseline.token_ids.index(baseline.token_ids[5]) + 1]
    sampled = engine.generate("Hello", max_new_tokens=6, temperature=1.0, seed=np.int64(7))
    assert sampled.token_ids == engine.generate("Hello", max_new_tokens=6, temperature=1.0,
                                                seed=7).token_ids


def test_text_prompt_without_tokenizer(tmp_path):
    from megakernel.loading import save_pretrained
    from megakernel.presets import PRESETS, random_weights

    save_pretrained(random_weights(PRESETS["tiny"], seed=0), tmp_path)
    engine = megakernel.Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=64)
    assert engine.tokenizer is None
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        engine.generate("Hello")
    assert len(engine.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_kv_exhaustion_is_an_error_before_any_work(engine, baseline):
    small = PagedKVCache(engine.config, max_seq_len=128, page_size=16, num_pages=2)
    from megakernel.backends.torch_backend import TorchBackend
    tight = megakernel.Engine(engine.weights, engine.tokenizer,
                              TorchBackend(engine.weights, small), small, max_seq_len=128)
    with pytest.raises(KVCacheExhaustedError, match="exhausted"):
        tight.generate("Hello", max_new_tokens=40)
    r = tight.generate("Hello", max_new_tokens=12, ignore_eos=True)
    assert r.token_ids == baseline.token_ids


def test_interrupt_leaves_engine_usable(engine, baseline):
    def stream(token, piece):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(token)

    calls = []
    with pytest.raises(KeyboardInterrupt):
        engine.generate("Hello", max_new_tokens=12, ignore_eos=True, stream=stream)
    assert calls == baseline.token_ids[:3]
    assert engine.generate("Hello", max_new_tokens=12, ignore_eos=True).token_ids == \
        baseline.token_ids


def test_a_hung_device_is_refused_until_idle_then_the_engine_recovers(monkeypatch, baseline):
    # A launch that outlives the readback's bound (no watchdog ended it): generate raises,
    # recovery finds the device still busy and marks it hung instead of waiting on it;
    # later calls are refused without touching the KV cache until the device is idle.
    # (The device is simulated on the CPU; test_readback.py has the real one on a GPU.)
    import megakernel.engine as engine_module
    eng = megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend="torch",
                                            max_seq_len=128)
    device_idle = False
    monkeypatch.setattr(engine_module, "synchronize_within", lambda device, s: device_idle)

    def read_times_out(ticket):
        raise DeviceHungError("the device did not finish a decode step within 0.1 s")

    monkeypatch.setattr(eng.readback, "read_tokens", read_times_out)
    with pytest.raises(DeviceHungError, match="did not finish"):
        eng.generate("Hello", max_new_tokens=12, ignore_eos=True)
    assert eng.hung
    monkeypatch.undo()
    monkeypatch.setattr(engine_module, "synchronize_within", lambda device, s: device_idle)
    reserved = eng.kv_cache.pages()      # left as the hung launch may still use them
    with pytest.raises(DeviceHungError, match="still running"):
        eng.generate("Hello", max_new_tokens=12, ignore_eos=True)
    assert eng.kv_cache.pages() == reserved
    device_idle = True
    assert eng.generate("Hello", max_new_tokens=12, ignore_eos=True).token_ids == \
        baseline.token_ids
    assert not eng.hung


def test_backend_choice_errors():
    with pytest.raises(InvalidRequestError, match="unknown backend"):
        megakernel.Engine.from_pretrained("random:tiny", backend="nope", device="cpu")
    with pytest.raises(InvalidRequestError, match="max_seq_len"):
        megakernel.Engine.from_pretrained("random:tiny", device="cpu", max_seq_len=0)
    for device, message in (("banana", "unknown device 'banana'"),
                            ("meta", "device 'meta' is not supported"),
                            ("cuda:x", "unknown device")):
        with pytest.raises(InvalidRequestError, match=message):
            megakernel.Engine.from_pretrained("random:tiny", device=device)
    if torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="does not exist: this machine has"):
            megakernel.Engine.from_pretrained("random:tiny", device="cuda:64")
    for page_size in (0, -4, 2.0):
        with pytest.raises(InvalidRequestError, match="page_size must be a positive integer"):
            megakernel.Engine.from_pretrained("random:tiny", device="cpu", page_size=page_size)
    for seed in (None, "0", 0.5):
        with pytest.raises(InvalidRequestError, match="seed must be an integer"):
            megakernel.Engine.from_pretrained("random:tiny", device="cpu", seed=seed)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="megakernel"):
            megakernel.Engine.from_pretrained("random:tiny", backend="megakernel")
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            megakernel.Engine.from_pretrained("random:tiny", device="cuda")


def test_default_backend_on_cpu_is_torch():
    engine = megakernel.Engine.from_pretrained("random:tiny", max_seq_len=64)
    if not torch.cuda.is_available():
        assert engine.backend_name == "torch" and engine.weights.dtype == torch.float32


def test_backends_agree(baseline):
    ref = megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend="reference",
                                            max_seq_len=128)
    r = ref.generate("Hello", max_new_tokens=12, ignore_eos=True)
    assert r.token_ids == baseline.token_ids


def reference_engine(steps_per_launch: int):
    """The tiny random model on the reference backend (the instruction stream on the CPU),
    chaining steps_per_launch steps per launch."""
    return megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend="reference",
                                             max_seq_len=128, steps_per_launch=steps_per_launch)


def test_chained_greedy_steps_equal_one_step_per_launch(baseline):
    """Greedy steps chained 3 per launch (the reference backend runs the chained program)
    give the same tokens, logits and stream as one step per launch: the last launch is cut
    to the tokens left, and the tokens a launch decoded past a stop token are dropped."""
    one, three = reference_engine(1), reference_engine(3)
    assert three.backend.steps_per_launch == 3
    a = one.generate("Hello", max_new_tokens=12, ignore_eos=True, output_logits=True)
    seen = []
    b = three.generate("Hello", max_new_tokens=12, ignore_eos=True, output_logits=True,
                       stream=lambda t, piece: seen.append(t))
    assert b.token_ids == a.token_ids == baseline.token_ids and seen == a.token_ids
    assert torch.equal(b.logits, a.logits) and b.logits.shape[0] == 12
    stop = a.token_ids[5]
    first = a.token_ids.index(stop)
    r = three.generate("Hello", max_new_tokens=12, stop_token_ids=[stop], ignore_eos=True)
    assert r.finish_reason == "stop" and r.token_ids == a.token_ids[:first + 1]
    assert three.generate("Hello", max_new_tokens=2, ignore_eos=True).token_ids == \
        a.token_ids[:2]


def test_temperature_sampling_chains_in_the_stream():
    """Plain temperature sampling on the reference backend runs the program that draws each
    step's token (scheduler.with_sampled_tokens), chained like greedy steps: 3 steps per
    launch give the tokens of 1 per launch, a seed gives the same tokens again and another
    seed others, and each token after the prompt's is the argmax of its step's logits /
    temperature + the stream's noise at its position."""
    one, three = reference_engine(1), reference_engine(3)
    prompt = [5, 9, 13, 2, 7]
    kw = dict(max_new_tokens=10, ignore_eos=True, temperature=1.7, output_logits=True)
    a = one.generate(prompt, seed=11, **kw)
    b = three.generate(prompt, seed=11, **kw)
    assert b.token_ids == a.token_ids and torch.equal(b.logits, a.logits)
    assert three.generate(prompt, seed=12, **kw).token_ids != a.token_ids
    rows = torch.arange(a.logits.shape[1])
    for i in range(1, len(a.token_ids)):
        scores = a.logits[i] * (1 / 1.7) + gumbel_noise(11, len(prompt) + i - 1, rows)
        assert int(torch.argmax(scores)) == a.token_ids[i]


@pytest.mark.parametrize("restrict, one_token", [
    (dict(top_k=5), dict(top_k=1)), (dict(top_p=0.6), dict(top_p=1e-6)),
    (dict(top_k=5, top_p=0.6), dict(top_k=5, top_p=1e-6))])
def test_top_k_and_top_p_sampling_chain_in_the_stream(baseline, restrict, one_token):
    """Top-k (k <= MAX_TOP_K), top-p or both on the reference backend runs the program
    with the top-k or nucleus stages, chained: 3 steps per launch give 1's tokens, each
    token is the argmax of its step's logits / temperature + the noise over the tokens
    sampling.masked_scores keeps, and keeping one token is greedy decoding."""
    from megakernel.sampling import masked_scores

    one, three = reference_engine(1), reference_engine(3)
    prompt = [5, 9, 13, 2, 7]
    kw = dict(max_new_tokens=10, ignore_eos=True, temperature=1.7, output_logits=True)
    a = one.generate(prompt, seed=11, **kw, **restrict)
    b = three.generate(prompt, seed=11, **kw, **restrict)
    assert b.token_ids == a.token_ids and torch.equal(b.logits, a.logits)
    rows = torch.arange(a.logits.shape[1])
    top_k, top_p = restrict.get("top_k", 0), restrict.get("top_p", 1.0)
    for i in range(1, len(a.token_ids)):
        kept = masked_scores(a.logits[i], 1.7, top_k, top_p) > float("-inf")
        scores = a.logits[i] * (1 / 1.7) + gumbel_noise(11, len(prompt) + i - 1, rows)
        assert int(torch.argmax(scores.masked_fill(~kept, float("-inf")))) == a.token_ids[i]
    greedy = three.generate("Hello", max_new_tokens=12, ignore_eos=True, temperature=0.5,
                            **one_token)
    assert greedy.token_ids == baseline.token_ids


def test_a_backend_that_samples_between_launches_refuses_a_device_draw(engine):
    """The torch backend draws no token on the device: decode_steps with a Sampling is a
    clear error, and the engine samples between launches there instead."""
    from megakernel.instructions import Sampling

    assert not engine.backend.chains_sampling
    with pytest.raises(InvalidRequestError, match="does not draw tokens on the device"):
        engine.backend.decode_steps(torch.tensor(5), 0, 1, sampling=Sampling(1.0, 0))


@pytest.mark.parametrize("backend,steps,message", [
    ("reference", 0, "steps_per_launch"), ("reference", 17, r"\[1, 16\]"),
    ("reference", 2.0, "integer"), ("torch", 4, "one step per launch")])
def test_bad_steps_per_launch_is_a_clear_error(backend, steps, message):
    with pytest.raises(InvalidRequestError, match=message):
        megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend=backend,
                                          max_seq_len=64, steps_per_launch=steps)


def test_one_shot_generate(baseline):
    r = megakernel.generate("random:tiny", "Hello", max_new_tokens=12, ignore_eos=True,
                            device="cpu", backend="torch", max_seq_len=128)
    assert r.token_ids == baseline.token_ids


def test_prompt_graphs_are_captured_after_the_last_token_unless_turned_off(monkeypatch,
                                                                          baseline):
    """generate() has the backend capture its pending prompt graphs once every token is
    out (after the last streamed one), and not when the generation failed, when the engine
    was made with prompt_graphs=False, or in the one-shot generate()."""
    from megakernel.backends.torch_backend import TorchBackend

    events = []
    def capture(self, keep_positions):
        events.append(("capture", keep_positions))
        return 0, False

    monkeypatch.setattr(TorchBackend, "capture_prompt_graphs", capture)
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend="torch",
                                               max_seq_len=128)
    engine.generate("Hello", max_new_tokens=12, ignore_eos=True,
                    stream=lambda token, piece: events.append(token))
    # It spares the K/V the cache keeps: the prompt's and the new tokens' but the last.
    kept = len(baseline.prompt_token_ids) + len(baseline.token_ids) - 1
    assert events == baseline.token_ids + [("capture", kept)]

    def interrupt(token, piece):
        raise KeyboardInterrupt

    events.clear()
    with pytest.raises(KeyboardInterrupt):
        engine.generate("Hello", max_new_tokens=4, stream=interrupt)
    assert events == []
    off = megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend="torch",
                                            max_seq_len=128, prompt_graphs=False)
    assert off.generate("Hello", max_new_tokens=12, ignore_eos=True).token_ids == \
        baseline.token_ids
    megakernel.generate("random:tiny", "Hello", max_new_tokens=4, device="cpu",
                        backend="torch", max_seq_len=128)
    assert events == []


def test_megakernel_on_an_unsupported_gpu_is_a_clear_error(monkeypatch):
    """An sm_80 GPU (simulated): the megakernel backend is refused, naming both
    architectures, before anything is loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    ok, reason = megakernel.megakernel_available()
    assert not ok and "sm_90" in reason and "sm_80" in reason
    with pytest.raises(BackendUnavailableError, match="sm_80"):
        megakernel.Engine.from_pretrained("random:tiny", backend="megakernel",
                                          device="cuda")


@pytest.mark.parametrize("backend, pages", [("torch", 4), ("reference", 3)])
def test_generate_reserves_the_pages_its_backend_s_prompt_path_writes(backend, pages):
    """33 prompt tokens + 2 new need positions [0, 36): 3 pages of 16. The torch prompt path
    runs its last chunk padded to the 64-token bucket, so it gets pages up to 64; the
    reference path writes the prompt's own positions only."""
    eng = megakernel.Engine.from_pretrained("random:tiny", device="cpu", backend=backend,
                                            max_seq_len=128)
    assert eng.kv_cache.page_size == 16
    eng.generate(list(range(3, 36)), max_new_tokens=2, ignore_eos=True)
    assert len(eng.kv_cache.pages()) == pages
