// attention_partial: decode attention of one KV head's query group over one partition of
// the paged context (instructions/attention_partial.py).
//
// The partition split is computed from the position at run time exactly as
// partition_range(): ppp = ceil(ceil((pos+1)/page_size)/P), tokens
// [part*ppp*page_size, min((part+1)*ppp*page_size, pos+1)). An empty partition writes
// out = 0, lse = -inf.
//
// K/V pipeline: the partition's tokens are cut into chunks of kAttnChunkTokens tokens' K
// and V rows; warp w takes chunks w, w + kComputeWarps, ... (so even a one-page partition
// spreads over several warps) and copies each into its own ring of shared-memory slots
// (kAttnRingBytes per warp) with cp.async, 16 bytes per lane through L2, all but one slot
// ahead of the chunk it computes (~100 KB per SM in flight at long contexts). Every row but
// the token's own is an input of the launch, so the first chunks are copied before the
// wait; the own row (written by this step's QKV blocks) is loaded after it.
//
// Compute: lane (tok = lane % 4, part = lane / 4) dots its eighth of token tok's K row
// with each query head of the group (the parts summed by shuffles); the warp keeps one
// online softmax (running max m, sum l, output acc) per head, lane j owning head dims
// [j*hd/32, (j+1)*hd/32) of acc. Warps are merged through shared memory.
#pragma once

#include <math_constants.h>

#include "common.cuh"

