// attention_partial: decode attention of one KV head's query group over one partition of
// the paged context (instructions/attention_partial.py). An empty partition writes out = 0,
// lse = -inf. The K/V rows stream through each warp's ring (kv_chunk_ring.cuh); each warp
// keeps one online softmax (running max m, sum l, output acc) per head over its chunks, and
// the warps are merged through shared memory at the end.
//
// Two ways to compute a chunk, chosen per instruction from the partition's size:
//
// - Partitions under kAttnMmaMinTokens (the one-page partitions of short contexts) of
//   groups of up to 4 heads: 4-token chunks in CUDA cores, so even a one-page partition
//   spreads over four warps and each warp's dependent chain stays short. Lane (tok =
//   lane % 4, part = lane / 4) dots its eighth of token tok's K row with each query head
//   (parts summed by shuffles); lane j owns head dims [j*hd/32, (j+1)*hd/32) of acc.
// - Longer partitions, and every partition of larger groups: chunks of 4 KB (16 tokens at
//   head_dim 64, 8 at 128) in tensor cores (m16n8k16, bf16 in, float out), tokens as the
//   M dimension and the group's heads (padded to 8) as N:
//     S^T[token][head] = K[token][:] . q[head][:]     (A = K rows, B = q^T)
//     O^T[dim][head]  += V^T[dim][token] . P[token][head]
//   P moves from S's accumulator layout to a B operand by an in-register transpose. q and P
//   are split into two bf16 parts each (head + tail), so the products carry ~16 mantissa
//   bits of the float operands, not bf16's 8. Counted from the source, ~10 instructions
//   per token per warp against ~60 in CUDA cores, which made long contexts compute-bound.
#pragma once

#include <math_constants.h>

#include "common.cuh"
#include "kv_chunk_ring.cuh"
#include "tensor_core.cuh"

namespace mk {

// Shared memory: q [kMaxGroup][hd], per warp m [kMaxGroup], l [kMaxGroup], per warp a
// 4-token chunk's weights [4][kMaxGroup], then the warps' rings
// (attention_smem_floats_before_rings). A warp's acc [kMaxGroup][hd] goes into its own ring
// once its chunks are done.
struct AttentionSmem {
  float* q;
  float* m;
  float* l;
  float* weights;  // this warp's
  char* rings;

