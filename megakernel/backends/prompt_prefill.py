"""A prompt chunk in few kernel launches: the time to first token.

A prompt prefills in chunks. Through the per-op forward() (torch_backend.TorchBackend) a
short prompt is bound by the host, not the GPU: on an H100 a 32-token prompt of
Llama-3.2-1B ran ~1100 kernels and copies, 3.3 ms of device time behind 16.8 ms of host time
(scripts/dev/ttft_breakdown.py; benchmarks/RESULTS.md, entry 48). This is the same math in
fewer launches: F.rms_norm, RoPE for q and k at once, and one scaled_dot_product_attention
per layer. A chunk from position 0 attends over its own K/V (rounded as the cache stores
them), causally, with no gather of the cache; a later chunk over the cache's K/V of every
position up to its last. The residual stream, norms and softmax stay in float32, matmuls
in the weight dtype, as in forward(), which stays the path of the decode baselines. With
bf16 or fp16 weights the attention's two matmuls are in that dtype too (its softmax stays
float32): the fused flash kernel with its own GQA, ~3-7x faster than the float32 kernel
on the long chunks (benchmarks/RESULTS.md, entry 59). With bf16 weights and cache on a GPU
the extension runs (megakernel._C, csrc/prefill_ops.cu), the elementwise steps between the
matmuls run fused instead: RoPE with the cache append, the residual add with the next
RMSNorm, SiLU with its product, ~9 kernels per layer where the PyTorch ops take ~26
(benchmarks/RESULTS.md, entry 73); rounded as those ops are, but for the order of a norm's
sum of squares and SiLU's exp. On that path a chunk can also read its start on the device
and attend over a window of the cache's K/V through the flash kernel's variable-length
form (_prefill_chunk_at), so that a CUDA graph of it serves any start in its window: a
chat turn's new tokens (entry 94).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The attention's kernels: the flash kernel first (deterministic, ~3-7x faster than the
# float32 one on long chunks), never cuDNN's, which torch may otherwise pick for square
# chunks and which compute-sanitizer's racecheck flags (benchmarks/RESULTS.md, entry 59).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """instructions.base.rms_norm through F.rms_norm (weight already float32)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _per_query_head(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[T, nkv, hd] -> float32 [T, nkv * group_size, hd], each KV head repeated for its
    group of query heads, in one copy kernel."""
    T, nkv, hd = x.shape
    out = torch.empty(T, nkv, group_size, hd, dtype=torch.float32, device=x.device)
    return out.copy_(x.unsqueeze(2)).view(T, nkv * group_size, hd)


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """Causal attention of queries q [T, nq, hd] (float32 or the cache's dtype) at the last
    T of the context's positions over keys/values [context, nkv, hd] (the cache's dtype)
    -> [T, nq, hd]: a bf16 or fp16 cache's dtype, else float32.

    Inputs get a batch dimension [1, heads, tokens, hd]: with 3-D inputs
    scaled_dot_product_attention falls back to the math path's materialized scores. Runs
    inside sdpa_kernel(ATTENTION_BACKENDS) (entered once per chunk: ~20 us of host time)."""
    T, context = q.shape[0], keys.shape[0]
    as_batch = lambda x: x.transpose(0, 1)[None]      # noqa: E731
    if keys.dtype in (torch.bfloat16, torch.float16):
        # Each query sees the keys up to its own position: causal, aligned at the ends. A
        # first chunk is square, where is_causal means the same. The lower-right bias is
        # imported only for a later chunk: its module imports torch._dynamo, ~2 s (5 s
        # without cached bytecode) that a process's first prefill, inside its time to first
        # token, would pay.
        mask = None
        if context != T:
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(T, context)
        out = F.scaled_dot_product_attention(
            as_batch(q.to(keys.dtype)), as_batch(keys), as_batch(values), attn_mask=mask,
            is_causal=mask is None, enable_gqa=group_size > 1)
    else:
        visible = None
        if context != T:
            positions = torch.arange(context - T, context, device=q.device)
            visible = torch.arange(context, device=q.device)[None] <= positions[:, None]
        out = F.scaled_dot_product_attention(
            as_batch(q), as_batch(_per_query_head(keys, group_size)),
            as_batch(_per_query_head(values, group_size)), attn_mask=visible,
            is_causal=visible is None)
    return out[0].transpose(0, 1)


def _context_pages(kv, context: int) -> torch.Tensor:
    """The cache's pages of positions [0, context), as int64 indices (computed once per
    chunk, read by every layer's _cached_kv)."""
    return kv.page_table[0, :-(-context // kv.page_size)].long()


def _cached_kv(kv, layer: int, pages: torch.Tensor, context: int):
    """Keys and values [context, nkv, hd] of positions [0, context) of `layer`, as a decode
    step reads them back (the cache's rounding)."""
    shape = (-1,) + tuple(kv.k.shape[3:])
    return (kv.k[layer, pages].reshape(shape)[:context],
            kv.v[layer, pages].reshape(shape)[:context])


# The extension's fused prefill kernels by device index, or None where they cannot run.
_FUSED_OPS: dict[int, object] = {}


def fused_ops(backend):
    """The module with the fused prefill kernels (megakernel._C) where the backend's chunks
    can use them: bf16 weights and cache on an sm_90 GPU with the extension built; else
    None."""
    w, kv = backend.weights, backend.kv_cache
    if (kv.device.type != "cuda" or w.dtype != torch.bfloat16
            or kv.k.dtype != torch.bfloat16):
        return None
    index = kv.device.index if kv.device.index is not None else torch.cuda.current_device()
    if index not in _FUSED_OPS:
        from megakernel.errors import BackendUnavailableError

        from .megakernel_backend import load_extension
        try:
            with torch.cuda.device(index):
                ext = load_extension()
        except BackendUnavailableError:
            ext = None
        _FUSED_OPS[index] = ext if hasattr(ext, "prefill_rope_append") else None
    return _FUSED_OPS[index]


# A chunk whose start is read on the device (_prefill_chunk_at) reads the K/V of a window
# of positions [0, W), W its end rounded up to a multiple of this: one CUDA graph then
# serves a bucket's chunks at any start whose end falls in the same window
# (prompt_graphs.py), such as a chat turn's new tokens after the conversation kept in the
# cache.
CONTEXT_STEP = 512


def context_window(end: int, kv) -> int:
    """The window of K/V positions a fused chunk ending at position `end` reads: `end`
    rounded up to CONTEXT_STEP, within the page table's reach."""
    return min(-(-end // CONTEXT_STEP) * CONTEXT_STEP, kv.max_pages_per_seq * kv.page_size)


def prefill_chunk(backend, token_ids: torch.Tensor, start: int = 0,
                  last_index: torch.Tensor | None = None,
                  fused: bool | None = None, start_on_device: torch.Tensor | None = None,
                  window: int | None = None) -> torch.Tensor:
    """Tokens [T] (int64, on the device) at positions start..start+T-1, after the K/V of
    positions [0, start) in the backend's cache: appends their K/V and returns the logits
    [V] float32 of token last_index ([1] int64 on the device; default the last token).
    Positions [0, start + T) must have pages. fused: through the fused kernels (True), the
    PyTorch ops (False), or the first where they can run (None). Fused only:
    start_on_device (int64 [1] on the device) gives the start instead, read on the device
    (a graph replayed at other starts), with `window`, the context_window() every start
    it takes must fit: through _prefill_chunk_at(), the form a chat turn's graph needs,
    ~0.25 ms slower on 1B per later chunk of a 600-2100-token prompt than the other form,
    which such chunks keep (their starts recur, so their graphs are keyed by start)."""
    ops = fused_ops(backend) if fused is not False else None
    if (fused or start_on_device is not None) and ops is None:
        raise RuntimeError("the fused prefill kernels need bf16 weights and cache on an "
                           "sm_90 GPU with the megakernel extension built")
    if ops is not None:
        if start_on_device is not None:
            return _prefill_chunk_at(backend, ops, token_ids, last_index, start_on_device,
                                     window)
        return _prefill_chunk_fused(backend, ops, token_ids, start, last_index)
    c, w, kv = backend.config, backend.weights, backend.kv_cache
    dt = w.dtype
    T, hd, nq, nkv, half = token_ids.shape[0], c.head_dim, c.num_heads, c.num_kv_heads, \
        c.head_dim // 2
    ps = kv.page_size
    positions = torch.arange(start, start + T, device=token_ids.device)
    slot_page = kv.page_table[0, positions // ps].long()
    slot_offset = positions % ps
    # Rotate-half RoPE as x * C + swap_halves(x) * S, for the q and k heads together.
    cos, sin = w.rope_cos[start:start + T], w.rope_sin[start:start + T]
    rope_c = torch.stack([cos, cos], dim=1).unsqueeze(1)          # [T, 1, 2, half]
    rope_s = torch.stack([-sin, sin], dim=1).unsqueeze(1)
    norms = {name: getattr(w, name).float() for name in ("attn_norm", "mlp_norm")}
    final_norm = w.final_norm.float()
    if start:
        context = start + T
        pages = _context_pages(kv, context)

    x = w.embed[token_ids].float()                                 # [T, H]
    with sdpa_kernel(ATTENTION_BACKENDS):
        for layer in range(c.num_layers):
            xn = _rms_norm(x, norms["attn_norm"][layer], c.rms_norm_eps)
            qkv = xn.to(dt) @ w.qkv[layer].t()
            qk = qkv[:, :c.q_size + c.kv_size].float().view(T, nq + nkv, 2, half)
            qk = qk * rope_c + qk.flip(2) * rope_s
            # Each head block copied once, straight into the cache's dtype (q too: the
            # attention rounds it so), and V from the matmul's output as it is: the same
            # values as through float32, in fewer kernels.
            q = qk[:, :nq].to(kv.k.dtype).reshape(T, nq, hd)
            k_cached = qk[:, nq:].to(kv.k.dtype).reshape(T, nkv, hd)
            v_cached = qkv[:, c.q_size + c.kv_size:].to(kv.v.dtype).view(T, nkv, hd)
            kv.k[layer].index_put_((slot_page, slot_offset), k_cached)
            kv.v[layer].index_put_((slot_page, slot_offset), v_cached)
            if start:
                k_cached, v_cached = _cached_kv(kv, layer, pages, context)
            attn = _attention(q, k_cached, v_cached, c.group_size).reshape(T, c.q_size)
            # A float32 tensor plus one of the weights' dtype adds in float32 (the other
            # upcast exactly): the same sums as .float() first, without its own kernel.
            x = x + attn.to(dt) @ w.o_proj[layer].t()
            xn = _rms_norm(x, norms["mlp_norm"][layer], c.rms_norm_eps)
            gate_up = xn.to(dt) @ w.gate_up[layer].t()
            act = F.silu(gate_up[:, :c.intermediate_size].float())
            act = act.mul_(gate_up[:, c.intermediate_size:])
            x = x + act.to(dt) @ w.down[layer].t()
    last = x[-1] if last_index is None else x.index_select(0, last_index)[0]
    xn = _rms_norm(last, final_norm, c.rms_norm_eps)
    return (xn.to(dt) @ w.lm_head.t()).float()


def _prefill_chunk_at(backend, ops, token_ids: torch.Tensor,
                      last_index: torch.Tensor | None, start_on_device: torch.Tensor,
                      window: int) -> torch.Tensor:
    """A later chunk through the fused kernels, its start read on the device: RoPE from the
    tables at its positions, the K/V of the window's pages, and the attention by the flash
    kernel's variable-length form, whose key length (start + T, on the device) bounds what
    it reads and aligns the causal mask at the chunk's end."""
    w, kv = backend.weights, backend.kv_cache
    T, device = token_ids.shape[0], token_ids.device
    # Padding tokens of a replay may run past the tables: their rows are never used.
    positions = (start_on_device + torch.arange(T, device=device)).clamp_(
        max=w.rope_cos.shape[0] - 1)
    rope = (w.rope_cos.index_select(0, positions), w.rope_sin.index_select(0, positions))
    key_lengths = torch.cat([torch.zeros(1, dtype=torch.int32, device=device),
                             (start_on_device + T).to(torch.int32)])
    query_lengths = torch.arange(0, 2 * T, T, dtype=torch.int32, device=device)   # [0, T]
    at = (start_on_device, rope, _context_pages(kv, window), window, query_lengths,
          key_lengths)
    return _prefill_chunk_fused(backend, ops, token_ids, 0, last_index, at)


def _prefill_chunk_fused(backend, ops, token_ids: torch.Tensor, start: int,
                         last_index: torch.Tensor | None, at=None) -> torch.Tensor:
    """prefill_chunk() through the extension's fused kernels (see the module doc); `at`:
    _prefill_chunk_at()'s chunk after position 0."""
    c, w, kv = backend.config, backend.weights, backend.kv_cache
    T, hd, eps = token_ids.shape[0], c.head_dim, c.rms_norm_eps
    device, dt = token_ids.device, w.dtype
    cos, sin = w.rope_cos[start:start + T], w.rope_sin[start:start + T]
    attn_norm, mlp_norm = w.attn_norm.float(), w.mlp_norm.float()
    final_norm = w.final_norm.float()
    start_on_device = None
    if at is not None:
        start_on_device, (cos, sin), pages, window, query_lengths, key_lengths = at
    elif start:
        context = start + T
        pages = _context_pages(kv, context)

    x = w.embed[token_ids].float()                                 # [T, H] residual stream
    xn = torch.empty(T, c.hidden_size, dtype=dt, device=device)    # its norm, for a matmul
    q = torch.empty(T, c.num_heads, hd, dtype=kv.k.dtype, device=device)
    k = torch.empty(T, c.num_kv_heads, hd, dtype=kv.k.dtype, device=device)
    act = torch.empty(T, c.intermediate_size, dtype=dt, device=device)
    ops.prefill_add_rms_norm(x, None, attn_norm[0], eps, xn)
    with sdpa_kernel(ATTENTION_BACKENDS):
        for layer in range(c.num_layers):
            qkv = xn @ w.qkv[layer].t()
            ops.prefill_rope_append(qkv, cos, sin, kv.page_table[0], start, kv.k[layer],
                                    kv.v[layer], q, k, start_on_device)
            if at is not None:
                keys, values = _cached_kv(kv, layer, pages, window)
                attn = torch.ops.aten._flash_attention_forward(
                    q, keys, values, query_lengths, key_lengths, T, window, 0.0, True,
                    False)[0].reshape(T, c.q_size)
            else:
                if start:
                    keys, values = _cached_kv(kv, layer, pages, context)
                else:
                    keys = k
                    values = qkv[:, c.q_size + c.kv_size:].view(T, c.num_kv_heads, hd)
                attn = _attention(q, keys, values, c.group_size).reshape(T, c.q_size)
            ops.prefill_add_rms_norm(x, attn @ w.o_proj[layer].t(), mlp_norm[layer], eps, xn)
            ops.prefill_silu_mul(xn @ w.gate_up[layer].t(), act)
            after = attn_norm[layer + 1] if layer + 1 < c.num_layers else final_norm
            ops.prefill_add_rms_norm(x, act @ w.down[layer].t(), after, eps, xn)
    last = xn[-1] if last_index is None else xn.index_select(0, last_index)[0]
    return (last @ w.lm_head.t()).float()
