// What a decode step's dependency chain costs when each SM's weight stream does not stop
// at the stage boundaries. A standalone microbenchmark (no torch): the step's mat-vec
// stages at a Llama model's real shapes (per layer qkv, a weightless attention stage,
// o_proj, gate_up, down; then the LM head), chained through counters in global memory as
// the megakernel chains them: every block of a stage waits (acquire) until every block of
// the stage before it has signalled (release) and reads that stage's whole output. Each
// block owns one contiguous row block per stage (132 blocks: one per SM).
//
// Three ways to feed the dot products, with the same arithmetic (each warp multiplies 2 KB
// spans of a row with the input vector in shared memory and adds its sum into the row's
// shared-memory accumulator):
//
//   ldg:  the compute warps load their spans from global with 16-byte loads (evict-first,
//         16 per lane in flight, as the megakernel's mat-vec keeps), after the stage's
//         wait; thread 0 prefetches the first 64 KB of the block's next stage into L2
//         after each signal (the megakernel's hand-over prefetch);
//   ring: a loader warp streams every weight byte of the block's whole sequence of stages
//         through a ring of shared-memory slots (15 x 2 KB each) with cp.async.bulk
//         (evict-first), as fast as the compute warps free slots. It never waits on a
//         counter, so across a stage boundary it fills the ring with the next stage's
//         weights while the compute warps wait for that stage's input;
//   cp.async ring: the same ring, filled by the loader warp's 32 lanes with 16-byte
//         cp.async copies (the load unit's path, not the copy engine's), each lane's
//         completing on the slot's mbarrier.
//
// Variants: with the waits or without (no stage waits for any other: the math is wrong,
// only the time counts), the signal as red.release or red.relaxed (no release fence: the
// outputs may be read before they land, only the time counts), the ring's depth, and
// (hold) the ring's loader kept from the next stage's weights until its block signalled.
// The floor is the step's weight bytes at the rate the same run reads them with the
// benchmark's read probe (csrc/read_probe.cu: bulk copies, no dependency).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I../../csrc stream_chain.cu \
//       ../../csrc/read_probe.cu -o sc
//   ./sc [1b|3b|8b] [steps per launch, default 8]          (benchmarks/RESULTS.md, entry 84)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dev_cuda.h"
#include "read_probe.h"

// The megakernel's block shape (common.cuh): 15 compute warps, + the loader warp in the
// controller's place (idle in ldg).
using mk::compute_sync;
using mk::kComputeThreads;
using mk::kComputeWarps;
constexpr int kThreads = mk::kThreads;
constexpr int kSpanBytes = 2048;  // one warp's share of a slot, in one row: 4 chunks per lane
constexpr int kSlotBytes = kComputeWarps * kSpanBytes;  // 30 KB
constexpr int kMaxSlots = 8;
constexpr int kLdgSpansInFlight = 4;  // 16 loads per lane in flight

// One stage: rows x k bf16 weights (none for the attention stage), its input and output.
enum InputKind : int { kPlain = 0, kSiluMul = 1, kCopy = 2 };
struct Stage {
  const char* weights;
  int k;
  int rows;  // output rows (for kCopy: elements copied)
  int input_kind;
  const float* input;
  float* output;
};

struct Params {
  const Stage* stages;
  int num_stages;  // per step
  int steps;
  unsigned long long* counters;  // one per stage of the launch, only growing
  unsigned long long epoch;
  int slots;
  int waits;
  int relaxed;
  int hold;  // ring: the loader starts a stage's copies only once the stage before it signalled
  uint32_t prefetch_bytes;
  int* error;
  long long timeout_ns;
};

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void row_block(int rows, int& r0, int& r1) {
  r0 = static_cast<int>(static_cast<long long>(rows) * blockIdx.x / gridDim.x);
  r1 = static_cast<int>(static_cast<long long>(rows) * (blockIdx.x + 1) / gridDim.x);
}

// The loader's wait for a free slot; false once a compute thread has recorded a timeout
// (its block's compute warps then free no slot again).
__device__ bool loader_wait(uint64_t* bar, uint32_t parity, const int* error) {
  for (uint32_t tries = 1; !try_wait_parity(bar, parity); ++tries)
    if (tries % 256 == 0 && *reinterpret_cast<const volatile int*>(error) != 0) return false;
  return true;
}

