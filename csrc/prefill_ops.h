// Plain C++ interface of the prompt prefill's fused elementwise kernels (prefill_ops.cu),
// called by the torch binding (binding.cpp). The prefill is cuBLAS matmuls and one
// attention kernel per layer; between them these kernels each replace several PyTorch
// elementwise launches (megakernel/backends/prompt_prefill.py), so a short prompt's
// prefill runs fewer, and fewer latency-bound, kernels. Every pointer is a contiguous
// row-major device array; bf16 arrays are passed as void*.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mk {

// For each of T tokens (token t at position start + t, or *start_on_device + t where that
// is given: a CUDA graph's chunk at a position set before each replay): rotates the q and
// k heads of its fused QKV row (bf16 [T, (nq + 2 nkv) * hd]) by RoPE (cos/sin float32
// [T, hd / 2], rotate-half), writes the rotated q heads to q_out (bf16 [T, nq, hd]), the
// rotated k heads to k_out (bf16 [T, nkv, hd]), and those k heads and the v heads to the
// token's slot of the cache layer (bf16 [num_pages, page_size, nkv, hd]) through
// page_table_row (int32 [table_length]; positions past the table and pages outside
// [0, num_pages) are skipped). Rounded as the PyTorch expression it replaces: float32
// products and sums, each rounded on its own, then bf16.
void launch_rope_append(const void* qkv, const float* cos, const float* sin,
                        const int32_t* page_table_row, int table_length, int start,
                        const int64_t* start_on_device, int page_size, int num_pages,
                        void* k_cache_layer, void* v_cache_layer, void* q_out, void* k_out,
                        int tokens, int num_heads, int num_kv_heads, int head_dim,
                        cudaStream_t stream);

// out[t, j] = bf16(silu(gate) * up) for gate = gate_up[t, j], up = gate_up[t, I + j]
// (bf16 [T, 2I] in, bf16 [T, I] out), in float32: silu(x) = x / (1 + exp(-x)).
void launch_silu_mul(const void* gate_up, void* out, int tokens, int intermediate,
                     cudaStream_t stream);

// Per row t of x (float32 [T, H], updated in place): x += delta (bf16 [T, H], or nullptr
// for none), then out[t] = bf16(x * rsqrt(mean(x^2) + eps) * weight) (weight float32 [H]).
void launch_add_rms_norm(float* x, const void* delta, const float* weight, float eps,
                         void* out, int tokens, int hidden, cudaStream_t stream);

}  // namespace mk
