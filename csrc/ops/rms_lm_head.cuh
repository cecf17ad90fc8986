// rms_lm_head: logits[t, rows] = lm_head[rows] @ RMSNorm(hidden[t], final_norm), and the
// block's partial argmax (largest logit, lowest index on ties) into slot block_index
// (instructions/rms_lm_head.py). Each warp keeps the best of its rows; the warps'
// candidates are then merged with the same tie rule.
#pragma once

#include <math_constants.h>

#include "common.cuh"

namespace mk {

// (value, index) order of torch.argmax: larger value wins, then the lower index.
__device__ __forceinline__ bool argmax_better(float v, int i, float best_v, int best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

__device__ __forceinline__ bool op_rms_lm_head(const OpContext& ctx) {
  const KernelParams& p = ctx.p;
  const int t = ctx.token;
  const int r0 = ctx.arg(rms_lm_head::kRowBegin);
  const int n = ctx.arg(rms_lm_head::kRowCount);
  const int H = p.hidden_size, V = p.vocab_size;
  struct Groups : RowPairs {
    const __nv_bfloat16* w;      // row r0
    int H, r0;
    float* logits;               // entry r0
    float best_v;
    int best_i;
    __device__ const __nv_bfloat16* row(int i, int r) const {
      return w + static_cast<int64_t>(row_index(i, r)) * H;
    }
    __device__ void emit(int i, const float (&out)[kRowsPerPass], int count) {
      #pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r >= count) break;
        const int row = row_index(i, r);
        if (threadIdx.x % kWarpSize == 0) logits[row] = out[r];
        if (argmax_better(out[r], r0 + row, best_v, best_i)) best_v = out[r], best_i = r0 + row;
      }
    }
  } g{{n}, bf16_ptr(p.lm_head) + static_cast<int64_t>(r0) * H, H, r0,
      p.logits + static_cast<int64_t>(t) * V + r0, -CUDART_INF_F, INT_MAX};
  float* xn = ctx.smem;
  float* gain = xn + H;
  stage_gain(gain, bf16_ptr(p.final_norm), H);
  if (!run_matvec<kOpRmsLmHead>(ctx, g, H, [&] {
        stage_rms_normed(xn, p.hidden + static_cast<int64_t>(t) * H, gain, H, p.rms_norm_eps,
                         ctx.scratch);
        return static_cast<const float*>(xn);
      }))
    return false;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* cand_v = ctx.scratch;                                    // [kComputeWarps]
  int* cand_i = reinterpret_cast<int*>(ctx.scratch + kWarpSize);  // [kComputeWarps]
  if (lane == 0) {
    cand_v[warp] = g.best_v;
    cand_i[warp] = g.best_i;
  }
  compute_sync();
  if (threadIdx.x == 0) {
    float best_v = g.best_v;
    int best_i = g.best_i;
    for (int k = 1; k < kComputeWarps; ++k)
      if (argmax_better(cand_v[k], cand_i[k], best_v, best_i)) {
        best_v = cand_v[k];
        best_i = cand_i[k];
      }
    const int64_t slot = static_cast<int64_t>(t) * p.lm_head_blocks + ctx.words[word::kBlockIndex];
    p.argmax_value[slot] = best_v;
    p.argmax_index[slot] = best_i;
  }
  compute_sync();  // scratch is free again
  return true;
}

}  // namespace mk
