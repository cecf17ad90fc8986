// embed: hidden[t] = embed_tokens[token_ids[t]] in float32 (instructions/embed.py).
#pragma once

#include "common.cuh"

namespace mk {

__device__ __forceinline__ bool op_embed(const OpContext& ctx) {
  if (!ctx.ready<kOpEmbed>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token;
  const int64_t token = step_token(p, t);  // validated by the controller
  const int H = p.hidden_size;
  const uint4* row = reinterpret_cast<const uint4*>(bf16_ptr(p.embed) + token * H);
  float4* out = reinterpret_cast<float4*>(p.hidden + static_cast<int64_t>(t) * H);
  for (int c = threadIdx.x; c < H / kChunkElems; c += kComputeThreads) {
    const uint4 w = load_weight(row + c, ctx.policy);
    out[2 * c] = make_float4(bf16_lo(w.x), bf16_hi(w.x), bf16_lo(w.y), bf16_hi(w.y));
    out[2 * c + 1] = make_float4(bf16_lo(w.z), bf16_hi(w.z), bf16_lo(w.w), bf16_hi(w.w));
  }
  return true;
}

}  // namespace mk
