// Torch binding of the persistent kernel: checks tensors, fills the plain KernelParams and
// calls the launcher on the current stream. All torch glue lives here so the .cu files
// compile without torch headers.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "instruction_layout.h"
#include "launcher.h"
#include "prefill_ops.h"
#include "read_probe.h"

namespace {

// Argument checks raise RuntimeError (std::runtime_error through pybind11). Their message
// is built from std::string and std::to_string, never an ostream: with torch
// 2.11.0+cu130 and g++ 13.3 on an H100 machine, formatting an integer through an
// std::ostringstream in this module (as TORCH_CHECK does) segfaulted, while a check whose
// message held only strings raised as it should.
std::string text(const char* s) { return s; }
std::string text(const std::string& s) { return s; }
std::string text(const c10::Device& d) { return d.str(); }
std::string text(at::ScalarType t) { return c10::toString(t); }
template <typename Int, typename = std::enable_if_t<std::is_integral_v<Int>>>
std::string text(Int v) { return std::to_string(v); }

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw std::runtime_error((std::string() + ... + text(parts)));
}

#define MK_CHECK(cond, ...)          \
  do {                               \
    if (!(cond)) fail(__VA_ARGS__);  \
  } while (0)

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim,
                  const at::Device& device) {
  MK_CHECK(t.is_cuda(), "megakernel: '", name, "' must be a CUDA tensor");
  MK_CHECK(t.device() == device, "megakernel: '", name, "' is on ", t.device(),
           ", expected ", device);
  MK_CHECK(t.scalar_type() == dtype, "megakernel: '", name, "' has dtype ", t.scalar_type(),
           ", expected ", dtype);
  MK_CHECK(dim < 0 || t.dim() == dim, "megakernel: '", name, "' must have ", dim,
           " dimensions, got ", t.dim());
  MK_CHECK(t.is_contiguous(), "megakernel: '", name, "' must be contiguous");
}

// Torch's current stream on `device`: every launch here goes on it.
cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

int as_int(int64_t v, const char* what) {
  MK_CHECK(v >= 0 && v <= INT32_MAX, "megakernel: ", what, " out of range: ", v);
  return static_cast<int>(v);
}

