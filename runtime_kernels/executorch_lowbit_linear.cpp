// executorch_lowbit_linear.cpp - ExecuTorch kernel of apq::lowbit_linear: 2-, 3- and 4-bit
// group-quantized weights in the core's own packed layout, with int8 per-token asymmetric
// dynamic activations.
//
// XNNPACK (ExecuTorch 1.5.1) runs 4-bit groups only: 2- and 3-bit groups fail at lowering and
// 2/3 bits per channel are silently widened to int8. The android-lowbit target
// (targets/executorch) keeps its 4-bit layers in XNNPACK and calls this operator for its 2- and
// 3-bit layers:
//
//   apq::lowbit_linear.out(Tensor x, Tensor packed, Tensor scales, int bits, int group_size,
//                          *, Tensor(a!) out) -> Tensor(a!)
//     x       float32 [..., K]
//     packed  uint8 [N, ceil(K * bits / 8)]: the checkpoint's qweight rows unchanged (codes
//             0 .. 2^bits - 1 in an LSB-first bit stream, docs/formats.md), symmetric: the
//             weight is (code - 2^(bits-1)) * scale
//     scales  float16 [N, ceil(K / group_size)]: the checkpoint's scales unchanged
//     out     float32 [..., N]
//
//   apq::lowbit_embedding.out(Tensor packed, Tensor scales, int bits, int group_size, Tensor ids,
//                             int k, *, Tensor(a!) out) -> Tensor(a!)
//     the rows `ids` of the same operands, dequantized: a tied head's embedding lookup reads
//     the head's own codes and scales, so the program holds them once
//
// The arithmetic (apq_lowbit_linear.hpp, beside this file) quantizes each token row as the core's
// int8-per-token-asym-dynamic mode does, sums each group exactly in int32 and the groups in
// order in float32 (build with -ffp-contract=off); the Python reference of the operator
// (targets/executorch/lowbit.py) computes exactly this, and the two are compared bit for bit
// (tests/targets/executorch/test_lowbit.py). Output rows are split over ExecuTorch's thread pool
// where the runtime has one (ET_USE_THREADPOOL); SIMD: AVX-512 VNNI+VBMI, or SSSE3/AVX2 (/BMI2,
// F16C) on x86-64, where the compiler targets them; NEON on aarch64, and the Armv8.2 dot product
// (SDOT) where the CPU has it, chosen at run time (Linux, Android) in an armv8-a build.
//
// The kernel registers itself at load time; linking it into an ExecuTorch runtime (or loading
// it as a shared library beside one) is all it takes.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <cstdint>
#include <cstring>

#include "apq_lowbit_linear.hpp"

namespace apq_lowbit {

using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

static_assert(sizeof(Half) == sizeof(uint16_t), "float16 scales are read as their bits");

Tensor& lowbit_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed,
                          const Tensor& scales, const int64_t bits, const int64_t group_size,
                          Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, bits >= 2 && bits <= 8, InvalidArgument, out,
                      "apq::lowbit_linear: expected 2 to 8 bits, found %lld",
                      static_cast<long long>(bits));
  ET_KERNEL_CHECK_MSG(ctx, group_size > 0, InvalidArgument, out,
                      "apq::lowbit_linear: expected a positive group size, found %lld",
                      static_cast<long long>(group_size));
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && x.dim() >= 1,
                      InvalidArgument, out, "apq::lowbit_linear: expected float32 x [..., K]");
  ET_KERNEL_CHECK_MSG(ctx, packed.scalar_type() == ScalarType::Byte && packed.dim() == 2,
                      InvalidArgument, out, "apq::lowbit_linear: expected uint8 packed [N, B]");
  ET_KERNEL_CHECK_MSG(ctx, scales.scalar_type() == ScalarType::Half && scales.dim() == 2,
                      InvalidArgument, out, "apq::lowbit_linear: expected float16 scales [N, G]");
  const int64_t k = x.size(x.dim() - 1);
  const int64_t n = packed.size(0);
  const int64_t groups = (k + group_size - 1) / group_size;
  ET_KERNEL_CHECK_MSG(ctx, packed.size(1) == (k * bits + 7) / 8, InvalidArgument, out,
                      "apq::lowbit_linear: packed rows of %lld bytes, expected %lld for K=%lld",
                      static_cast<long long>(packed.size(1)),
                      static_cast<long long>((k * bits + 7) / 8), static_cast<long long>(k));
  ET_KERNEL_CHECK_MSG(ctx, scales.size(0) == n && scales.size(1) == groups, InvalidArgument, out,
                      "apq::lowbit_linear: scales [%lld, %lld], expected [%lld, %lld]",
                      static_cast<long long>(scales.size(0)),
                      static_cast<long long>(scales.size(1)), static_cast<long long>(n),
                      static_cast<long long>(groups));
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "apq::lowbit_linear: expected a float32 out");

  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (int d = 0; d < x.dim() - 1; ++d) sizes[d] = static_cast<SizesType>(x.size(d));
  sizes[x.dim() - 1] = static_cast<SizesType>(n);
  ET_KERNEL_CHECK_MSG(
      ctx,
      executorch::runtime::resize_tensor(
          out, {sizes, static_cast<size_t>(x.dim())}) == Error::Ok,
      InvalidArgument, out, "apq::lowbit_linear: cannot resize out");

  const int64_t m = k ? x.numel() / k : 0;
  // output rows split over ExecuTorch's thread pool (built with ET_USE_THREADPOOL; else serial)
  auto parallel = [](int64_t begin, int64_t end, int64_t grain, const auto& f) {
    executorch::extension::parallel_for(begin, end, grain, f);
  };
  lowbit_linear(x.const_data_ptr<float>(), m, k, packed.const_data_ptr<uint8_t>(),
                reinterpret_cast<const uint16_t*>(scales.const_data_ptr<Half>()), n,
                static_cast<int>(bits), group_size, out.mutable_data_ptr<float>(), parallel);
  return out;
}

