// Plain C++ interface of the read-bandwidth probe (read_probe.cu), called by the torch
// binding (binding.cpp). scripts/benchmark.py counts a decode step's floor as its bytes
// over the fastest rate it measured this device moving bytes at; a device-to-device copy
// and a PyTorch sum both read DRAM slower than large bulk copies do (benchmarks/RESULTS.md,
// entry 42: 3.16 TB/s against 3.03-3.06 for the best 16-byte loads on an H100).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mk {

// Bytes of one bulk copy of the probe, and of each of its blocks' share's granularity.
constexpr int64_t kReadProbeChunk = 32 * 1024;

// The bytes launch_read_probe() reads of a buffer of `bytes` with `blocks` blocks: each
// block's share of whole chunks, the same for every block (0 if a block gets none).
int64_t read_probe_bytes(int64_t bytes, int blocks);

// Reads read_probe_bytes(bytes, blocks) of buf (device memory, 16-byte aligned) from
// DRAM: block b streams its contiguous share through a two-chunk ring in shared memory
// with cp.async.bulk. The data is not used.
void launch_read_probe(const void* buf, int64_t bytes, int blocks, cudaStream_t stream);

}  // namespace mk