// Launches the program once, all its steps (all tensors on one CUDA device, current stream).
// Mutated: counters, queue, error_record, step_result, profile, host_status, the activations
// (hidden ... next_token) and k_cache / v_cache. The steps' tokens: step_input [2, T]
// (token ids, then positions) or, without it, `steps` chained decode steps at positions
// `position` + t: the first step's token token_source (a device int64, read by the
// kernel) or else `token`, every later step's the greedy token of the step before.
void launch(const at::Tensor& instructions, at::Tensor counters, at::Tensor queue,
            at::Tensor error_record, std::optional<at::Tensor> step_result,
            std::optional<at::Tensor> profile, std::optional<at::Tensor> host_status,
            const std::optional<at::Tensor>& step_input, at::Tensor hidden,
            at::Tensor q, at::Tensor attn_partial_out, at::Tensor attn_partial_lse,
            at::Tensor attn_out, at::Tensor mlp_act, at::Tensor logits, at::Tensor argmax_value,
            at::Tensor argmax_index, at::Tensor next_token, const at::Tensor& embed,
            const at::Tensor& attn_norm, const at::Tensor& qkv, const at::Tensor& o_proj,
            const at::Tensor& mlp_norm, const at::Tensor& gate_up, const at::Tensor& down,
            const at::Tensor& final_norm, const at::Tensor& lm_head, const at::Tensor& rope_cos,
            const at::Tensor& rope_sin, at::Tensor k_cache, at::Tensor v_cache,
            const at::Tensor& page_table, double rms_norm_eps, int64_t epoch,
            int64_t timeout_ns, int64_t num_blocks, int64_t prefetch_bytes,
            const std::optional<at::Tensor>& token_source, int64_t token, int64_t position,
            int64_t steps, double sample_inv_temperature, int64_t sample_seed,
            int64_t sample_top_k, double sample_top_p,
            const std::optional<at::Tensor>& topk_values,
            const std::optional<at::Tensor>& topk_ties,
            const std::optional<at::Tensor>& topp_hist,
            const std::optional<at::Tensor>& topp_state,
            const std::optional<at::Tensor>& sample_threshold) {
  const at::Device device = hidden.device();
  const auto f32 = at::kFloat, i32 = at::kInt, i64 = at::kLong, bf16 = at::kBFloat16;
  check_tensor(instructions, "instructions", i32, 2, device);
  MK_CHECK(instructions.size(1) == mk::kInstructionWords,
           "megakernel: instructions must be [N, ", mk::kInstructionWords, "]");
  check_tensor(counters, "counters", i64, 1, device);
  check_tensor(queue, "queue", i64, 1, device);
  MK_CHECK(queue.numel() >= mk::kQueueWords, "megakernel: queue needs ", mk::kQueueWords,
           " words");
  check_tensor(error_record, "error_record", i64, 1, device);
  MK_CHECK(error_record.numel() >= mk::kErrorWords, "megakernel: error_record needs ",
           mk::kErrorWords, " words");
  if (step_result) check_tensor(*step_result, "step_result", i64, -1, device);
  if (profile) {
    check_tensor(*profile, "profile", i64, 2, device);
    MK_CHECK(profile->size(0) >= instructions.size(0) && profile->size(1) == mk::kProfileWords,
             "megakernel: profile must be [N, ", mk::kProfileWords, "]");
  }
  int64_t* host_status_device = nullptr;
  if (host_status) {
    MK_CHECK(host_status->device().is_cpu() && host_status->scalar_type() == i64 &&
                 host_status->is_contiguous() && host_status->numel() >= mk::kHostStatusWords,
             "megakernel: host_status must be a CPU int64 tensor from alloc_host_status()");
    void* dptr = nullptr;
    mk::check(cudaHostGetDevicePointer(&dptr, host_status->data_ptr(), 0),
              "host_status is not mapped pinned memory");
    host_status_device = static_cast<int64_t*>(dptr);
  }
  if (step_input) {
    check_tensor(*step_input, "step_input", i32, 2, device);
    MK_CHECK(step_input->size(0) == 2, "megakernel: step_input must be [2, T]");
  } else {
    if (token_source) {
      check_tensor(*token_source, "token_source", i64, -1, device);
      MK_CHECK(token_source->numel() >= 1, "megakernel: token_source is empty");
    }
    MK_CHECK(steps >= 1 && steps <= mk::kMaxLaunchSteps, "megakernel: steps must be in [1, ",
             mk::kMaxLaunchSteps, "], got ", steps);
    MK_CHECK(position >= 0 && position + steps - 1 <= INT32_MAX,
             "megakernel: position out of range: ", position);
  }
  check_tensor(k_cache, "k_cache", bf16, 5, device);
  check_tensor(v_cache, "v_cache", bf16, 5, device);
  MK_CHECK(k_cache.sizes() == v_cache.sizes(), "megakernel: k_cache and v_cache differ");
  check_tensor(page_table, "page_table", i32, 2, device);
  check_tensor(qkv, "qkv", bf16, 3, device);
  check_tensor(down, "down", bf16, 3, device);
  check_tensor(lm_head, "lm_head", bf16, 2, device);

  const int64_t T = step_input ? step_input->size(1) : steps;
  const int64_t L = qkv.size(0), H = qkv.size(2), I = down.size(2), V = lm_head.size(0);
  const int64_t nkv = k_cache.size(3), hd = k_cache.size(4);
  const int64_t nq = hd > 0 ? q.size(-1) / hd : 0;
  const int64_t P = attn_partial_lse.dim() == 3 ? attn_partial_lse.size(2) : 0;
  const int64_t B = argmax_value.dim() == 2 ? argmax_value.size(1) : 0;

  check_tensor(hidden, "hidden", f32, 2, device);
  check_tensor(q, "q", f32, 2, device);
  check_tensor(attn_partial_out, "attn_partial_out", f32, 4, device);
  check_tensor(attn_partial_lse, "attn_partial_lse", f32, 3, device);
  check_tensor(attn_out, "attn_out", f32, 2, device);
  check_tensor(mlp_act, "mlp_act", f32, 2, device);
  check_tensor(logits, "logits", f32, 2, device);
  check_tensor(argmax_value, "argmax_value", f32, 2, device);
  check_tensor(argmax_index, "argmax_index", i32, 2, device);
  check_tensor(next_token, "next_token", i32, 1, device);
  MK_CHECK(hidden.sizes() == at::IntArrayRef({T, H}), "megakernel: hidden must be [T, H]");
  MK_CHECK(q.sizes() == at::IntArrayRef({T, nq * hd}) && attn_out.sizes() == q.sizes(),
           "megakernel: q and attn_out must be [T, nq * hd]");
  MK_CHECK(attn_partial_out.sizes() == at::IntArrayRef({T, nq, P, hd}),
           "megakernel: attn_partial_out must be [T, nq, P, hd]");
  MK_CHECK(attn_partial_lse.size(0) == T && attn_partial_lse.size(1) == nq,
           "megakernel: attn_partial_lse must be [T, nq, P]");
  MK_CHECK(mlp_act.sizes() == at::IntArrayRef({T, I}), "megakernel: mlp_act must be [T, I]");
  MK_CHECK(logits.sizes() == at::IntArrayRef({T, V}), "megakernel: logits must be [T, V]");
  MK_CHECK(argmax_index.sizes() == argmax_value.sizes() && argmax_value.size(0) == T,
           "megakernel: argmax buffers must be [T, B]");
  MK_CHECK(next_token.size(0) >= T, "megakernel: next_token must be [T]");

  check_tensor(embed, "embed", bf16, 2, device);
  check_tensor(attn_norm, "attn_norm", bf16, 2, device);
  check_tensor(o_proj, "o_proj", bf16, 3, device);
  check_tensor(mlp_norm, "mlp_norm", bf16, 2, device);
  check_tensor(gate_up, "gate_up", bf16, 3, device);
  check_tensor(final_norm, "final_norm", bf16, 1, device);
  check_tensor(rope_cos, "rope_cos", f32, 2, device);
  check_tensor(rope_sin, "rope_sin", f32, 2, device);
  MK_CHECK(embed.sizes() == at::IntArrayRef({V, H}), "megakernel: embed must be [V, H]");
  MK_CHECK(lm_head.size(1) == H, "megakernel: lm_head must be [V, H]");
  MK_CHECK(attn_norm.sizes() == at::IntArrayRef({L, H}) && mlp_norm.sizes() == attn_norm.sizes(),
           "megakernel: attn_norm / mlp_norm must be [L, H]");
  MK_CHECK(final_norm.size(0) == H, "megakernel: final_norm must be [H]");
  MK_CHECK(qkv.size(1) == (nq + 2 * nkv) * hd, "megakernel: qkv must be [L, (nq + 2 nkv) hd, H]");
  MK_CHECK(o_proj.sizes() == at::IntArrayRef({L, H, nq * hd}),
           "megakernel: o_proj must be [L, H, nq hd]");
  MK_CHECK(gate_up.sizes() == at::IntArrayRef({L, 2 * I, H}),
           "megakernel: gate_up must be [L, 2 I, H]");
  MK_CHECK(down.sizes() == at::IntArrayRef({L, H, I}), "megakernel: down must be [L, H, I]");
  MK_CHECK(rope_cos.size(1) == hd / 2 && rope_sin.sizes() == rope_cos.sizes(),
           "megakernel: rope tables must be [max_positions, hd / 2]");
  MK_CHECK(k_cache.size(0) == L, "megakernel: KV cache must have one entry per layer");

  mk::KernelParams p{};
  p.instructions = ptr<const int32_t>(instructions);
  p.num_instructions = as_int(instructions.size(0), "instruction count");
  p.counters = reinterpret_cast<uint64_t*>(counters.data_ptr());
  p.num_counters = as_int(counters.numel(), "counter count");
  p.queue = reinterpret_cast<uint64_t*>(queue.data_ptr());
  p.error_record = ptr<int64_t>(error_record);
  p.step_result = step_result ? ptr<int64_t>(*step_result) : nullptr;
  p.profile = profile ? ptr<int64_t>(*profile) : nullptr;
  p.host_status = host_status_device;
  p.epoch = epoch;
  p.timeout_ns = timeout_ns;
  p.prefetch_bytes = static_cast<uint32_t>(as_int(prefetch_bytes, "prefetch_bytes"));
  p.step_input = step_input ? ptr<const int32_t>(*step_input) : nullptr;
  p.num_tokens = as_int(T, "token count");
  p.step_token_source = !step_input && token_source ? ptr<const int64_t>(*token_source) : nullptr;
  p.step_token = token;
  p.step_position = step_input ? 0 : static_cast<int>(position);
  MK_CHECK(sample_inv_temperature >= 0.0 && std::isfinite(sample_inv_temperature),
           "megakernel: sample_inv_temperature must be finite and >= 0, got ",
           std::to_string(sample_inv_temperature));
  p.sample_inv_temperature = static_cast<float>(sample_inv_temperature);
  p.sample_seed = static_cast<uint64_t>(sample_seed);
  MK_CHECK(sample_top_k >= 0 && sample_top_k <= mk::kMaxSampleTopK,
           "megakernel: sample_top_k must be in [0, ", mk::kMaxSampleTopK, "], got ",
           sample_top_k);
  MK_CHECK(sample_top_p > 0.0 && sample_top_p <= 1.0,
           "megakernel: sample_top_p must be in (0, 1], got ", std::to_string(sample_top_p));
  const bool top_k = sample_top_k > 0, top_p = sample_top_p < 1.0;
  MK_CHECK(!(top_k || top_p) || (sample_inv_temperature > 0.0 && sample_threshold),
           "megakernel: top-k or top-p sampling needs sample_inv_temperature > 0 and "
           "sample_threshold");
  p.sample_top_k = static_cast<int>(sample_top_k);
  p.sample_top_p = static_cast<float>(sample_top_p);
  p.topk_values = nullptr;
  p.topk_ties = nullptr;
  p.topp_hist = nullptr;
  p.topp_state = nullptr;
  p.sample_threshold = nullptr;
  if (top_k || top_p) {
    check_tensor(*sample_threshold, "sample_threshold", f32, 1, device);
    MK_CHECK(sample_threshold->size(0) >= T, "megakernel: sample_threshold must be [T]");
    p.sample_threshold = ptr<float>(*sample_threshold);
  }
  if (top_k) {
    MK_CHECK(topk_values && topk_ties,
             "megakernel: top-k sampling needs topk_values and topk_ties");
    check_tensor(*topk_values, "topk_values", f32, 2, device);
    check_tensor(*topk_ties, "topk_ties", i32, 2, device);
    MK_CHECK(topk_values->sizes() == at::IntArrayRef({T, B * mk::kMaxSampleTopK}) &&
                 topk_ties->sizes() == at::IntArrayRef({T, B}),
             "megakernel: topk_values must be [T, B * ", mk::kMaxSampleTopK,
             "] and topk_ties [T, B]");
    p.topk_values = ptr<float>(*topk_values);
    p.topk_ties = ptr<int32_t>(*topk_ties);
  } else if (top_p) {  // with top-k, topk_threshold takes the nucleus among the top k
    MK_CHECK(topp_hist && topp_state, "megakernel: top-p sampling needs topp_hist and topp_state");
    check_tensor(*topp_hist, "topp_hist", i64, 2, device);
    check_tensor(*topp_state, "topp_state", at::kDouble, 2, device);
    MK_CHECK(topp_hist->sizes() == at::IntArrayRef({T, 4 * 256}) &&
                 topp_state->sizes() == at::IntArrayRef({T, 4}),
             "megakernel: topp_hist must be [T, 4 * 256] and topp_state [T, 4]");
    p.topp_hist = reinterpret_cast<unsigned long long*>(ptr<int64_t>(*topp_hist));
    p.topp_state = ptr<double>(*topp_state);
  }
  p.hidden = ptr<float>(hidden);
  p.q = ptr<float>(q);
  p.attn_partial_out = ptr<float>(attn_partial_out);
  p.attn_partial_lse = ptr<float>(attn_partial_lse);
  p.attn_out = ptr<float>(attn_out);
  p.mlp_act = ptr<float>(mlp_act);
  p.logits = ptr<float>(logits);
  p.argmax_value = ptr<float>(argmax_value);
  p.argmax_index = ptr<int32_t>(argmax_index);
  p.next_token = ptr<int32_t>(next_token);
  p.attn_partitions = as_int(P, "attention partitions");
  p.lm_head_blocks = as_int(B, "LM-head blocks");
  p.embed = embed.data_ptr();
  p.attn_norm = attn_norm.data_ptr();
  p.qkv = qkv.data_ptr();
  p.o_proj = o_proj.data_ptr();
  p.mlp_norm = mlp_norm.data_ptr();
  p.gate_up = gate_up.data_ptr();
  p.down = down.data_ptr();
  p.final_norm = final_norm.data_ptr();
  p.lm_head = lm_head.data_ptr();
  p.rope_cos = ptr<const float>(rope_cos);
  p.rope_sin = ptr<const float>(rope_sin);
  p.rope_max_positions = as_int(rope_cos.size(0), "RoPE positions");
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.page_table = ptr<const int32_t>(page_table);
  p.num_pages = as_int(k_cache.size(1), "page count");
  p.page_size = as_int(k_cache.size(2), "page size");
  p.max_pages = as_int(page_table.size(1), "pages per sequence");
  p.num_layers = as_int(L, "layers");
  p.hidden_size = as_int(H, "hidden size");
  p.intermediate_size = as_int(I, "intermediate size");
  p.vocab_size = as_int(V, "vocab size");
  p.num_heads = as_int(nq, "query heads");
  p.num_kv_heads = as_int(nkv, "KV heads");
  p.head_dim = as_int(hd, "head_dim");
  p.rms_norm_eps = static_cast<float>(rms_norm_eps);

  const c10::cuda::CUDAGuard guard(device);
  mk::check_device_supported();
  mk::launch_megakernel(p, as_int(num_blocks, "num_blocks"), current_stream(device));
}

