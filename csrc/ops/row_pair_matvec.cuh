// o_proj_residual, down_proj_residual and rms_lm_head through one instance of code: the
// three mat-vec ops whose warps pass two rows at a time (RowPairs), with their inputs,
// staging and outputs chosen at run time. Every SM runs the LM head between a step's last
// layer and the next step's first; with code of its own it made that first layer 4-14 us
// slower than the others, most likely in instruction fetch (benchmarks/RESULTS.md,
// entry 36). One call site in run_op(): each call of a forced-inline function is a copy.
//
//   o_proj_residual:    hidden[t, rows] += o_proj[layer, rows] @ attn_out[t]
//   down_proj_residual: hidden[t, rows] += down[layer, rows] @ mlp_act[t]
//   rms_lm_head:        logits[t, rows] = lm_head[rows] @ RMSNorm(hidden[t], final_norm),
//                       and the block's partial argmax (largest logit, lowest index on
//                       ties) into slot block_index
//
// Blocks own disjoint rows, so the residual update is in place. The LM head's warps each
// keep the best of their rows; the warps' candidates are then merged with the same rule.
#pragma once

#include <math_constants.h>

#include "common.cuh"
#include "ops/argmax_merge.cuh"

namespace mk {

__device__ __forceinline__ bool op_row_pair_matvec(const OpContext& ctx) {
  const KernelParams& p = ctx.p;
  const int op = ctx.words[word::kOpcode], t = ctx.token, H = p.hidden_size;
  const bool lm_head = op == kOpRmsLmHead, down = op == kOpDownProjResidual;
  // layer_rows() (common.cuh) by hand: its switch over a run-time opcode grew the kernel
  // by 0.9 KB here and the step by ~3 us (benchmarks/RESULTS.md, entry 40).
  const int K = lm_head ? H : down ? p.intermediate_size : p.num_heads * p.head_dim;
  const int r0 = ctx.arg(row_block::kRowBegin), n = ctx.arg(row_block::kRowCount);
  const __nv_bfloat16* w =
      lm_head ? bf16_ptr(p.lm_head)
              : bf16_ptr(down ? p.down : p.o_proj) + static_cast<int64_t>(ctx.layer()) * H * K;
  float* x_s = ctx.smem;     // [K]: the input vector (the LM head's times the norm gain)
  float* aux_s = x_s + K;    // the LM head: the norm gain [H]; else the block's rows [n]
  struct Groups : RowPairs {
    const __nv_bfloat16* w;  // row r0
    int K, r0;
    bool lm_head;
    float* out;              // hidden[t] + r0, or logits[t] + r0
    const float* hidden_s;
    float best_v;
    int best_i;
    float norm_scale = 1.0f;  // the LM head's RMSNorm rsqrt (finish_rms_gained); else 1
    __device__ const __nv_bfloat16* row(int i, int r) const {
      return w + static_cast<int64_t>(row_index(i, r)) * K;
    }
    __device__ void emit(int i, const float (&o)[kRowsPerPass], int count) {
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r >= count) break;
        const int row = row_index(i, r);
        const float v = o[r] * norm_scale;
        if (threadIdx.x % kWarpSize == 0) out[row] = lm_head ? v : hidden_s[row] + v;
        if (lm_head && argmax_better(v, r0 + row, best_v, best_i)) best_v = v, best_i = r0 + row;
      }
    }
  } g{{n},
      w + static_cast<int64_t>(r0) * K,
      K,
      r0,
      lm_head,
      (lm_head ? p.logits + static_cast<int64_t>(t) * p.vocab_size
               : p.hidden + static_cast<int64_t>(t) * H) + r0,
      aux_s,
      -CUDART_INF_F,
      INT_MAX};
  if (lm_head) stage_gain(aux_s, bf16_ptr(p.final_norm), H);
  // The block's residual rows are loaded before the input vector's copies are issued and
  // stored after they land: one L2 round trip for both, not two. The first weights load
  // after the staging (run_matvec's kEarly off): loaded during it, these three ops lost,
  // o_proj and down each on its own too (benchmarks/RESULTS.md, entries 79 and 80).
  const float* hidden = p.hidden + static_cast<int64_t>(t) * H;
  const float* input =
      lm_head ? hidden : (down ? p.mlp_act : p.attn_out) + static_cast<int64_t>(t) * K;
  const bool has_row = !lm_head && static_cast<int>(threadIdx.x) < n;
  float row = 0.0f;
  if (!run_matvec<kOpOProjResidual, false>(
          ctx, g, K,
          [&] {
            if (has_row) row = load_act(hidden + r0 + threadIdx.x);
            issue_vector_copies(x_s, input, K);
          },
          [&] {
            if (lm_head) {
              g.norm_scale = finish_rms_gained(x_s, aux_s, H, p.rms_norm_eps, ctx.scratch);
            } else {
              copy_async_wait_all();
              if (has_row) aux_s[threadIdx.x] = row;
              for (int i = threadIdx.x + kComputeThreads; i < n; i += kComputeThreads)
                aux_s[i] = load_act(hidden + r0 + i);  // blocks of more rows than threads
              compute_sync();
            }
            return static_cast<const float*>(x_s);
          }))
    return false;
  if (!lm_head) return true;

  write_block_argmax(ctx, t, g.best_v, g.best_i);
  return true;
}

}  // namespace mk
