"""Whole-model checks of the megakernel backend on the GPU: parity with transformers,
token-exact agreement with the reference interpreter, long contexts and long runs."""
from __future__ import annotations

import pytest
import torch

import megakernel
from megakernel.instructions.base import gumbel_noise
from conftest import hf_llama_config, write_hf_checkpoint
from tolerances import MODEL_RELATIVE_TOLERANCE, relative_error

pytestmark = pytest.mark.gpu

CONFIGS = {
    "gqa4-hd64": dict(num_heads=8, num_kv_heads=2, head_dim=64, intermediate=1376),
    "gqa8-hd128-tied": dict(num_heads=8, num_kv_heads=1, head_dim=128, tied=True,
                            intermediate=2048),
    "gqa4-hd128-llama3": dict(num_heads=4, num_kv_heads=1, head_dim=128, rope_scaling=True,
                              intermediate=1024, vocab=1003),
    "gqa1-hd64-tied": dict(num_heads=4, num_kv_heads=4, head_dim=64, tied=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_config = hf_llama_config(**CONFIGS[request.param])
    hf_config.max_position_embeddings = 16384
    model = write_hf_checkpoint(path, hf_config, seed=2, dtype=torch.bfloat16, logit_scale=3.0)
    return path, model


def hf_logits(model, prompt, new_tokens):
    """Teacher-forced float32 logits at the positions that produced new_tokens."""
    ids = torch.tensor([prompt + new_tokens[:-1]], device="cuda")
    with torch.no_grad():
        logits = model.to("cuda")(ids).logits[0].float()
    model.to("cpu")
    return logits[len(prompt) - 1:].cpu()


def make_engine(path, max_seq_len, **backend_options):
    return megakernel.Engine.from_pretrained(str(path), device="cuda", backend="megakernel",
                                             max_seq_len=max_seq_len, page_size=16,
                                             shuffle_pages_seed=11, poison_cache=True,
                                             **backend_options)


def check_parity(engine, model, prompt_len):
    """24 greedy tokens after a seeded prompt of prompt_len tokens, against transformers."""
    prompt = torch.randint(3, 200, (prompt_len,), generator=torch.Generator().manual_seed(
        prompt_len)).tolist()
    result = engine.generate(prompt, max_new_tokens=24, ignore_eos=True, output_logits=True)
    expected = hf_logits(model, prompt, result.token_ids)
    assert relative_error(result.logits, expected) < MODEL_RELATIVE_TOLERANCE[torch.bfloat16]
    # Greedy choices agree wherever transformers' own margin is clear of bf16 noise
    # (logits here have a spread of several units).
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    assert clear.sum() >= len(clear) // 2
    chosen = torch.tensor(result.token_ids)
    assert torch.equal(chosen[clear], expected.argmax(-1)[clear])


@pytest.mark.parametrize("prompt_len", [1, 37, 1500])
def test_parity_with_transformers(checkpoint, prompt_len):
    path, model = checkpoint
    check_parity(make_engine(path, max_seq_len=2048), model, prompt_len)


def test_mistral_parity_with_transformers(tmp_path):
    """A MistralForCausalLM checkpoint whose sliding window is the engine's max_seq_len."""
    hf_config = hf_llama_config(num_heads=8, num_kv_heads=2, head_dim=128, hidden=512,
                                intermediate=1376, rope_theta=1e6, mistral_window=2048)
    model = write_hf_checkpoint(tmp_path, hf_config, seed=3, dtype=torch.bfloat16,
                                logit_scale=3.0)
    engine = make_engine(tmp_path, max_seq_len=None)
    assert engine.max_seq_len == 2048
    for prompt_len in (1, 37, 1500):
        check_parity(engine, model, prompt_len)


def test_parity_with_transformers_through_long_prefill_chunks(checkpoint):
    """A 4700-token prompt prefills in two long chunks of 2048 tokens (unpadded, no graph),
    one of 512 and a padded last one of 92; twice, the second replaying the short chunks'
    graphs."""
    path, model = checkpoint
    engine = make_engine(path, max_seq_len=4800)
    prompt = torch.randint(3, 200, (4700,), generator=torch.Generator().manual_seed(3)).tolist()
    results = [engine.generate(prompt, max_new_tokens=16, ignore_eos=True, output_logits=True)
               for _ in range(2)]
    expected = hf_logits(model, prompt, results[0].token_ids)
    for result in results:
        assert result.token_ids == results[0].token_ids
        assert relative_error(result.logits, expected) < MODEL_RELATIVE_TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("page_size", [1, 7, 64])
def test_parity_with_transformers_at_other_page_sizes(checkpoint, page_size):
    """Pages of 1, 7 and 64 tokens (the default is 16) through the prompt path, the
    whole-context program and past its limit (192 positions at head_dim 64, 96 at 128)
    the split one."""
    path, model = checkpoint
    engine = megakernel.Engine.from_pretrained(str(path), device="cuda", backend="megakernel",
                                               max_seq_len=512, page_size=page_size,
                                               shuffle_pages_seed=5, poison_cache=True)
    prompt = torch.randint(3, 200, (170,), generator=torch.Generator().manual_seed(7)).tolist()
    result = engine.generate(prompt, max_new_tokens=40, ignore_eos=True, output_logits=True)
    expected = hf_logits(model, prompt, result.token_ids)
    assert relative_error(result.logits, expected) < MODEL_RELATIVE_TOLERANCE[torch.bfloat16]


@pytest.mark.slow
def test_parity_at_8k_context(checkpoint):
    path, model = checkpoint
    engine = make_engine(path, max_seq_len=8300)
    prompt = torch.randint(3, 200, (8160,), generator=torch.Generator().manual_seed(0)).tolist()
    result = engine.generate(prompt, max_new_tokens=40, ignore_eos=True, output_logits=True)
    expected = hf_logits(model, prompt, result.token_ids)
    assert relative_error(result.logits, expected) < MODEL_RELATIVE_TOLERANCE[torch.bfloat16]


def test_greedy_tokens_equal_reference_over_128_steps(checkpoint):
    """Same bf16 weights and bf16 KV cache: the CPU interpreter and the kernel differ only
    in summation order, which must not flip a single greedy token of a peaked model."""
    path, _ = checkpoint
    prompt = [1, 5, 9, 33, 7]
    # The prompt also goes through the kernel (not the torch prefill, whose bf16 matmuls
    # round differently), so every token comes from the instruction stream on both sides.
    engine = megakernel.Engine.from_pretrained(str(path), device="cuda", backend="megakernel",
                                               max_seq_len=256, prefill_mode="decode")
    gpu = engine.generate(prompt, max_new_tokens=128, ignore_eos=True)
    ref = megakernel.Engine.from_pretrained(str(path), device="cpu", backend="reference",
                                            dtype=torch.bfloat16, max_seq_len=256)
    expected = ref.generate(prompt, max_new_tokens=128, ignore_eos=True)
    assert gpu.token_ids == expected.token_ids
    # Blocks cut for four times the SMs: every SM runs several instructions of each stage,
    # so its controller meets waits it already saw hold (and skips their loads).
    from megakernel.scheduler import build_program

    backend = engine.backend
    backend.load_program(build_program(backend.config, num_sms=4 * backend.num_sms,
                                       page_size=backend.kv_cache.page_size,
                                       max_seq_len=backend.max_seq_len))
    many_waves = engine.generate(prompt, max_new_tokens=128, ignore_eos=True)
    assert many_waves.token_ids == expected.token_ids


def test_whole_context_attention_below_its_limit_then_the_split_program(checkpoint):
    """Positions below whole_context_limit() decode with the program whose attention needs
    no reduce stage, the others with the split one: a generation across the switch gives
    the tokens and logits of a backend that runs the split program everywhere."""
    from megakernel.scheduler import whole_context_limit

    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=512)
    split = make_engine(path, max_seq_len=512, whole_context_positions=0)
    limit = whole_context_limit(engine.config)

    def reduces(backend, position):
        return "attention_reduce" in backend.program_for(position).opcode_counts()

    assert not reduces(engine.backend, limit - 1) and reduces(engine.backend, limit)
    assert reduces(split.backend, 0)
    prompt = [3 + i % 200 for i in range(limit - 20)]
    a = engine.generate(prompt, max_new_tokens=40, ignore_eos=True, output_logits=True)
    b = split.generate(prompt, max_new_tokens=40, ignore_eos=True, output_logits=True)
    assert a.token_ids == b.token_ids
    assert relative_error(a.logits, b.logits) < 1e-3
    # The engine switched back for the next prompt: the same result again.
    again = engine.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert again.token_ids == a.token_ids


def test_carried_gate_up_prefetches_change_no_result():
    """On the 1B shape (gate_up runs long enough to carry prefetches): the programs below
    early_gate_up_positions carry L2 prefetches under qkv (o_proj's), the attention and
    o_proj, the split program above it under its reduce stage and o_proj, and a
    generation across both switches gives, bit for bit, the logits of an engine whose
    programs carry none."""
    from megakernel.scheduler import whole_context_limit

    def engine(early, late):
        return megakernel.Engine.from_pretrained(
            "random:llama-3.2-1b", device="cuda", backend="megakernel", max_seq_len=512,
            early_gate_up_positions=early, late_gate_up=late)

    def carriers(backend, position):
        return {i.spec.name for i in backend.program_for(position).instruction_list()
                if i.l2_prefetch}

    carrying, plain = engine(256, True), engine(0, False)
    whole_end = whole_context_limit(carrying.config)
    assert whole_end < 256
    early = {"rms_qkv_rope", "attention_partial", "o_proj_residual"}
    assert [carriers(carrying.backend, p) for p in (0, whole_end, 255, 256)] == [
        early, early, early, {"attention_reduce", "o_proj_residual"}]
    assert not any(carriers(plain.backend, p) for p in (0, whole_end, 256))
    prompt = [1000 + i for i in range(whole_end - 40)]
    a = carrying.generate(prompt, max_new_tokens=150, ignore_eos=True, output_logits=True)
    b = plain.generate(prompt, max_new_tokens=150, ignore_eos=True, output_logits=True)
    assert len(prompt) + 150 > 256
    assert a.token_ids == b.token_ids
    assert torch.equal(a.logits, b.logits)


def test_kv_group_waits_change_no_result():
    """On the 1B shape (8 KV groups, qkv blocks running on across heads and groups): with
    each attention block waiting on its KV group's qkv blocks alone, a generation across the
    whole-context and split programs gives, bit for bit, the logits of the stage-wide wait."""
    from megakernel.scheduler import whole_context_limit

    def engine(grouped):
        return megakernel.Engine.from_pretrained(
            "random:llama-3.2-1b", device="cuda", backend="megakernel", max_seq_len=512,
            kv_group_waits=grouped)

    def attention_waits(backend, position):
        return {i.waits for i in backend.program_for(position).instruction_list()
                if i.spec.name == "attention_partial" and i.layer == 3}

    grouped, staged = engine(True), engine(False)
    whole_end = whole_context_limit(grouped.config)
    for position in (0, whole_end):
        assert len(attention_waits(grouped.backend, position)) == 8
        assert len(attention_waits(staged.backend, position)) == 1
    prompt = [1000 + i for i in range(whole_end - 40)]
    a = grouped.generate(prompt, max_new_tokens=100, ignore_eos=True, output_logits=True)
    b = staged.generate(prompt, max_new_tokens=100, ignore_eos=True, output_logits=True)
    assert a.token_ids == b.token_ids
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("steps_per_launch,launches", [(1, 16), (8, 2), (5, 4)])
def test_one_launch_per_chain_of_decode_steps(checkpoint, steps_per_launch, launches):
    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=256, steps_per_launch=steps_per_launch)
    before = engine.backend.launches
    engine.generate([1, 2, 3], max_new_tokens=17, ignore_eos=True)
    # 16 decode steps after the prefill's token, in launches of steps_per_launch (the last
    # one cut to the steps left).
    assert engine.backend.launches - before == launches


