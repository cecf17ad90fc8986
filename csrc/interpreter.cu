// The persistent megakernel: one block per SM interprets the decode step's instruction
// stream (scheduler/program.py) until the stream is exhausted.
//
// Roles. kComputeWarps warps execute ops (csrc/ops/<opcode>.cuh; o_proj_residual,
// down_proj_residual and rms_lm_head share row_pair_matvec.cuh). One controller warp:
//   - claims instructions with atomicAdd on queue[0], in the stream's topological order,
//     one instruction ahead: while the block runs instruction i, the controller has already
//     claimed i+1 and copied its 32 words into the other shared-memory slot; once i has
//     signalled, it issues L2 prefetches of i+1's first weight bytes (weights depend on
//     no counter);
//   - while an instruction runs, issues the L2 prefetch of a later instruction's weights
//     it carries, if any (scheduler/program.py puts them where the memory system idles);
//   - before an instruction runs, spins (lane 0) on its waits with ld.acquire.gpu until
//     counter >= target * epoch, bounded by the %globaltimer watchdog;
//   - after the compute warps wrote its outputs, signals its counter with red.release.gpu.
// Per instruction every thread passes two block barriers:
//   controller: [lane 0 waits] A [claim + fetch next] B [lane 0 signals, L2-prefetch next]
//   compute:    [op: dependency-free work, e.g. norm gains -> smem] A [op proper] B
// Barrier A is inside the op (OpContext::ready), so work that needs no activation overlaps
// the wait. Acquire-then-barrier and barrier-then-release carry the producers' writes to
// the consumers' threads (the CTA semaphore pattern), so no extra fences are needed.
//
// Queue head and counters need no reset between launches: launch `epoch` (1-based) makes
// exactly N + gridDim.x claims (each block stops after its first claim past the end), so
// the instruction of claim c is c - (epoch - 1) * (N + gridDim.x). Counters only grow.
//
// Errors: the first failing block writes the error record (atomicCAS on its code word);
// the non-zero code is the abort flag every spinning block polls, so all blocks exit.
// The last block to finish writes step_result: the last step's next_token, or -code after
// an error, and every step's token and the error code into mapped host memory
// (host_status) for a sync-free read and check.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "instruction_layout.h"
#include "launcher.h"
#include "ops/argmax_reduce.cuh"
#include "ops/attention_partial.cuh"
#include "ops/attention_reduce.cuh"
#include "ops/embed.cuh"
#include "ops/rms_gate_up_silu.cuh"
#include "ops/row_pair_matvec.cuh"
#include "ops/rms_qkv_rope.cuh"
#include "ops/sample_logits.cuh"
#include "ops/topk_sampling.cuh"
#include "ops/topp_sampling.cuh"