  __device__ AttentionSmem(float* smem, int head_dim) {
    const int warp = threadIdx.x / kWarpSize;
    q = smem;
    m = q + kMaxGroup * head_dim;
    l = m + kComputeWarps * kMaxGroup;
    weights = l + kComputeWarps * kMaxGroup + warp * kAttnChunkTokens * kMaxGroup;
    rings = reinterpret_cast<char*>(smem + attention_smem_floats_before_rings(head_dim));
  }
  // Warp w's acc: valid after its chunks (and its copies: copy_async_wait_all) are done.
  __device__ float* acc(int w) const {
    return reinterpret_cast<float*>(rings + w * kAttnRingBytes);
  }
};

// After the wait: the group's q into shared memory; the ring's rows written during this
// launch and its other chunks ahead are issued behind q's loads, so their L2 round trips
// overlap.
template <int kHeadDim, typename Ring>
__device__ __forceinline__ void stage_q_and_launch_rows(const OpContext& ctx, const Ring& ring,
                                                        float* q_s) {
  const KernelParams& p = ctx.p;
  const int nq = p.num_heads, group = nq / p.num_kv_heads;
  const float4* q_g = reinterpret_cast<const float4*>(
      p.q + static_cast<int64_t>(ctx.token) * nq * kHeadDim + ring.kv_head * group * kHeadDim);
  const bool loads_q = threadIdx.x < group * kHeadDim / 4;  // <= 256 float4 on 480 threads
  const float4 q_part = loads_q ? load_act4(q_g + threadIdx.x) : float4{};
  ring.issue_after_wait();
  if (loads_q) reinterpret_cast<float4*>(q_s)[threadIdx.x] = q_part;
  compute_sync();
}

// After every warp published m, l (summed over its tokens) and acc per head of the group:
// the instruction's heads [head_begin, +head_count) and dims [dim_begin, +dim_count) of the
// partition's out (normalized) and their lse, merged over the warps. With one partition
// the out is the heads' attention itself and goes to attn_out (no lse, no reduce).
template <int kHeadDim>
__device__ __forceinline__ void publish_partition(const OpContext& ctx, const AttentionSmem& s) {
  const KernelParams& p = ctx.p;
  const int nq = p.num_heads, group = nq / p.num_kv_heads, P = p.attn_partitions;
  const int kv_head = ctx.arg(attention_partial::kKvHead);
  const int part = ctx.arg(attention_partial::kPartition);
  const bool whole = ctx.arg(attention_partial::kNumPartitions) == 1;
  const int head_begin = ctx.arg(attention_partial::kHeadBegin);
  const int head_end = head_begin + ctx.arg(attention_partial::kHeadCount);
  const int dim_begin = ctx.arg(attention_partial::kDimBegin);
  const int dim_end = dim_begin + ctx.arg(attention_partial::kDimCount);
  // The whole group's elements, the others skipped: no division by a run-time count.
  for (int i = threadIdx.x; i < group * kHeadDim; i += kComputeThreads) {
    const int g = i / kHeadDim, d = i % kHeadDim;
    if (g < head_begin || g >= head_end || d < dim_begin || d >= dim_end) continue;
    float m_all = -CUDART_INF_F;
    for (int w = 0; w < kComputeWarps; ++w) m_all = fmaxf(m_all, s.m[w * kMaxGroup + g]);
    const int64_t row = static_cast<int64_t>(ctx.token) * nq + kv_head * group + g;
    float* out = whole ? p.attn_out + row * kHeadDim
                       : p.attn_partial_out + (row * P + part) * kHeadDim;
    float* lse = p.attn_partial_lse + row * P + part;
    const bool writes_lse = !whole && d == dim_begin;
    if (m_all == -CUDART_INF_F) {  // empty partition (never the only one: it holds pos)
      out[d] = 0.0f;
      if (writes_lse) *lse = -CUDART_INF_F;
      continue;
    }
    float total = 0.0f, o = 0.0f;
    for (int w = 0; w < kComputeWarps; ++w) {
      const float e = __expf(s.m[w * kMaxGroup + g] - m_all);
      total += s.l[w * kMaxGroup + g] * e;
      o += s.acc(w)[g * kHeadDim + d] * e;
    }
    out[d] = o / total;
    if (writes_lse) *lse = m_all + __logf(total);
  }
}

// The CUDA-core path, for groups of up to kGroupCap heads: the size of the unrolled
// per-head state (every SM runs each op once per layer, so its instructions are fetched
// anew each time: code size is latency; and twice the state spills registers).
template <int kHeadDim>
__device__ __forceinline__ bool attention_partial_lanes(const OpContext& ctx,
                                                        const AttentionPartition& part) {
  constexpr int kGroupCap = 4;
  static_assert(kGroupCap <= kMaxGroup, "shared memory holds kMaxGroup heads");
  using Ring = KvChunkRing<kHeadDim, kAttnChunkTokens, /*kSwizzled=*/false>;
  constexpr int kChunkTokens = kAttnChunkTokens;                       // 4
  constexpr int kParts = kWarpSize / kChunkTokens;                     // 8
  constexpr int kPartUnits = Ring::kUnitsPerRow / kParts;              // 1 or 2
  constexpr int kDimsPv = kHeadDim / kWarpSize;                        // 2 or 4
  constexpr int kRowBytes = Ring::kRowBytes;
  static_assert(kPartUnits * kParts == Ring::kUnitsPerRow, "lanes split a row in whole units");

  const AttentionSmem s(ctx.smem, kHeadDim);
  const Ring ring(ctx, part, s.rings);
  const int group = ctx.p.num_heads / ctx.p.num_kv_heads;
  const int warp = ring.warp, lane = ring.lane;

  ring.issue_before_wait();
  if (!ctx.template ready<kOpAttentionPartial * 1000 + kHeadDim>()) {
    copy_async_wait_all();
    return false;
  }
  stage_q_and_launch_rows<kHeadDim>(ctx, ring, s.q);

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

  for (int i = 0; i < ring.my_chunks; ++i) {
    ring.issue(i + Ring::kStages - 1);
    ring.wait_chunk();
    const char* slot = ring.slot(i);
    const bool valid = ring.chunk_begin(i) + tok < part.end;
    const uint4* k_row = reinterpret_cast<const uint4*>(slot) + tok * Ring::kUnitsPerRow;
    uint4 k[kPartUnits];
#pragma unroll
    for (int u = 0; u < kPartUnits; ++u) k[u] = k_row[qpart * kPartUnits + u];
    // Every head up to kGroupCap is computed (heads past the group repeat the last one and
    // are never published): no branch between heads, so their chains interleave.
#pragma unroll
    for (int g = 0; g < kGroupCap; ++g) {
      const float* qg = s.q + min(g, group - 1) * kHeadDim + qpart * kPartUnits * 8;
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
      if (qpart == 0) s.weights[tok * kMaxGroup + g] = e;
    }
    __syncwarp();  // the weights written
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
        const float e = s.weights[r * kMaxGroup + g];
#pragma unroll
        for (int d = 0; d < kDimsPv; ++d) acc[g][d] = fmaf(e, v[d], acc[g][d]);
      }
    }
    __syncwarp();  // the slot and the weights are free for the next chunk
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
      s.m[warp * kMaxGroup + g] = m[g];
      s.l[warp * kMaxGroup + g] = total;
    }