@pytest.mark.parametrize("whole_context_positions", [None, 0])
def test_chained_steps_equal_one_step_per_launch(checkpoint, whole_context_positions):
    """Greedy steps chained in one launch (each token the argmax of the step before,
    chosen on the device; the K/V rows of the launch's earlier steps read after the wait)
    give the tokens and logits of one step per launch, bit for bit wherever both run the
    same program: below the whole-context limit and with the split program everywhere
    (whole_context_positions=0). A chain that crosses the limit runs the split program
    from its first step (the program of its last position): the same tokens there."""
    from megakernel.scheduler import whole_context_limit

    path, _ = checkpoint
    kw = dict(max_seq_len=512, whole_context_positions=whole_context_positions)
    one = make_engine(path, steps_per_launch=1, **kw)
    prompt = list(range(3, 83))
    expected = one.generate(prompt, max_new_tokens=150, ignore_eos=True, output_logits=True)
    limit = whole_context_limit(one.config)
    for steps in (5, 16):
        chained = make_engine(path, steps_per_launch=steps, **kw)
        got = chained.generate(prompt, max_new_tokens=150, ignore_eos=True,
                               output_logits=True)
        assert got.token_ids == expected.token_ids, steps
        if whole_context_positions == 0:
            assert torch.equal(got.logits, expected.logits), steps
            continue
        # Token i came from the step at position len(prompt) + i - 1 (token 0: prefill).
        exact = 1 + max(0, (limit - len(prompt)) // steps * steps)
        assert torch.equal(got.logits[:exact], expected.logits[:exact]), steps
        assert relative_error(got.logits, expected.logits) < 1e-2, steps


def test_a_prepared_generation_builds_no_program(checkpoint, monkeypatch):
    """The greedy chains are built with the backend and a sampling kind's programs by
    Engine.prepare (which also launches one), so a generation builds none inside its time
    to first token, also one that crosses into the split program and ends on a shorter
    chain (a view of the longer one). A kind not prepared is still built at its first
    use."""
    import megakernel.scheduler as scheduler
    from megakernel.scheduler import whole_context_limit

    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=512)
    before = engine.backend.launches
    engine.prepare(temperature=1.5, top_k=20)
    # One launch of the kind, outside any generation; its pages are poisoned again.
    assert engine.backend.launches == before + 1
    assert engine.kv_cache.pages() == [] and torch.isnan(engine.kv_cache.k).all()

    def refuse(*_args, **_kwargs):
        raise AssertionError("a program was built inside generate()")

    monkeypatch.setattr(scheduler, "chain_steps", refuse)
    monkeypatch.setattr(scheduler, "with_sampled_tokens", refuse)
    prompt = list(range(3, 3 + whole_context_limit(engine.config) - 10))
    kw = dict(max_new_tokens=21, ignore_eos=True)
    greedy = engine.generate(prompt, **kw)
    assert len(greedy.token_ids) == 21
    assert len(engine.generate(prompt, temperature=1.5, top_k=20, seed=1, **kw).token_ids) == 21
    with pytest.raises(AssertionError, match="inside generate"):
        engine.generate(prompt, temperature=1.5, top_p=0.5, **kw)
    assert engine.generate(prompt, **kw).token_ids == greedy.token_ids


