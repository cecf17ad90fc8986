// attention_partial: decode attention of one KV head's query group over one partition of
// the paged context (instructions/attention_partial.py).
//
// The partition split is computed from the position at run time exactly as
// partition_range(): ppp = ceil(ceil((pos+1)/page_size)/P), tokens
// [part*ppp*page_size, min((part+1)*ppp*page_size, pos+1)). Each warp walks its own
// tokens kAttnTokensPerStep at a time (K and V rows of all of them loaded before use) and
// keeps an online softmax (running max m, sum l, output acc) per query head of the group;
// lane j holds head dims [j*hd/32, (j+1)*hd/32). The warps' states are merged through
// shared memory. An empty partition writes out = 0, lse = -inf.
#pragma once

#include <math_constants.h>

#include "common.cuh"

namespace mk {

// kDims bf16 of one K or V row for this lane, loaded at L2 (the row may have been written
// by another block during this launch).
template <int kDims>
struct KvLane;
template <>
struct KvLane<2> {  // head_dim 64
  uint32_t bits;
  __device__ void load(const __nv_bfloat16* row, int lane) {
    bits = __ldcg(reinterpret_cast<const unsigned int*>(row) + lane);
  }
  __device__ float get(int i) const { return i == 0 ? bf16_lo(bits) : bf16_hi(bits); }
};
template <>
struct KvLane<4> {  // head_dim 128
  uint2 bits;
  __device__ void load(const __nv_bfloat16* row, int lane) {
    bits = __ldcg(reinterpret_cast<const uint2*>(row) + lane);
  }
  __device__ float get(int i) const {
    const uint32_t w = i < 2 ? bits.x : bits.y;
    return (i & 1) == 0 ? bf16_lo(w) : bf16_hi(w);
  }
};

template <int kHeadDim>
__device__ __forceinline__ bool attention_partial_impl(const OpContext& ctx) {
  constexpr int kDims = kHeadDim / kWarpSize;
  constexpr int kSteps = kAttnTokensPerStep;
  static_assert(kHeadDim % kWarpSize == 0, "head dims split evenly over the lanes");
  const KernelParams& p = ctx.p;
  const int t = ctx.token, l = ctx.layer();
  const int kv_head = ctx.arg(attention_partial::kKvHead);
  const int part = ctx.arg(attention_partial::kPartition);
  const int nparts = ctx.arg(attention_partial::kNumPartitions);
  const int nq = p.num_heads, nkv = p.num_kv_heads, ps = p.page_size;
  const int group = nq / nkv;
  const int P = p.attn_partitions;

  // The position, the page table and every K/V row but the token's own are inputs of the
  // launch, not of this step's producers: before the wait, each warp looks up its first
  // K/V rows and prefetches them into L2, so after it they come from L2, not DRAM behind a
  // dependent page-table read. (Loading them into registers before the barrier, or before
  // q is staged, makes ptxas spill: the kernel is one function at 128 registers.)
  const int pos = p.step_input[p.num_tokens + t];
  const int seq_len = pos + 1;
  const int seq_pages = (seq_len + ps - 1) / ps;
  const int per_part = (seq_pages + nparts - 1) / nparts;
  const int begin = part * per_part * ps;
  const int end = max(begin, min((part + 1) * per_part * ps, seq_len));

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t layer_base = static_cast<int64_t>(l) * p.num_pages;
  const __nv_bfloat16* k_cache = static_cast<const __nv_bfloat16*>(p.k_cache);
  const __nv_bfloat16* v_cache = static_cast<const __nv_bfloat16*>(p.v_cache);
  // Element offset of token j's row (callers keep j < end).
  auto row_offset = [&](int j) {
    const int page = p.page_table[j / ps];
    return (((layer_base + page) * ps + j % ps) * nkv + kv_head) * kHeadDim;
  };
  const int first = begin + warp * kSteps;
  // A position outside the tables is refused by the controller (ready() is then false):
  // nothing may be read with it before that.
  const bool pos_ok = pos >= 0 && pos < position_limit(p);
  if (pos_ok && lane < kSteps && first + lane < end && first + lane != pos) {
    const int64_t off = row_offset(first + lane);
    prefetch_l2_lines(k_cache + off, kHeadDim * 2);
    prefetch_l2_lines(v_cache + off, kHeadDim * 2);
  }

  if (!ctx.template ready<kOpAttentionPartial * 1000 + kHeadDim>()) return false;

  KvLane<kDims> k[kSteps], v[kSteps];
  auto load_step = [&](int j0) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t off = row_offset(min(j0 + s, end - 1));
      k[s].load(k_cache + off, lane);
      v[s].load(v_cache + off, lane);
    }
  };

  // Shared memory: q [group][hd], then per warp m [group], l [group], acc [group][hd].
  float* q_s = ctx.smem;
  float* m_s = q_s + kMaxGroup * kHeadDim;
  float* l_s = m_s + kComputeWarps * kMaxGroup;
  float* acc_s = l_s + kComputeWarps * kMaxGroup;

  const float* q_g = p.q + static_cast<int64_t>(t) * nq * kHeadDim + kv_head * group * kHeadDim;
  for (int i = threadIdx.x; i < group * kHeadDim; i += kComputeThreads) q_s[i] = load_act(q_g + i);
  compute_sync();

  // q stays in shared memory (read per use, conflict-free): registers hold the state.
  const float* q_lane = q_s + lane * kDims;

  float m[kMaxGroup], lsum[kMaxGroup], acc[kMaxGroup][kDims];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -CUDART_INF_F;
    lsum[g] = 0.0f;