#pragma unroll
    for (int d = 0; d < kDimsPv; ++d)
      s.acc(warp)[g * kHeadDim + lane * kDimsPv + d] = acc[g][d];
  }
  compute_sync();
  publish_partition<kHeadDim>(ctx, s);
  return true;
}

// The tensor-core path (see the top of the file). Lane (g = lane / 4, c = lane % 4) holds
// the scores of tokens g and g + 8 for heads 2c and 2c + 1, so its softmax state is those
// two heads' (the same in the eight lanes of a c), and O^T rows g and g + 8 of each
// 16-dim tile.
template <int kHeadDim>
__device__ __forceinline__ bool attention_partial_mma(const OpContext& ctx,
                                                      const AttentionPartition& part) {
  static_assert(kMaxGroup == 8, "the group's heads are the 8 columns of the MMA");
  constexpr int kChunkTokens = attention_mma_chunk_tokens(kHeadDim);
  static_assert(kChunkTokens == 8 || kChunkTokens == 16, "chunks of 8 or 16 tokens");
  constexpr int kTiles = kHeadDim / 16;  // k-steps of S^T, row tiles of O^T
  using Ring = KvChunkRing<kHeadDim, kChunkTokens, /*kSwizzled=*/true>;

  const AttentionSmem s(ctx.smem, kHeadDim);
  const Ring ring(ctx, part, s.rings);
  const int group = ctx.p.num_heads / ctx.p.num_kv_heads;
  const int warp = ring.warp, lane = ring.lane, g = lane / 4, c = lane % 4;

  ring.issue_before_wait();
  if (!ctx.template ready<kOpAttentionPartial * 1000 + 500 + kHeadDim>()) {
    copy_async_wait_all();
    return false;
  }
  stage_q_and_launch_rows<kHeadDim>(ctx, ring, s.q);

  // B operand of S^T = K q^T, per k-step t: q[head g][16t + 2c..] and [16t + 2c + 8..],
  // zero for the padding heads past the group; split in head and tail parts.
  uint32_t q_head[kTiles][2], q_tail[kTiles][2];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float* q_g = s.q + g * kHeadDim + 16 * t + 8 * half + 2 * c;
      const float2 v = g < group ? *reinterpret_cast<const float2*>(q_g) : make_float2(0.f, 0.f);
      const SplitBf16x2 q2 = split_bf16x2(v.x, v.y);
      q_head[t][half] = q2.head;
      q_tail[t][half] = q2.tail;
    }
  }

  float o[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[t][e] = 0.0f;
  float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, lsum[2] = {0.0f, 0.0f};
  const float scale = rsqrtf(static_cast<float>(kHeadDim));
  // ldmatrix rows of this lane: K as the A operand (matrices: tokens 0-7 | 8-15, then the
  // next 8 dims), V^T as the A operand (tokens 0-7, dims | next 8 dims, then tokens 8-15).
  // An 8-token chunk reads its rows 0-7 again as tokens 8-15, whose scores are masked.
  constexpr int kSecondHalf = kChunkTokens == 16 ? 8 : 0;
  const int k_row = (lane & 7) + ((lane >> 3) & 1) * kSecondHalf, k_unit = lane >> 4;
  const int v_row = kChunkTokens + (lane & 7) + (lane >> 4) * kSecondHalf;
  const int v_unit = (lane >> 3) & 1;

  for (int i = 0; i < ring.my_chunks; ++i) {
    ring.issue(i + Ring::kStages - 1);
    ring.wait_chunk();
    const char* slot = ring.slot(i);

    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      uint32_t a[4];
      ldmatrix_x4(a, slot + Ring::unit_offset(k_row, 2 * t + k_unit));
      mma_bf16_16816(sc, a, q_head[t]);
      mma_bf16_16816(sc, a, q_tail[t]);
    }
    // sc: tokens g (0, 1) and g + 8 (2, 3), heads 2c (0, 2) and 2c + 1 (1, 3).
    const int token0 = ring.chunk_begin(i) + g;
    const bool valid_lo = token0 < part.end;
    const bool valid_hi = kChunkTokens == 16 && token0 + 8 < part.end;
    float pr[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float s_lo = valid_lo ? sc[h] * scale : -CUDART_INF_F;
      const float s_hi = valid_hi ? sc[2 + h] * scale : -CUDART_INF_F;
      float chunk_max = fmaxf(s_lo, s_hi);
#pragma unroll
      for (int x = 4; x < kWarpSize; x *= 2)
        chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, x));
      // chunk_max is finite: the chunk's first token is valid.
      const float m_new = fmaxf(m[h], chunk_max);
      const float correction = __expf(m[h] - m_new);
      pr[h] = __expf(s_lo - m_new);
      pr[2 + h] = __expf(s_hi - m_new);
      lsum[h] = lsum[h] * correction + pr[h] + pr[2 + h];
      m[h] = m_new;
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        o[t][h] *= correction;
        o[t][2 + h] *= correction;
      }
    }
    // P[token][head] as the B operand of O^T: the 8x8 blocks of tokens 0-7 and 8-15
    // transposed, each in head and tail parts.
    const SplitBf16x2 p_lo = split_bf16x2(pr[0], pr[1]), p_hi = split_bf16x2(pr[2], pr[3]);
    const uint32_t b_head[2] = {movmatrix_trans(p_lo.head), movmatrix_trans(p_hi.head)};
    const uint32_t b_tail[2] = {movmatrix_trans(p_lo.tail), movmatrix_trans(p_hi.tail)};
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, slot + Ring::unit_offset(v_row, 2 * t + v_unit));
      mma_bf16_16816(o[t], a, b_head);
      mma_bf16_16816(o[t], a, b_tail);
    }
    __syncwarp();  // the slot is free for the next copies
  }
  copy_async_wait_all();  // the trailing empty groups

  // Publish the warp's state: l summed over the eight lanes of each c.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float total = lsum[h];
