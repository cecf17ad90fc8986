// Plain C++ interface between the torch binding (binding.cpp) and the persistent kernel
// (interpreter.cu). No torch and no CUDA device code here (only the runtime API's types),
// so both sides compile fast.
//
// KernelParams is a POD of raw device pointers and sizes: every tensor is contiguous and
// row-major with the shapes given beside it (T = tokens per step, L layers, H hidden,
// I intermediate, V vocab, nq/nkv query/KV heads, hd head_dim, P attention partitions,
// B LM-head blocks). Weights and the KV cache are bf16; activations float32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mk {

// Error record: kErrorWords int64 words; the first error of a launch wins (atomicCAS on
// word kErrCode), and a non-zero code doubles as the abort flag every block polls.
constexpr int kErrorWords = 8;
enum ErrorWord : int {
  kErrCode = 0,         // ErrorCode
  kErrInstruction = 1,  // index of the instruction in the program
  kErrOpcode = 2,
  kErrLayer = 3,
  kErrCounter = 4,      // counter index waited on (or -1)
  kErrSeen = 5,         // counter value seen (or the offending value, e.g. a token id)
  kErrTarget = 6,       // value waited for: target * epoch (or the allowed bound)
  kErrBlock = 7,        // blockIdx.x of the block that wrote the record
};
enum ErrorCode : int {
  kErrNone = 0,
  kErrTimeout = 1,           // a wait did not reach its target within timeout_ns
  kErrUnsupportedTokens = 2, // token_begin/token_count this kernel does not serve
  kErrBadOpcode = 3,
  kErrBadCounter = 4,        // counter index out of range
  kErrBadToken = 5,          // token id outside [0, V)
  kErrBadPosition = 6,       // position outside the RoPE table or the page table
};

// Queue words: [0] instructions claimed, [1] blocks finished. Both grow by a fixed amount
// per launch (N + grid, grid), so they never need a reset between launches.
constexpr int kQueueWords = 2;

// Decode steps one launch may chain (KernelParams: step inputs): each step's token is the
// greedy token of the step before, chosen on the device.
constexpr int kMaxLaunchSteps = 16;

// Host status words, written by the last block of every launch into mapped pinned host
// memory so the host can check for errors without a device sync: [0] the error record's
// code (sticky until the host resets it), [1] the launch's epoch, then a ring of
// kHostResultSlots result slots of kMaxLaunchSteps words: launch `epoch` writes the greedy
// token of each of its steps t (next_token[t], or -code after an error) to word
// kHostResultWord + ((epoch - 1) % kHostResultSlots) * kMaxLaunchSteps + t, so the host
// reads a launch's tokens once it is done, with no device-to-host copy behind it.
constexpr int kHostResultWord = 2;
constexpr int kHostResultSlots = 4;
constexpr int kHostStatusWords = kHostResultWord + kHostResultSlots * kMaxLaunchSteps;

// Default L2 prefetch budget per instruction. Measured on an H100, Llama-3.2-1B shape:
// 0 or 64 KB 1.22 ms/token, 128 KB 1.26, 256 KB 1.30 (larger budgets evict useful lines);
// after the QKV and attention changes of benchmarks/RESULTS.md: 0 KB 1.190, 64 KB 1.169.
// With the prefetch issued after the signal (H200, entry 25): 1B 32/64/128/192 KB
// 0.902/0.898/0.913/0.930, 8B 64/128/256 KB 4.236/4.288/4.433.
constexpr uint32_t kDefaultPrefetchBytes = 64 * 1024;

// Profiling record per executed instruction (MEGAKERNEL_PROFILE builds only), int64 words:
// SM id, block, opcode, layer, wait start, waits satisfied, end (after signal) in
// %globaltimer ns, the instruction's local index, then when compute warp 0 finished the
// op and when the block passed the barrier after it (the signal's fence is end - that).
constexpr int kProfileWords = 10;

struct KernelParams {
  // Program and its synchronization state.
  const int32_t* instructions;   // [N, 32]
  int num_instructions;
  uint64_t* counters;            // [num_counters], monotonic across launches
  int num_counters;
  uint64_t* queue;               // [kQueueWords]
  int64_t* error_record;         // [kErrorWords], zero when healthy
  int64_t* step_result;          // [1] or null: next_token[T - 1], or -code after an error
  int64_t* host_status;          // [kHostStatusWords] mapped pinned host memory, or null
  int64_t* profile;              // [N, kProfileWords] or null
  int64_t epoch;                 // 1-based launch number since the last reset
  int64_t timeout_ns;            // bound on every spin-wait
  uint32_t prefetch_bytes;       // L2 prefetch of the next instruction's weights, bytes