def test_a_chained_launch_from_a_bad_device_token_faults_and_recovers(checkpoint):
    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=256)
    backend, vocab = engine.backend, engine.config.vocab_size
    engine.kv_cache.release()
    engine.kv_cache.reserve(64)
    out = backend.prefill(torch.tensor([1, 2, 3], device="cuda"), 0)
    good = backend.decode_steps(out.greedy_token, 3, 6)
    torch.cuda.synchronize()
    tokens = good.tokens_host.tolist()
    assert int(good.last_token) == tokens[-1] and min(tokens) >= 0
    assert good.logits.argmax(-1).tolist() == tokens
    for bad_steps in (0, 17):
        with pytest.raises(megakernel.InvalidRequestError, match="steps"):
            backend.decode_steps(good.last_token, 9, bad_steps)
    with pytest.raises(megakernel.InvalidRequestError, match="outside"):
        backend.decode_steps(good.last_token, 250, 8)
    bad = backend.decode_steps(torch.tensor([vocab + 1], device="cuda"), 9, 4)
    torch.cuda.synchronize()
    assert all(t < 0 for t in bad.tokens_host.tolist())
    with pytest.raises(megakernel.KernelFaultError) as e:
        backend.check_error()
    assert e.value.record["kind"] == "bad_token"
    again = backend.decode_steps(torch.tensor(tokens[-1], device="cuda"), 9, 6)
    full = backend.decode_steps(again.last_token, 15, 8)
    torch.cuda.synchronize()
    assert min(again.tokens_host.tolist() + full.tokens_host.tolist()) >= 0
    # A launch of fewer steps than steps_per_launch (8) runs on views of the longer chain.
    assert backend.steps_per_launch == 8 and full.logits.data_ptr() == again.logits.data_ptr()