// The prompt prefill's fused kernels (prefill_ops.h), on the tensors' device and its
// current stream. Shapes are checked here; page indices are device data, skipped by the
// kernel when outside the cache.

void prefill_rope_append(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& page_table_row, int64_t start,
                         at::Tensor k_cache_layer, at::Tensor v_cache_layer, at::Tensor q_out,
                         at::Tensor k_out, const c10::optional<at::Tensor>& start_on_device) {
  const auto device = qkv.device();
  const auto bf16 = at::ScalarType::BFloat16;
  check_tensor(q_out, "q_out", bf16, 3, device);
  check_tensor(k_cache_layer, "k_cache_layer", bf16, 4, device);
  check_tensor(v_cache_layer, "v_cache_layer", bf16, 4, device);
  const int64_t T = q_out.size(0), nq = q_out.size(1), hd = q_out.size(2);
  const int64_t pages = k_cache_layer.size(0), page_size = k_cache_layer.size(1),
                nkv = k_cache_layer.size(2);
  check_tensor(qkv, "qkv", bf16, 2, device);
  MK_CHECK(qkv.size(0) == T && qkv.size(1) == (nq + 2 * nkv) * hd,
           "megakernel: 'qkv' must be [", T, ", ", (nq + 2 * nkv) * hd, "]");
  MK_CHECK(k_cache_layer.size(3) == hd && v_cache_layer.sizes() == k_cache_layer.sizes(),
           "megakernel: the cache layers must be [pages, page_size, ", nkv, ", ", hd, "]");
  MK_CHECK(hd % 2 == 0, "megakernel: head_dim must be even, got ", hd);
  check_tensor(k_out, "k_out", bf16, 3, device);
  MK_CHECK(k_out.size(0) == T && k_out.size(1) == nkv && k_out.size(2) == hd,
           "megakernel: 'k_out' must be [", T, ", ", nkv, ", ", hd, "]");
  for (const auto* table : {&cos, &sin}) {
    check_tensor(*table, "rope table", at::ScalarType::Float, 2, device);
    MK_CHECK(table->size(0) == T && table->size(1) == hd / 2,
             "megakernel: the RoPE tables must be [", T, ", ", hd / 2, "]");
  }
  check_tensor(page_table_row, "page_table_row", at::ScalarType::Int, 1, device);
  const int64_t* device_start = nullptr;
  if (start_on_device.has_value()) {
    // Read by the kernel: positions past the table are skipped there.
    check_tensor(*start_on_device, "start_on_device", at::ScalarType::Long, 1, device);
    MK_CHECK(start_on_device->numel() == 1, "megakernel: 'start_on_device' must hold one value");
    device_start = start_on_device->data_ptr<int64_t>();
  } else {
    MK_CHECK(start >= 0 && (T == 0 || (start + T - 1) / page_size < page_table_row.size(0)),
             "megakernel: positions [", start, ", ", start + T, ") are past the page table");
  }
  const c10::cuda::CUDAGuard guard(device);
  mk::launch_rope_append(qkv.data_ptr(), ptr<const float>(cos), ptr<const float>(sin),
                         ptr<const int32_t>(page_table_row),
                         as_int(page_table_row.size(0), "page table length"),
                         as_int(start, "start"), device_start, as_int(page_size, "page size"), as_int(pages, "page count"),
                         k_cache_layer.data_ptr(), v_cache_layer.data_ptr(), q_out.data_ptr(),
                         k_out.data_ptr(), as_int(T, "tokens"), as_int(nq, "query heads"),
                         as_int(nkv, "KV heads"), as_int(hd, "head_dim"),
                         current_stream(device));
  mk::check(cudaGetLastError(), "rope_append launch");
}

