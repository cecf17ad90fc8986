// rms_qkv_rope: RMSNorm(hidden) -> 2 * pair_count rows of the fused QKV mat-vec -> RoPE
// -> q, or the K/V cache slot of the token's position (instructions/rms_qkv_rope.py).
//
// Pairs are numbered head-major (head * hd/2 + i); pair i of a head is rows head*hd + i
// ("lo") and the same + hd/2 ("hi"), so each RoPE pair is inside the block. The block's
// pairs start at pair `pair_begin` of `head` and may run on into the next heads. Block row
// j < n is the lo row of pair j, j >= n the hi row of pair j - n; the results meet in
// shared memory for the rotation.
#pragma once

#include "common.cuh"

namespace mk {

__device__ __forceinline__ bool op_rms_qkv_rope(const OpContext& ctx) {
  const KernelParams& p = ctx.p;
  const int t = ctx.token, l = ctx.layer();
  const int head = ctx.arg(rms_qkv_rope::kHead);
  const int p0 = ctx.arg(rms_qkv_rope::kPairBegin);
  const int n = ctx.arg(rms_qkv_rope::kPairCount);
  const int H = p.hidden_size, hd = p.head_dim, half = hd / 2;
  const int nq = p.num_heads, nkv = p.num_kv_heads;
  const int qkv_rows = (nq + 2 * nkv) * hd;
  const int first_pair = head * half + p0;  // head-major index of the block's first pair

  float* xn = ctx.smem;          // [H]
  float* gain = xn + H;          // [H]
  float* rows_out = gain + H;    // [2n], n <= hd (scheduler): lo rows then hi rows
  struct Groups : RowPairs {
    const __nv_bfloat16* qkv;    // the layer's fused QKV weights
    int first_pair, n, half, hd, H;
    float* rows_out;
    float norm_scale = 1.0f;  // the RMSNorm's rsqrt (finish_rms_gained)
    __device__ const __nv_bfloat16* row(int i, int r) const {
      const int j = row_index(i, r);
      const int pair = first_pair + (j < n ? j : j - n);
      const int64_t w_row = (pair / half) * hd + pair % half + (j < n ? 0 : half);
      return qkv + w_row * H;
    }
    __device__ void emit(int i, const float (&out)[kRowsPerPass], int count) const {
      if (threadIdx.x % kWarpSize != 0) return;
      #pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r)
        if (r < count) rows_out[row_index(i, r)] = out[r] * norm_scale;
    }
  } g{{2 * n}, bf16_ptr(p.qkv) + static_cast<int64_t>(l) * qkv_rows * H, first_pair, n, half,
      hd, H, rows_out};
  stage_gain(gain, bf16_ptr(p.attn_norm) + static_cast<int64_t>(l) * H, H);
  // This thread's RoPE pair (i = threadIdx.x < n), its rotation and the token's cache page:
  // launch inputs, loaded before the wait so the epilogue after the mat-vec makes no
  // global round trip of its own. The controller refuses a position outside the tables.
  const int pos = step_position(p, t);
  const bool pos_ok = pos >= 0 && pos < position_limit(p);
  const int my_pair = first_pair + static_cast<int>(threadIdx.x);
  const int my_head = my_pair / half, my_c = my_pair % half;
  float cs = 1.0f, sn = 0.0f;
  int page = 0;
  if (pos_ok && static_cast<int>(threadIdx.x) < n) {
    if (my_head < nq + nkv) {  // queries and keys are rotated, values are not
      cs = __ldg(p.rope_cos + static_cast<int64_t>(pos) * half + my_c);
      sn = __ldg(p.rope_sin + static_cast<int64_t>(pos) * half + my_c);
    }
    if (my_head >= nq) page = p.page_table[pos / p.page_size];
  }
  const bool go = run_matvec<kOpRmsQkvRope, true>(
      ctx, g, H, [&] { issue_vector_copies(xn, p.hidden + static_cast<int64_t>(t) * H, H); },
      [&] {
        g.norm_scale = finish_rms_gained(xn, gain, H, p.rms_norm_eps, ctx.scratch);
        return static_cast<const float*>(xn);
      });
  if (!go) return false;
  compute_sync();

  // One pair per thread: n <= head_dim <= 128 pairs (scheduler; rows_out holds 2 * head_dim)
  // < kComputeThreads.
  if (static_cast<int>(threadIdx.x) < n) {
    const int i = threadIdx.x;
    float lo = rows_out[i], hi = rows_out[n + i];
    if (my_head < nq + nkv) {
      const float rlo = lo * cs - hi * sn;
      const float rhi = hi * cs + lo * sn;
      lo = rlo;
      hi = rhi;
    }
    if (my_head < nq) {
      float* q = p.q + static_cast<int64_t>(t) * nq * hd + my_head * hd;
      q[my_c] = lo;
      q[half + my_c] = hi;
    } else {
      const int offset = pos % p.page_size;
      const int kv_head = (my_head - nq) % nkv;
      __nv_bfloat16* cache =
          static_cast<__nv_bfloat16*>(my_head < nq + nkv ? p.k_cache : p.v_cache);
      __nv_bfloat16* slot =
          cache + (((static_cast<int64_t>(l) * p.num_pages + page) * p.page_size + offset) * nkv +
                   kv_head) * hd;
      slot[my_c] = __float2bfloat16(lo);
      slot[half + my_c] = __float2bfloat16(hi);
    }
  }
  return true;
}

}  // namespace mk