@pytest.mark.slow
def test_long_run_to_max_seq_len_on_1b():
    """Generate up to max_seq_len on the 1B shape: no error, no memory growth, the same
    tokens three times, and teacher-forced logits at checkpoints that match the torch
    backend. The first run ends by capturing the prompt's prefill graph (its memory pool
    is the one allocation a run may add), the later ones replay it."""
    max_len = 8192
    engine = megakernel.Engine.from_pretrained("random:llama-3.2-1b", device="cuda",
                                               backend="megakernel", max_seq_len=max_len)
    prompt = list(range(1000, 1032))
    n_new = max_len - len(prompt)
    first = engine.generate(prompt, max_new_tokens=n_new, ignore_eos=True)
    second = engine.generate(prompt, max_new_tokens=n_new, ignore_eos=True)
    torch.cuda.synchronize()
    mem = torch.cuda.memory_allocated()
    third = engine.generate(prompt, max_new_tokens=n_new, ignore_eos=True)
    torch.cuda.synchronize()
    assert len(first.token_ids) == n_new
    assert second.token_ids == first.token_ids and third.token_ids == first.token_ids
    assert torch.cuda.memory_allocated() <= mem

    # Teacher forcing: feed the generated sequence through the torch backend and compare
    # the logits the megakernel produced at a few checkpoints along the run.
    torch_engine = megakernel.Engine(engine.weights, engine.tokenizer,
                                     megakernel.engine.make_backend(
                                         "torch", engine.weights, engine.kv_cache, max_len),
                                     engine.kv_cache, max_len)
    sequence = prompt + first.token_ids
    for checkpoint_pos in (64, 2048, max_len - 2):
        torch_engine.kv_cache.release()
        torch_engine.kv_cache.reserve(checkpoint_pos + 1)
        ref = torch_engine.backend.prefill(torch.tensor(sequence[:checkpoint_pos + 1],
                                                        device="cuda"), 0).logits.float()
        engine.kv_cache.release()
        engine.kv_cache.reserve(checkpoint_pos + 2)
        engine.backend.reset()
        engine.backend.prefill(torch.tensor(sequence[:checkpoint_pos], device="cuda"), 0)
        got = engine.backend.decode(torch.tensor(sequence[checkpoint_pos], device="cuda"),
                                    checkpoint_pos).logits.float()
        assert relative_error(got.cpu(), ref.cpu()) < MODEL_RELATIVE_TOLERANCE[torch.bfloat16]