namespace mk {
namespace {

constexpr int kNoInstruction = -1;  // the slot holds the claim past the end: stop
constexpr int kMaxDevices = 64;     // per-device caches of launch checks

static_assert(kInstructionWords == kWarpSize, "the controller warp fetches one word per lane");
static_assert(kMaxWaits == 2, "header has two waits");
static_assert(word::kWait1Counter == word::kWait0Counter + 2, "wait pairs are adjacent");

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t load_acquire(const uint64_t* ptr) {
  uint64_t v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ void signal_release(uint64_t* ptr) {
  asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(ptr) : "memory");
}

__device__ __forceinline__ int64_t load_volatile(const int64_t* ptr) {
  return *reinterpret_cast<const volatile int64_t*>(ptr);
}

__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
}

// Writes the error record unless another error was recorded first. Returns nothing: the
// non-zero code is the abort flag.
__device__ void record_error(const KernelParams& p, int64_t code, int index, const int* words,
                             int64_t counter, int64_t seen, int64_t target) {
  auto* code_word = reinterpret_cast<unsigned long long*>(p.error_record + kErrCode);
  if (atomicCAS(code_word, 0ull, static_cast<unsigned long long>(code)) != 0ull) return;
  p.error_record[kErrInstruction] = index;
  p.error_record[kErrOpcode] = words[word::kOpcode];
  p.error_record[kErrLayer] = words[word::kLayer];
  p.error_record[kErrCounter] = counter;
  p.error_record[kErrSeen] = seen;
  p.error_record[kErrTarget] = target;
  p.error_record[kErrBlock] = blockIdx.x;
  __threadfence();
}

// The last counter value this block's controller saw satisfy a wait. Counters only grow,
// so a wait on the same counter for no more than that value holds without a load: the
// second block of a stage on an SM (e.g. two waves of down_proj) starts without an L2
// round trip. The earlier acquire load, program order and barrier A still order the
// producers' writes before the op's reads. Kept in shared memory (only the leader touches
// it): registers live across the whole loop cost the ops spills.
struct SeenCounter {
  int counter;
  uint64_t value;
};

// Controller lane 0: checks what the instruction needs from the step's inputs, then spins on
// its waits. Returns false when the block must stop (error recorded here or elsewhere).
__device__ bool controller_ready(const KernelParams& p, int index, const int* words,
                                 SeenCounter& seen_counter) {
  const int op = words[word::kOpcode];
  if (op <= kOpNone || op >= kNumOpcodes) {
    record_error(p, kErrBadOpcode, index, words, -1, op, kNumOpcodes);
    return false;
  }
  // Only single-token instructions are implemented: refuse rather than compute wrongly.
  const int tb = words[word::kTokenBegin], tc = words[word::kTokenCount];
  if (tc != 1 || tb < 0 || tb + tc > p.num_tokens) {
    record_error(p, kErrUnsupportedTokens, index, words, -1, tc, 1);
    return false;
  }
  if (op == kOpRmsQkvRope || op == kOpAttentionPartial) {
    const int pos = step_position(p, tb);
    const int limit = position_limit(p);
    if (pos < 0 || pos >= limit) {
      record_error(p, kErrBadPosition, index, words, -1, pos, limit);
      return false;
    }
  }
  for (int w = 0; w < kMaxWaits; ++w) {
    const int counter = words[word::kWait0Counter + 2 * w];
    if (counter == kNoCounter) continue;
    const uint64_t goal = static_cast<uint64_t>(words[word::kWait0Target + 2 * w]) * p.epoch;
    if (counter < 0 || counter >= p.num_counters) {
      record_error(p, kErrBadCounter, index, words, counter, -1, p.num_counters);
      return false;
    }
    if (counter == seen_counter.counter && goal <= seen_counter.value) continue;
    uint64_t seen = load_acquire(p.counters + counter);
    if (seen < goal) {
      const uint64_t start = global_timer_ns();
      while (true) {
        seen = load_acquire(p.counters + counter);
        if (seen >= goal) break;
        if (load_volatile(p.error_record + kErrCode) != 0) return false;
        if (global_timer_ns() - start > static_cast<uint64_t>(p.timeout_ns)) {
          record_error(p, kErrTimeout, index, words, counter, static_cast<int64_t>(seen),
                       static_cast<int64_t>(goal));
          return false;
        }
      }
    }
    seen_counter.counter = counter;
    seen_counter.value = seen;
  }
  // After the waits: a chained step's token is the argmax of the step before it.
  if (op == kOpEmbed) {
    const int64_t token = step_token(p, tb);
    if (token < 0 || token >= p.vocab_size) {
      record_error(p, kErrBadToken, index, words, -1, token, p.vocab_size);
      return false;
    }
  }
  // The acquire loads, then the block barrier the compute warps pass in ctx.ready(), make
  // the producers' writes visible to them (the same pattern as a CTA-wide semaphore wait).
  return true;
}

// Weight runs an instruction streams, for the L2 prefetch: up to kMaxWeightRuns
// contiguous runs (gate_up's gate and up rows; rms_qkv_rope's lo and hi rows of the
// block's pairs in its first head).
constexpr int kMaxWeightRuns = 2;
struct WeightRuns {
  const void* ptr[kMaxWeightRuns];
  uint32_t bytes[kMaxWeightRuns];
};

// The runs of rows [r0, r0 + n) of layer l's weights of a row-block op (one whose
// OpSpec streams_weight_rows); none for another opcode or rows out of range.
__device__ WeightRuns row_block_runs(const KernelParams& p, int op, int64_t l, int64_t r0,
                                     int64_t n) {
  WeightRuns r = {};
  const int64_t I = p.intermediate_size;
  const int64_t rows = op == kOpRmsGateUpSilu ? I : op == kOpRmsLmHead ? p.vocab_size
                                                                        : p.hidden_size;
  const int64_t layers = op == kOpRmsLmHead ? 1 : p.num_layers;
  if (l < 0 || l >= layers || r0 < 0 || n < 1 || r0 + n > rows) return r;
  const LayerRows w = layer_rows(p, op, l);
  if (w.rows == nullptr) return r;
  r.ptr[0] = w.rows + r0 * w.row_elems;
  r.bytes[0] = static_cast<uint32_t>(n * w.row_elems * 2);
  if (op == kOpRmsGateUpSilu) {  // the up rows, I rows after the gate rows
    r.ptr[1] = w.rows + (I + r0) * w.row_elems;
    r.bytes[1] = r.bytes[0];
  }
  return r;
}

__device__ WeightRuns weight_runs(const KernelParams& p, const int* words) {
  const int op = words[word::kOpcode];
  const int64_t l = words[word::kLayer];
  switch (op) {
    case kOpRmsQkvRope: {
      WeightRuns r = {};
      const int64_t H = p.hidden_size;
      const int hd = p.head_dim, half = hd / 2;
      const int head = words[rms_qkv_rope::kHead], p0 = words[rms_qkv_rope::kPairBegin];
      const int pairs = min(words[rms_qkv_rope::kPairCount], half - p0);
      const int64_t qkv_rows = static_cast<int64_t>(p.num_heads + 2 * p.num_kv_heads) * hd;
      const __nv_bfloat16* lo = bf16_ptr(p.qkv) + (l * qkv_rows + head * hd + p0) * H;
      r.ptr[0] = lo;
      r.ptr[1] = lo + half * H;
      r.bytes[0] = r.bytes[1] = static_cast<uint32_t>(pairs * H * 2);
      return r;
    }
    default:  // none for an opcode that streams no weight rows
      return row_block_runs(p, op, l, words[row_block::kRowBegin], words[row_block::kRowCount]);
  }
}

// Bytes [begin, end) of a weight run into L2, in pieces of at most kPrefetchPiece.
__device__ void prefetch_run(const void* run, uint32_t begin, uint32_t end) {
  const char* ptr = static_cast<const char*>(run);
  for (uint32_t off = begin; off < end; off += kPrefetchPiece)
    prefetch_l2(ptr + off, min(kPrefetchPiece, end - off));
}

// Controller warp: prefetch the first p.prefetch_bytes of the weight runs of the
// instruction in `slot_words` (none for the claim past the end) into L2. Issued once the
// instruction before it has signalled, in the hand-over between stages, not at the claim:
// between the claim and the signal the prefetch's DRAM-to-L2 traffic slowed the running
// op's own loads by more than it saved the next op (benchmarks/RESULTS.md, entry 25).
__device__ void prefetch_weights(const KernelParams& p, const int* slot_words,
                                 int slot_index) {
  const int lane = threadIdx.x % kWarpSize;
  if (slot_index != kNoInstruction && lane < kMaxWeightRuns) {
    const WeightRuns runs = weight_runs(p, slot_words);
    // The instruction's prefetch budget is shared by its runs, in whole 16-byte units.
    int num_runs = 0;
    for (int i = 0; i < kMaxWeightRuns; ++i) num_runs += runs.bytes[i] > 0;
    const uint32_t share = p.prefetch_bytes / max(num_runs, 1);
    prefetch_run(runs.ptr[lane], 0, min(runs.bytes[lane], share) & ~15u);
  }
}

// Controller warp, between barriers A and B: the L2 prefetch the running instruction
// carries (its l2_prefetch trailer, chosen by the scheduler), a later instruction's
// weights brought into L2 while this one leaves the memory system room.
__device__ void prefetch_carried(const KernelParams& p, const int* words) {
  static_assert(l2_prefetch::kRun0End == l2_prefetch::kRun0Begin + 1 &&
                    l2_prefetch::kRun1Begin == l2_prefetch::kRun0Begin + 2 &&
                    l2_prefetch::kRun1End == l2_prefetch::kRun0Begin + 3,
                "lane r reads run r's [begin, end) pair");
  const int lane = threadIdx.x % kWarpSize;
  if (lane >= kMaxWeightRuns) return;
  const int begin = words[l2_prefetch::kRun0Begin + 2 * lane];
  const int end = words[l2_prefetch::kRun0End + 2 * lane];
  if (end <= begin || begin < 0) return;
  const WeightRuns runs =
      row_block_runs(p, words[l2_prefetch::kOpcode], words[l2_prefetch::kLayer],
                     words[l2_prefetch::kRowBegin], words[l2_prefetch::kRowCount]);
  const uint32_t run_end = min(runs.bytes[lane], static_cast<uint32_t>(end)) & ~15u;
  prefetch_run(runs.ptr[lane], static_cast<uint32_t>(begin) & ~15u, run_end);
}

// Controller warp: claim the next instruction and copy its words into `slot_words`.
__device__ void controller_fetch(const KernelParams& p, uint64_t claim_base, int* slot_words,
                                 int* slot_index) {
  const int lane = threadIdx.x % kWarpSize;
  int index = 0;
  if (lane == 0) {
    const uint64_t claim = atomicAdd(reinterpret_cast<unsigned long long*>(p.queue), 1ull);
    const int64_t local = static_cast<int64_t>(claim - claim_base);
    index = (local >= 0 && local < p.num_instructions) ? static_cast<int>(local) : kNoInstruction;
  }
  index = __shfl_sync(0xffffffffu, index, 0);
  if (lane == 0) *slot_index = index;
  if (index == kNoInstruction) return;
  const int word = __ldg(p.instructions + static_cast<int64_t>(index) * kInstructionWords + lane);
  slot_words[lane] = word;
  __syncwarp();
}

// The sampling ops, compiled only into the sampling instance.
__device__ __forceinline__ bool run_sampling_op(const OpContext& ctx) {
  switch (ctx.words[word::kOpcode]) {
    case kOpSampleLogits: return op_sample_logits(ctx);
    case kOpTopkPartial: return op_topk_partial(ctx);
    case kOpTopkThreshold: return op_topk_threshold(ctx);
    case kOpToppHistogram: return op_topp_histogram(ctx);
    case kOpToppSelect: return op_topp_select(ctx);
    default: return ctx.ready<kOpNone>();
  }
}

// Compute warps: runs the op, which passes the block barrier (ctx.ready()) once the
// controller has seen its waits hold. Returns false when the block must stop.
//
// kSampling: the kernel's instance for launches that sample (KernelParams:
// sample_inv_temperature > 0), the only one with the sampling ops' code. Greedy launches
// run an instance without it: code that greedy steps never run still slowed them by 2 us
// per token at 8 steps per launch and 7 at one, by where it put theirs
// (benchmarks/RESULTS.md, entry 51). There a sample_logits instruction does nothing, which
// leaves the LM head's greedy partial argmax in its slot: what the op itself writes at
// inv_temperature 0 (and the top-k or top-p stages before it then matter to nothing).
template <bool kSampling>
__device__ bool run_op(const OpContext& ctx) {
  switch (ctx.words[word::kOpcode]) {
    case kOpEmbed: return op_embed(ctx);
    case kOpRmsQkvRope: return op_rms_qkv_rope(ctx);
    case kOpAttentionPartial: return op_attention_partial(ctx);
    case kOpAttentionReduce: return op_attention_reduce(ctx);
    case kOpRmsGateUpSilu: return op_rms_gate_up_silu(ctx);
    case kOpOProjResidual:
    case kOpDownProjResidual:
    case kOpRmsLmHead: return op_row_pair_matvec(ctx);  // one instance of code for three
    case kOpArgmaxReduce: return op_argmax_reduce(ctx);
    case kOpSampleLogits:
    case kOpTopkPartial:
    case kOpTopkThreshold:
    case kOpToppHistogram:
    case kOpToppSelect:
      if constexpr (kSampling) return run_sampling_op(ctx);
      [[fallthrough]];
    default: return ctx.ready<kOpNone>();  // refused by the controller: ready() is false
  }
}

template <bool kSampling>
__global__ void __launch_bounds__(kThreads, 1) megakernel(const __grid_constant__ KernelParams p) {
  extern __shared__ float4 dynamic_smem[];
  __shared__ int slot_words[2][kInstructionWords];
  __shared__ int slot_index[2];
  // go[slot]: 1 when the waits of the slot's instruction hold, 0: stop. One flag per slot,
  // like the instruction words, so the controller's write for the next slot never touches
  // the flag the compute warps of this slot may still be reading.
  __shared__ int go[2];
  __shared__ float scratch[kScratchFloats];
  __shared__ SeenCounter seen_counter;  // the controller leader's
#ifdef MEGAKERNEL_PROFILE
  __shared__ int64_t op_end_ns[2];  // per slot: when compute warp 0 finished the op
#endif

  const bool controller = threadIdx.x / kWarpSize == kControllerWarp;
  const bool leader = threadIdx.x == kControllerWarp * kWarpSize;
  const uint64_t claim_base =
      static_cast<uint64_t>(p.epoch - 1) * (static_cast<uint64_t>(p.num_instructions) + gridDim.x);

  if (leader) seen_counter = {kNoCounter, 0};
  if (controller) {
    controller_fetch(p, claim_base, slot_words[0], &slot_index[0]);
    prefetch_weights(p, slot_words[0], slot_index[0]);
  }
  block_sync();

  const uint64_t policy = evict_first_policy();
  // Per instruction, every thread passes two block barriers: A (waits hold; inside
  // ctx.ready() for the compute warps) and B (outputs written), unless it stops after A.
  for (int slot = 0;; slot ^= 1) {
    const int index = slot_index[slot];
    const int* words = slot_words[slot];
    if (controller) {
#ifdef MEGAKERNEL_PROFILE
      int64_t t_start = 0, t_ready = 0;
      if (leader && p.profile != nullptr) t_start = static_cast<int64_t>(global_timer_ns());
#endif
      if (leader)
        go[slot] = index != kNoInstruction && controller_ready(p, index, words, seen_counter);
#ifdef MEGAKERNEL_PROFILE
      if (leader && p.profile != nullptr) t_ready = static_cast<int64_t>(global_timer_ns());
#endif
      block_sync();  // A
      if (!go[slot]) break;
      controller_fetch(p, claim_base, slot_words[slot ^ 1], &slot_index[slot ^ 1]);
      prefetch_carried(p, words);
      block_sync();  // B: every output of the instruction is written
#ifdef MEGAKERNEL_PROFILE
      int64_t t_passed_b = 0;
      if (leader && p.profile != nullptr) t_passed_b = static_cast<int64_t>(global_timer_ns());
#endif
      if (leader) {
        const int counter = words[word::kSignalCounter];
        if (counter >= 0 && counter < p.num_counters) signal_release(p.counters + counter);
#ifdef MEGAKERNEL_PROFILE
        if (p.profile != nullptr) {
          int64_t* rec = p.profile + static_cast<int64_t>(index) * kProfileWords;
          unsigned smid;
          asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
          rec[0] = smid;
          rec[1] = blockIdx.x;
          rec[2] = words[word::kOpcode];
          rec[3] = words[word::kLayer];
          rec[4] = t_start;
          rec[5] = t_ready;
          rec[6] = static_cast<int64_t>(global_timer_ns());
          rec[7] = index;
          rec[8] = op_end_ns[slot];
          rec[9] = t_passed_b;
        }
#endif
      }
      prefetch_weights(p, slot_words[slot ^ 1], slot_index[slot ^ 1]);
    } else {
      const OpContext ctx{p, words, reinterpret_cast<float*>(dynamic_smem), scratch,
                          &go[slot], policy, words[word::kTokenBegin]};
      const bool ran =
          index != kNoInstruction ? run_op<kSampling>(ctx) : ctx.ready<kNumOpcodes>();
      if (!ran) break;
#ifdef MEGAKERNEL_PROFILE
      if (threadIdx.x == 0) op_end_ns[slot] = static_cast<int64_t>(global_timer_ns());
#endif
      block_sync();  // B
    }
  }

  // The last block to finish publishes the launch's results: each step's greedy token, or
  // -code after an error.
  if (leader) {
    __threadfence();
    const uint64_t done = atomicAdd(reinterpret_cast<unsigned long long*>(p.queue + 1), 1ull);
    if (done + 1 == static_cast<uint64_t>(p.epoch) * gridDim.x) {
      __threadfence();
      const int64_t code = load_volatile(p.error_record + kErrCode);
      const int steps = min(p.num_tokens, kMaxLaunchSteps);
      auto result = [&](int t) {
        return code != 0 ? -code : static_cast<int64_t>(__ldcg(p.next_token + t));
      };
      if (p.step_result != nullptr) p.step_result[0] = result(p.num_tokens - 1);
      if (p.host_status != nullptr) {
        volatile int64_t* status = p.host_status;
        volatile int64_t* slot =
            status + kHostResultWord + ((p.epoch - 1) % kHostResultSlots) * kMaxLaunchSteps;
        for (int t = 0; t < steps; ++t) slot[t] = result(t);
        status[0] = code;
        status[1] = p.epoch;
        __threadfence_system();
      }
    }
  }
}

size_t dynamic_smem_bytes(const KernelParams& p) {
  // Mat-vec ops: the staged input vector (+ 2 * head_dim outputs for rms_qkv_rope).
  // o_proj / down_proj: the staged input vector and the block's residual rows (<= H).
  const size_t vec = static_cast<size_t>(std::max(p.intermediate_size, p.num_heads * p.head_dim)) +
                     static_cast<size_t>(p.hidden_size);
  // Mat-vec ops with a fused RMSNorm: the gained vector and the gain, + 2 * head_dim outputs.
  const size_t norm = 2 * static_cast<size_t>(p.hidden_size) + 2 * p.head_dim;
  // attention_partial: q, the warps' softmax states, then their K/V rings.
  const size_t attn = attention_smem_floats_before_rings(p.head_dim) +
                      static_cast<size_t>(kComputeWarps) * kAttnRingBytes / sizeof(float);
  // The sampling ops: the radix selections' histograms, then topk_threshold's candidates
  // (ops/topk_sampling.cuh, ops/topp_sampling.cuh); below the attention's need for every
  // model, counted all the same.
  const size_t radix =
      static_cast<size_t>(std::max(kTopkSmemBytes, kToppSmemBytes)) / sizeof(float) +
      static_cast<size_t>(p.lm_head_blocks) * kMaxSampleTopK;
  return std::max({vec, norm, attn, radix}) * sizeof(float);
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::runtime_error("megakernel: " + msg);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw std::runtime_error(std::string("megakernel: ") + what + ": " + cudaGetErrorString(err));
}

void check_device_supported() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  // cudaGetDeviceProperties is slow: check each device once (launches call this per step).
  static bool checked[kMaxDevices] = {};
  if (device < kMaxDevices && checked[device]) return;
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  require(prop.major == 9 && prop.minor == 0,
          std::string("the kernel is built for sm_90a only (H100/H200); device '") + prop.name +
              "' is sm_" + std::to_string(prop.major) + std::to_string(prop.minor));
  if (device < kMaxDevices) checked[device] = true;
}

