// The prompt prefill's fused elementwise kernels; see prefill_ops.h. Short prompts are
// bound by how many kernels run, not by their bytes (a 32-token 1B prefill moved ~40 KB
// per elementwise kernel, 2-4 us each), so each kernel here does one step of the layer
// whole: one block per token row, or a grid-stride loop.
#include <cuda_bf16.h>

#include "prefill_ops.h"

namespace mk {
namespace {

constexpr int kPrefillThreads = 256;

__device__ __forceinline__ float load_bf16(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

__global__ void __launch_bounds__(kPrefillThreads)
    rope_append_kernel(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                       const float* __restrict__ sin, const int32_t* __restrict__ page_table_row,
                       int start, const int64_t* __restrict__ start_on_device,
                       int table_length, int page_size, int num_pages, __nv_bfloat16* k_cache,
                       __nv_bfloat16* v_cache, __nv_bfloat16* __restrict__ q_out,
                       __nv_bfloat16* __restrict__ k_out, int num_heads, int num_kv_heads,
                       int head_dim) {
  const int t = blockIdx.x;
  const int half = head_dim / 2;
  const int kv_size = num_kv_heads * head_dim;
  const __nv_bfloat16* row = qkv + static_cast<size_t>(t) * (num_heads * head_dim + 2 * kv_size);
  const int64_t position = (start_on_device != nullptr ? *start_on_device : start) + t;
  const int64_t entry = position / page_size;
  const int page = position >= 0 && entry < table_length ? page_table_row[entry] : -1;
  const bool cached = page >= 0 && page < num_pages;
  const size_t slot =
      (static_cast<size_t>(page) * page_size + position % page_size) * kv_size;
  const float* c = cos + static_cast<size_t>(t) * half;
  const float* s = sin + static_cast<size_t>(t) * half;
  // Rotated pairs (j, j + half) of the q and k heads, in the order of the PyTorch form
  // x * [cos, cos] + swap_halves(x) * [-sin, sin]: two rounded products, one rounded sum
  // (no fused multiply-add, which would round once).
  const int pairs = (num_heads + num_kv_heads) * half;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int head = i / half, j = i % half;
    const float lo = load_bf16(row + head * head_dim + j);
    const float hi = load_bf16(row + head * head_dim + half + j);
    const float cj = c[j], sj = s[j];
    const float out_lo = __fadd_rn(__fmul_rn(lo, cj), __fmul_rn(hi, -sj));
    const float out_hi = __fadd_rn(__fmul_rn(hi, cj), __fmul_rn(lo, sj));
    const __nv_bfloat16 rotated_lo = __float2bfloat16_rn(out_lo);
    const __nv_bfloat16 rotated_hi = __float2bfloat16_rn(out_hi);
    if (head < num_heads) {
      __nv_bfloat16* dst = q_out + (static_cast<size_t>(t) * num_heads + head) * head_dim;
      dst[j] = rotated_lo;
      dst[half + j] = rotated_hi;
      continue;
    }
    const int kv_head = head - num_heads;
    __nv_bfloat16* dst = k_out + (static_cast<size_t>(t) * num_kv_heads + kv_head) * head_dim;
    dst[j] = rotated_lo;
    dst[half + j] = rotated_hi;
    if (cached) {
      dst = k_cache + slot + static_cast<size_t>(kv_head) * head_dim;
      dst[j] = rotated_lo;
      dst[half + j] = rotated_hi;
    }
  }
  if (!cached) return;
  const __nv_bfloat16* v_row = row + (num_heads + num_kv_heads) * head_dim;
  for (int i = threadIdx.x; i < kv_size; i += blockDim.x) v_cache[slot + i] = v_row[i];
}

__global__ void __launch_bounds__(kPrefillThreads)
    silu_mul_kernel(const __nv_bfloat16* __restrict__ gate_up, __nv_bfloat16* __restrict__ out,
                    int64_t total, int intermediate) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / intermediate, j = i % intermediate;
    const __nv_bfloat16* row = gate_up + t * 2 * intermediate;
    const float gate = load_bf16(row + j), up = load_bf16(row + intermediate + j);
    const float silu = __fdiv_rn(gate, __fadd_rn(1.0f, expf(-gate)));
    out[i] = __float2bfloat16_rn(__fmul_rn(silu, up));
  }
}

__global__ void __launch_bounds__(kPrefillThreads)
    add_rms_norm_kernel(float* __restrict__ x, const __nv_bfloat16* __restrict__ delta,
                        const float* __restrict__ weight, float eps,
                        __nv_bfloat16* __restrict__ out, int hidden) {
  __shared__ float warp_sums[kPrefillThreads / 32];
  __shared__ float scale;
  const int t = blockIdx.x;
  float* xr = x + static_cast<size_t>(t) * hidden;
  float sum = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = xr[i];
    if (delta != nullptr) {
      v = __fadd_rn(v, load_bf16(delta + static_cast<size_t>(t) * hidden + i));
      xr[i] = v;
    }
    sum = fmaf(v, v, sum);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kPrefillThreads / 32; ++w) total += warp_sums[w];
    scale = rsqrtf(total / hidden + eps);
  }
  __syncthreads();
  const float r = scale;
  __nv_bfloat16* out_row = out + static_cast<size_t>(t) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out_row[i] = __float2bfloat16_rn(__fmul_rn(__fmul_rn(xr[i], r), weight[i]));
}

}  // namespace

void launch_rope_append(const void* qkv, const float* cos, const float* sin,
                        const int32_t* page_table_row, int table_length, int start,
                        const int64_t* start_on_device, int page_size, int num_pages,
                        void* k_cache_layer, void* v_cache_layer, void* q_out, void* k_out,
                        int tokens, int num_heads, int num_kv_heads, int head_dim,
                        cudaStream_t stream) {
  if (tokens <= 0) return;
  rope_append_kernel<<<tokens, kPrefillThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(qkv), cos, sin, page_table_row, start, start_on_device,
      table_length, page_size, num_pages, static_cast<__nv_bfloat16*>(k_cache_layer),
      static_cast<__nv_bfloat16*>(v_cache_layer), static_cast<__nv_bfloat16*>(q_out),
      static_cast<__nv_bfloat16*>(k_out), num_heads, num_kv_heads, head_dim);
}

void launch_silu_mul(const void* gate_up, void* out, int tokens, int intermediate,
                     cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(tokens) * intermediate;
  if (total <= 0) return;
  const int64_t blocks = (total + kPrefillThreads - 1) / kPrefillThreads;
  silu_mul_kernel<<<static_cast<int>(blocks < 65535 ? blocks : 65535), kPrefillThreads, 0,
                    stream>>>(static_cast<const __nv_bfloat16*>(gate_up),
                              static_cast<__nv_bfloat16*>(out), total, intermediate);
}

void launch_add_rms_norm(float* x, const void* delta, const float* weight, float eps,
                         void* out, int tokens, int hidden, cudaStream_t stream) {
  if (tokens <= 0) return;
  add_rms_norm_kernel<<<tokens, kPrefillThreads, 0, stream>>>(
      x, static_cast<const __nv_bfloat16*>(delta), weight, eps,
      static_cast<__nv_bfloat16*>(out), hidden);
}

}  // namespace mk