def test_interrupt_and_bad_input_leave_the_kernel_usable(checkpoint):
    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=256)
    baseline = engine.generate([1, 2, 3], max_new_tokens=20, ignore_eos=True).token_ids

    def stream(token, piece):
        if len(seen) == 5:
            raise KeyboardInterrupt
        seen.append(token)

    seen = []
    with pytest.raises(KeyboardInterrupt):
        engine.generate([1, 2, 3], max_new_tokens=20, ignore_eos=True, stream=stream)
    assert seen == baseline[:5]
    with pytest.raises(megakernel.InvalidRequestError):
        engine.generate([1, 2, 10**7], max_new_tokens=20)
    assert engine.generate([1, 2, 3], max_new_tokens=20, ignore_eos=True).token_ids == baseline


def test_streams_ended_mid_launch_leave_the_kernel_usable(checkpoint):
    """generate_stream on the kernel: its pieces are generate()'s; closed after 10 tokens
    (inside the second chained launch of 8, with the third queued), or left open for the
    next generation, the engine goes on with the same tokens."""
    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=256)
    kw = dict(max_new_tokens=40, ignore_eos=True, temperature=0.8, top_k=20, seed=5)
    baseline = engine.generate([1, 2, 3], **kw)
    stream = engine.generate_stream([1, 2, 3], **kw)
    assert "".join(stream) == baseline.text and stream.token_ids == baseline.token_ids
    with engine.generate_stream([1, 2, 3], **kw) as stream:
        for _ in range(10):
            next(stream)
    assert not stream.open and stream.token_ids == baseline.token_ids[:10]
    assert engine.generate([1, 2, 3], **kw).token_ids == baseline.token_ids
    left_open = engine.generate_stream([1, 2, 3], **kw)
    next(left_open)
    assert engine.generate([1, 2, 3], **kw).token_ids == baseline.token_ids
    with pytest.raises(megakernel.InvalidRequestError, match="later generation"):
        next(left_open)


