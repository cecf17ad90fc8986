// o_proj_residual: merge the attention partitions of every query head by log-sum-exp, then
// hidden[t, rows] += o_proj[layer, rows] @ attn (instructions/o_proj_residual.py). Blocks
// own disjoint rows, so the update is in place. Every block merges the partials itself:
// a few KB of L2 reads instead of a dependency stage of its own.
#pragma once

#include <math_constants.h>

#include "common.cuh"
#include "ops/matvec_residual.cuh"

namespace mk {

// Partitions that hold tokens of the context for a token at `position`: the first
// ceil(num_pages / pages_per_partition) (instructions/o_proj_residual.py:active_partitions).
__device__ __forceinline__ int active_partitions(int position, int page_size, int nparts) {
  const int num_pages = (position + 1 + page_size - 1) / page_size;
  const int per_part = (num_pages + nparts - 1) / nparts;
  return (num_pages + per_part - 1) / per_part;
}

// x_s[h * hd + d] = merged attention output; lse_s: nq * nparts floats of scratch. Ends
// with the compute warps synchronized.
__device__ __forceinline__ void stage_merged_attention(const OpContext& ctx, float* x_s,
                                                       float* lse_s, int nparts) {
  const KernelParams& p = ctx.p;
  const int t = ctx.token, nq = p.num_heads, hd = p.head_dim, P = p.attn_partitions;
  const int active = active_partitions(p.step_input[p.num_tokens + t], p.page_size, nparts);
  const float* lse = p.attn_partial_lse + static_cast<int64_t>(t) * nq * P;
  const float* out = p.attn_partial_out + static_cast<int64_t>(t) * nq * P * hd;
  for (int i = threadIdx.x; i < nq * active; i += kComputeThreads)
    lse_s[i] = load_act(lse + static_cast<int64_t>(i / active) * P + i % active);
  compute_sync();
  for (int i = threadIdx.x; i < nq * hd; i += kComputeThreads) {
    const int h = i / hd, d = i % hd;
    const float* lse_h = lse_s + h * active;
    float m = -CUDART_INF_F;
    for (int k = 0; k < active; ++k) m = fmaxf(m, lse_h[k]);
    float total = 0.0f, o = 0.0f;
    const float* out_h = out + static_cast<int64_t>(h) * P * hd + d;
    for (int k = 0; k < active; ++k) {
      const float w = __expf(lse_h[k] - m);
      total += w;
      o = fmaf(w, load_act(out_h + static_cast<int64_t>(k) * hd), o);
    }
    x_s[i] = o / total;
  }
}

__device__ __forceinline__ bool op_o_proj_residual(const OpContext& ctx) {
  const KernelParams& p = ctx.p;
  const int K = p.num_heads * p.head_dim;
  const int r0 = ctx.arg(o_proj_residual::kRowBegin), n = ctx.arg(o_proj_residual::kRowCount);
  const int nparts = ctx.arg(o_proj_residual::kNumPartitions);
  const __nv_bfloat16* w =
      bf16_ptr(p.o_proj) + static_cast<int64_t>(ctx.layer()) * p.hidden_size * K;
  return matvec_residual<kOpOProjResidual>(ctx, w, K, r0, n, [&](float* x_s, float* free_s) {
    stage_merged_attention(ctx, x_s, free_s, nparts);
  });
}

}  // namespace mk
