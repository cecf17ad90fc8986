// attention_reduce: merge the partitions' partial outputs of query heads
// [head_begin, head_begin + head_count) by log-sum-exp into attn_out
// (instructions/attention_reduce.py). One thread per (head, dim); partition 0 is never
// empty, so the maximum lse is finite and empty partitions weigh exp(-inf) = 0.
#pragma once

#include <math_constants.h>

#include "common.cuh"

namespace mk {

// Partitions merged per batch of loads.
constexpr int kReduceBatch = 16;

__device__ __forceinline__ bool op_attention_reduce(const OpContext& ctx) {
  if (!ctx.ready<kOpAttentionReduce>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token;
  const int h0 = ctx.arg(attention_reduce::kHeadBegin);
  const int nh = ctx.arg(attention_reduce::kHeadCount);
  const int nparts = ctx.arg(attention_reduce::kNumPartitions);
  const int nq = p.num_heads, hd = p.head_dim, P = p.attn_partitions;
  for (int i = threadIdx.x; i < nh * hd; i += kComputeThreads) {
    const int h = h0 + i / hd, d = i % hd;
    const float* lse = p.attn_partial_lse + (static_cast<int64_t>(t) * nq + h) * P;
    const float* out = p.attn_partial_out + (static_cast<int64_t>(t) * nq + h) * P * hd + d;
    // kReduceBatch partitions' lse and out are loaded together (one L2 round trip per
    // batch, not one for the maximum and another for the sum), merged online.
    float m = -CUDART_INF_F, total = 0.0f, o = 0.0f;
    for (int k0 = 0; k0 < nparts; k0 += kReduceBatch) {
      float l_k[kReduceBatch], o_k[kReduceBatch];
#pragma unroll
      for (int k = 0; k < kReduceBatch; ++k) {
        const bool in = k0 + k < nparts;
        l_k[k] = in ? load_act(lse + k0 + k) : -CUDART_INF_F;
        o_k[k] = in ? load_act(out + static_cast<int64_t>(k0 + k) * hd) : 0.0f;
      }
      float m_new = m;
#pragma unroll
      for (int k = 0; k < kReduceBatch; ++k) m_new = fmaxf(m_new, l_k[k]);
      // Partition 0 is never empty, so m_new is finite from the first batch on.
      const float correction = __expf(m - m_new);
      total *= correction;
      o *= correction;
#pragma unroll
      for (int k = 0; k < kReduceBatch; ++k) {
        const float w = __expf(l_k[k] - m_new);
        total += w;
        o = fmaf(w, o_k[k], o);
      }
      m = m_new;
    }
    p.attn_out[static_cast<int64_t>(t) * nq * hd + static_cast<int64_t>(h) * hd + d] = o / total;
  }
  return true;
}

}  // namespace mk