def test_a_reused_prefix_gives_the_logits_of_the_whole_prompt(checkpoint):
    """generate(..., reuse_prefix=True) on shuffled, NaN-poisoned pages: the kept K/V (a
    prompt prefilled by the prompt path and tokens the kernel decoded) serve the next
    prompt, whose logits match transformers' over the whole prompt; the graphs their
    chunks leave pending serve any start of their window, and a capture after a
    generation leaves its K/V to reuse. (Each generation is checked on its own tokens: a
    bf16 near-tie may pick another one where the K/V were rounded apart.)"""
    path, model = checkpoint
    engine = make_engine(path, max_seq_len=256)
    prompt = [1, 5, 9, 33, 7, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83]
    first = engine.generate(prompt, max_new_tokens=40, ignore_eos=True, reuse_prefix=True)
    follow = prompt + first.token_ids + [11, 12, 13]
    kw = dict(max_new_tokens=24, ignore_eos=True, output_logits=True)
    tolerance = MODEL_RELATIVE_TOLERANCE[torch.bfloat16]

    def check(result, reused_tokens):
        assert result.stats.reused_tokens == reused_tokens
        ref = hf_logits(model, follow, result.token_ids)
        assert relative_error(result.logits, ref) < tolerance

    graphs = engine.backend._prefill_backend._prompt_graphs
    captures = graphs.captures
    kept = engine.generate(follow, reuse_prefix=True, **kw)   # a 4-token chunk at 58
    check(kept, len(prompt) + 40 - 1)
    # Its chunk's graph (bucket 16, the window of the cache's 256 positions) was captured
    # after it, in a spare page.
    assert graphs.captures == captures + 1 and (16, 256) in graphs._windowed
    whole = engine.generate(follow, **kw)      # its bucket's graph is captured after it
    check(whole, 0)
    assert graphs.captures == captures + 2
    # The next chunk at another start of the window replays that graph; the capture after
    # the whole prompt left its K/V in the cache.
    turn = follow + whole.token_ids + [14, 15]
    replayed = engine.generate(turn, reuse_prefix=True, **kw)
    assert replayed.stats.reused_tokens == len(follow) + 24 - 1
    assert graphs.captures == captures + 2
    ref = hf_logits(model, turn, replayed.token_ids)
    assert relative_error(replayed.logits, ref) < tolerance