  // Step inputs: step_input [2, T] (token ids, then positions), or, when it is null, T
  // chained decode steps at positions step_position + t: step 0's token given by the
  // launch itself, *step_token_source (a device int64 a previous launch wrote, e.g. its
  // step_result) or else step_token, and every later step's the greedy token of the step
  // before (see step_token()). The second form needs no device write between launches.
  // A launch's steps run in order (the program makes step t's embed wait on step t-1's
  // argmax) at increasing positions: the K/V rows from the first step's position on are
  // written during the launch.
  const int32_t* step_input;
  int num_tokens;                // T
  const int64_t* step_token_source;
  int64_t step_token;
  int step_position;

  // Activations (float32 unless noted).
  float* hidden;                 // [T, H]
  float* q;                      // [T, nq * hd]
  float* attn_partial_out;       // [T, nq, P, hd]
  float* attn_partial_lse;       // [T, nq, P]
  float* attn_out;               // [T, nq * hd]
  float* mlp_act;                // [T, I]
  float* logits;                 // [T, V]
  float* argmax_value;           // [T, B]
  int32_t* argmax_index;         // [T, B]
  int32_t* next_token;           // [T]
  int attn_partitions;           // P (the buffers' partition stride)
  int lm_head_blocks;            // B (the argmax buffers' stride)

  // Weights (bf16, layer-stacked; see megakernel/weights.py).
  const void* embed;             // [V, H]
  const void* attn_norm;         // [L, H]
  const void* qkv;               // [L, (nq + 2 nkv) hd, H]
  const void* o_proj;            // [L, H, nq hd]
  const void* mlp_norm;          // [L, H]
  const void* gate_up;           // [L, 2 I, H]
  const void* down;              // [L, H, I]
  const void* final_norm;        // [H]
  const void* lm_head;           // [V, H]
  const float* rope_cos;         // [max_positions, hd / 2]
  const float* rope_sin;         // [max_positions, hd / 2]
  int rope_max_positions;

  // Paged KV cache (bf16) and page table of sequence 0.
  void* k_cache;                 // [L, num_pages, page_size, nkv, hd]
  void* v_cache;                 // [L, num_pages, page_size, nkv, hd]
  const int32_t* page_table;     // [batch, max_pages]; row 0 is used
  int num_pages;
  int page_size;
  int max_pages;

  // Model shape.
  int num_layers;
  int hidden_size;
  int intermediate_size;
  int vocab_size;
  int num_heads;
  int num_kv_heads;
  int head_dim;
  float rms_norm_eps;

  // Temperature sampling (programs with sample_logits). Above 0, the launch runs the
  // kernel's sampling instance, where each step's argmax is taken over
  // logit * sample_inv_temperature + gumbel_noise(sample_seed, position, row): a draw from
  // softmax(logits / temperature), so sampled steps chain like greedy ones. 0: the greedy
  // instance, whose steps stay greedy. Last, so the other fields keep their offsets.
  float sample_inv_temperature;
  uint64_t sample_seed;
  // Top-k sampling (programs with topk_partial and topk_threshold; 0: none): the draw is
  // among the sample_top_k largest logits (1 to kMaxSampleTopK), the k-th largest found in
  // topk_values [T, B, kMaxSampleTopK] and topk_ties [T, B] and written to
  // sample_threshold [T]; with sample_top_p < 1 too, the nucleus among those instead.
  int sample_top_k;
  float* topk_values;
  int* topk_ties;
  // Top-p sampling (without top-k: programs with topp_histogram and topp_select; 1: none):
  // the draw is among the logits at or above the nucleus threshold, the largest logit
  // whose tokens and those above it hold sample_top_p of the probability, found by a
  // mass-weighted radix selection through topp_hist [T, 4 passes, 256] (zero between
  // steps) and topp_state [T, 4], and written to sample_threshold [T].
  float sample_top_p;
  unsigned long long* topp_hist;
  double* topp_state;
  // The threshold sample_logits draws at or above (top-k or top-p), or null: none.
  float* sample_threshold;
};

// Launches the persistent kernel on `stream` (a cudaStream_t) with `num_blocks` blocks
// (0: one per SM of the current device). Throws std::runtime_error on an unsupported shape,
// a non-sm_90 device, or when the blocks cannot all be resident.
void launch_megakernel(const KernelParams& params, int num_blocks, void* stream);

// Throws std::runtime_error("megakernel: <what>: <CUDA's message>") on a failed runtime
// call. The runtime also keeps that error as the thread's last error, and torch's next
// kernel launch checks cudaGetLastError(): without the clear here a caught refusal (the
// engine keeps working) would resurface from an unrelated torch op. Sticky errors (a
// faulted context) survive the clear, as they must.
void check(cudaError_t err, const char* what);

// Number of SMs of the current CUDA device.
int device_sm_count();

// Throws std::runtime_error unless the current device is compute capability 9.0.
void check_device_supported();

// Whether the kernel was compiled with MEGAKERNEL_PROFILE.
bool profiling_compiled();

}  // namespace mk
