// Top-p (nucleus) sampling on the device (instructions/topp_histogram.py, topp_select.py):
// the nucleus threshold, the largest logit v such that the tokens with logits >= v hold
// top_p of softmax(logits / temperature), found by a radix selection weighted by
// probability mass over the order-preserving keys of the logits, 8 bits per pass:
//
//   topp_histogram (pass p), each LM-head block: the mass of its rows whose keys share the
//     digits chosen so far, per value of the next 8-bit digit, relative to the block's
//     largest logit (found in pass 0) and in 32.32 fixed point, so that the sums do not
//     depend on the order the threads add them, into topp_hist[t, block]
//   topp_select (pass p), one block: the blocks' histograms summed per digit in block
//     order (rescaled to the step's largest logit), then the digit where the mass from the
//     top reaches top_p of the total; after pass 3 the threshold into sample_threshold[t]
//
// sample_logits then draws among the logits at or above it. Compiled only into the
// kernel's sampling instance.
#pragma once

#include <math_constants.h>

#include "common.cuh"
#include "ops/topk_sampling.cuh"  // float_order_key, kRadixBins

namespace mk {

// topp_state[t]: the digits chosen so far, the mass above them, the target mass.
constexpr int kToppStateWords = 4;
constexpr double kFixedOne = 4294967296.0;  // 2^32: a block's largest logit's mass

__device__ __forceinline__ bool op_topp_histogram(const OpContext& ctx) {
  if (!ctx.ready<kOpToppHistogram>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token, pass = min(max(ctx.arg(topp_histogram::kPassIndex), 0), 3);
  const int r0 = max(ctx.arg(topp_histogram::kRowBegin), 0);
  const int n = min(r0 + ctx.arg(topp_histogram::kRowCount), p.vocab_size) - r0;
  const int block = ctx.words[word::kBlockIndex];
  const float* logits = p.logits + static_cast<int64_t>(t) * p.vocab_size + r0;
  float* block_max = p.topp_block_max + static_cast<int64_t>(t) * p.lm_head_blocks + block;
  unsigned long long* hist = reinterpret_cast<unsigned long long*>(ctx.smem);
  for (int i = threadIdx.x; i < kRadixBins; i += kComputeThreads) hist[i] = 0;
  float m;
  if (pass == 0) {
    float local = -CUDART_INF_F;
    for (int i = threadIdx.x; i < n; i += kComputeThreads) local = fmaxf(local, load_act(logits + i));
    local = warp_max(local);
    if (threadIdx.x % kWarpSize == 0) ctx.scratch[threadIdx.x / kWarpSize] = local;
    compute_sync();
    m = -CUDART_INF_F;
    for (int w = 0; w < kComputeWarps; ++w) m = fmaxf(m, ctx.scratch[w]);
    if (threadIdx.x == 0) *block_max = m;
  } else {
    m = load_act(block_max);
  }
  const int shift = 24 - 8 * pass;
  const uint32_t high = pass == 0 ? 0u : ~0u << (shift + 8);
  const uint32_t prefix =
      pass == 0 ? 0u
                : static_cast<uint32_t>(__ldcg(p.topp_state + static_cast<int64_t>(t) *
                                                                  kToppStateWords));
  compute_sync();  // hist zeroed, the scratch read
  const float inv_temperature = p.sample_inv_temperature;
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += kComputeThreads) {
    const float v = load_act(logits + i);
    const uint32_t key = float_order_key(v);
    if ((key & high) != prefix) continue;
    const float mass = __expf((v - m) * inv_temperature);
    atomicAdd(&hist[(key >> shift) & (kRadixBins - 1)],
              static_cast<unsigned long long>(mass * 4294967296.0f + 0.5f));
  }
  compute_sync();
  unsigned long long* out =
      p.topp_hist + (static_cast<int64_t>(t) * p.lm_head_blocks + block) * kRadixBins;
  for (int i = threadIdx.x; i < kRadixBins; i += kComputeThreads) out[i] = hist[i];
  return true;
}

__device__ __forceinline__ bool op_topp_select(const OpContext& ctx) {
  if (!ctx.ready<kOpToppSelect>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token, pass = min(max(ctx.arg(topp_select::kPassIndex), 0), 3);
  const int blocks = min(max(ctx.arg(topp_select::kNumBlocks), 1), p.lm_head_blocks);
  const float* block_max = p.topp_block_max + static_cast<int64_t>(t) * p.lm_head_blocks;
  const unsigned long long* hists =
      p.topp_hist + static_cast<int64_t>(t) * p.lm_head_blocks * kRadixBins;
  double* state = p.topp_state + static_cast<int64_t>(t) * kToppStateWords;
  double* bins = reinterpret_cast<double*>(ctx.smem);  // [kRadixBins]
  double* scales = bins + kRadixBins;                  // [blocks]
  // The step's largest logit, by every thread (blocks is small), then each block's
  // histogram's scale to it.
  float top = -CUDART_INF_F;
  for (int b = 0; b < blocks; ++b) top = fmaxf(top, load_act(block_max + b));
  const float inv_temperature = p.sample_inv_temperature;
  for (int b = threadIdx.x; b < blocks; b += kComputeThreads)
    scales[b] = static_cast<double>(__expf((load_act(block_max + b) - top) * inv_temperature)) /
                kFixedOne;
  compute_sync();
  for (int d = threadIdx.x; d < kRadixBins; d += kComputeThreads) {
    double sum = 0.0;
    for (int b = 0; b < blocks; ++b)
      sum += static_cast<double>(__ldcg(hists + static_cast<int64_t>(b) * kRadixBins + d)) *
             scales[b];
    bins[d] = sum;
  }
  compute_sync();
  if (threadIdx.x == 0) {
    double above = 0.0, target;
    uint32_t prefix = 0;
    if (pass == 0) {
      double total = 0.0;
      for (int d = 0; d < kRadixBins; ++d) total += bins[d];
      target = static_cast<double>(p.sample_top_p) * total;
    } else {
      prefix = static_cast<uint32_t>(__ldcg(state));
      above = __ldcg(state + 1);
      target = __ldcg(state + 2);
    }
    // The highest digit at which the mass from the top reaches the target; the lowest
    // digit with any mass if rounding keeps it short.
    int digit = -1, lowest = 0;
    double before = above, lowest_before = above, cum = above;
    for (int d = kRadixBins - 1; d >= 0; --d) {
      if (bins[d] > 0.0) {
        lowest = d;
        lowest_before = cum;
      }
      if (cum + bins[d] >= target && bins[d] > 0.0) {
        digit = d;
        before = cum;
        break;
      }
      cum += bins[d];
    }
    if (digit < 0) digit = lowest, before = lowest_before;
    const int shift = 24 - 8 * pass;
    prefix |= static_cast<uint32_t>(digit) << shift;
    state[0] = static_cast<double>(prefix);
    state[1] = before;
    state[2] = target;
    if (pass == 3) p.sample_threshold[t] = float_of_order_key(prefix);
  }
  return true;
}

}  // namespace mk
