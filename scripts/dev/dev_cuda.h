// What the standalone CUDA microbenchmarks here share: the error check that ends the run,
// the median time of a launch, and the kernel's own device helpers they time (weight
// loads, L2 policy and dot products from csrc/common.cuh; bulk copies and mbarrier waits
// from csrc/bulk_copy.cuh).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bulk_copy.cuh"
#include "common.cuh"

#define CHECK(x)                                                                     \
  do {                                                                               \
    cudaError_t e = (x);                                                             \
    if (e != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

using mk::bulk_copy;
using mk::dot8;
using mk::evict_first_policy;
using mk::init_barriers;
using mk::load_weight;
using mk::smem_address;
using mk::try_wait_parity;
using mk::wait_parity;
using mk::warp_sum;

// Median milliseconds of `reps` timed launches, after three untimed ones.
template <typename Launch>
double median_ms(Launch launch, int reps) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int i = 0; i < reps + 3; ++i) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaGetLastError());
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    if (i >= 3) ms.push_back(t);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}
