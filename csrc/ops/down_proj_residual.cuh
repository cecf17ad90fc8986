// down_proj_residual: hidden[t, rows] += down[layer, rows] @ mlp_act[t]
// (instructions/down_proj_residual.py). Blocks own disjoint rows, so the update is in place.
#pragma once

#include "common.cuh"
#include "ops/matvec_residual.cuh"

namespace mk {

__device__ __forceinline__ bool op_down_proj_residual(const OpContext& ctx) {
  const KernelParams& p = ctx.p;
  const int K = p.intermediate_size;
  return matvec_residual<kOpDownProjResidual>(
      ctx, bf16_ptr(p.down) + static_cast<int64_t>(ctx.layer()) * p.hidden_size * K,
      p.mlp_act + static_cast<int64_t>(ctx.token) * K, K, ctx.arg(down_proj_residual::kRowBegin),
      ctx.arg(down_proj_residual::kRowCount));
}

}  // namespace mk
