// Top-k sampling on the device (instructions/topk_partial.py, topk_threshold.py): the k-th
// largest logit of a step, found in two stages between the LM head and sample_logits.
//
//   topk_partial:   each LM-head block's rows: their k largest logits (a multiset, ties
//                   repeated) into the block's kMaxSampleTopK slots of topk_values[t], and
//                   how many rows equal to its k-th largest the slots leave out into
//                   topk_ties[t]
//   topk_threshold: one block: the k-th largest of all blocks' candidates, which is the
//                   k-th largest logit of the step, into sample_threshold[t]; with top-p
//                   as well, the nucleus threshold among the tokens at or above it instead
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
// the rank still sought within it, then topk_partial's two counters (its compaction, the
// rows equal to the k-th largest).
constexpr int kRadixBins = 256;
constexpr int kRadixSmemInts = kRadixBins + 4;
// topk_threshold's top-p among the top k, after those: two arrays of kMaxSampleTopK floats
// and two counters. Then the rows (topk_partial) or the candidates (topk_threshold,
// lm_head_blocks * top_k floats: interpreter.cu's dynamic_smem_bytes counts them), read
// from memory once and scanned by every radix pass from there.
constexpr int kTopkNucleusInts = 2 * kMaxSampleTopK + 2;
constexpr int kTopkSmemBytes = (kRadixSmemInts + kTopkNucleusInts) * 4;

// This launch's dynamic shared memory, in bytes.
__device__ __forceinline__ uint32_t dynamic_smem_size() {
  uint32_t bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
  return bytes;
}

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
      const int above_end = warp_inclusive_sum(sum, lane);
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
  const int64_t block = static_cast<int64_t>(t) * p.lm_head_blocks + ctx.words[word::kBlockIndex];
  float* out = p.topk_values + block * kMaxSampleTopK;
  int* ties = p.topk_ties + block;
  if (n <= k) {  // every row is a candidate; the rest of the k slots never win
    for (int i = threadIdx.x; i < k; i += kComputeThreads)
      out[i] = i < n ? load_act(logits + i) : -CUDART_INF_F;
    if (threadIdx.x == 0) *ties = 0;
    return true;
  }
  int* hist = reinterpret_cast<int*>(ctx.smem);
  int* count = hist + kRadixBins + 2;
  int* equal = hist + kRadixBins + 3;
  if (threadIdx.x == 0) *count = 0, *equal = 0;
  // The rows into shared memory, as many as fit (all of them for an LM-head block of any
  // model so far); block_kth_largest_key's first barrier publishes them.
  float* staged_rows = reinterpret_cast<float*>(ctx.smem) + kRadixSmemInts + kTopkNucleusInts;
  const int staged =
      min(n, static_cast<int>(dynamic_smem_size() / 4) - kRadixSmemInts - kTopkNucleusInts);
#pragma unroll 4
  for (int i = threadIdx.x; i < staged; i += kComputeThreads) staged_rows[i] = load_act(logits + i);
  const auto row = [&](int i) { return i < staged ? staged_rows[i] : load_act(logits + i); };
  const uint32_t kth = block_kth_largest_key(row, n, k, hist);
  // The logits above the k-th largest (fewer than k, in any order: the multiset is what
  // counts), then the k-th itself in the slots left.
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += kComputeThreads) {
    const float v = row(i);
    const uint32_t key = float_order_key(v);
    if (key > kth) out[atomicAdd(count, 1)] = v;
    else if (key == kth) atomicAdd(equal, 1);
  }
  compute_sync();
  for (int i = *count + threadIdx.x; i < k; i += kComputeThreads) out[i] = float_of_order_key(kth);
  if (threadIdx.x == 0) *ties = *equal - (k - *count);
  return true;
}