#pragma unroll
    for (int x = 4; x < kWarpSize; x *= 2) total += __shfl_xor_sync(0xffffffffu, total, x);
    const int head = 2 * c + h;
    if (head < group) {
      if (g == 0) {
        s.m[warp * kMaxGroup + head] = m[h];
        s.l[warp * kMaxGroup + head] = total;
      }
      float* acc = s.acc(warp) + head * kHeadDim + g;
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        acc[16 * t] = o[t][h];
        acc[16 * t + 8] = o[t][2 + h];
      }
    }
  }
  compute_sync();
  publish_partition<kHeadDim>(ctx, s);
  return true;
}

__device__ __forceinline__ bool op_attention_partial(const OpContext& ctx) {
  // head_dim is 64 or 128, the group at most kMaxGroup: checked at launch. The path is the
  // same in every thread: the partition's capacity depends on the position alone. Groups
  // of more than 4 heads always take the tensor cores (in CUDA cores they would need twice
  // the per-lane state).
  const AttentionPartition part(ctx);
  const bool hd64 = ctx.p.head_dim == 64;
  if (part.capacity >= kAttnMmaMinTokens || ctx.p.num_heads > 4 * ctx.p.num_kv_heads)
    return hd64 ? attention_partial_mma<64>(ctx, part) : attention_partial_mma<128>(ctx, part);
  return hd64 ? attention_partial_lanes<64>(ctx, part) : attention_partial_lanes<128>(ctx, part);
}

}  // namespace mk
