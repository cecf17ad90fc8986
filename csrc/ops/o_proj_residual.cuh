// o_proj_residual: hidden[t, rows] += o_proj[layer, rows] @ attn_out[t]
// (instructions/o_proj_residual.py). Blocks own disjoint rows, so the update is in place.
#pragma once

#include "common.cuh"
#include "ops/matvec_residual.cuh"

namespace mk {

__device__ __forceinline__ bool op_o_proj_residual(const OpContext& ctx) {
  const KernelParams& p = ctx.p;
  const int K = p.num_heads * p.head_dim;
  return matvec_residual<kOpOProjResidual>(
      ctx, bf16_ptr(p.o_proj) + static_cast<int64_t>(ctx.layer()) * p.hidden_size * K,
      p.attn_out + static_cast<int64_t>(ctx.token) * K, K, ctx.arg(o_proj_residual::kRowBegin),
      ctx.arg(o_proj_residual::kRowCount));
}

}  // namespace mk