#pragma unroll
    for (int d = 0; d < kDims; ++d) acc[g][d] = 0.0f;
  }

  const float scale = rsqrtf(static_cast<float>(kHeadDim));

  for (int j0 = first; j0 < end; j0 += kComputeWarps * kSteps) {
    load_step(j0);
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) break;
      float score[kSteps];
      float step_max = -CUDART_INF_F;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < kDims; ++d) dot = fmaf(k[s].get(d), q_lane[g * kHeadDim + d], dot);
        dot = warp_sum(dot) * scale;
        score[s] = j0 + s < end ? dot : -CUDART_INF_F;
        step_max = fmaxf(step_max, score[s]);
      }
      const float m_new = fmaxf(m[g], step_max);  // finite: token j0 is valid
      const float correction = __expf(m[g] - m_new);
      lsum[g] *= correction;
#pragma unroll
      for (int d = 0; d < kDims; ++d) acc[g][d] *= correction;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const float e = __expf(score[s] - m_new);
        lsum[g] += e;
#pragma unroll
        for (int d = 0; d < kDims; ++d) acc[g][d] = fmaf(e, v[s].get(d), acc[g][d]);
      }
      m[g] = m_new;
    }
  }

  // Publish this warp's state, then merge over warps: thread per (head, dim).
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= group) break;
    if (lane == 0) {
      m_s[warp * kMaxGroup + g] = m[g];
      l_s[warp * kMaxGroup + g] = lsum[g];
    }
#pragma unroll
    for (int d = 0; d < kDims; ++d)
      acc_s[(warp * kMaxGroup + g) * kHeadDim + lane * kDims + d] = acc[g][d];
  }
  compute_sync();

  for (int i = threadIdx.x; i < group * kHeadDim; i += kComputeThreads) {
    const int g = i / kHeadDim, d = i % kHeadDim;
    float m_all = -CUDART_INF_F;
    for (int w = 0; w < kComputeWarps; ++w) m_all = fmaxf(m_all, m_s[w * kMaxGroup + g]);
    const int h = kv_head * group + g;
    float* out = p.attn_partial_out + ((static_cast<int64_t>(t) * nq + h) * P + part) * kHeadDim;
    float* lse = p.attn_partial_lse + (static_cast<int64_t>(t) * nq + h) * P + part;
    if (m_all == -CUDART_INF_F) {  // empty partition
      out[d] = 0.0f;
      if (d == 0) *lse = -CUDART_INF_F;
      continue;
    }
    float total = 0.0f, o = 0.0f;
    for (int w = 0; w < kComputeWarps; ++w) {
      const float e = __expf(m_s[w * kMaxGroup + g] - m_all);
      total += l_s[w * kMaxGroup + g] * e;
      o += acc_s[(w * kMaxGroup + g) * kHeadDim + d] * e;
    }
    out[d] = o / total;
    if (d == 0) *lse = m_all + __logf(total);
  }
  return true;
}

__device__ __forceinline__ bool op_attention_partial(const OpContext& ctx) {
  // head_dim is 64 or 128: checked at launch.
  return ctx.p.head_dim == 64 ? attention_partial_impl<64>(ctx) : attention_partial_impl<128>(ctx);
}

}  // namespace mk