// apq::lowbit_embedding.out(Tensor packed, Tensor scales, int bits, int group_size, Tensor ids,
//                           int k, *, Tensor(a!) out) -> Tensor(a!)
//   the rows `ids` [...] (int64) of the packed table of width k, float32 [..., k]: a tied head's
//   embedding lookup over the head's own operands
Tensor& lowbit_embedding_out(KernelRuntimeContext& ctx, const Tensor& packed,
                             const Tensor& scales, const int64_t bits, const int64_t group_size,
                             const Tensor& ids, const int64_t k, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, bits >= 2 && bits <= 8 && group_size > 0 && k > 0, InvalidArgument,
                      out, "apq::lowbit_embedding: bits %lld, group %lld, width %lld",
                      static_cast<long long>(bits), static_cast<long long>(group_size),
                      static_cast<long long>(k));
  ET_KERNEL_CHECK_MSG(ctx, packed.scalar_type() == ScalarType::Byte && packed.dim() == 2 &&
                               packed.size(1) == (k * bits + 7) / 8,
                      InvalidArgument, out,
                      "apq::lowbit_embedding: expected uint8 packed [N, ceil(K * bits / 8)]");
  const int64_t groups = (k + group_size - 1) / group_size;
  ET_KERNEL_CHECK_MSG(ctx, scales.scalar_type() == ScalarType::Half && scales.dim() == 2 &&
                               scales.size(0) == packed.size(0) && scales.size(1) == groups,
                      InvalidArgument, out,
                      "apq::lowbit_embedding: expected float16 scales [N, ceil(K / group)]");
  ET_KERNEL_CHECK_MSG(ctx, ids.scalar_type() == ScalarType::Long, InvalidArgument, out,
                      "apq::lowbit_embedding: expected int64 ids");
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Float &&
                               static_cast<size_t>(ids.dim()) <
                                   executorch::runtime::kTensorDimensionLimit,
                      InvalidArgument, out, "apq::lowbit_embedding: expected a float32 out");
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (ssize_t d = 0; d < ids.dim(); ++d) sizes[d] = static_cast<SizesType>(ids.size(d));
  sizes[ids.dim()] = static_cast<SizesType>(k);
  ET_KERNEL_CHECK_MSG(
      ctx,
      executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(ids.dim() + 1)}) ==
          Error::Ok,
      InvalidArgument, out, "apq::lowbit_embedding: cannot resize out");
  ET_KERNEL_CHECK_MSG(
      ctx,
      lowbit_rows(ids.const_data_ptr<int64_t>(), ids.numel(), packed.const_data_ptr<uint8_t>(),
                  reinterpret_cast<const uint16_t*>(scales.const_data_ptr<Half>()),
                  packed.size(0), k, static_cast<int>(bits), group_size,
                  out.mutable_data_ptr<float>()),
      InvalidArgument, out, "apq::lowbit_embedding: an id outside the table");
  return out;
}

namespace {

constexpr char kLowbitLinear[] = "apq::lowbit_linear.out";
constexpr char kLowbitEmbedding[] = "apq::lowbit_embedding.out";

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
    if (!registered(kLowbitLinear)) {
      (void)executorch::runtime::register_kernel(
          make_boxed_kernel(kLowbitLinear, EXECUTORCH_FN(lowbit_linear_out, kLowbitLinear)));
    }
    if (!registered(kLowbitEmbedding)) {
      (void)executorch::runtime::register_kernel(make_boxed_kernel(
          kLowbitEmbedding, EXECUTORCH_FN(lowbit_embedding_out, kLowbitEmbedding)));
    }
  }
};

const Registration registration;

}  // namespace
}  // namespace apq_lowbit
