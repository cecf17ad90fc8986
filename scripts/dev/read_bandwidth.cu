// How fast can an SM pull weights from DRAM, by load path? A standalone microbenchmark
// (no torch): every block reads its own contiguous share of a large buffer, as the
// megakernel's row blocks do, and the DRAM read rate is timed over the whole grid.
//
//   ldg U:   16-byte ld.global.nc loads with an L2 evict-first hint, U per thread in
//            flight (the megakernel's mat-vec keeps 2 rows x 8 = 16 per lane);
//   bulk S x C KB: one thread per block streams with cp.async.bulk (the TMA copy engine)
//            into a ring of S shared-memory buffers of C KB, each completed on an mbarrier;
//            the data is not read from shared memory (the DRAM side alone);
//   warp bulk 15 x S x C KB: the same per warp, each warp its own share and ring, and the
//            warp reads each chunk back from shared memory;
//   rows ldg / rows ring: mat-vecs over 4 KB rows (below).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I../../csrc read_bandwidth.cu -o rb
//   ./rb [MB per block, default 16]      (benchmarks/RESULTS.md, entry 42: ./rb 48)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

#include "dev_cuda.h"

template <int U>
__global__ void __launch_bounds__(512) ldg_read(const uint4* buf, size_t per_block16,
                                                unsigned* sink) {
  const uint64_t policy = evict_first_policy();
  const uint4* p = buf + blockIdx.x * per_block16;
  unsigned acc = 0;
  const size_t stride = blockDim.x;
  for (size_t i = threadIdx.x; i < per_block16; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      v[u] = i + u * stride < per_block16 ? load_weight(p + i + u * stride, policy)
                                          : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the loads
}

__global__ void __launch_bounds__(32) bulk_read(const char* buf, size_t per_block, int stages,
                                                int chunk, unsigned* sink) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) uint64_t full[16];
  if (threadIdx.x != 0) return;
  init_barriers(full, stages, 1);
  const uint64_t policy = 0;  // no L2 hint
  const char* p = buf + blockIdx.x * per_block;
  const int chunks = static_cast<int>(per_block / chunk);
  auto issue = [&](int c) {
    bulk_copy(ring + static_cast<size_t>(c % stages) * chunk, p + static_cast<size_t>(c) * chunk,
              chunk, &full[c % stages], policy);
  };
  for (int c = 0; c < stages && c < chunks; ++c) issue(c);
  unsigned acc = 0;
  for (int c = 0; c < chunks; ++c) {
    wait_parity(&full[c % stages], (c / stages) & 1);
    acc += static_cast<unsigned char>(ring[(c % stages) * chunk]);
    if (c + stages < chunks) issue(c + stages);
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// Each warp streams its own contiguous share with its own ring of `stages` slots of `chunk`
// bytes (lane 0 issues and waits), and the whole warp reads every chunk back from shared
// memory: what a mat-vec whose warps each own their rows would do.
__global__ void __launch_bounds__(480) warp_bulk_read(const char* buf, size_t per_block,
                                                      int stages, int chunk, unsigned* sink) {
  extern __shared__ __align__(128) char ring_all[];
  __shared__ __align__(8) uint64_t full_all[15 * 8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  char* ring = ring_all + static_cast<size_t>(warp) * stages * chunk;
  uint64_t* full = full_all + warp * 8;
  if (lane == 0) init_barriers(full, stages, 1);
  __syncwarp();
  const uint64_t policy = 0;  // no L2 hint
  const size_t per_warp = per_block / warps / chunk * chunk;
  const char* p = buf + blockIdx.x * per_block + warp * per_warp;
  const int chunks = static_cast<int>(per_warp / chunk);
  auto issue = [&](int c) {
    bulk_copy(ring + static_cast<size_t>(c % stages) * chunk, p + static_cast<size_t>(c) * chunk,
              chunk, &full[c % stages], policy);
  };
  if (lane == 0)
    for (int c = 0; c < stages && c < chunks; ++c) issue(c);
  unsigned acc = 0;
  for (int c = 0; c < chunks; ++c) {
    wait_parity(&full[c % stages], (c / stages) & 1);
    const uint4* data = reinterpret_cast<const uint4*>(ring + (c % stages) * chunk);
    for (int i = lane; i < chunk / 16; i += 32) {
      const uint4 v = data[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncwarp();
    if (lane == 0 && c + stages < chunks) issue(c + stages);
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// The two mat-vec shapes, with the dot products against a float vector in shared memory
// (4 KB rows, 2048 bf16, like the LM head's), one block per SM over its contiguous rows:
//
//   rows ldg: the megakernel's own (common.cuh: WarpRows, RowPairs): 15 warps, each two
//            rows 15 apart, 8 16-byte loads of each row per lane in flight;
//   rows ring S x 15 rows: warp 15's lane 0 copies 15 rows (60 KB) at a time into a ring
//            of S slots with cp.async.bulk; warp w computes row w of each slot and
//            releases the slot on an mbarrier the copier waits on.
constexpr int kRowChunks = 256;  // 16-byte chunks in a 4 KB row

__global__ void __launch_bounds__(480) rows_ldg(const uint4* buf, size_t rows_per_block,
                                                float* sink) {
  __shared__ __align__(16) float x[kRowChunks * 8];
  for (int i = threadIdx.x; i < kRowChunks * 8; i += blockDim.x) x[i] = 1.0f / (1 + i);
  __syncthreads();
  const uint64_t policy = evict_first_policy();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint4* base = buf + blockIdx.x * rows_per_block * kRowChunks;
  float total = 0.0f;
  for (size_t r0 = 0; r0 + 30 <= rows_per_block; r0 += 30) {
    const uint4* row0 = base + (r0 + warp) * kRowChunks;
    const uint4* row1 = row0 + 15 * kRowChunks;
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int c0 = lane; c0 < kRowChunks; c0 += 256) {
      uint4 w0[8], w1[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        w0[u] = load_weight(row0 + c0 + u * 32, policy);
        w1[u] = load_weight(row1 + c0 + u * 32, policy);
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        acc0 = dot8(w0[u], x + (c0 + u * 32) * 8, acc0);
        acc1 = dot8(w1[u], x + (c0 + u * 32) * 8, acc1);
      }
    }
    total += acc0 + acc1;
  }
  if (total == 1234.5f) sink[0] = total;
}

__global__ void __launch_bounds__(512) rows_ring(const char* buf, size_t rows_per_block,
                                                 int stages, float* sink) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(16) float x[kRowChunks * 8];
  __shared__ __align__(8) uint64_t full[8], empty[8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kSlot = 15 * kRowChunks * 16;
  for (int i = threadIdx.x; i < kRowChunks * 8; i += blockDim.x) x[i] = 1.0f / (1 + i);
  if (threadIdx.x == 0) {
    init_barriers(full, stages, 1);
    init_barriers(empty, stages, 15);
  }
  __syncthreads();
  const char* base = buf + blockIdx.x * rows_per_block * kRowChunks * 16;
  const int slots = static_cast<int>(rows_per_block / 15);
  if (warp == 15) {
    if (lane != 0) return;
    const uint64_t policy = evict_first_policy();
    for (int c = 0; c < slots; ++c) {
      const int s = c % stages;
      if (c >= stages) wait_parity(&empty[s], ((c / stages) - 1) & 1);
      bulk_copy(ring + static_cast<size_t>(s) * kSlot, base + static_cast<size_t>(c) * kSlot,
                kSlot, &full[s], policy);
    }
    return;
  }
  float total = 0.0f;
  for (int c = 0; c < slots; ++c) {
    const int s = c % stages;
    wait_parity(&full[s], (c / stages) & 1);
    const uint4* row = reinterpret_cast<const uint4*>(ring + static_cast<size_t>(s) * kSlot) +
                       warp * kRowChunks;
    float acc = 0.0f;
#pragma unroll
    for (int u = 0; u < 8; ++u) acc = dot8(row[u * 32 + lane], x + (u * 32 + lane) * 8, acc);
    total += acc;
    __syncwarp();
    if (lane == 0)
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(&empty[s]))
                   : "memory");
  }
  if (total == 1234.5f) sink[0] = total;
}

template <typename Launch>
double median_tbps(Launch launch, size_t bytes) {
  return bytes / (median_ms(launch, 10) * 1e-3) / 1e12;
}

int main(int argc, char** argv) {
  int sms;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int mb = argc > 1 ? std::atoi(argv[1]) : 16;   // MB per block
  const size_t per_block = static_cast<size_t>(mb) << 20;
  const size_t bytes = per_block * sms;           // ~2.1 GB on 132 SMs
  char* buf;
  unsigned* sink;
  CHECK(cudaMalloc(&buf, bytes));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMemset(buf, 1, bytes));
  const uint4* b16 = reinterpret_cast<const uint4*>(buf);
  std::printf("%d SMs, %.2f GB read per run, one block per SM\n", sms, bytes / 1e9);
  auto ldg = [&](auto kernel, int threads, const char* name) {
    const double r = median_tbps([&] { kernel<<<sms, threads>>>(b16, per_block / 16, sink); },
                                 bytes);
    std::printf("%-26s %.3f TB/s\n", name, r);
  };
  ldg(ldg_read<8>, 480, "ldg 480 threads x 8");
  ldg(ldg_read<16>, 480, "ldg 480 threads x 16");
  ldg(ldg_read<32>, 480, "ldg 480 threads x 32");
  ldg(ldg_read<16>, 512, "ldg 512 threads x 16");
  const int configs[][2] = {{2, 32}, {4, 16}, {4, 32}, {6, 32}, {8, 16}, {4, 48}, {8, 24},
                            {12, 16}, {3, 64}};
  for (const auto& config : configs) {
    const int stages = config[0], kb = config[1];
    const int chunk = kb * 1024;
    const int smem = stages * chunk;
    CHECK(cudaFuncSetAttribute(bulk_read, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const double r = median_tbps(
        [&] { bulk_read<<<sms, 32, smem>>>(buf, per_block, stages, chunk, sink); }, bytes);
    std::printf("bulk %2d x %2d KB (%3d KB)    %.3f TB/s\n", stages, kb, smem / 1024, r);
  }
  const int warp_configs[][2] = {{2, 4}, {3, 4}, {1, 8}, {1, 12}, {2, 6}};
  for (const auto& config : warp_configs) {
    const int stages = config[0], kb = config[1];
    const int chunk = kb * 1024;
    const int smem = 15 * stages * chunk;
    CHECK(cudaFuncSetAttribute(warp_bulk_read, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               smem));
    const double r = median_tbps(
        [&] { warp_bulk_read<<<sms, 480, smem>>>(buf, per_block, stages, chunk, sink); },
        bytes);
    std::printf("warp bulk 15 x %d x %2d KB (%3d KB) %.3f TB/s\n", stages, kb, smem / 1024, r);
  }
  {
    const size_t rows_per_block = per_block / 4096 / 30 * 30;
    const size_t rows_bytes = rows_per_block * 4096 * sms;
    float* fsink = reinterpret_cast<float*>(sink);
    const double r = median_tbps(
        [&] { rows_ldg<<<sms, 480>>>(b16, rows_per_block, fsink); }, rows_bytes);
    std::printf("%-33s %.3f TB/s\n", "rows ldg (the megakernel's shape)", r);
    for (int stages : {2, 3}) {
      const int smem = stages * 15 * 4096;
      CHECK(cudaFuncSetAttribute(rows_ring, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      const double q = median_tbps(
          [&] { rows_ring<<<sms, 512, smem>>>(buf, rows_per_block, stages, fsink); }, rows_bytes);
      std::printf("rows ring %d x 15 rows (%3d KB)      %.3f TB/s\n", stages, smem / 1024, q);
    }
  }
  // The device copy the benchmark's floor uses, read + write counted.
  char* dst;
  CHECK(cudaMalloc(&dst, bytes / 2));
  const double copy = median_tbps(
      [&] { CHECK(cudaMemcpyAsync(dst, buf, bytes / 2, cudaMemcpyDeviceToDevice)); }, bytes);
  std::printf("%-26s %.3f TB/s\n", "cudaMemcpy (read + write)", copy);
  return 0;
}
