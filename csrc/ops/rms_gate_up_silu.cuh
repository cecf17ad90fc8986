// rms_gate_up_silu: mlp_act[t, rows] = silu(gate[rows] @ xn) * (up[rows] @ xn),
// xn = RMSNorm(hidden[t], mlp_norm[layer]) (instructions/rms_gate_up_silu.py). A warp
// computes a gate row and its up row in one pass.
#pragma once

#include "common.cuh"

namespace mk {

__device__ __forceinline__ bool op_rms_gate_up_silu(const OpContext& ctx) {
  const KernelParams& p = ctx.p;
  const int t = ctx.token, l = ctx.layer();
  const int r0 = ctx.arg(rms_gate_up_silu::kRowBegin);
  const int n = ctx.arg(rms_gate_up_silu::kRowCount);
  const int H = p.hidden_size, I = p.intermediate_size;
  struct Groups {
    const __nv_bfloat16* gate;   // row r0 of the gate half; the up half is I rows further
    int64_t up_offset;
    int n, H;
    float* act;
    float norm_scale = 1.0f;  // the RMSNorm's rsqrt (finish_rms_gained)
    __device__ int count(int i) const { return i < n ? 2 : 0; }
    __device__ const __nv_bfloat16* row(int i, int r) const {
      return gate + static_cast<int64_t>(i) * H + (r == 0 ? 0 : up_offset);
    }
    __device__ void emit(int i, const float (&out)[kRowsPerPass], int) const {
      if (threadIdx.x % kWarpSize != 0) return;
      const float gate_dot = out[0] * norm_scale, up_dot = out[1] * norm_scale;
      act[i] = gate_dot / (1.0f + __expf(-gate_dot)) * up_dot;
    }
  } g{layer_rows(p, kOpRmsGateUpSilu, l).rows + static_cast<int64_t>(r0) * H,
      static_cast<int64_t>(I) * H, n, H, p.mlp_act + static_cast<int64_t>(t) * I + r0};
  float* xn = ctx.smem;
  float* gain = xn + H;
  stage_gain(gain, bf16_ptr(p.mlp_norm) + static_cast<int64_t>(l) * H, H);
  return run_matvec<kOpRmsGateUpSilu, true>(
      ctx, g, H, [&] { issue_vector_copies(xn, p.hidden + static_cast<int64_t>(t) * H, H); },
      [&] {
        g.norm_scale = finish_rms_gained(xn, gain, H, p.rms_norm_eps, ctx.scratch);
        return static_cast<const float*>(xn);
      });
}

}  // namespace mk
