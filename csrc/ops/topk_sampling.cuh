// Top-k sampling on the device (instructions/topk_partial.py, topk_threshold.py): the k-th
// largest logit of a step, found in two stages between the LM head and sample_logits.
//
//   topk_partial:   each LM-head block's rows: their k largest logits (a multiset, ties
//                   repeated) into the block's kMaxSampleTopK slots of topk_values[t]
//   topk_threshold: one block: the k-th largest of all blocks' candidates, which is the
//                   k-th largest logit of the step, into sample_threshold[t]
//
// sample_logits then draws among the logits at or above the threshold. Both find a k-th
// largest by radix selection over order-preserving 32-bit keys: four passes of an 8-bit
// histogram in shared memory. Compiled only into the kernel's sampling instance.
#pragma once

#include <math_constants.h>

#include "common.cuh"
#include "instruction_layout.h"  // kMaxSampleTopK

namespace mk {

// Shared-memory ints the radix selection uses: the histogram, then the pass's digit and
// the rank still sought within it, then a counter for topk_partial's compaction.
constexpr int kRadixBins = 256;
constexpr int kRadixSmemInts = kRadixBins + 3;

// A key per float whose unsigned order is the floats' order (-0 just below +0).
__device__ __forceinline__ uint32_t float_order_key(float v) {
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float float_of_order_key(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The key of the k-th largest of value(i), i in [0, n), 1 <= k <= n, in every compute
// thread. hist: kRadixSmemInts ints of shared memory.
template <typename Value>
__device__ uint32_t block_kth_largest_key(Value value, int n, int k, int* hist) {
  uint32_t prefix = 0;
  int rank = k;  // the rank sought among the keys that share the prefix's digits
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kRadixBins; i += kComputeThreads) hist[i] = 0;
    compute_sync();
    const uint32_t high = shift == 24 ? 0u : ~0u << (shift + 8);
#pragma unroll 1
    for (int i = threadIdx.x; i < n; i += kComputeThreads) {
      const uint32_t key = float_order_key(value(i));
      if ((key & high) == prefix) atomicAdd(&hist[(key >> shift) & (kRadixBins - 1)], 1);
    }
    compute_sync();
    if (threadIdx.x < kWarpSize) {
      // Lane l holds the 8 bins from digit 255 - 8l down; an inclusive scan over lanes
      // counts the keys in the bins above each lane's.
      const int lane = threadIdx.x;
      int counts[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += counts[j] = hist[kRadixBins - 1 - (lane * 8 + j)];
      int above_end = sum;
#pragma unroll
      for (int o = 1; o < kWarpSize; o *= 2) {
        const int from = __shfl_up_sync(0xffffffffu, above_end, o);
        if (lane >= o) above_end += from;
      }
      int above = above_end - sum;
      if (above < rank && rank <= above_end) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (above + counts[j] >= rank) {
            hist[kRadixBins] = kRadixBins - 1 - (lane * 8 + j);
            hist[kRadixBins + 1] = rank - above;
            break;
          }
          above += counts[j];
        }
      }
    }
    compute_sync();
    prefix |= static_cast<uint32_t>(hist[kRadixBins]) << shift;
    rank = hist[kRadixBins + 1];
  }
  return prefix;
}

__device__ __forceinline__ bool op_topk_partial(const OpContext& ctx) {
  if (!ctx.ready<kOpTopkPartial>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token, k = min(max(p.sample_top_k, 1), kMaxSampleTopK);
  const int r0 = max(ctx.arg(topk_partial::kRowBegin), 0);
  const int n = min(r0 + ctx.arg(topk_partial::kRowCount), p.vocab_size) - r0;
  const float* logits = p.logits + static_cast<int64_t>(t) * p.vocab_size + r0;
  float* out = p.topk_values +
               (static_cast<int64_t>(t) * p.lm_head_blocks + ctx.words[word::kBlockIndex]) *
                   kMaxSampleTopK;
  if (n <= k) {  // every row is a candidate; the rest of the k slots never win
    for (int i = threadIdx.x; i < k; i += kComputeThreads)
      out[i] = i < n ? load_act(logits + i) : -CUDART_INF_F;
    return true;
  }
  int* hist = reinterpret_cast<int*>(ctx.smem);
  int* count = hist + kRadixBins + 2;
  if (threadIdx.x == 0) *count = 0;
  const uint32_t kth = block_kth_largest_key([&](int i) { return load_act(logits + i); }, n, k,
                                             hist);
  // The logits above the k-th largest (fewer than k, in any order: the multiset is what
  // counts), then the k-th itself in the slots left.
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += kComputeThreads) {
    const float v = load_act(logits + i);
    if (float_order_key(v) > kth) out[atomicAdd(count, 1)] = v;
  }
  compute_sync();
  for (int i = *count + threadIdx.x; i < k; i += kComputeThreads) out[i] = float_of_order_key(kth);
  return true;
}

__device__ __forceinline__ bool op_topk_threshold(const OpContext& ctx) {
  if (!ctx.ready<kOpTopkThreshold>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token, k = min(max(p.sample_top_k, 1), kMaxSampleTopK);
  const int blocks = min(max(ctx.arg(topk_threshold::kNumBlocks), 1), p.lm_head_blocks);
  const float* values =
      p.topk_values + static_cast<int64_t>(t) * p.lm_head_blocks * kMaxSampleTopK;
  const uint32_t kth = block_kth_largest_key(
      [&](int i) { return load_act(values + (i / k) * kMaxSampleTopK + i % k); }, blocks * k, k,
      reinterpret_cast<int*>(ctx.smem));
  if (threadIdx.x == 0) p.sample_threshold[t] = float_of_order_key(kth);
  return true;
}

}  // namespace mk