def test_a_stream_closed_mid_launch_keeps_the_prefix_its_finished_launches_wrote(checkpoint):
    """Closed after 10 tokens (inside the second chained launch of 8, the third queued),
    a stream leaves the prompt and its first 9 new tokens in the cache, once the launches
    in flight have finished: the next prompt reuses them and its logits match
    transformers' over the whole prompt."""
    path, model = checkpoint
    engine = make_engine(path, max_seq_len=256)
    prompt = [1, 5, 9, 33, 7, 70, 71, 72, 73, 74, 75]
    with engine.generate_stream(prompt, max_new_tokens=40, ignore_eos=True) as stream:
        for _ in range(10):
            next(stream)
    follow = prompt + stream.token_ids + [11, 12]
    result = engine.generate(follow, reuse_prefix=True, max_new_tokens=24, ignore_eos=True,
                             output_logits=True)
    assert result.stats.reused_tokens == len(prompt) + 9
    expected = hf_logits(model, follow, result.token_ids)
    assert relative_error(result.logits, expected) < MODEL_RELATIVE_TOLERANCE[torch.bfloat16]


def test_a_stop_string_drops_the_tokens_launches_decoded_past_it():
    """8 greedy steps a launch: the text ends before the stop string, and the tokens end
    with the one that completed it, whichever step of its launch that was."""
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cuda",
                                               backend="megakernel", max_seq_len=256)
    full = engine.generate("Hello", max_new_tokens=64, ignore_eos=True)
    n = len(full.text)
    for start in (n // 8, n // 2, n * 7 // 8):
        stop = full.text[start:start + 3]
        cut = full.text.find(stop)
        pieces = []
        r = engine.generate("Hello", max_new_tokens=64, ignore_eos=True, stop=stop,
                            stream=lambda _token, piece: pieces.append(piece))
        assert r.finish_reason == "stop" and r.text == "".join(pieces) == full.text[:cut]
        assert r.token_ids == full.token_ids[:len(r.token_ids)]
        assert stop in engine.decode_text(r.token_ids)
        assert stop not in engine.decode_text(r.token_ids[:-1])
    assert engine.generate("Hello", max_new_tokens=64, ignore_eos=True).token_ids == \
        full.token_ids


def test_step_token_from_the_device_or_the_host(checkpoint):
    """decode() takes the step's token as an int or as the device int64 a previous step
    left (the kernel reads either through its launch arguments; no copy runs between the
    steps) and writes each result to host memory as well as to the device. Both give the
    same bits; a token outside the vocabulary is refused and the backend keeps working."""
    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=256)
    backend, vocab = engine.backend, engine.config.vocab_size
    engine.kv_cache.release()
    engine.kv_cache.reserve(32)

    def run(feed_from_device: bool):
        backend.reset()
        out = backend.prefill(torch.tensor([1, 2, 3], device="cuda"), 0)
        token = out.greedy_token if feed_from_device else int(out.greedy_token)
        steps = []
        for pos in range(3, 11):
            out = backend.decode(token, pos)
            torch.cuda.synchronize()
            assert int(out.greedy_token_host) == int(out.greedy_token)
            steps.append((int(out.greedy_token), out.logits.clone()))
            token = out.greedy_token if feed_from_device else int(out.greedy_token)
        return steps

    from_device, from_host = run(True), run(False)
    assert [t for t, _ in from_device] == [t for t, _ in from_host]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(from_device, from_host))

    # From the host: refused before the launch. From the device: refused by the kernel.
    launches = backend.launches
    for bad in (vocab + 5, -1, 10**30):
        with pytest.raises(megakernel.InvalidRequestError, match="outside the vocabulary"):
            backend.decode(bad, 3)
    assert backend.launches == launches
    for bad in (torch.tensor(-2, device="cuda"), torch.tensor([vocab])):
        backend.decode(bad, 3)
        torch.cuda.synchronize()
        with pytest.raises(megakernel.KernelFaultError) as e:
            backend.check_error()
        assert e.value.record["kind"] == "bad_token"
        assert e.value.record["seen"] == int(bad)
    again = run(True)
    assert [t for t, _ in again] == [t for t, _ in from_device]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, from_device))