void prefill_silu_mul(const at::Tensor& gate_up, at::Tensor out) {
  const auto device = gate_up.device();
  check_tensor(gate_up, "gate_up", at::ScalarType::BFloat16, 2, device);
  check_tensor(out, "out", at::ScalarType::BFloat16, 2, device);
  MK_CHECK(out.size(0) == gate_up.size(0) && gate_up.size(1) == 2 * out.size(1),
           "megakernel: 'gate_up' must be [T, 2I] for 'out' [T, I]");
  const c10::cuda::CUDAGuard guard(device);
  mk::launch_silu_mul(gate_up.data_ptr(), out.data_ptr(), as_int(out.size(0), "tokens"),
                      as_int(out.size(1), "intermediate size"), current_stream(device));
  mk::check(cudaGetLastError(), "silu_mul launch");
}

void prefill_add_rms_norm(at::Tensor x, const std::optional<at::Tensor>& delta,
                          const at::Tensor& weight, double eps, at::Tensor out) {
  const auto device = x.device();
  check_tensor(x, "x", at::ScalarType::Float, 2, device);
  check_tensor(out, "out", at::ScalarType::BFloat16, 2, device);
  check_tensor(weight, "weight", at::ScalarType::Float, 1, device);
  MK_CHECK(out.sizes() == x.sizes() && weight.size(0) == x.size(1),
           "megakernel: 'out' must be the shape of 'x' and 'weight' its width");
  if (delta) {
    check_tensor(*delta, "delta", at::ScalarType::BFloat16, 2, device);
    MK_CHECK(delta->sizes() == x.sizes(), "megakernel: 'delta' must be the shape of 'x'");
  }
  const c10::cuda::CUDAGuard guard(device);
  mk::launch_add_rms_norm(ptr<float>(x), delta ? delta->data_ptr() : nullptr,
                          ptr<const float>(weight), static_cast<float>(eps), out.data_ptr(),
                          as_int(x.size(0), "tokens"), as_int(x.size(1), "hidden size"),
                          current_stream(device));
  mk::check(cudaGetLastError(), "add_rms_norm launch");
}

