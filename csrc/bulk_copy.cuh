// Bulk copies from global into shared memory through the copy engine (cp.async.bulk),
// each completing on an mbarrier: the read probe's stream (read_probe.cu) and the
// microbenchmarks' in scripts/dev (read_bandwidth.cu, stream_chain.cu).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace mk {

// mbarriers [0, n) with `count` arrivals each, visible to the copy engine.
__device__ __forceinline__ void init_barriers(uint64_t* bars, int n, int count) {
  for (int s = 0; s < n; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(&bars[s])),
                 "r"(count));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global src to shared dst
// by the copy engine, completing on mbarrier bar (this thread's arrival carries the
// expected bytes); with an L2 cache-hint policy unless it is 0.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar, uint64_t policy) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
  if (policy != 0)
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1], %2, [%3], %4;" ::"r"(smem_address(dst)),
        "l"(src), "r"(bytes), "r"(smem_address(bar)), "l"(policy)
        : "memory");
  else
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(smem_address(dst)), "l"(src), "r"(bytes), "r"(smem_address(bar))
        : "memory");
}

// Whether mbarrier bar has completed the phase of this parity (one bounded try).
__device__ __forceinline__ bool try_wait_parity(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; "
      "selp.u32 %0, 1, 0, q; }"
      : "=r"(done)
      : "r"(smem_address(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Until mbarrier bar completes the phase of this parity. Bounded: a copy that never lands
// (2^26 polls) traps, failing the launch, instead of hanging.
__device__ __forceinline__ void wait_parity(uint64_t* bar, uint32_t parity) {
  for (uint32_t tries = 0; !try_wait_parity(bar, parity); ++tries)
    if (tries > (1u << 26)) __trap();
}

}  // namespace mk
