// Device-side vocabulary shared by the interpreter and every op: block shape, memory
// access flavours (weights through the non-coherent path with an evict-first L2 hint,
// activations written during the launch through L2 only), reductions and barriers.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <math_constants.h>

#include "instruction_layout.h"
#include "launcher.h"

namespace mk {

// Block shape: kComputeWarps warps run the ops; one controller warp claims, fetches and
// prefetches the next instruction and does the waits and signals. 15 + 1 warps = 512
// threads leave 128 registers per thread (attention keeps 8 heads' state in registers).
constexpr int kWarpSize = 32;
constexpr int kComputeWarps = 15;
constexpr int kComputeThreads = kComputeWarps * kWarpSize;
constexpr int kControllerWarp = kComputeWarps;
constexpr int kThreads = kComputeThreads + kWarpSize;
// Named barrier for the compute warps only (barrier 0 is __syncthreads).
constexpr int kComputeBarrier = 1;
// Static shared scratch: [0, 2 * kWarpSize) for compute_reduce and write_block_argmax,
// then finish_rms_gained's per-warp sums of squares, which no other use overwrites.
constexpr int kScratchNormPartials = 2 * kWarpSize;
constexpr int kScratchFloats = kScratchNormPartials + kWarpSize;

// Mat-vec: a weight chunk is 16 bytes = 8 bf16; each lane keeps kMatvecUnroll chunks of
// every row it works on in flight (15 warps x 32 lanes x 8 x 16 B = 60 KB per SM).
constexpr int kChunkElems = 8;
constexpr int kMatvecUnroll = 8;

// Attention: query heads per KV head handled by one instruction; each warp streams its
// share of the context through a kAttnRingBytes ring in shared memory, in chunks computed
// in CUDA cores (kAttnChunkTokens tokens) or, for partitions of at least kAttnMmaMinTokens
// tokens, in tensor cores (attention_mma_chunk_tokens; see ops/attention_partial.cuh).
constexpr int kMaxGroup = 8;
constexpr int kAttnChunkTokens = 4;
constexpr int kAttnRingBytes = 12 * 1024;
constexpr int kAttnMmaMinTokens = 64;
// Chunks each warp copies before the wait. One, not the whole ring ahead: q, loaded after
// the wait, queued behind ~120 KB of copies per SM at long contexts, and the chunk loop
// waits for q (benchmarks/RESULTS.md, entry 24).
constexpr int kAttnPreWaitChunks = 1;
// Tokens per chunk of the tensor-core path: 4 KB of K and V rows, 3 per ring.
__host__ __device__ constexpr int attention_mma_chunk_tokens(int head_dim) {
  return head_dim == 64 ? 16 : 8;
}
// Each warp leaves its output accumulators [kMaxGroup][hd] in its own ring when its chunks
// are done.
static_assert(kMaxGroup * 128 * 4 <= kAttnRingBytes, "a warp's acc fits its ring");

// attention_partial's shared memory, in floats, before the warps' K/V rings: q
// [kMaxGroup][hd], per warp m and l [kMaxGroup], per warp a 4-token chunk's softmax weights
// [kAttnChunkTokens][kMaxGroup]. One definition for the op's layout and the launch's
// shared-memory size.
__host__ __device__ constexpr size_t attention_smem_floats_before_rings(int head_dim) {
  return static_cast<size_t>(kMaxGroup) * head_dim +
         static_cast<size_t>(kComputeWarps) * kMaxGroup * 2 +
         static_cast<size_t>(kComputeWarps) * kAttnChunkTokens * kMaxGroup;
}

// L2 prefetches of the next instruction's weights are issued in pieces of this size.
constexpr uint32_t kPrefetchPiece = 16 * 1024;

static_assert(kThreads <= 1024, "block too large");
static_assert(kThreads * 128 <= 64 * 1024, "128 registers per thread must fit one SM");
static_assert(kComputeWarps <= kWarpSize, "compute_reduce reduces one value per warp in a warp");

// ---------------------------------------------------------------------------------------
// Barriers and reductions.

__device__ __forceinline__ void compute_sync() {
  asm volatile("barrier.sync %0, %1;" ::"n"(kComputeBarrier), "n"(kComputeThreads) : "memory");
}

// Whole-block barrier. Not .aligned (unlike __syncthreads): the controller and compute
// warps reach it from different places in the code.
__device__ __forceinline__ void block_sync() {
  asm volatile("barrier.sync 0;" ::: "memory");
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Inclusive prefix sum over the lanes: lane l gets the sum of lanes 0..l (lane: this
// thread's, which the caller usually has at hand).
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T v, int lane) {
#pragma unroll
  for (int o = 1; o < kWarpSize; o *= 2) {
    const T from = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += from;
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A reduction over the compute threads, by WarpReduce within each warp and then across the
// warps' results (identity: what an absent warp contributes); every compute thread gets
// the result. scratch: >= 32 floats, free again on return.
template <float (*WarpReduce)(float)>
__device__ __forceinline__ float compute_reduce(float v, float identity, float* scratch) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  v = WarpReduce(v);
  if (lane == 0) scratch[warp] = v;
  compute_sync();
  float total = lane < kComputeWarps ? scratch[lane] : identity;
  total = WarpReduce(total);
  compute_sync();
  return total;
}

__device__ __forceinline__ float compute_max(float v, float* scratch) {
  return compute_reduce<warp_max>(v, -CUDART_INF_F, scratch);
}

// ---------------------------------------------------------------------------------------
// Loads and stores.

// Weights: read-only for the whole launch, streamed once: non-coherent path, no L1
// allocation, evict-first in L2.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ uint4 load_weight(const uint4* ptr, uint64_t policy) {
  uint4 v;
  asm volatile(
      "ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "l"(policy));
  return v;
}

// Small read-only vectors (norm gains, RoPE tables, instruction words).
__device__ __forceinline__ float load_bf16_ro(const __nv_bfloat16* ptr) {
  return __bfloat162float(__ldg(ptr));
}

// Activations and KV written by other blocks during this launch: after the acquire wait,
// read them at L2 (.cg), never through the non-coherent or L1 path.
__device__ __forceinline__ float load_act(const float* ptr) { return __ldcg(ptr); }
__device__ __forceinline__ float4 load_act4(const float4* ptr) { return __ldcg(ptr); }

// The shared-state-space address of a pointer into shared memory, for PTX operands.
__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared through L2 (.cg: never L1, the bytes may have been written by
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

// bf16 pairs packed in a 32-bit word (element 0 in the low half) to float.
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// sum_i w[i] * x[i] over 8 bf16 weights and 8 floats of shared memory.
__device__ __forceinline__ float dot8(uint4 w, const float* x, float acc) {
  const float4 a = *reinterpret_cast<const float4*>(x);
  const float4 b = *reinterpret_cast<const float4*>(x + 4);
  acc = fmaf(bf16_lo(w.x), a.x, acc);
  acc = fmaf(bf16_hi(w.x), a.y, acc);
  acc = fmaf(bf16_lo(w.y), a.z, acc);
  acc = fmaf(bf16_hi(w.y), a.w, acc);
  acc = fmaf(bf16_lo(w.z), b.x, acc);
  acc = fmaf(bf16_hi(w.z), b.y, acc);
  acc = fmaf(bf16_lo(w.w), b.z, acc);
  acc = fmaf(bf16_hi(w.w), b.w, acc);
  return acc;
}

// Dot products of kRows weight rows (bf16, k elements, 16-byte aligned) with a float
// vector x in shared memory, by one warp. Each lane keeps kMatvecUnroll 16-byte chunks of
// every row in flight before it consumes any: start() issues the first chunks, finish()
// consumes them and streams the rest of the rows.
template <int kRows>
struct WarpRows {
  const uint4* rows[kRows];
  int count;   // rows in use (<= kRows); the others load nothing and sum to 0
  int chunks;
  uint4 w[kRows][kMatvecUnroll];

  __device__ __forceinline__ void load(int c0, uint64_t policy) {
#pragma unroll
    for (int u = 0; u < kMatvecUnroll; ++u) {
      const int c = c0 + u * kWarpSize;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        w[r][u] = r < count && c < chunks ? load_weight(rows[r] + c, policy)
                                          : make_uint4(0, 0, 0, 0);
    }
  }

  __device__ __forceinline__ void start(const __nv_bfloat16* const (&row_ptrs)[kRows],
                                        int rows_used, int k, uint64_t policy) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) rows[r] = reinterpret_cast<const uint4*>(row_ptrs[r]);
    count = rows_used;
    chunks = k / kChunkElems;
    load(threadIdx.x % kWarpSize, policy);
  }

  // start() on the rows of group i of a run_matvec Groups.
  template <typename Groups>
  __device__ __forceinline__ void start_group(const Groups& g, int i, int rows_used, int k,
                                              uint64_t policy) {
    const __nv_bfloat16* ptrs[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) ptrs[r] = g.row(i, r < rows_used ? r : 0);
    start(ptrs, rows_used, k, policy);
  }

  // The dot products, in every lane.
  __device__ __forceinline__ void finish(const float* x, uint64_t policy, float (&out)[kRows]) {
    const int lane = threadIdx.x % kWarpSize;
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    for (int c0 = lane; c0 < chunks; c0 += kWarpSize * kMatvecUnroll) {
      if (c0 != lane) load(c0, policy);
#pragma unroll
      for (int u = 0; u < kMatvecUnroll; ++u) {
        const int c = c0 + u * kWarpSize;
        if (c < chunks) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r] = dot8(w[r][u], x + c * kChunkElems, acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) out[r] = warp_sum(acc[r]);
  }
};

// Rows per warp pass: two rows share the activation reads and double the loads in flight.
constexpr int kRowsPerPass = 2;

// Norm gain (bf16, read-only) to float shared memory: done before the dependency wait.
__device__ __forceinline__ void stage_gain(float* dst, const __nv_bfloat16* gain, int n) {
  for (int i = threadIdx.x; i < n; i += kComputeThreads) dst[i] = load_bf16_ro(gain + i);
}

// Copies a float vector written during this launch (n % 4 == 0) into shared memory with
// the compute threads: every thread's copies are issued at once, register-free (cp.async),
// so the vector costs one L2 round trip at any length. Loads used as they came took two to
// four dependent round trips where a thread had more than two float4 (1B's down_proj
// input, every 8B input), and a batch of them held in registers spilled
// (benchmarks/RESULTS.md, entry 64). Only issues them: after copy_async_wait_all() this
// thread's copies have landed, the other threads' after a barrier as well.
__device__ __forceinline__ void issue_vector_copies(float* dst, const float* src, int n) {
  for (int i = threadIdx.x; i < n / 4; i += kComputeThreads)
    copy16_async(reinterpret_cast<float4*>(dst) + i, reinterpret_cast<const float4*>(src) + i,
                 16);
}

// RMSNorm (instructions.base.rms_norm: x * rsqrt(mean(x^2) + eps) * gain) with its
// scalar factored out of the mat-vec that follows, on a vector whose copies into dst
// issue_vector_copies() issued: dst = src * gain (gain already staged, stage_gain), and
// the returned rsqrt(mean(src^2) + eps) multiplies each dot product instead, W (x * r * g)
// = r * W (x * g). The mat-vec can then start after one barrier, not after the reduction's
// two and the normalizing pass's one (benchmarks/RESULTS.md, entry 62). scratch:
// kScratchFloats; its norm slots are read by every thread after the barrier and written
// by nothing else. Returns after that barrier: dst is complete.
__device__ __forceinline__ float finish_rms_gained(float* dst, const float* gain_s, int n,
                                                   float eps, float* scratch) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* partials = scratch + kScratchNormPartials;
  copy_async_wait_all();
  float sq = 0.0f;
  for (int i = threadIdx.x; i < n / 4; i += kComputeThreads) {  // this thread's copies
    float4 x = reinterpret_cast<float4*>(dst)[i];
    const float4 g = reinterpret_cast<const float4*>(gain_s)[i];
    sq += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    reinterpret_cast<float4*>(dst)[i] = make_float4(x.x * g.x, x.y * g.y, x.z * g.z, x.w * g.w);
  }
  sq = warp_sum(sq);
  if (lane == 0) partials[warp] = sq;
  compute_sync();
  // The same sum in every lane and warp: an xor butterfly over the same values.
  const float total = warp_sum(lane < kComputeWarps ? partials[lane] : 0.0f);
  return rsqrtf(total / static_cast<float>(n) + eps);
}

// The token and position of step t of the launch (KernelParams: step inputs). Without
// step_input, step 0 takes the launch's token and every later step the greedy token of
// the step before it (next_token[t - 1], written during this launch: read through L2, and
// only once the argmax that writes it has signalled), at the launch's position + t.
__device__ __forceinline__ int64_t step_token(const KernelParams& p, int t) {
  if (p.step_input != nullptr) return p.step_input[t];
  if (t > 0) return __ldcg(p.next_token + t - 1);
  return p.step_token_source != nullptr ? *p.step_token_source : p.step_token;
}
__device__ __forceinline__ int step_position(const KernelParams& p, int t) {
  return p.step_input != nullptr ? p.step_input[p.num_tokens + t] : p.step_position + t;
}

// Positions [0, limit) have a RoPE row and a page-table slot; the controller refuses any
// other before an instruction runs (kErrBadPosition).
__device__ __forceinline__ int position_limit(const KernelParams& p) {
  return min(p.rope_max_positions, p.max_pages * p.page_size);
}

__device__ __forceinline__ const __nv_bfloat16* bf16_ptr(const void* p) {
  return static_cast<const __nv_bfloat16*>(p);
}

// Layer `layer`'s weight matrix of a row-block op (OpSpec.streams_weight_rows; the LM
// head's is the same at every layer): `rows` points at its row 0, each row_elems bf16
// long. gate_up's matrix holds its intermediate_size gate rows, then as many up rows. Null
// for any other opcode. The one place the ops that stream these rows and the controller
// that prefetches them find them.
struct LayerRows {
  const __nv_bfloat16* rows;
  int64_t row_elems;
};
__device__ __forceinline__ LayerRows layer_rows(const KernelParams& p, int op, int64_t layer) {
  const int64_t H = p.hidden_size, I = p.intermediate_size;
  const int64_t q_size = static_cast<int64_t>(p.num_heads) * p.head_dim;
  switch (op) {
    case kOpOProjResidual: return {bf16_ptr(p.o_proj) + layer * H * q_size, q_size};
    case kOpRmsGateUpSilu: return {bf16_ptr(p.gate_up) + layer * 2 * I * H, H};
    case kOpDownProjResidual: return {bf16_ptr(p.down) + layer * H * I, I};
    case kOpRmsLmHead: return {bf16_ptr(p.lm_head), H};
    default: return {nullptr, 0};
  }
}

}  // namespace mk

namespace mk {

// What an op sees: the kernel parameters, its instruction's words (shared memory), the
// block's dynamic shared memory and a small reduction scratch.
//
// Every op calls ready() exactly once, on all compute threads, before it reads anything
// another block writes (activations, the KV cache): it is the block barrier after which
// the instruction's waits hold. Work that depends on nothing (weight loads into
// registers, norm gains into shared memory) goes before it and overlaps the wait. When
// ready() returns false the block is stopping (error or abort): the op returns at once.
struct OpContext {
  const KernelParams& p;
  const int* words;      // kInstructionWords, in shared memory
  float* smem;           // dynamic shared memory (see interpreter.cu: dynamic_smem_bytes)
  float* scratch;        // kScratchFloats floats of static shared memory
  const volatile int* go;  // set by the controller before the barrier: waits hold
  uint64_t policy;       // L2 evict-first policy for weight loads
  int token;             // the token (row of the step's batch) this instruction serves

