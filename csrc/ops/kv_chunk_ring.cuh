// The K/V stream of attention_partial: the partition's tokens cut into chunks of
// kChunkTokens tokens' K and V rows of one KV head; warp w takes chunks w, w +
// kComputeWarps, ... and copies each into its own ring of shared-memory slots
// (kAttnRingBytes per warp) with cp.async, 16 bytes per lane through L2, all but one slot
// ahead of the chunk it computes. The rows before the launch's first step are inputs of
// the launch, so each warp's first chunk is copied before the wait without the rows from
// that step's position on (the token's own, written by this step's QKV blocks, and in a
// chained launch those of the steps before it), which are copied after it, with q.
#pragma once

#include "common.cuh"

namespace mk {

// The tokens [begin, end) of one (token, KV head, partition) instruction, computed from
// the position at run time exactly as partition_range(): ppp = ceil(ceil((pos+1)/page_size)
// / P), tokens [part*ppp*page_size, min((part+1)*ppp*page_size, pos+1)). capacity is the
// partition's size before the clamp to the context, the same for every partition.
struct AttentionPartition {
  int pos, begin, end, capacity;
  int launch_begin;  // rows from here to pos are written during this launch
  bool pos_ok;  // a position outside the tables is refused by the controller (ready() is
                // then false): nothing may be read with it before that.

  __device__ explicit AttentionPartition(const OpContext& ctx) {
    const KernelParams& p = ctx.p;
    const int ps = p.page_size;
    const int nparts = ctx.arg(attention_partial::kNumPartitions);
    const int part = ctx.arg(attention_partial::kPartition);
    pos = step_position(p, ctx.token);
    launch_begin = min(pos, step_position(p, 0));
    const int seq_len = pos + 1;
    const int seq_pages = (seq_len + ps - 1) / ps;
    capacity = (seq_pages + nparts - 1) / nparts * ps;
    begin = part * capacity;
    end = max(begin, min(begin + capacity, seq_len));
    pos_ok = pos >= 0 && pos < position_limit(p);
  }
};

// One warp's ring. A slot holds the chunk's K rows, then its V rows; 16-byte unit u of
// row r sits at unit (u ^ (r % 8)) of the row when kSwizzled (eight consecutive rows'
// same unit then fall in different banks, as ldmatrix reads them), else at unit u.
template <int kHeadDim, int kChunkTokens, bool kSwizzled>
struct KvChunkRing {
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kUnitsPerRow = kRowBytes / 16;
  static constexpr int kChunkBytes = kChunkTokens * 2 * kRowBytes;
  static constexpr int kStages = kAttnRingBytes / kChunkBytes;
  // Rows of the chunk (K and V alike) each lane copies one unit of.
  static constexpr int kRowsPerLane = kChunkTokens * kUnitsPerRow / kWarpSize;
  static_assert(kStages >= 1 && kStages * kChunkBytes == kAttnRingBytes, "whole chunks");
  static_assert(kRowsPerLane * kWarpSize == kChunkTokens * kUnitsPerRow, "lanes copy evenly");

  const KernelParams& p;
  const AttentionPartition& part;
  const char* k_cache;
  const char* v_cache;
  char* ring;
  int64_t layer_base;
  int kv_head, warp, lane, my_chunks;

  __device__ KvChunkRing(const OpContext& ctx, const AttentionPartition& partition, char* rings)
      : p(ctx.p), part(partition), k_cache(static_cast<const char*>(ctx.p.k_cache)),
        v_cache(static_cast<const char*>(ctx.p.v_cache)),
        layer_base(static_cast<int64_t>(ctx.layer()) * ctx.p.num_pages),
        kv_head(ctx.arg(attention_partial::kKvHead)), warp(threadIdx.x / kWarpSize),
        lane(threadIdx.x % kWarpSize) {
    ring = rings + warp * kAttnRingBytes;
    const int all_chunks =
        part.pos_ok ? (part.end - part.begin + kChunkTokens - 1) / kChunkTokens : 0;
    my_chunks = max(0, all_chunks - warp + kComputeWarps - 1) / kComputeWarps;
  }

  // This warp's i-th chunk starts at token chunk_begin(i).
  __device__ int chunk_begin(int i) const {
    return part.begin + (warp + i * kComputeWarps) * kChunkTokens;
  }
  __device__ char* slot(int i) const { return ring + (i % kStages) * kChunkBytes; }
  // Byte offset of unit u of row r (K rows 0..T-1, V rows T..2T-1) in a slot.
  __device__ static int unit_offset(int r, int u) {
    return (r * kUnitsPerRow + (kSwizzled ? (u ^ (r & 7)) : u)) * 16;
  }

  // The lane's share of chunk i: unit (lane % R) of the K and the V row of kRowsPerLane
  // tokens, lane / R + n * (32 / R). fn(k_dst, v_dst, byte offset in the cache, token).
  template <typename Fn>
  __device__ void for_each_row(int i, Fn&& fn) const {
    char* s = slot(i);
    const int token0 = chunk_begin(i), unit = lane % kUnitsPerRow;
    const int nkv = p.num_kv_heads, ps = p.page_size;
#pragma unroll 1
    for (int n = 0; n < kRowsPerLane; ++n) {
      const int r = lane / kUnitsPerRow + n * (kWarpSize / kUnitsPerRow);
      const int j = token0 + r;
      int64_t off = 0;
      if (j < part.end) {
        const int page = p.page_table[j / ps];
        off = ((((layer_base + page) * ps + j % ps) * nkv + kv_head) * kHeadDim) * 2 + unit * 16;
      }
      fn(s + unit_offset(r, unit), s + unit_offset(kChunkTokens + r, unit), off, j);
    }
  }

  // Copies the rows of chunk i (if it is this warp's) that `take(token)` selects; rows
  // past the partition's end are zero-filled.
  template <typename Take>
  __device__ void copy_rows(int i, Take&& take) const {
    if (i >= my_chunks) return;
    for_each_row(i, [&](char* k_dst, char* v_dst, int64_t off, int j) {
      if (!take(j)) return;
      const uint32_t bytes = j < part.end ? 16u : 0u;
      copy16_async(k_dst, k_cache + off, bytes);
      copy16_async(v_dst, v_cache + off, bytes);
    });
  }

  // Copies chunk i and commits a group: group n is always chunk n.
  __device__ void issue(int i) const {
    copy_rows(i, [](int) { return true; });
    copy_async_commit();
  }

  // The chunk copied before the wait; the other slots ahead are filled after it.
  static constexpr int kPreWaitChunks =
      kAttnPreWaitChunks < kStages - 1 ? kAttnPreWaitChunks : kStages - 1;
  static_assert(kPreWaitChunks == 1, "one chunk's group stays open across the wait");

  // Before the wait: the first chunk without the rows written during this launch, its
  // group left open for them.
  __device__ void issue_before_wait() const {
    copy_rows(0, [&](int j) { return j < part.launch_begin || j >= part.end; });
  }
  // After the wait: the first chunk's rows written during this launch, closing its group,
  // then the other chunks that fit ahead (all slots but one).
  __device__ void issue_after_wait() const {
    copy_rows(0, [&](int j) { return j >= part.launch_begin && j < part.end; });
    copy_async_commit();
#pragma unroll 1
    for (int i = kPreWaitChunks; i < kStages - 1; ++i) issue(i);
  }

  // Waits until chunk i has landed in every lane's slot.
  __device__ void wait_chunk() const {
    copy_async_wait<kStages - 1>();
    __syncwarp();
  }
};

}  // namespace mk
