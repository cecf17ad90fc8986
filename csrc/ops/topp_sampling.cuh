// Top-p (nucleus) sampling on the device (instructions/topp_histogram.py, topp_select.py):
// the nucleus threshold, the largest logit v such that the tokens with logits >= v hold
// top_p of softmax(logits / temperature), found by a radix selection weighted by
// probability mass over the order-preserving keys of the logits, 8 bits per pass:
//
//   topp_histogram (pass p), each LM-head block: the mass of its rows whose keys share the
//     digits chosen so far, per value of the next 8-bit digit, relative to the step's
//     largest logit (the largest of the LM head's partial maxima) and in 32.32 fixed
//     point, added with integer atomics (the same sums in any order) into the step's
//     histogram topp_hist[t, p]
//   topp_select (pass p), one block: the digit where the mass from the top reaches top_p
//     of the total; it clears the histogram for the next step; after pass 3 the
//     threshold into sample_threshold[t]
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
constexpr double kFixedOne = 4294967296.0;  // 2^32: the step's largest logit's mass
// Shared memory of either op: 256 bins of 8 bytes (fixed-point masses, then doubles).
constexpr int kToppSmemBytes = kRadixBins * 8;

__device__ __forceinline__ bool op_topp_histogram(const OpContext& ctx) {
  if (!ctx.ready<kOpToppHistogram>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token, pass = min(max(ctx.arg(topp_histogram::kPassIndex), 0), 3);
  const int r0 = max(ctx.arg(topp_histogram::kRowBegin), 0);
  const int n = min(r0 + ctx.arg(topp_histogram::kRowCount), p.vocab_size) - r0;
  const float* logits = p.logits + static_cast<int64_t>(t) * p.vocab_size + r0;
  unsigned long long* hist = reinterpret_cast<unsigned long long*>(ctx.smem);
  for (int i = threadIdx.x; i < kRadixBins; i += kComputeThreads) hist[i] = 0;
  // The step's largest logit: the largest of the LM head's partial maxima.
  const float* partial_max = p.argmax_value + static_cast<int64_t>(t) * p.lm_head_blocks;
  float local = -CUDART_INF_F;
  for (int b = threadIdx.x; b < p.lm_head_blocks; b += kComputeThreads)
    local = fmaxf(local, load_act(partial_max + b));
  const float top = compute_max(local, ctx.scratch);  // its barriers: hist zeroed too
  const int shift = 24 - 8 * pass;
  const uint32_t high = pass == 0 ? 0u : ~0u << (shift + 8);
  const uint32_t prefix =
      pass == 0 ? 0u
                : static_cast<uint32_t>(__ldcg(p.topp_state + static_cast<int64_t>(t) *
                                                                  kToppStateWords));
  const float inv_temperature = p.sample_inv_temperature;
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += kComputeThreads) {
    const float v = load_act(logits + i);
    const uint32_t key = float_order_key(v);
    if ((key & high) != prefix) continue;
    const float mass = __expf((v - top) * inv_temperature);
    atomicAdd(&hist[(key >> shift) & (kRadixBins - 1)],
              static_cast<unsigned long long>(mass * static_cast<float>(kFixedOne) + 0.5f));
  }
  compute_sync();
  // Integer sums: the step's histogram is the same whatever order the blocks add in.
  unsigned long long* out = p.topp_hist + (static_cast<int64_t>(t) * 4 + pass) * kRadixBins;
  for (int i = threadIdx.x; i < kRadixBins; i += kComputeThreads)
    if (hist[i] != 0) atomicAdd(out + i, hist[i]);
  return true;
}

__device__ __forceinline__ bool op_topp_select(const OpContext& ctx) {
  if (!ctx.ready<kOpToppSelect>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token, pass = min(max(ctx.arg(topp_select::kPassIndex), 0), 3);
  unsigned long long* hist = p.topp_hist + (static_cast<int64_t>(t) * 4 + pass) * kRadixBins;
  double* state = p.topp_state + static_cast<int64_t>(t) * kToppStateWords;
  double* bins = reinterpret_cast<double*>(ctx.smem);  // [kRadixBins]
  // Read, then cleared for the next step's pass (the backend clears them after a fault).
  for (int d = threadIdx.x; d < kRadixBins; d += kComputeThreads) {
    bins[d] = static_cast<double>(__ldcg(hist + d)) / kFixedOne;
    hist[d] = 0;
  }
  compute_sync();
  if (threadIdx.x >= kWarpSize) return true;
  // One warp: lane l holds the 8 bins from digit 255 - 8l down. The bins are multiples of
  // 2^-32, each row's mass at most 1, so sums below 2^21 (any vocabulary up to 2M tokens)
  // are exact and any order of adding gives the bits a serial scan from the top would.
  const int lane = threadIdx.x;
  double mass[8], sum = 0.0;
#pragma unroll
  for (int j = 0; j < 8; ++j) sum += mass[j] = bins[kRadixBins - 1 - (lane * 8 + j)];
  double above, target;
  uint32_t prefix;
  if (pass == 0) {
    prefix = 0;
    above = 0.0;
    target = static_cast<double>(p.sample_top_p) * warp_sum(sum);
  } else {
    prefix = static_cast<uint32_t>(__ldcg(state));
    above = __ldcg(state + 1);
    target = __ldcg(state + 2);
  }
  const double end = warp_inclusive_sum(sum, lane);  // the mass down to this lane's last bin
  // The highest digit at which the mass from the top reaches the target; the lowest digit
  // with any mass if rounding keeps it short (or digit 0 where no bin has any).
  double cum = above + (end - sum), before = 0.0, lowest_before = 0.0;
  int hit = -1, lowest = -1;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (mass[j] > 0.0) {
      lowest = j;
      lowest_before = cum;
      if (hit < 0 && cum + mass[j] >= target) hit = j, before = cum;
    }
    cum += mass[j];
  }
  const unsigned hits = __ballot_sync(0xffffffffu, hit >= 0);
  const unsigned any = __ballot_sync(0xffffffffu, lowest >= 0);
  const int winner = hits ? __ffs(hits) - 1 : any ? kWarpSize - 1 - __clz(any) : kWarpSize - 1;
  if (lane != winner) return true;
  if (hit < 0) hit = lowest >= 0 ? lowest : 7, before = lowest >= 0 ? lowest_before : above;
  const int digit = kRadixBins - 1 - (lane * 8 + hit);
  prefix |= static_cast<uint32_t>(digit) << (24 - 8 * pass);
  state[0] = static_cast<double>(prefix);
  state[1] = before;
  state[2] = target;
  if (pass == 3) p.sample_threshold[t] = float_of_order_key(prefix);
  return true;
}

}  // namespace mk