// Top-p among the top k, as sampling.masked_scores applies the two: the survivors are the
// logits at or above the k-th largest (its ties included), each of mass
// exp((v - top) / T), and the threshold is the smallest survivor value u whose larger
// survivors hold less than top_p of their mass. The survivors above the k-th largest are
// the candidates above it (fewer than k, each row once); those equal to it are counted
// from the slots plus what each block's slots left out (topk_ties). candidates: the
// blocks' k slots each, packed. Every compute thread gets the threshold.
__device__ float top_k_nucleus(const OpContext& ctx, const float* candidates, int blocks, int k,
                               uint32_t kth, int* smem_ints) {
  const KernelParams& p = ctx.p;
  float* above = reinterpret_cast<float*>(smem_ints + kRadixSmemInts);  // any order
  float* sorted = above + kMaxSampleTopK;                               // descending
  int* counts = reinterpret_cast<int*>(sorted + kMaxSampleTopK);  // above, equal to kth
  if (threadIdx.x < 2) counts[threadIdx.x] = 0;
  compute_sync();
  const int* ties = p.topk_ties + static_cast<int64_t>(ctx.token) * p.lm_head_blocks;
  for (int i = threadIdx.x; i < blocks * k; i += kComputeThreads) {
    const float v = candidates[i];
    const uint32_t key = float_order_key(v);
    if (key > kth) above[atomicAdd(&counts[0], 1)] = v;
    else if (key == kth) atomicAdd(&counts[1], 1);
  }
  for (int b = threadIdx.x; b < blocks; b += kComputeThreads) {
    const int omitted = __ldcg(ties + b);  // rows equal to the block's k-th, its last slot
    if (omitted > 0 && float_order_key(candidates[b * k + k - 1]) == kth)
      atomicAdd(&counts[1], omitted);
  }
  compute_sync();
  const int n = counts[0];
  const float kth_value = float_of_order_key(kth);
  // Ranked by value: equal values are interchangeable, so `sorted` holds the same bits
  // whatever order the candidates were appended in, and so do the sums below.
  int larger = 0;
  float v = 0.0f;
  if (threadIdx.x < n) {
    v = above[threadIdx.x];
    int rank = 0;
    for (int j = 0; j < n; ++j) {
      const float w = above[j];
      larger += w > v;
      rank += w > v || (w == v && j < static_cast<int>(threadIdx.x));
    }
    sorted[rank] = v;
  }
  compute_sync();
  const float top = n > 0 ? sorted[0] : kth_value;
  const float inv_temperature = p.sample_inv_temperature;
  // mass_before[r]: the mass of sorted[0, r), r <= n (< 64): a scan by one warp, two
  // sorted values per lane.
  float* mass_before = above;  // free again
  if (threadIdx.x < kWarpSize) {
    const int lane = threadIdx.x, r = 2 * lane;
    const float m0 = r < n ? __expf((sorted[r] - top) * inv_temperature) : 0.0f;
    const float m1 = r + 1 < n ? __expf((sorted[r + 1] - top) * inv_temperature) : 0.0f;
    const float end = warp_inclusive_sum(m0 + m1, lane);
    float start = __shfl_up_sync(0xffffffffu, end, 1);
    if (lane == 0) start = 0.0f;
    if (r <= n) mass_before[r] = start;
    if (r + 1 <= n) mass_before[r + 1] = start + m0;
  }
  compute_sync();
  const float above_kth = mass_before[n];
  const float target =
      p.sample_top_p * (above_kth + counts[1] * __expf((kth_value - top) * inv_temperature));
  float lowest = above_kth < target ? kth_value : CUDART_INF_F;
  if (threadIdx.x < n && mass_before[larger] < target) lowest = fminf(lowest, v);
  return -compute_max(-lowest, ctx.scratch);
}

__device__ __forceinline__ bool op_topk_threshold(const OpContext& ctx) {
  if (!ctx.ready<kOpTopkThreshold>()) return false;
  const KernelParams& p = ctx.p;
  const int t = ctx.token, k = min(max(p.sample_top_k, 1), kMaxSampleTopK);
  const int blocks = min(max(ctx.arg(topk_threshold::kNumBlocks), 1), p.lm_head_blocks);
  const float* values =
      p.topk_values + static_cast<int64_t>(t) * p.lm_head_blocks * kMaxSampleTopK;
  int* smem_ints = reinterpret_cast<int*>(ctx.smem);
  // The candidates into shared memory, packed; block_kth_largest_key's first barrier
  // publishes them.
  float* candidates = reinterpret_cast<float*>(ctx.smem) + kRadixSmemInts + kTopkNucleusInts;
#pragma unroll 4
  for (int i = threadIdx.x; i < blocks * kMaxSampleTopK; i += kComputeThreads) {
    const int b = i / kMaxSampleTopK, slot = i % kMaxSampleTopK;
    if (slot < k) candidates[b * k + slot] = load_act(values + i);
  }
  const uint32_t kth =
      block_kth_largest_key([&](int i) { return candidates[i]; }, blocks * k, k, smem_ints);
  const float threshold = p.sample_top_p < 1.0f
                              ? top_k_nucleus(ctx, candidates, blocks, k, kth, smem_ints)
                              : float_of_order_key(kth);
  if (threadIdx.x == 0) p.sample_threshold[t] = threshold;
  return true;
}

}  // namespace mk
