// sample_logits: the block's partial draw for temperature sampling
// (instructions/sample_logits.py): over its rows of logits[t], the largest
// logit * inv_temperature + gumbel_noise(seed, position, row), lowest index on ties, into
// the block's partial-argmax slot, where the LM head left its greedy one. With top-k or
// top-p (KernelParams: sample_threshold set), only logits at or above sample_threshold[t]
// take part (ops/topk_sampling.cuh, ops/topp_sampling.cuh).
//
// An op of its own, in sampling programs only, and compiled only into the kernel's
// sampling instance (interpreter.cu: run_op<kSampling>), so greedy steps neither run nor
// carry its code: the noise inside the LM head's epilogue, which o_proj and down_proj
// share, made greedy steps 2-5 us slower (benchmarks/RESULTS.md, entry 50), and the op in
// the one kernel still 2-7 us (entry 51).
#pragma once

#include <math_constants.h>

#include "common.cuh"
#include "ops/argmax_merge.cuh"

namespace mk {

// SplitMix64's finalizer (instructions/base.py: _mix64, the same bits).
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Gumbel noise -log(-log(u)), u uniform in (0, 1) on 24 bits hashed from (seed, position,
// row) (instructions/base.py: gumbel_noise).
__device__ __forceinline__ float gumbel_noise(uint64_t seed, int position, int row) {
  const uint64_t h = mix64(seed ^ mix64((static_cast<uint64_t>(position) << 32) |
                                        static_cast<uint32_t>(row)));
  const float u = (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
  return -logf(-logf(u));
}

__device__ __forceinline__ bool op_sample_logits(const OpContext& ctx) {
  if (!ctx.ready<kOpSampleLogits>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token;
  const int r0 = max(ctx.arg(sample_logits::kRowBegin), 0);
  const int end = min(r0 + ctx.arg(sample_logits::kRowCount), p.vocab_size);
  const float* logits = p.logits + static_cast<int64_t>(t) * p.vocab_size;
  const float inv_temperature = p.sample_inv_temperature;
  const int position = step_position(p, t);
  const float threshold =
      p.sample_threshold != nullptr ? load_act(p.sample_threshold + t) : -CUDART_INF_F;
  float best_v = -CUDART_INF_F;
  int best_i = INT_MAX;
#pragma unroll 1
  for (int row = r0 + threadIdx.x; row < end; row += kComputeThreads) {
    float score = load_act(logits + row);
    if (!(score >= threshold)) continue;
    if (inv_temperature > 0.0f)
      score = score * inv_temperature + gumbel_noise(p.sample_seed, position, row);
    if (argmax_better(score, row, best_v, best_i)) best_v = score, best_i = row;
  }
  warp_argmax(best_v, best_i);
  write_block_argmax(ctx, t, best_v, best_i);
  return true;
}

}  // namespace mk
