"""Whole-model parity on the CPU: torch and reference backends against transformers'
LlamaForCausalLM (and MistralForCausalLM) in float32, teacher-forced on the tokens the
engine generated."""
from __future__ import annotations

import pytest
import torch

import megakernel
from conftest import hf_llama_config, write_hf_checkpoint
from megakernel.backends.prompt_prefill import prefill_chunk
from tolerances import RELATIVE_TOLERANCE, relative_error

CONFIGS = {
    "gqa1-hd64": dict(num_heads=4, num_kv_heads=4, head_dim=64),
    "gqa2-hd64-tied": dict(num_heads=4, num_kv_heads=2, head_dim=64, tied=True),
    "gqa4-hd128-llama3rope": dict(num_heads=4, num_kv_heads=1, head_dim=128, rope_scaling=True),
    "gqa8-hd64": dict(num_heads=8, num_kv_heads=1, head_dim=64, hidden=256),
    "gqa2-hd128-tied-llama3rope": dict(num_heads=2, num_kv_heads=1, head_dim=128, tied=True,
                                       rope_scaling=True, layers=3),
    # Mistral: the same layers; its window holds every position the engine keeps.
    "mistral-gqa4-hd128-window": dict(num_heads=8, num_kv_heads=2, head_dim=128, hidden=512,
                                      mistral_window=64, rope_theta=1e6),
}
PROMPT = [1, 17, 42, 99, 7, 250, 3, 64, 5, 11, 200]
NEW_TOKENS = 34          # crosses several pages of size 8


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = write_hf_checkpoint(path, hf_llama_config(**CONFIGS[request.param]), seed=1)
    return path, model


def hf_logits(model, prompt, new_tokens):
    ids = torch.tensor([prompt + new_tokens[:-1]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1:]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_matches_transformers(checkpoint, backend):
    path, model = checkpoint
    engine = megakernel.Engine.from_pretrained(str(path), device="cpu", backend=backend,
                                               dtype=torch.float32, max_seq_len=64,
                                               page_size=8, shuffle_pages_seed=5,
                                               poison_cache=True)
    result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                             output_logits=True)
    assert len(result.token_ids) == NEW_TOKENS
    expected = hf_logits(model, PROMPT, result.token_ids)
    assert result.logits.shape == expected.shape
    assert relative_error(result.logits, expected) < 1e-4
    assert result.token_ids == expected.argmax(-1).tolist()
    # The KV cache really was paged: the sequence's pages are not contiguous.
    pages = engine.kv_cache.pages()
    assert pages != sorted(pages)


@pytest.mark.parametrize("start,prompt_len", [(0, 1), (0, 8), (0, 37), (13, 1), (16, 21)])
def test_prompt_prefill_equals_the_per_op_forward(checkpoint, start, prompt_len):
    """A prompt chunk in few launches (prompt_prefill.py), from position 0 or after
    `start` positions in the cache, gives the logits and the K/V that the per-op forward()
    gives."""
    path, _ = checkpoint
    engine = megakernel.Engine.from_pretrained(str(path), device="cpu", backend="torch",
                                               page_size=8)
    kv, backend = engine.kv_cache, engine.backend
    end = start + prompt_len
    ids = torch.randint(3, 200, (end,), generator=torch.Generator().manual_seed(prompt_len))

    def run(prefill):
        kv.release()
        kv.reserve(end + 1)
        backend.reset()
        if start:     # the positions before the chunk, the same way for both
            backend.forward(ids[:start], torch.arange(start), start)
        logits = prefill()
        pos = torch.arange(end)
        slots = (kv.page_table[0, pos // kv.page_size].long(), pos % kv.page_size)
        return logits, kv.k[:, slots[0], slots[1]].clone(), kv.v[:, slots[0], slots[1]].clone()

    fast = run(lambda: prefill_chunk(backend, ids[start:], start))
    per_op = run(lambda: backend.forward(ids[start:], torch.arange(start, end), end))
    for got, want in zip(fast, per_op):
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("start,chunk", [(0, 37), (45, 19)])
def test_half_precision_prefill_attention_equals_float32(device, group_size, start, chunk):
    """The prefill's attention with a bf16 cache (flash kernel and its own GQA on the GPU)
    against the float32 path on the same K/V: within bf16 rounding, and causal at the
    chunk's own positions (keys past a query's position do not reach it)."""
    from torch.nn.attention import sdpa_kernel

    from megakernel.backends.prompt_prefill import ATTENTION_BACKENDS, _attention

    gen = torch.Generator().manual_seed(group_size + start)
    nkv, hd, context = 2, 64, start + chunk
    q = torch.randn(chunk, nkv * group_size, hd, generator=gen).to(device)
    keys = torch.randn(context, nkv, hd, generator=gen).bfloat16().to(device)
    values = torch.randn(context, nkv, hd, generator=gen).bfloat16().to(device)
    with sdpa_kernel(ATTENTION_BACKENDS):
        got = _attention(q, keys, values, group_size)
        want = _attention(q, keys.float(), values.float(), group_size)
    assert got.shape == want.shape == q.shape and got.dtype == torch.bfloat16
    assert relative_error(got, want) < RELATIVE_TOLERANCE[torch.bfloat16]
    # A later key changed: the queries before its position see the same.
    moved = keys.clone()
    moved[start + 10] += 5
    with sdpa_kernel(ATTENTION_BACKENDS):
        again = _attention(q, moved, values, group_size)
    assert torch.equal(again[:10], got[:10]) and not torch.equal(again[10:], got[10:])


def test_the_prompt_path_does_not_import_torch_dynamo():
    """torch.nn.attention.bias imports torch._dynamo (~2 s): a process's first prompt
    would pay for it inside its time to first token. Only a chunk after the first may."""
    import subprocess
    import sys

    code = ("import sys, torch, megakernel\n"
            "from megakernel.backends import megakernel_backend, torch_backend\n"
            "e = megakernel.Engine.from_pretrained('random:tiny', device='cpu', "
            "backend='torch')\n"
            "e.generate([1, 2, 3], max_new_tokens=2)\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
