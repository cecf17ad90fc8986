// Shared body of o_proj_residual and down_proj_residual (not an opcode itself):
// hidden[t, r0:r0+n] += W[r0:r0+n] @ x, with W [rows, K] bf16 and x [K] float32 written
// during this launch. x and the block's residual rows are staged in shared memory.
#pragma once

#include "common.cuh"

namespace mk {

template <int kOp>
__device__ __forceinline__ bool matvec_residual(const OpContext& ctx, const __nv_bfloat16* w,
                                                const float* x, int K, int r0, int n) {
  const KernelParams& p = ctx.p;
  float* hidden = p.hidden + static_cast<int64_t>(ctx.token) * p.hidden_size + r0;
  float* x_s = ctx.smem;          // [K]
  float* hidden_s = x_s + K;      // [n]: the block's residual rows, read with x
  struct Groups : RowPairs {
    const __nv_bfloat16* w;
    int K;
    float* hidden;
    const float* hidden_s;
    __device__ const __nv_bfloat16* row(int i, int r) const {
      return w + static_cast<int64_t>(row_index(i, r)) * K;
    }
    __device__ void emit(int i, const float (&out)[kRowsPerPass], int count) const {
      if (threadIdx.x % kWarpSize != 0) return;
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r >= count) break;
        const int row = row_index(i, r);
        hidden[row] = hidden_s[row] + out[r];
      }
    }
  } g{{n}, w + static_cast<int64_t>(r0) * K, K, hidden, hidden_s};
  return run_matvec<kOp>(ctx, g, K, [&] {
    // Both reads are issued before either is used: one L2 round trip, not two.
    stage_vector(x_s, x, K);
    for (int i = threadIdx.x; i < n; i += kComputeThreads) hidden_s[i] = load_act(hidden + i);
    compute_sync();
    return static_cast<const float*>(x_s);
  });
}

}  // namespace mk