// A zeroed CPU int64 tensor [kHostStatusWords] in mapped pinned memory that the kernel
// writes its error code into, so the host can check for faults without a device sync.
at::Tensor alloc_host_status() {
  void* host = nullptr;
  const size_t bytes = mk::kHostStatusWords * sizeof(int64_t);
  mk::check(cudaHostAlloc(&host, bytes, cudaHostAllocMapped), "cudaHostAlloc");
  std::memset(host, 0, bytes);
  return torch::from_blob(host, {mk::kHostStatusWords}, [](void* ptr) { cudaFreeHost(ptr); },
                          torch::TensorOptions().dtype(torch::kInt64));
}

// Number of SMs of the current CUDA device (the grid size of a launch).
int64_t sm_count() { return mk::device_sm_count(); }

// Reads buf's bytes from DRAM once per SM's share (read_probe.h) on the current stream;
// returns how many bytes it reads, for the caller's timing.
int64_t read_probe(const at::Tensor& buf) {
  MK_CHECK(buf.is_cuda(), "megakernel: 'buf' must be a CUDA tensor");
  MK_CHECK(buf.is_contiguous(), "megakernel: 'buf' must be contiguous");
  const c10::cuda::CUDAGuard guard(buf.device());
  const int blocks = mk::device_sm_count();
  const int64_t bytes = buf.numel() * buf.element_size();
  const int64_t read = mk::read_probe_bytes(bytes, blocks);
  MK_CHECK(read > 0, "megakernel: 'buf' must hold at least ",
           mk::kReadProbeChunk * blocks, " bytes (one 32 KB chunk per SM), got ", bytes);
  MK_CHECK(reinterpret_cast<uintptr_t>(buf.data_ptr()) % 16 == 0,
           "megakernel: 'buf' must be 16-byte aligned");
  mk::launch_read_probe(buf.data_ptr(), bytes, blocks, current_stream(buf.device()));
  mk::check(cudaGetLastError(), "read probe launch");
  return read;
}