  __device__ int arg(int index) const { return words[index]; }
  __device__ int layer() const { return words[word::kLayer]; }
  // kSite: a number unique to the calling op, so each op has its own barrier instruction.
  template <int kSite>
  __device__ __forceinline__ bool ready() const {
    asm volatile("barrier.sync 0; // ready %0" ::"n"(kSite) : "memory");
    return *go != 0;
  }
};

}  // namespace mk

namespace mk {

// A block's mat-vec, cut into groups of up to kRowsPerPass rows; warp w runs groups w,
// w + kComputeWarps, ... Groups provides count(i) (rows in group i, 0 past the end, never
// growing again), row(i, r) (row r's weights) and emit(i, out, count) (out in every lane).
// After ctx.ready(), issue() issues the input vector's copies into shared memory and
// stage() completes it (ending in a compute barrier) and returns it. kSite: the op's
// number for ctx.ready().
//
// kEarly: each warp issues its first group's weight loads between issue() and stage(), so
// their latency overlaps the input's round trip and the norm instead of following them
// (rms_qkv_rope and rms_gate_up_silu: -14 us per 1B token; o_proj and down lost ~1 us
// per stage that way and the LM head ~3, benchmarks/RESULTS.md, entry 79). The first
// group starts for every warp, with count 0 loading nothing: started only where count >
// 0, the loaded registers were spilled right after their loads, which made every early
// load wait for its data (entry 77's loss). Issued before the wait instead, they lost
// (entry 79).
template <int kSite, bool kEarly, typename Groups, typename Issue, typename Stage>
__device__ __forceinline__ bool run_matvec(const OpContext& ctx, Groups& g, int k, Issue issue,
                                           Stage stage) {
  const int warp = threadIdx.x / kWarpSize;
  WarpRows<kRowsPerPass> rows;
  if (!ctx.template ready<kSite>()) return false;
  issue();
  if constexpr (kEarly) {
    int i = warp, count = g.count(i);
    rows.start_group(g, i, count, k, ctx.policy);  // count 0: loads nothing
    const float* x = stage();
    while (true) {
      float out[kRowsPerPass];
      rows.finish(x, ctx.policy, out);
      if (count > 0) g.emit(i, out, count);
      i += kComputeWarps;
      count = g.count(i);
      if (count <= 0) break;
      rows.start_group(g, i, count, k, ctx.policy);
    }
  } else {
    // Its own loop, not the early one with the start moved after stage(): that shape
    // alone, without early loads, cost ~5 us per 1B token (entry 79's build E).
    const float* x = stage();
    for (int i = warp, count = g.count(i); count > 0; i += kComputeWarps, count = g.count(i)) {
      rows.start_group(g, i, count, k, ctx.policy);
      float out[kRowsPerPass];
      rows.finish(x, ctx.policy, out);
      g.emit(i, out, count);
    }
  }
  return true;
}

// Groups of rows of a run of n rows, taken in rounds of 2 * kComputeWarps rows, one group
// per warp: group i is slot i % kComputeWarps of round i / kComputeWarps. A full round
// pairs rows (slot, slot + kComputeWarps); the last, partial round of m rows pairs (slot,
// slot + ceil(m / 2)), so its rows go two to a warp. Either way consecutive warps read
// consecutive rows. (Pairing the last round by kComputeWarps too left 14 of 15 warps of a
// 16-row block with one row and a second of zeros that still cost its multiply-adds.)
struct RowPairs {
  int n;
  __device__ int round_begin(int i) const { return (i / kComputeWarps) * 2 * kComputeWarps; }
  __device__ int stride(int i) const {
    const int m = n - round_begin(i);
    return m >= 2 * kComputeWarps ? kComputeWarps : (m + 1) / 2;
  }
  __device__ int count(int i) const {
    const int slot = i % kComputeWarps, s = stride(i);
    return slot < s ? 1 + (round_begin(i) + slot + s < n) : 0;
  }
  __device__ int row_index(int i, int r) const {
    return round_begin(i) + i % kComputeWarps + r * stride(i);
  }
};
static_assert(kRowsPerPass == 2, "RowPairs pairs rows");

}  // namespace mk
