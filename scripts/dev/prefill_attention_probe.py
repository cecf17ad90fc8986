"""Time scaled_dot_product_attention's forms for the prompt prefill's chunks (GPU).

    python3 scripts/dev/prefill_attention_probe.py

Llama-3.2-1B's heads (32 query, 8 KV, head_dim 64), chunks of 32 and 512 tokens at
several context lengths: float32 with K/V copied per query head (the prefill's float32
path), bf16 the same way, bf16 with the kernel's own GQA, and that with causal_lower_right
instead of a mask. Prints each form's time per call (with the copies it needs), the
kernels the profiler names, and each bf16 form's relative error against float32
(benchmarks/RESULTS.md, entry 59).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.profiler import ProfilerActivity, profile

from dev_model import device_us

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 64
CASES = [(32, 32), (512, 512), (512, 1536), (512, 3000)]     # (chunk, context)


def per_query_head(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    group = NUM_HEADS // NUM_KV_HEADS
    return (x.to(dtype).unsqueeze(2).expand(x.shape[0], NUM_KV_HEADS, group, HEAD_DIM)
            .reshape(x.shape[0], NUM_HEADS, HEAD_DIM))


def as_batch(x: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, hd] -> [1, heads, tokens, hd]."""
    return x.transpose(0, 1)[None]


def timed(name: str, fn, reps: int = 20) -> torch.Tensor | None:
    try:
        out = fn()
        us = device_us(fn, reps)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except RuntimeError as e:
        print(f"{name:40s} error: {str(e).splitlines()[0][:120]}")
        return None
    kernels = sorted({e.name[:60] for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA})
    print(f"{name:40s} {us:8.1f} us  {kernels}")
    return out


def main():
    torch.manual_seed(0)
    for chunk, context in CASES:
        first = context - chunk
        q = torch.randn(chunk, NUM_HEADS, HEAD_DIM, device="cuda")
        k = torch.randn(context, NUM_KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
        v = torch.randn(context, NUM_KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
        positions = torch.arange(first, context, device="cuda")
        visible = torch.arange(context, device="cuda")[None] <= positions[:, None]
        causal = dict(attn_mask=visible) if first else dict(is_causal=True)
        print(f"chunk {chunk}, context {context}")

        def copies(dtype):
            return F.scaled_dot_product_attention(
                as_batch(q.to(dtype)), as_batch(per_query_head(k, dtype)),
                as_batch(per_query_head(v, dtype)), **causal)

        reference = timed("float32, K/V per query head", lambda: copies(torch.float32))
        forms = {
            "bf16, K/V per query head": lambda: copies(torch.bfloat16),
            "bf16, own GQA": lambda: F.scaled_dot_product_attention(
                as_batch(q.bfloat16()), as_batch(k), as_batch(v), enable_gqa=True, **causal),
        }
        if first:
            forms["bf16, own GQA, causal_lower_right"] = lambda: F.scaled_dot_product_attention(
                as_batch(q.bfloat16()), as_batch(k), as_batch(v),
                attn_mask=causal_lower_right(chunk, context), enable_gqa=True)
        for name, fn in forms.items():
            out = timed(name, fn)
            if out is not None and reference is not None:
                error = float((out.float() - reference).norm() / reference.norm())
                print(f"{'':40s} relative error against float32: {error:.2e}")


if __name__ == "__main__":
    main()