// Raises RuntimeError unless the current device is sm_90 (H100 / H200).
void check_device() { mk::check_device_supported(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megakernel: the persistent decode kernel (csrc/interpreter.cu)";
  m.def("launch", &launch,
        "Launch the instruction stream once (its steps) on the current stream (mutates counters, "
        "queue, error_record, step_result, profile, activations and the KV cache).",
        py::arg("instructions"), py::arg("counters"), py::arg("queue"), py::arg("error_record"),
        py::arg("step_result"), py::arg("profile"), py::arg("host_status"),
        py::arg("step_input"), py::arg("hidden"),
        py::arg("q"), py::arg("attn_partial_out"), py::arg("attn_partial_lse"),
        py::arg("attn_out"), py::arg("mlp_act"), py::arg("logits"), py::arg("argmax_value"),
        py::arg("argmax_index"), py::arg("next_token"), py::arg("embed"), py::arg("attn_norm"),
        py::arg("qkv"), py::arg("o_proj"), py::arg("mlp_norm"), py::arg("gate_up"),
        py::arg("down"), py::arg("final_norm"), py::arg("lm_head"), py::arg("rope_cos"),
        py::arg("rope_sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("page_table"),
        py::arg("rms_norm_eps"), py::arg("epoch"), py::arg("timeout_ns"),
        py::arg("num_blocks") = 0,
        py::arg("prefetch_bytes") = static_cast<int64_t>(mk::kDefaultPrefetchBytes),
        py::arg("token_source") = py::none(), py::arg("token") = 0, py::arg("position") = 0,
        py::arg("steps") = 1, py::arg("sample_inv_temperature") = 0.0,
        py::arg("sample_seed") = 0, py::arg("sample_top_k") = 0, py::arg("sample_top_p") = 1.0,
        py::arg("topk_values") = py::none(), py::arg("topk_ties") = py::none(),
        py::arg("topp_hist") = py::none(), py::arg("topp_state") = py::none(),
        py::arg("sample_threshold") = py::none());
  m.def("prefill_rope_append", &prefill_rope_append,
        "RoPE on a prompt chunk's fused QKV rows: q heads to q_out, k heads to k_out, k and v "
        "heads into the cache layer's slots of positions start.. (or start_on_device[0]..: "
        "int64 [1] on the device, read by the kernel) (csrc/prefill_ops.h).",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("page_table_row"),
        py::arg("start"), py::arg("k_cache_layer"), py::arg("v_cache_layer"), py::arg("q_out"),
        py::arg("k_out"), py::arg("start_on_device") = py::none());
  m.def("prefill_silu_mul", &prefill_silu_mul, "out = bf16(silu(gate) * up) of gate_up [T, 2I].",
        py::arg("gate_up"), py::arg("out"));
  m.def("prefill_add_rms_norm", &prefill_add_rms_norm,
        "x += delta (if given), then out = bf16(rms_norm(x) * weight), row by row.",
        py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("eps"), py::arg("out"));
  m.def("alloc_host_status", &alloc_host_status,
        "Zeroed int64 CPU tensor in mapped pinned memory for launch(host_status=...).");
  m.def("sm_count", &sm_count, "Number of SMs of the current CUDA device.");
  m.def("read_probe", &read_probe,
        "Read a CUDA tensor's bytes from DRAM by bulk copies, one block per SM, on the "
        "current stream; returns the bytes read (whole 32 KB chunks per SM).",
        py::arg("buf"));
  m.def("check_device", &check_device, "Raise RuntimeError unless the current device is sm_90.");
  m.def("profiling_compiled", &mk::profiling_compiled,
        "Whether the kernel was built with MEGAKERNEL_PROFILE (per-instruction timestamps).");
  // Layouts of the small int64 state buffers, so Python never hard-codes an offset.
  m.attr("ERROR_WORDS") = py::dict(
      py::arg("code") = static_cast<int>(mk::kErrCode),
      py::arg("instruction") = static_cast<int>(mk::kErrInstruction),
      py::arg("opcode") = static_cast<int>(mk::kErrOpcode),
      py::arg("layer") = static_cast<int>(mk::kErrLayer),
      py::arg("counter") = static_cast<int>(mk::kErrCounter),
      py::arg("seen") = static_cast<int>(mk::kErrSeen),
      py::arg("target") = static_cast<int>(mk::kErrTarget),
      py::arg("block") = static_cast<int>(mk::kErrBlock));
  m.attr("ERROR_CODES") = py::dict(
      py::arg("timeout") = static_cast<int>(mk::kErrTimeout),
      py::arg("unsupported_tokens") = static_cast<int>(mk::kErrUnsupportedTokens),
      py::arg("bad_opcode") = static_cast<int>(mk::kErrBadOpcode),
      py::arg("bad_counter") = static_cast<int>(mk::kErrBadCounter),
      py::arg("bad_token") = static_cast<int>(mk::kErrBadToken),
      py::arg("bad_position") = static_cast<int>(mk::kErrBadPosition));
  m.attr("ERROR_RECORD_WORDS") = mk::kErrorWords;
  m.attr("QUEUE_WORDS") = mk::kQueueWords;
  m.attr("PROFILE_WORDS") = mk::kProfileWords;
  m.attr("HOST_STATUS_WORDS") = mk::kHostStatusWords;
  m.attr("HOST_RESULT_WORD") = mk::kHostResultWord;
  m.attr("HOST_RESULT_SLOTS") = mk::kHostResultSlots;
  m.attr("MAX_LAUNCH_STEPS") = mk::kMaxLaunchSteps;
  m.attr("DEFAULT_PREFETCH_BYTES") = static_cast<int64_t>(mk::kDefaultPrefetchBytes);
  m.attr("INSTRUCTION_WORDS") = mk::kInstructionWords;
}
