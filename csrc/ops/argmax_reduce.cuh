// argmax_reduce: next_token[t] = index of the largest of the LM-head blocks' partial maxima,
// the lowest index among equal maxima (instructions/argmax_reduce.py). One warp.
#pragma once

#include <math_constants.h>

#include "common.cuh"
#include "ops/argmax_merge.cuh"

namespace mk {

__device__ __forceinline__ bool op_argmax_reduce(const OpContext& ctx) {
  if (!ctx.ready<kOpArgmaxReduce>()) return false;
  const KernelParams& p = ctx.p;
  if (threadIdx.x >= kWarpSize) return true;
  const int t = ctx.token, lane = threadIdx.x;
  const int n = ctx.arg(argmax_reduce::kNumBlocks);
  const float* values = p.argmax_value + static_cast<int64_t>(t) * p.lm_head_blocks;
  const int* indices = p.argmax_index + static_cast<int64_t>(t) * p.lm_head_blocks;
  float best_v = -CUDART_INF_F;
  int best_i = INT_MAX;
  // Every load of a round issued before any is compared: one L2 round trip per
  // kWarpSize * kPerLane blocks (one round for every LM head of up to 256 blocks).
  constexpr int kPerLane = 8;
  for (int b0 = lane; b0 < n; b0 += kWarpSize * kPerLane) {
    float v[kPerLane];
    int i[kPerLane];
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int b = b0 + u * kWarpSize;
      v[u] = b < n ? load_act(values + b) : -CUDART_INF_F;
      i[u] = b < n ? __ldcg(indices + b) : INT_MAX;
    }
#pragma unroll
    for (int u = 0; u < kPerLane; ++u)
      if (argmax_better(v[u], i[u], best_v, best_i)) best_v = v[u], best_i = i[u];
  }
  warp_argmax(best_v, best_i);
  if (lane == 0) p.next_token[t] = best_i;
  return true;
}

}  // namespace mk