def test_temperature_sampling_is_drawn_on_the_device(checkpoint):
    """Plain temperature sampling chains its steps in launches like greedy decoding (the
    sampled program, scheduler.with_sampled_tokens): the same seed gives the same tokens,
    at 8 steps per launch as at 1, another seed others, and each step's token is the
    argmax of its logits / temperature + the kernel's noise at its position."""
    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=256)
    prompt, temperature = [5, 9, 13, 2, 7], 1.5
    kw = dict(max_new_tokens=24, ignore_eos=True, temperature=temperature, output_logits=True)
    launches = engine.backend.launches
    first = engine.generate(prompt, seed=3, **kw)
    assert engine.backend.launches - launches <= 4      # 23 steps, 8 per launch
    assert engine.generate(prompt, seed=3, **kw).token_ids == first.token_ids
    assert engine.generate(prompt, seed=4, **kw).token_ids != first.token_ids
    one = make_engine(path, max_seq_len=256, steps_per_launch=1).generate(prompt, seed=3, **kw)
    assert one.token_ids == first.token_ids
    rows = torch.arange(first.logits.shape[1])
    agree = 0
    for i in range(1, len(first.token_ids)):   # token 0: the prefill's, drawn by sample()
        position = len(prompt) + i - 1
        scores = first.logits[i] * (1 / temperature) + gumbel_noise(3, position, rows)
        agree += int(torch.argmax(scores)) == first.token_ids[i]
    # The kernel's logf is the fast one: a near tie may go the other way.
    assert agree >= 0.9 * (len(first.token_ids) - 1)


@pytest.mark.parametrize("top_k, top_p, narrowest", [
    (20, 1.0, dict(top_k=1)), (0, 0.8, dict(top_p=1e-6)), (20, 0.8, dict(top_k=20, top_p=1e-6))])
def test_top_k_and_top_p_sampling_are_drawn_on_the_device(checkpoint, top_k, top_p, narrowest):
    """Top-k sampling (k <= MAX_TOP_K), top-p sampling and the two together chain too: 8
    steps per launch give 1's tokens, each token is among those its step's logits leave
    (sampling.masked_scores), and a one-token set gives the greedy tokens."""
    from megakernel.sampling import masked_scores

    path, _ = checkpoint
    engine = make_engine(path, max_seq_len=256)
    prompt = [5, 9, 13, 2, 7]
    kw = dict(max_new_tokens=24, ignore_eos=True, temperature=1.5, top_k=top_k, top_p=top_p,
              output_logits=True)
    launches = engine.backend.launches
    first = engine.generate(prompt, seed=3, **kw)
    assert engine.backend.launches - launches <= 4      # 23 steps, 8 per launch
    one = make_engine(path, max_seq_len=256, steps_per_launch=1).generate(prompt, seed=3, **kw)
    assert one.token_ids == first.token_ids
    for i, token in enumerate(first.token_ids):
        assert masked_scores(first.logits[i], 1.5, top_k, top_p)[token] > float("-inf")
    greedy = engine.generate(prompt, max_new_tokens=24, ignore_eos=True)
    assert engine.generate(prompt, max_new_tokens=24, ignore_eos=True, temperature=1.5,
                           **narrowest).token_ids == greedy.token_ids
