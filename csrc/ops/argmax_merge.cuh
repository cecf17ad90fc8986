// The (value, index) argmax that the LM head, sample_logits and argmax_reduce share: the
// larger value wins, then the lower index (torch.argmax's order among equal values).
#pragma once

#include "common.cuh"

namespace mk {

__device__ __forceinline__ bool argmax_better(float v, int i, float best_v, int best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

// The warp's best (value, index), in every lane.
__device__ __forceinline__ void warp_argmax(float& best_v, int& best_i) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) {
    const float v = __shfl_xor_sync(0xffffffffu, best_v, o);
    const int i = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (argmax_better(v, i, best_v, best_i)) best_v = v, best_i = i;
  }
}

// The block's best of the compute warps' candidates (each warp's lanes agree on theirs)
// into slot block_index of token t's partial argmax: argmax_reduce's input. Called by
// every compute thread; ends with the scratch free again.
__device__ __forceinline__ void write_block_argmax(const OpContext& ctx, int t, float best_v,
                                                   int best_i) {
  const KernelParams& p = ctx.p;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* cand_v = ctx.scratch;                                    // [kComputeWarps]
  int* cand_i = reinterpret_cast<int*>(ctx.scratch + kWarpSize);  // [kComputeWarps]
  if (lane == 0) {
    cand_v[warp] = best_v;
    cand_i[warp] = best_i;
  }
  compute_sync();
  if (threadIdx.x == 0) {
    for (int k = 1; k < kComputeWarps; ++k)
      if (argmax_better(cand_v[k], cand_i[k], best_v, best_i)) {
        best_v = cand_v[k];
        best_i = cand_i[k];
      }
    const int64_t slot =
        static_cast<int64_t>(t) * p.lm_head_blocks + ctx.words[word::kBlockIndex];
    p.argmax_value[slot] = best_v;
    p.argmax_index[slot] = best_i;
  }
  compute_sync();  // scratch is free again
}

}  // namespace mk
