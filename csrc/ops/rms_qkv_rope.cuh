// rms_qkv_rope: RMSNorm(hidden) -> 2 * pair_count rows of the fused QKV mat-vec -> RoPE
// -> q, or the K/V cache slot of the token's position (instructions/rms_qkv_rope.py).
//
// Rows are head*hd + pair_begin + i ("lo") and the same + hd/2 ("hi"), so each RoPE pair
// is inside the block. Block row j < n is lo row j, j >= n is hi row j - n; the results
// meet in shared memory for the rotation.
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

  float* xn = ctx.smem;          // [H]
  float* gain = xn + H;          // [H]
  float* rows_out = gain + H;    // [2n]: lo rows then hi rows
  struct Groups : RowPairs {
    const __nv_bfloat16* lo;     // weights of lo row 0
    int n, half, H;
    float* rows_out;
    __device__ const __nv_bfloat16* row(int i, int r) const {
      const int j = row_index(i, r);
      return lo + static_cast<int64_t>(j < n ? j : half + j - n) * H;
    }
    __device__ void emit(int i, const float (&out)[kRowsPerPass], int count) const {
      if (threadIdx.x % kWarpSize != 0) return;
      #pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r)
        if (r < count) rows_out[row_index(i, r)] = out[r];
    }
  } g{{2 * n},
      bf16_ptr(p.qkv) + (static_cast<int64_t>(l) * qkv_rows + head * hd + p0) * H, n, half, H,
      rows_out};
  stage_gain(gain, bf16_ptr(p.attn_norm) + static_cast<int64_t>(l) * H, H);
  const bool go = run_matvec<kOpRmsQkvRope>(ctx, g, H, [&] {
    stage_rms_normed(xn, p.hidden + static_cast<int64_t>(t) * H, gain, H, p.rms_norm_eps,
                     ctx.scratch);
    return static_cast<const float*>(xn);
  });
  if (!go) return false;
  compute_sync();

  const int pos = p.step_input[p.num_tokens + t];
  for (int i = threadIdx.x; i < n; i += kComputeThreads) {
    float lo = rows_out[i], hi = rows_out[n + i];
    if (head < nq + nkv) {  // queries and keys are rotated, values are not
      const float c = __ldg(p.rope_cos + static_cast<int64_t>(pos) * half + p0 + i);
      const float s = __ldg(p.rope_sin + static_cast<int64_t>(pos) * half + p0 + i);
      const float rlo = lo * c - hi * s;
      const float rhi = hi * c + lo * s;
      lo = rlo;
      hi = rhi;
    }
    if (head < nq) {
      float* q = p.q + static_cast<int64_t>(t) * nq * hd + head * hd;
      q[p0 + i] = lo;
      q[half + p0 + i] = hi;
    } else {
      const int page = p.page_table[pos / p.page_size];
      const int offset = pos % p.page_size;
      const int kv_head = (head - nq) % nkv;
      __nv_bfloat16* cache = static_cast<__nv_bfloat16*>(head < nq + nkv ? p.k_cache : p.v_cache);
      __nv_bfloat16* slot =
          cache + (((static_cast<int64_t>(l) * p.num_pages + page) * p.page_size + offset) * nkv +
                   kv_head) * hd;
      slot[p0 + i] = __float2bfloat16(lo);
      slot[half + p0 + i] = __float2bfloat16(hi);
    }
  }
  return true;
}

}  // namespace mk
