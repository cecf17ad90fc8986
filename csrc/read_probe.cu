// The read-bandwidth probe; see read_probe.h. One thread per block issues the bulk copies
// (the copy engine moves the bytes; more threads add nothing) into a ring of two 32 KB
// slots, each completed on an mbarrier: the two-slot ring read as fast as any larger one
// (benchmarks/RESULTS.md, entry 42).
#include <cuda_runtime.h>

#include <cstdint>

#include "launcher.h"
#include "read_probe.h"

namespace mk {
namespace {

constexpr int kRingSlots = 2;
constexpr int kRingBytes = kRingSlots * static_cast<int>(kReadProbeChunk);

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies chunk bytes from global src into shared dst, completing on mbarrier bar; this
// thread's arrival carries the expected byte count.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               ::"r"(shared_address(bar)), "r"(static_cast<uint32_t>(kReadProbeChunk))
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(shared_address(dst)), "l"(src), "r"(static_cast<uint32_t>(kReadProbeChunk)),
      "r"(shared_address(bar))
      : "memory");
}

// Waits until mbarrier bar completes the phase of this parity. Bounded: a copy that
// never lands (2^26 polls) traps, failing the launch, instead of hanging.
__device__ __forceinline__ void wait_parity(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  for (uint32_t tries = 0; !done; ++tries) {
    if (tries > (1u << 26)) __trap();
    asm volatile(
        "{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; "
        "selp.u32 %0, 1, 0, q; }"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
  }
}

__global__ void __launch_bounds__(32) read_probe_kernel(const char* buf, int64_t chunks) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) uint64_t full[kRingSlots];
  if (threadIdx.x != 0) return;
  for (int s = 0; s < kRingSlots; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&full[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // seen by the copy engine
  const char* share = buf + blockIdx.x * chunks * kReadProbeChunk;
  auto issue = [&](int64_t c) {
    bulk_copy(ring + (c % kRingSlots) * kReadProbeChunk, share + c * kReadProbeChunk,
              &full[c % kRingSlots]);
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
