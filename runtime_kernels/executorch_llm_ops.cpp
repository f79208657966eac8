// executorch_llm_ops.cpp - reference kernels of ExecuTorch's LLM ops for a runtime without them.
//
// An android package's program (targets/executorch/program.py, attention "custom-ops") calls two
// operators outside the XNNPACK delegate, the ones ExecuTorch's own export_llm emits:
//
//   llama::update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out)
//       value [1, S, H, D] written into cache [1, max, H, D] at positions start_pos .. start_pos+S
//   llama::custom_sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos,
//                          Tensor? attn_mask=None, float drpout_p=0., bool is_causal=False,
//                          float? scale=None, *, Tensor(a!) out)
//       query [1, S, H, D] over the caches [1, max, Hkv, D] (H a multiple of Hkv: grouped-query
//       heads read their kv head in place): query row s attends to positions 0 .. start_pos+s.
//
// ExecuTorch's Android runtime (executorch-android's LlmModule) and its source builds with the
// LLM kernels (EXECUTORCH_BUILD_KERNELS_LLM) carry optimized kernels of both; the x86-64 wheel
// ships them only inside its Python extension. This file registers these float32 reference
// kernels at load time, and only where no kernel of that name is registered yet, so it is safe
// to link beside ExecuTorch's. They compute the same function as ExecuTorch's kernels (softmax in
// float32 with the running maximum subtracted), not bit for bit: ExecuTorch's tile the sums
// differently (tests/targets/executorch: logits within 1e-5 of the Python runtime, same greedy
// tokens). Refused (the method fails with InvalidArgument): other dtypes, an attention mask,
// is_causal false, a batch other than 1, positions past the cache.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace apq_llm_ops {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

bool is_float4d(const Tensor& t) {
  return t.scalar_type() == ScalarType::Float && t.dim() == 4 && t.size(0) == 1;
}

}  // namespace

Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache,
                         const int64_t start_pos, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, is_float4d(value) && is_float4d(cache), InvalidArgument, out,
                      "llama::update_cache: expected float32 value [1, S, H, D] and cache "
                      "[1, max, H, D]");
  ET_KERNEL_CHECK_MSG(ctx, value.size(2) == cache.size(2) && value.size(3) == cache.size(3),
                      InvalidArgument, out,
                      "llama::update_cache: value and cache differ in heads or head size");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + value.size(1) <= cache.size(1),
                      InvalidArgument, out,
                      "llama::update_cache: positions %lld..%lld past a cache of %lld",
                      static_cast<long long>(start_pos),
                      static_cast<long long>(start_pos + value.size(1)),
                      static_cast<long long>(cache.size(1)));
  const size_t row = static_cast<size_t>(value.size(2) * value.size(3));
  std::memcpy(cache.mutable_data_ptr<float>() + static_cast<size_t>(start_pos) * row,
              value.const_data_ptr<float>(), static_cast<size_t>(value.size(1)) * row *
              sizeof(float));
  return out;
}

Tensor& custom_sdpa_out(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& key,
                        const Tensor& value, const int64_t start_pos,
                        const std::optional<Tensor>& attn_mask, const double dropout_p,
                        const bool is_causal, const std::optional<double> scale, Tensor& out) {
  (void)dropout_p;  // inference: ignored, as ExecuTorch's kernel does
  ET_KERNEL_CHECK_MSG(ctx, is_float4d(query) && is_float4d(key) && is_float4d(value),
                      InvalidArgument, out,
                      "llama::custom_sdpa: expected float32 query [1, S, H, D] and caches "
                      "[1, max, Hkv, D]");
  ET_KERNEL_CHECK_MSG(ctx, !attn_mask.has_value() && is_causal, InvalidArgument, out,
                      "llama::custom_sdpa: only the causal form without a mask is provided");
  const int64_t seq = query.size(1), heads = query.size(2), dim = query.size(3);
  const int64_t max = key.size(1), kv_heads = key.size(2);
  ET_KERNEL_CHECK_MSG(ctx, kv_heads > 0 && heads % kv_heads == 0 && key.size(3) == dim &&
                      value.size(1) == max && value.size(2) == kv_heads &&
                      value.size(3) == dim, InvalidArgument, out,
                      "llama::custom_sdpa: caches do not match the query's heads and size");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + seq <= max, InvalidArgument, out,
                      "llama::custom_sdpa: positions past the cache");
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, query.sizes()) == Error::Ok,
                      InvalidArgument, out, "llama::custom_sdpa: cannot resize the output");
  const float factor = scale.has_value() ? static_cast<float>(*scale)
                                         : 1.0f / std::sqrt(static_cast<float>(dim));
  const float* q = query.const_data_ptr<float>();
  const float* k = key.const_data_ptr<float>();
  const float* v = value.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const int64_t group = heads / kv_heads;
  std::vector<float> weights(static_cast<size_t>(max));
  for (int64_t s = 0; s < seq; ++s) {
    const int64_t last = start_pos + s;  // the query row's own position: attends 0 .. last
    for (int64_t h = 0; h < heads; ++h) {
      const float* qrow = q + (s * heads + h) * dim;
      const int64_t kvh = h / group;
      float top = -INFINITY;
      for (int64_t j = 0; j <= last; ++j) {
        const float* krow = k + (j * kv_heads + kvh) * dim;
        float dot = 0.0f;
        for (int64_t d = 0; d < dim; ++d) dot += qrow[d] * krow[d];
        weights[j] = dot * factor;
        top = weights[j] > top ? weights[j] : top;
      }
      float total = 0.0f;
      for (int64_t j = 0; j <= last; ++j) {
        weights[j] = std::exp(weights[j] - top);
        total += weights[j];
      }
      float* orow = o + (s * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) orow[d] = 0.0f;
      for (int64_t j = 0; j <= last; ++j) {
        const float* vrow = v + (j * kv_heads + kvh) * dim;
        const float p = weights[j] / total;
        for (int64_t d = 0; d < dim; ++d) orow[d] += p * vrow[d];
      }
    }
  }
  return out;
}

namespace {

constexpr char kUpdateCache[] = "llama::update_cache.out";
constexpr char kCustomSdpa[] = "llama::custom_sdpa.out";

// registers each kernel unless the runtime already has one of that name (ExecuTorch's own)
// whether a kernel of this name is registered (a scan: the registry's own lookup logs an error
// for a name it lacks)
bool registered(const char* name) {
  for (const auto& kernel : executorch::runtime::get_registered_kernels()) {
    if (std::strcmp(kernel.name_, name) == 0) return true;
  }
  return false;
}

struct Registration {
  Registration() {
    using executorch::extension::make_boxed_kernel;
    if (!registered(kUpdateCache)) {
      (void)executorch::runtime::register_kernel(
          make_boxed_kernel(kUpdateCache, EXECUTORCH_FN(update_cache_out, kUpdateCache)));
    }
    if (!registered(kCustomSdpa)) {
      (void)executorch::runtime::register_kernel(
          make_boxed_kernel(kCustomSdpa, EXECUTORCH_FN(custom_sdpa_out, kCustomSdpa)));
    }
  }
};

const Registration registration;

}  // namespace
}  // namespace apq_llm_ops
