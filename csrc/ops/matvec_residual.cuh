// Shared body of o_proj_residual and down_proj_residual (not an opcode itself):
// hidden[t, r0:r0+n] += W[r0:r0+n] @ x, with W [rows, K] bf16 and x [K] float32, built
// after the waits by fill(x_s, free_s) in shared memory (free_s: the shared memory past
// x and the block's residual rows, for fill's own use).
#pragma once

#include "common.cuh"

namespace mk {

template <int kOp, typename Fill>
__device__ __forceinline__ bool matvec_residual(const OpContext& ctx, const __nv_bfloat16* w,
                                                int K, int r0, int n, Fill fill) {
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
    fill(x_s, hidden_s + n);
    for (int i = threadIdx.x; i < n; i += kComputeThreads) hidden_s[i] = load_act(hidden + i);
    compute_sync();
    return static_cast<const float*>(x_s);
  });
}

}  // namespace mk
