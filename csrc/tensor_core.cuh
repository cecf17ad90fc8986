// Warp-level tensor-core primitives (sm_80+ PTX): the bf16 m16n8k16 MMA with float
// accumulators, its fragment loads from shared memory and an in-register 8x8 transpose.
//
// Fragment layout of m16n8k16 (g = lane / 4, c = lane % 4; two 16-bit elements per 32-bit
// register, the lower column in the low half):
//   A (16x16, row-major): a0 = A[g][2c..], a1 = A[g+8][2c..], a2 = A[g][2c+8..],
//                         a3 = A[g+8][2c+8..]
//   B (16x8, by column):  b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]
//   C (16x8, floats):     c0, c1 = C[g][2c], C[g][2c+1]; c2, c3 = C[g+8][2c], C[g+8][2c+1]
#pragma once

#include <cstdint>
#include <cuda_bf16.h>

#include "common.cuh"

namespace mk {

// Four 8x8 b16 matrices from shared memory: lanes 8i..8i+7 give the 16-byte row addresses
// of matrix i, which lands in r[i] (row g, columns 2c and 2c+1 of it).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// The same, each matrix transposed: r[i] holds rows 2c and 2c+1 of column g.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// The warp's 8x8 b16 matrix (lane holds row g, columns 2c..2c+1) transposed in registers.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t m) {
  uint32_t t;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(t) : "r"(m));
  return t;
}

// c += A * B, bf16 inputs, float accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4],
                                               const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// (lo, hi) as two bf16 pairs whose sum carries ~16 bits of each float's mantissa: the
// products of a float operand with bf16 data are then nearly as exact as in float.
struct SplitBf16x2 {
  uint32_t head, tail;
};
__device__ __forceinline__ SplitBf16x2 split_bf16x2(float lo, float hi) {
  const __nv_bfloat162 head = __floats2bfloat162_rn(lo, hi);
  const float2 back = __bfloat1622float2(head);
  return {*reinterpret_cast<const uint32_t*>(&head), pack_bf16x2(lo - back.x, hi - back.y)};
}

}  // namespace mk
