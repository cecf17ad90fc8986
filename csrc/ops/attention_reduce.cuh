// attention_reduce: merge the partitions' partial outputs of query heads
// [head_begin, head_begin + head_count) by log-sum-exp into attn_out
// (instructions/attention_reduce.py). One thread per (head, dim); partition 0 is never
// empty, so the maximum lse is finite and empty partitions weigh exp(-inf) = 0.
#pragma once

#include <math_constants.h>

#include "common.cuh"

namespace mk {

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
    float m = -CUDART_INF_F;
    for (int k = 0; k < nparts; ++k) m = fmaxf(m, load_act(lse + k));
    float total = 0.0f, o = 0.0f;
    for (int k = 0; k < nparts; ++k) {
      const float w = __expf(load_act(lse + k) - m);
      total += w;
      o = fmaf(w, load_act(out + static_cast<int64_t>(k) * hd), o);
    }
    p.attn_out[static_cast<int64_t>(t) * nq * hd + static_cast<int64_t>(h) * hd + d] = o / total;
  }
  return true;
}

}  // namespace mk