int device_sm_count() {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  return sms;
}

bool profiling_compiled() {
#ifdef MEGAKERNEL_PROFILE
  return true;
#else
  return false;
#endif
}

void launch_megakernel(const KernelParams& p, int num_blocks, void* stream) {
  require(p.head_dim == 64 || p.head_dim == 128,
          "head_dim " + std::to_string(p.head_dim) + " is not supported (64 or 128)");
  require(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
              p.num_heads / p.num_kv_heads <= kMaxGroup,
          "query heads per KV head must divide evenly and be at most " +
              std::to_string(kMaxGroup));
  require(p.hidden_size % kChunkElems == 0 && p.intermediate_size % kChunkElems == 0,
          "hidden_size and intermediate_size must be multiples of 8 (16-byte weight rows)");
  require(p.epoch >= 1, "epoch must be >= 1");
  require(p.num_instructions >= 1, "empty program");
  const void* vectors[] = {p.embed, p.qkv, p.o_proj, p.gate_up, p.down, p.lm_head,
                           p.hidden, p.q, p.attn_out, p.mlp_act, p.k_cache, p.v_cache};
  for (const void* ptr : vectors)
    require(aligned16(ptr), "weights, caches and activations must be 16-byte aligned");

  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  const int sms = device_sm_count();
  const int blocks = num_blocks > 0 ? num_blocks : sms;
  const size_t smem = dynamic_smem_bytes(p);
  const bool sampling = p.sample_inv_temperature > 0.0f;
  void (*kernel)(KernelParams) = sampling ? megakernel<true> : megakernel<false>;
  // Setting the shared-memory limit and asking for the occupancy cost microseconds: done
  // again only when a launch needs more shared memory than any before it on this device
  // (per instance of the kernel).
  static size_t configured_smem[2][kMaxDevices] = {};
  static int blocks_per_sm[2][kMaxDevices] = {};
  int per_sm = device < kMaxDevices && smem <= configured_smem[sampling][device]
                   ? blocks_per_sm[sampling][device]
                   : 0;
  if (per_sm == 0) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          "cudaFuncSetAttribute(max dynamic shared memory)");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (device < kMaxDevices && per_sm >= 1) {
      configured_smem[sampling][device] = smem;
      blocks_per_sm[sampling][device] = per_sm;
    }
  }
  require(per_sm >= 1 && blocks <= per_sm * sms,
          "the persistent kernel needs all " + std::to_string(blocks) +
              " blocks resident, but only " + std::to_string(per_sm) + " per SM x " +
              std::to_string(sms) + " SMs fit (" + std::to_string(smem) +
              " bytes of dynamic shared memory)");
  kernel<<<blocks, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace mk