// One warp's 2 KB span (one row's, 16-byte chunks lane, lane + 32, ...) dotted with x.
__device__ __forceinline__ float span_dot(const uint4 (&w)[4], const float* x) {
  const int lane = threadIdx.x % 32;
  float acc = 0.0f;
#pragma unroll
  for (int u = 0; u < 4; ++u) acc = dot8(w[u], x + (lane + 32 * u) * 8, acc);
  return warp_sum(acc);
}

// Feeds: ldg, a ring filled by the copy engine (one thread's cp.async.bulk), or a ring
// filled by the loader warp's 32 lanes with 16-byte cp.async (the load unit's path).
enum Feed : int { kLdg = 0, kBulkRing = 1, kLdgstsRing = 2 };

template <int kFeed>
__global__ void __launch_bounds__(kThreads, 1) chain(const Params p) {
  constexpr bool kRing = kFeed != kLdg;
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) uint64_t full[kMaxSlots], empty[kMaxSlots];
  __shared__ int stop;  // thread 0 timed out: every compute thread returns
  __shared__ int signalled;  // stages of the launch this block has signalled (for hold)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  char* ring = smem;
  float* x = reinterpret_cast<float*>(smem + (kRing ? p.slots * kSlotBytes : 0));
  if (threadIdx.x == 0) stop = signalled = 0;
  if (threadIdx.x == 0 && kRing) {
    init_barriers(full, p.slots, kFeed == kLdgstsRing ? 32 : 1);
    init_barriers(empty, p.slots, kComputeWarps);
  }
  __syncthreads();
  const uint64_t policy = evict_first_policy();

  if (warp == kComputeWarps) {  // the loader
    if (!kRing || (kFeed == kBulkRing && lane != 0)) return;
    int c = 0;
    for (int step = 0; step < p.steps; ++step)
      for (int j = 0; j < p.num_stages; ++j) {
        const Stage st = p.stages[j];
        if (st.weights == nullptr) continue;
        int r0, r1;
        row_block(st.rows, r0, r1);
        const size_t row_bytes = static_cast<size_t>(st.k) * 2;
        const char* src = st.weights + r0 * row_bytes;
        const size_t bytes = (r1 - r0) * row_bytes;
        const int g = step * p.num_stages + j;
        if (p.hold)
          for (uint32_t tries = 1; *reinterpret_cast<volatile int*>(&signalled) < g; ++tries)
            if (tries % 256 == 0 && *reinterpret_cast<const volatile int*>(p.error) != 0) return;
        for (size_t off = 0; off < bytes; off += kSlotBytes, ++c) {
          const int s = c % p.slots;
          if (c >= p.slots && !loader_wait(&empty[s], ((c / p.slots) - 1) & 1, p.error)) return;
          const size_t left = bytes - off;
          const uint32_t n = static_cast<uint32_t>(left < kSlotBytes ? left : kSlotBytes);
          if constexpr (kFeed == kBulkRing) {
            bulk_copy(ring + s * kSlotBytes, src + off, n, &full[s], policy);
          } else {
            char* dst = ring + s * kSlotBytes;
            for (uint32_t b = lane * 16; b < n; b += 32 * 16)
              asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(
                               smem_address(dst + b)),
                           "l"(src + off + b), "l"(policy)
                           : "memory");
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(
                             smem_address(&full[s]))
                         : "memory");
          }
        }
      }
    return;
  }

  // The compute warps.
  const unsigned long long goal = static_cast<unsigned long long>(gridDim.x) * p.epoch;
  int c = 0;  // ring slots consumed
  for (int step = 0; step < p.steps; ++step)
    for (int j = 0; j < p.num_stages; ++j) {
      const int g = step * p.num_stages + j;
      const Stage st = p.stages[j];
      if (threadIdx.x == 0 && p.waits && g > 0) {
        const uint64_t start = now_ns();
        while (true) {
          unsigned long long v;
          asm volatile("ld.acquire.gpu.global.u64 %0, [%1];"
                       : "=l"(v)
                       : "l"(p.counters + g - 1)
                       : "memory");
          if (v >= goal) break;
          if (now_ns() - start > static_cast<uint64_t>(p.timeout_ns)) {
            atomicExch(p.error, g);
            stop = 1;
            break;
          }
        }
      }
      compute_sync();
      if (stop) return;
      int r0, r1;
      row_block(st.rows, r0, r1);
      float* acc = x + st.k;  // after the input vector
      if (st.input_kind == kCopy) {
        for (int r = r0 + threadIdx.x; r < r1; r += kComputeThreads)
          st.output[r] = __ldcg(st.input + r);
      } else {
        // The input vector, up to 4 x 4 x 480 floats per L2 round trip.
        const int k4 = st.k / 4;
        for (int e0 = threadIdx.x; e0 < k4; e0 += 4 * kComputeThreads) {
          float4 v[4], u[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int e = e0 + i * kComputeThreads;
            if (e < k4) {
              v[i] = __ldcg(reinterpret_cast<const float4*>(st.input) + e);
              if (st.input_kind == kSiluMul)
                u[i] = __ldcg(reinterpret_cast<const float4*>(st.input + st.k) + e);
            }
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int e = e0 + i * kComputeThreads;
            if (e < k4) {
              if (st.input_kind == kSiluMul) {
                v[i].x = v[i].x / (1.0f + __expf(-v[i].x)) * u[i].x;
                v[i].y = v[i].y / (1.0f + __expf(-v[i].y)) * u[i].y;
                v[i].z = v[i].z / (1.0f + __expf(-v[i].z)) * u[i].z;
                v[i].w = v[i].w / (1.0f + __expf(-v[i].w)) * u[i].w;
              }
              reinterpret_cast<float4*>(x)[e] = v[i];
            }
          }
        }
        for (int r = threadIdx.x; r < r1 - r0; r += kComputeThreads) acc[r] = 0.0f;
        compute_sync();
        const int row_bytes = st.k * 2;
        const size_t bytes = static_cast<size_t>(r1 - r0) * row_bytes;
        if constexpr (kRing) {
          for (size_t off = 0; off < bytes; off += kSlotBytes, ++c) {
            const int s = c % p.slots;
            wait_parity(&full[s], (c / p.slots) & 1);
            const size_t span = off + warp * kSpanBytes;
            if (span < bytes) {
              const uint4* data =
                  reinterpret_cast<const uint4*>(ring + s * kSlotBytes + warp * kSpanBytes);
              uint4 w[4];
#pragma unroll
              for (int u = 0; u < 4; ++u) w[u] = data[lane + 32 * u];
              const int row = static_cast<int>(span / row_bytes);
              const int col = static_cast<int>(span % row_bytes) / 2;
              const float d = span_dot(w, x + col);
              if (lane == 0) atomicAdd(acc + row, d);
            }
            __syncwarp();
            if (lane == 0)
              asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(
                               smem_address(&empty[s]))
                           : "memory");
          }
        } else {
          const char* base = st.weights + static_cast<size_t>(r0) * row_bytes;
          const int spans = static_cast<int>(bytes / kSpanBytes);
          for (int s0 = warp; s0 < spans; s0 += kComputeWarps * kLdgSpansInFlight) {
            uint4 w[kLdgSpansInFlight][4];
#pragma unroll
            for (int i = 0; i < kLdgSpansInFlight; ++i) {
              const int s = s0 + i * kComputeWarps;
              const uint4* src = reinterpret_cast<const uint4*>(base + static_cast<size_t>(s) *
                                                                           kSpanBytes);
#pragma unroll
              for (int u = 0; u < 4; ++u)
                w[i][u] = s < spans ? load_weight(src + lane + 32 * u, policy)
                                    : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int i = 0; i < kLdgSpansInFlight; ++i) {
              const int s = s0 + i * kComputeWarps;
              if (s < spans) {
                const size_t span = static_cast<size_t>(s) * kSpanBytes;
                const float d = span_dot(w[i], x + static_cast<int>(span % row_bytes) / 2);
                if (lane == 0) atomicAdd(acc + span / row_bytes, d);
              }
            }
          }
        }
        compute_sync();
        for (int r = threadIdx.x; r < r1 - r0; r += kComputeThreads) st.output[r0 + r] = acc[r];
      }
      compute_sync();  // every output written before thread 0's release
      if (threadIdx.x == 0) {
        if (p.relaxed)
          asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(p.counters + g)
                       : "memory");
        else
          asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(p.counters + g)
                       : "memory");
        *reinterpret_cast<volatile int*>(&signalled) = g + 1;
        if (!kRing && p.prefetch_bytes > 0) {  // the next weight stage's first bytes
          for (int n = 1; n < p.num_stages; ++n) {
            const Stage nx = p.stages[(j + n) % p.num_stages];
            if (nx.weights == nullptr) continue;
            int q0, q1;
            row_block(nx.rows, q0, q1);
            const size_t nb = static_cast<size_t>(q1 - q0) * nx.k * 2;
            const uint32_t want =
                static_cast<uint32_t>(nb < p.prefetch_bytes ? nb : p.prefetch_bytes);
            const char* at = nx.weights + static_cast<size_t>(q0) * nx.k * 2;
            for (uint32_t o = 0; o < want; o += 16384)
              asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(at + o),
                           "r"(min(16384u, want - o))
                           : "memory");
            break;
          }
        }
      }
    }
}