namespace mk {

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared through L2 (.cg: never L1, the row may have been written by
// another block during this launch); src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_address(dst)),
               "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void copy_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void copy_async_wait_all() {
  asm volatile("cp.async.wait_all;" ::: "memory");
}

// kGroupCap >= the query heads per KV head: the size of the unrolled per-head state. The
// op's code is kept to what its group needs (every SM runs each op once per layer, so its
// instructions are fetched anew each time: code size is latency).
template <int kHeadDim, int kGroupCap>
__device__ __forceinline__ bool attention_partial_impl(const OpContext& ctx) {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim 64 or 128");
  static_assert(kGroupCap <= kMaxGroup, "shared memory holds kMaxGroup heads");
  constexpr int kRowBytes = kHeadDim * 2;
  constexpr int kUnitsPerRow = kRowBytes / 16;                         // 8 or 16
  constexpr int kChunkTokens = kAttnChunkTokens;                       // 4
  constexpr int kChunkBytes = kChunkTokens * 2 * kRowBytes;            // 1 or 2 KB
  constexpr int kStages = kAttnRingBytes / kChunkBytes;                // 8 or 4
  constexpr int kParts = kWarpSize / kChunkTokens;                     // 8
  constexpr int kPartUnits = kUnitsPerRow / kParts;                    // 1 or 2
  constexpr int kDimsPv = kHeadDim / kWarpSize;                        // 2 or 4
  static_assert(kStages >= 2 && kStages * kChunkBytes == kAttnRingBytes, "whole chunks");
  static_assert(kPartUnits * kParts == kUnitsPerRow, "lanes split a row in whole units");

  const KernelParams& p = ctx.p;
  const int t = ctx.token, l = ctx.layer();
  const int kv_head = ctx.arg(attention_partial::kKvHead);
  const int part = ctx.arg(attention_partial::kPartition);
  const int nparts = ctx.arg(attention_partial::kNumPartitions);
  const int nq = p.num_heads, nkv = p.num_kv_heads, ps = p.page_size;
  const int group = nq / nkv;
  const int P = p.attn_partitions;

  const int pos = p.step_input[p.num_tokens + t];
  const int seq_len = pos + 1;
  const int seq_pages = (seq_len + ps - 1) / ps;
  const int per_part = (seq_pages + nparts - 1) / nparts;
  const int begin = part * per_part * ps;
  const int end = max(begin, min((part + 1) * per_part * ps, seq_len));
  // A position outside the tables is refused by the controller (ready() is then false):
  // nothing may be read with it before that.
  const bool pos_ok = pos >= 0 && pos < position_limit(p);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t layer_base = static_cast<int64_t>(l) * p.num_pages;
  const char* k_cache = static_cast<const char*>(p.k_cache);
  const char* v_cache = static_cast<const char*>(p.v_cache);

  // Shared memory: q [kMaxGroup][hd], per warp m [kMaxGroup], l [kMaxGroup],
  // acc [kMaxGroup][hd], per warp the chunk's weights [kChunkTokens][kMaxGroup], then per
  // warp kStages chunk slots (K rows, then V rows).
  float* q_s = ctx.smem;
  float* m_s = q_s + kMaxGroup * kHeadDim;
  float* l_s = m_s + kComputeWarps * kMaxGroup;
  float* acc_s = l_s + kComputeWarps * kMaxGroup;
  float* e_s = acc_s + kComputeWarps * kMaxGroup * kHeadDim + warp * kChunkTokens * kMaxGroup;
  constexpr size_t kRingsAt = attention_smem_floats_before_rings(kHeadDim);
  char* ring = reinterpret_cast<char*>(ctx.smem + kRingsAt) + warp * kAttnRingBytes;

  // This warp's i-th chunk starts at token chunk_begin(i); it has my_chunks of them.
  auto chunk_begin = [&](int i) { return begin + (warp + i * kComputeWarps) * kChunkTokens; };
  const int all_chunks = pos_ok ? (end - begin + kChunkTokens - 1) / kChunkTokens : 0;
  const int my_chunks = max(0, all_chunks - warp + kComputeWarps - 1) / kComputeWarps;

  // The lane's share of chunk i: the same 16-byte unit (lane % R) of the K and the V row
  // of kRowsPerLane tokens, lane / R + n * (32 / R). fn(k_dst, v_dst, byte offset, token).
  constexpr int kRowsPerLane = kChunkTokens * kUnitsPerRow / kWarpSize;
  static_assert(kRowsPerLane * kWarpSize == kChunkTokens * kUnitsPerRow, "lanes copy evenly");
  auto for_each_row = [&](int i, auto&& fn) {
    char* slot = ring + (i % kStages) * kChunkBytes;
    const int token0 = chunk_begin(i), unit = lane % kUnitsPerRow;
#pragma unroll 1
    for (int n = 0; n < kRowsPerLane; ++n) {
      const int r = lane / kUnitsPerRow + n * (kWarpSize / kUnitsPerRow);
      const int j = token0 + r;
      int64_t off = 0;
      if (j < end) {
        const int page = p.page_table[j / ps];
        off = ((((layer_base + page) * ps + j % ps) * nkv + kv_head) * kHeadDim) * 2 + unit * 16;
      }
      fn(slot + (r * kUnitsPerRow + unit) * 16,
         slot + ((kChunkTokens + r) * kUnitsPerRow + unit) * 16, off, j);
    }
  };
  auto issue = [&](int i, bool skip_own_row) {
    if (i < my_chunks) {
      for_each_row(i, [&](char* k_dst, char* v_dst, int64_t off, int j) {
        if (skip_own_row && j == pos) return;
        const uint32_t bytes = j < end ? 16u : 0u;
        copy16_async(k_dst, k_cache + off, bytes);
        copy16_async(v_dst, v_cache + off, bytes);
      });
    }
    copy_async_commit();  // empty groups too: group n is always chunk n
  };

#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) issue(i, /*skip_own_row=*/true);

  if (!ctx.template ready<kOpAttentionPartial * 1000 + kHeadDim>()) {
    copy_async_wait_all();
    return false;
  }

  // After the wait: q and the token's own K/V row (if it falls in a chunk copied before
  // the wait; a lane holds at most one unit of each), all loaded before any is stored so
  // their L2 round trips overlap.
  const float4* q_g = reinterpret_cast<const float4*>(
      p.q + static_cast<int64_t>(t) * nq * kHeadDim + kv_head * group * kHeadDim);
  const bool loads_q = threadIdx.x < group * kHeadDim / 4;  // <= 256 float4 on 480 threads
  const float4 q_part = loads_q ? load_act4(q_g + threadIdx.x) : float4{};
  uint4 own_k = {}, own_v = {};
  char *own_k_dst = nullptr, *own_v_dst = nullptr;
#pragma unroll 1
  for (int i = 0; i < kStages - 1 && i < my_chunks; ++i) {
    for_each_row(i, [&](char* k_dst, char* v_dst, int64_t off, int j) {
      if (j != pos) return;
      own_k_dst = k_dst;
      own_v_dst = v_dst;
      own_k = __ldcg(reinterpret_cast<const uint4*>(k_cache + off));
      own_v = __ldcg(reinterpret_cast<const uint4*>(v_cache + off));
    });
  }
  if (loads_q) reinterpret_cast<float4*>(q_s)[threadIdx.x] = q_part;
  if (own_k_dst != nullptr) {
    *reinterpret_cast<uint4*>(own_k_dst) = own_k;
    *reinterpret_cast<uint4*>(own_v_dst) = own_v;
  }
  compute_sync();

  // Scores: lane (tok = lane % T, qpart = lane / T) dots 8 or 16 dims of token tok's K row
  // with each head's q; the parts are summed by shuffles. Weighted V: lane owns kDimsPv dims.
  const int tok = lane % kChunkTokens, qpart = lane / kChunkTokens;
  float m[kGroupCap], lsum[kGroupCap], acc[kGroupCap][kDimsPv];
#pragma unroll
  for (int g = 0; g < kGroupCap; ++g) {
    m[g] = -CUDART_INF_F;
    lsum[g] = 0.0f;  // this lane's tokens only (summed over lanes at the end)
#pragma unroll
    for (int d = 0; d < kDimsPv; ++d) acc[g][d] = 0.0f;
  }
  const float scale = rsqrtf(static_cast<float>(kHeadDim));

  for (int i = 0; i < my_chunks; ++i) {
    issue(i + kStages - 1, /*skip_own_row=*/false);
    copy_async_wait<kStages - 1>();  // chunk i landed (this lane's pieces)
    __syncwarp();                    // ... and every lane's
    const char* slot = ring + (i % kStages) * kChunkBytes;
    const bool valid = chunk_begin(i) + tok < end;
    const uint4* k_row = reinterpret_cast<const uint4*>(slot) + tok * kUnitsPerRow;
    uint4 k[kPartUnits];
#pragma unroll
    for (int u = 0; u < kPartUnits; ++u) k[u] = k_row[qpart * kPartUnits + u];
    // Every head up to kGroupCap is computed (heads past the group repeat the last one and
    // are never published): no branch between heads, so their chains interleave.
#pragma unroll
    for (int g = 0; g < kGroupCap; ++g) {
      const float* qg = q_s + min(g, group - 1) * kHeadDim + qpart * kPartUnits * 8;
      float dot = dot8(k[0], qg, 0.0f);
      if constexpr (kPartUnits == 2) dot += dot8(k[1], qg + 8, 0.0f);
#pragma unroll
      for (int o = kChunkTokens; o < kWarpSize; o *= 2)
        dot += __shfl_xor_sync(0xffffffffu, dot, o);
      const float score = valid ? dot * scale : -CUDART_INF_F;
      float chunk_max = score;
#pragma unroll
      for (int o = kChunkTokens / 2; o > 0; o /= 2)
        chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, o));
      // chunk_max is finite: the chunk's first token is valid.
      const float m_new = fmaxf(m[g], chunk_max);
      const float correction = __expf(m[g] - m_new);
      const float e = __expf(score - m_new);
      lsum[g] = lsum[g] * correction + e;
#pragma unroll
      for (int d = 0; d < kDimsPv; ++d) acc[g][d] *= correction;
      m[g] = m_new;
      if (qpart == 0) e_s[tok * kMaxGroup + g] = e;
    }
    __syncwarp();  // e_s written
    const char* v_rows = slot + kChunkTokens * kRowBytes + lane * kDimsPv * 2;
#pragma unroll
    for (int r = 0; r < kChunkTokens; ++r) {
      float v[kDimsPv];
      if constexpr (kDimsPv == 2) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(v_rows + r * kRowBytes);
        v[0] = bf16_lo(w);
        v[1] = bf16_hi(w);
      } else {
        const uint2 w = *reinterpret_cast<const uint2*>(v_rows + r * kRowBytes);
        v[0] = bf16_lo(w.x);
        v[1] = bf16_hi(w.x);
        v[2] = bf16_lo(w.y);
        v[3] = bf16_hi(w.y);
      }
#pragma unroll
      for (int g = 0; g < kGroupCap; ++g) {
        const float e = e_s[r * kMaxGroup + g];
#pragma unroll
        for (int d = 0; d < kDimsPv; ++d) acc[g][d] = fmaf(e, v[d], acc[g][d]);
      }
    }
    __syncwarp();  // the slot and e_s are free for the next chunk
  }
  copy_async_wait_all();  // the trailing empty groups

  // Publish the warp's state: m is the same in every lane, l is summed over the tokens.
#pragma unroll
  for (int g = 0; g < kGroupCap; ++g) {
    if (g >= group) break;
    float total = lsum[g];
#pragma unroll
    for (int o = kChunkTokens / 2; o > 0; o /= 2)
      total += __shfl_xor_sync(0xffffffffu, total, o);
    if (lane == 0) {
      m_s[warp * kMaxGroup + g] = m[g];
      l_s[warp * kMaxGroup + g] = total;
    }
#pragma unroll
    for (int d = 0; d < kDimsPv; ++d)
      acc_s[(warp * kMaxGroup + g) * kHeadDim + lane * kDimsPv + d] = acc[g][d];
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
  // head_dim is 64 or 128, the group at most kMaxGroup: checked at launch.
  const bool small_group = ctx.p.num_heads <= 4 * ctx.p.num_kv_heads;
  if (ctx.p.head_dim == 64)
    return small_group ? attention_partial_impl<64, 4>(ctx) : attention_partial_impl<64, 8>(ctx);
  return small_group ? attention_partial_impl<128, 4>(ctx) : attention_partial_impl<128, 8>(ctx);
}

}  // namespace mk
