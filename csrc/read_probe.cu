// The read-bandwidth probe; see read_probe.h. One thread per block issues the bulk copies
// (the copy engine moves the bytes; more threads add nothing) into a ring of two 32 KB
// slots, each completed on an mbarrier: the two-slot ring read as fast as any larger one
// (benchmarks/RESULTS.md, entry 42).
#include <cuda_runtime.h>

#include <cstdint>

#include "bulk_copy.cuh"
#include "launcher.h"
#include "read_probe.h"

namespace mk {
namespace {

constexpr int kRingSlots = 2;
constexpr int kRingBytes = kRingSlots * static_cast<int>(kReadProbeChunk);

__global__ void __launch_bounds__(32) read_probe_kernel(const char* buf, int64_t chunks) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) uint64_t full[kRingSlots];
  if (threadIdx.x != 0) return;
  init_barriers(full, kRingSlots, 1);
  const char* share = buf + blockIdx.x * chunks * kReadProbeChunk;
  auto issue = [&](int64_t c) {
    bulk_copy(ring + (c % kRingSlots) * kReadProbeChunk, share + c * kReadProbeChunk,
              static_cast<uint32_t>(kReadProbeChunk), &full[c % kRingSlots], 0);
  };
  for (int64_t c = 0; c < kRingSlots && c < chunks; ++c) issue(c);
  for (int64_t c = 0; c < chunks; ++c) {
    wait_parity(&full[c % kRingSlots], static_cast<uint32_t>((c / kRingSlots) & 1));
    if (c + kRingSlots < chunks) issue(c + kRingSlots);
  }
}

}  // namespace

int64_t read_probe_bytes(int64_t bytes, int blocks) {
  if (blocks <= 0 || bytes <= 0) return 0;
  return bytes / blocks / kReadProbeChunk * kReadProbeChunk * blocks;
}

void launch_read_probe(const void* buf, int64_t bytes, int blocks, cudaStream_t stream) {
  const int64_t chunks = read_probe_bytes(bytes, blocks) / blocks / kReadProbeChunk;
  check(cudaFuncSetAttribute(read_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kRingBytes),
        "read probe shared memory");
  read_probe_kernel<<<blocks, 32, kRingBytes, stream>>>(static_cast<const char*>(buf), chunks);
}

}  // namespace mk