// The read probe's launch reports its errors through the launcher's hook, which the
// extension defines in interpreter.cu; here it ends the run.
namespace mk {
void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
  std::exit(1);
}
}  // namespace mk

struct Model {
  const char* name;
  int hidden, heads, kv_heads, head_dim, intermediate, layers, vocab;
};

int main(int argc, char** argv) {
  const Model models[] = {{"1b", 2048, 32, 8, 64, 8192, 16, 128256},
                          {"3b", 3072, 24, 8, 128, 8192, 28, 128256},
                          {"8b", 4096, 32, 8, 128, 14336, 32, 128256}};
  const std::string which = argc > 1 ? argv[1] : "1b";
  const int steps = argc > 2 ? std::atoi(argv[2]) : 8;
  const Model* m = nullptr;
  for (const Model& candidate : models)
    if (which == candidate.name) m = &candidate;
  if (m == nullptr || steps < 1) {
    std::fprintf(stderr, "usage: %s [1b|3b|8b] [steps per launch]\n", argv[0]);
    return 2;
  }
  int sms;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int H = m->hidden, Q = (m->heads + 2 * m->kv_heads) * m->head_dim;
  const int A = m->heads * m->head_dim, I = m->intermediate;
  struct Shape {
    int rows, k;
  };
  const Shape layer_shapes[] = {{Q, H}, {A, H}, {2 * I, H}, {H, I}};
  size_t layer_bytes = 0;
  for (const Shape& s : layer_shapes) layer_bytes += static_cast<size_t>(s.rows) * s.k * 2;
  const size_t lm_bytes = static_cast<size_t>(m->vocab) * H * 2;
  const size_t total = layer_bytes * m->layers + lm_bytes;
  char* weights;
  CHECK(cudaMalloc(&weights, total));
  CHECK(cudaMemset(weights, 1, total));
  // Activations: x (H), q (Q), a (A), o (H), g (2I), logits (V).
  float *x, *q, *a, *o, *g, *logits;
  CHECK(cudaMalloc(&x, H * 4));
  CHECK(cudaMalloc(&q, Q * 4));
  CHECK(cudaMalloc(&a, A * 4));
  CHECK(cudaMalloc(&o, H * 4));
  CHECK(cudaMalloc(&g, 2 * I * 4));
  CHECK(cudaMalloc(&logits, static_cast<size_t>(m->vocab) * 4));
  for (float* v : {x, q, a, o, g}) CHECK(cudaMemset(v, 0, 4));
  std::vector<Stage> stages;
  char* w = weights;
  for (int l = 0; l < m->layers; ++l) {
    stages.push_back({w, H, Q, kPlain, x, q});
    w += static_cast<size_t>(Q) * H * 2;
    stages.push_back({nullptr, 0, A, kCopy, q, a});
    stages.push_back({w, A, H, kPlain, a, o});
    w += static_cast<size_t>(H) * A * 2;
    stages.push_back({w, H, 2 * I, kPlain, o, g});
    w += static_cast<size_t>(2 * I) * H * 2;
    stages.push_back({w, I, H, kSiluMul, g, x});
    w += static_cast<size_t>(H) * I * 2;
  }
  stages.push_back({w, H, m->vocab, kPlain, x, logits});
  Stage* d_stages;
  CHECK(cudaMalloc(&d_stages, stages.size() * sizeof(Stage)));
  CHECK(cudaMemcpy(d_stages, stages.data(), stages.size() * sizeof(Stage),
                   cudaMemcpyHostToDevice));
  const int num_stages = static_cast<int>(stages.size());
  unsigned long long* counters;
  CHECK(cudaMalloc(&counters, sizeof(unsigned long long) * num_stages * steps));
  CHECK(cudaMemset(counters, 0, sizeof(unsigned long long) * num_stages * steps));
  int* error;
  CHECK(cudaMalloc(&error, sizeof(int)));
  CHECK(cudaMemset(error, 0, sizeof(int)));

  // The floor's rate.
  const int64_t probe_bytes = mk::read_probe_bytes(static_cast<int64_t>(total), sms);
  const double probe_ms = median_ms(
      [&] { mk::launch_read_probe(weights, static_cast<int64_t>(total), sms, nullptr); }, 10);
  const double probe_tbps = probe_bytes / (probe_ms * 1e-3) / 1e12;
  const double floor_us = total / (probe_tbps * 1e12) * 1e6;
  std::printf("%s: %d SMs, %.3f GB of weights per step, %d stages per step, %d steps per "
              "launch\nprobe %.3f TB/s: floor %.1f us per step\n",
              m->name, sms, total / 1e9, num_stages, steps, probe_tbps, floor_us);

  const int max_k = std::max(H, I), max_rows = (m->vocab + sms - 1) / sms;
  const size_t vec_bytes = static_cast<size_t>(max_k + max_rows) * 4;
  unsigned long long epoch = 0;
  struct Variant {
    const char* name;
    int feed, slots, waits, relaxed, hold;
    uint32_t prefetch;
  };
  const Variant variants[] = {
      {"ldg, waits, release", 0, 0, 1, 0, 0, 64 * 1024},
      {"ldg, waits, relaxed", 0, 0, 1, 1, 0, 64 * 1024},
      {"ldg, no waits", 0, 0, 0, 0, 0, 64 * 1024},
      {"ldg, waits, no hand-over prefetch", 0, 0, 1, 0, 0, 0},
      {"ring 5, waits, release", 1, 5, 1, 0, 0, 0},
      {"ring 5, waits, relaxed", 1, 5, 1, 1, 0, 0},
      {"ring 5, no waits", 1, 5, 0, 0, 0, 0},
      {"ring 5, waits, release, hold", 1, 5, 1, 0, 1, 0},
      {"ring 5, waits, relaxed, hold", 1, 5, 1, 1, 1, 0},
      {"ring 4, waits, release", 1, 4, 1, 0, 0, 0},
      {"ring 4, waits, relaxed", 1, 4, 1, 1, 0, 0},
      {"ring 3, waits, release", 1, 3, 1, 0, 0, 0},
      {"cp.async ring 5, waits, release", 2, 5, 1, 0, 0, 0},
      {"cp.async ring 5, waits, relaxed", 2, 5, 1, 1, 0, 0},
      {"cp.async ring 5, no waits", 2, 5, 0, 0, 0, 0},
      {"cp.async ring 5, no waits, relaxed", 2, 5, 0, 1, 0, 0},
      {"ring 5, no waits, relaxed", 1, 5, 0, 1, 0, 0},
      {"cp.async ring 3, waits, release", 2, 3, 1, 0, 0, 0},
  };
  int max_smem;
  CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
  for (int round = 0; round < 2; ++round)
    for (const Variant& v : variants) {
      const size_t ring_bytes = static_cast<size_t>(v.feed != kLdg ? v.slots : 0) * kSlotBytes;
      const size_t smem = vec_bytes + ring_bytes;
      if (smem > static_cast<size_t>(max_smem)) {
        std::printf("%-36s skipped: %zu bytes of shared memory\n", v.name, smem);
        continue;
      }
      void (*kernel)(Params) = v.feed == kLdg       ? chain<kLdg>
                               : v.feed == kBulkRing ? chain<kBulkRing>
                                                     : chain<kLdgstsRing>;
      CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem)));
      Params p{d_stages, num_stages, steps,  counters, 0,           v.slots,
               v.waits,  v.relaxed,  v.hold, v.prefetch, error, 2000000000LL};
      const double ms = median_ms(
          [&] {
            p.epoch = ++epoch;
            kernel<<<sms, kThreads, smem>>>(p);
          },
          10);
      int err = 0;
      CHECK(cudaMemcpy(&err, error, sizeof(int), cudaMemcpyDeviceToHost));
      if (err != 0) {
        std::printf("%-36s TIMED OUT at stage %d\n", v.name, err);
        return 1;
      }
      const double us = ms * 1e3 / steps;
      std::printf("%-36s %8.1f us per step  %.3f TB/s  %.3fx floor\n", v.name, us,
                  total / (us * 1e-6) / 1e12, us / floor_us);
    }
  return 0;
}
