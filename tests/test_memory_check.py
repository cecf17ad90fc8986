"""max_seq_len against the model's positions and the device's free memory, refused before
anything loads."""
from __future__ import annotations

import pytest
import torch

import megakernel
from megakernel import memory_check
from megakernel.errors import InvalidRequestError
from megakernel.kv_cache import PagedKVCache
from megakernel.presets import PRESETS, random_weights

TINY = PRESETS["tiny"]


@pytest.mark.parametrize("max_seq_len,page_size", [(64, 16), (100, 16), (33, 7), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_are_what_the_cache_allocates(max_seq_len, page_size, dtype):
    cache = PagedKVCache(TINY, max_seq_len=max_seq_len, page_size=page_size, dtype=dtype)
    assert memory_check.kv_cache_bytes(TINY, max_seq_len, page_size, dtype) == cache.nbytes()


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_are_what_loading_allocates(tied):
    from dataclasses import replace

    config = replace(TINY, tie_word_embeddings=tied)
    weights = random_weights(config, dtype=torch.bfloat16, max_positions=300)
    tables = sum(t.numel() * t.element_size() for t in (weights.rope_cos, weights.rope_sin))
    assert memory_check.weight_bytes(config, torch.bfloat16, 300) == weights.nbytes() + tables


def test_cpu_free_memory_is_read():
    free = memory_check.free_bytes(torch.device("cpu"))
    assert free is None or free > 0


def pretend_free(monkeypatch, usable: int | None):
    """free_bytes() returns `usable` plus the allowance the check keeps back."""
    free = None if usable is None else usable + memory_check.ALLOWANCE_BYTES
    monkeypatch.setattr(memory_check, "free_bytes", lambda device: free)


def test_a_cache_too_large_names_the_length_that_fits(monkeypatch):
    weights = memory_check.weight_bytes(TINY, torch.float32, 4096)
    per_token = memory_check.kv_cache_bytes(TINY, 16, 16, torch.float32) // 16
    free = weights + 1000 * per_token + 5
    pretend_free(monkeypatch, free)
    with pytest.raises(InvalidRequestError, match=r"max_seq_len 4096 needs .* at most 992$"):
        memory_check.check_model_fits(TINY, 4096, 16, torch.float32, torch.device("cpu"))
    # The length it names fits (whole pages: 992 of the 1000 tokens' room; it counts the
    # RoPE tables of the refused length, so it errs short).
    memory_check.check_model_fits(TINY, 992, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(InvalidRequestError):
        memory_check.check_model_fits(TINY, 2000, 16, torch.float32, torch.device("cpu"))


def test_weights_alone_too_large_are_named(monkeypatch):
    weights = memory_check.weight_bytes(TINY, torch.float32, 64)
    pretend_free(monkeypatch, weights - 1)
    with pytest.raises(InvalidRequestError, match="weights need .* float32, more than"):
        memory_check.check_model_fits(TINY, 64, 16, torch.float32, torch.device("cpu"))
    pretend_free(monkeypatch, weights + 1)
    with pytest.raises(InvalidRequestError, match="no room for a KV cache"):
        memory_check.check_model_fits(TINY, 64, 16, torch.float32, torch.device("cpu"))


def test_unknown_free_memory_checks_nothing(monkeypatch):
    pretend_free(monkeypatch, None)
    memory_check.check_model_fits(TINY, 4096, 16, torch.float32, torch.device("cpu"))


def test_engine_refuses_before_loading_and_loads_afterwards(monkeypatch):
    import megakernel.engine as engine_module

    loads = []
    real_load = engine_module.load_weights
    monkeypatch.setattr(engine_module, "load_weights",
                        lambda *a, **k: loads.append(1) or real_load(*a, **k))
    pretend_free(monkeypatch, memory_check.weight_bytes(TINY, torch.float32, 64) + 1)
    with pytest.raises(InvalidRequestError, match="KV cache"):
        megakernel.Engine.from_pretrained("random:tiny", device="cpu", max_seq_len=64)
    assert loads == []
    monkeypatch.undo()
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cpu", max_seq_len=64)
    assert len(engine.generate("Hi", max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_max_seq_len_defaults_to_the_model_limit_and_is_refused_past_it(tmp_path):
    from conftest import hf_llama_config, write_hf_checkpoint

    write_hf_checkpoint(tmp_path, hf_llama_config())      # max_position_embeddings 2048
    engine = megakernel.Engine.from_pretrained(str(tmp_path), device="cpu")
    assert engine.max_seq_len == 2048 and engine.kv_cache.max_seq_len == 2048
    assert megakernel.Engine.from_pretrained("random:tiny", device="cpu").max_seq_len == 4096
    with pytest.raises(InvalidRequestError,
                       match=r"max_seq_len 2049 exceeds the model's max_position_embeddings"):
        megakernel.Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=2049)


@pytest.mark.gpu
def test_cuda_refuses_what_free_memory_cannot_hold_and_the_length_it_names_runs():
    """With all but 6 GiB of the GPU held elsewhere, Llama-3.2-1B at 131072 tokens (2.3 GiB
    of weights, 4 GiB of cache) is refused before it loads, and the max_seq_len the error
    names loads and runs what allocates beyond the weights and the cache: a prompt of a
    long prefill chunk and two short ones, greedy and sampled, its graphs captured, then
    replayed."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hold = torch.empty(free - 6 * memory_check.GIB, dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises(InvalidRequestError, match=r"at most \d+$") as refused:
            megakernel.Engine.from_pretrained("random:llama-3.2-1b", max_seq_len=131072)
        fits = int(str(refused.value).rsplit(" ", 1)[1])
        # (6 GiB - the allowance - 2.3 GiB of weights) / 32 KiB of K/V a token: ~72,000.
        config, dtype = PRESETS["llama-3.2-1b"], torch.bfloat16
        room = (memory_check.free_bytes(torch.device("cuda")) - memory_check.ALLOWANCE_BYTES
                - memory_check.weight_bytes(config, dtype, 131072))
        per_token = memory_check.kv_cache_bytes(config, 16, 16, dtype) // 16
        assert 0 <= room // per_token - fits < 1024
        engine = megakernel.Engine.from_pretrained("random:llama-3.2-1b", max_seq_len=fits)
        assert engine.backend_name == "megakernel"
        prompt = torch.randint(0, 128000, (2600,), generator=torch.Generator().manual_seed(0))
        for kw in (dict(), dict(temperature=0.8, top_k=100), dict()):
            result = engine.generate(prompt.tolist(), max_new_tokens=32, ignore_eos=True, **kw)
            assert len(result.token_ids) == 32
    finally:
        del hold
        torch.cuda.empty_cache()
