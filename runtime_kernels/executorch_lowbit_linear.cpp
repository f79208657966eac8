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
// Each token row of x is quantized as the core's int8-per-token-asym-dynamic mode does it
// (apq_sdk/quant/modules.py, formula for formula): lo = min(x, 0), hi = max(x, 0),
// scale = max((hi - lo) / 255, FLT_MIN), zero = clamp(-128 - round(lo / scale), -128, 127),
// code = clamp(round(x * (1 / scale)) + zero, -128, 127), rounding half to even. Then, per output
// row n and group g, the integer sum S_g = sum_k (code_k - zero) * (w_k - 2^(bits-1)) is exact in
// int32, and
//
//   out[n] = (((0 + s_0 * S_0) + s_1 * S_1) + ... + s_{G-1} * S_{G-1}) * scale
//
// in float32, groups in order, no fused multiply-add (build with -ffp-contract=off). The Python
// reference of the operator (targets/executorch/lowbit.py) computes exactly this, so the two are
// compared bit for bit (tests/targets/executorch/test_lowbit.py).
//
// One thread. The kernel registers itself at load time; linking it into an ExecuTorch runtime
// (or loading it as a shared library beside one) is all it takes.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace apq_lowbit {

using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

// the codes of one packed row, minus the symmetric zero point, as int16 (what the dot reads)
void unpack_row(const uint8_t* row, int bits, int64_t k, int16_t* out) {
  const int16_t zero = static_cast<int16_t>(1 << (bits - 1));
  if (bits == 2) {
    for (int64_t j = 0; j < k / 4; ++j) {
      const uint8_t b = row[j];
      out[4 * j] = static_cast<int16_t>((b & 3) - zero);
      out[4 * j + 1] = static_cast<int16_t>(((b >> 2) & 3) - zero);
      out[4 * j + 2] = static_cast<int16_t>(((b >> 4) & 3) - zero);
      out[4 * j + 3] = static_cast<int16_t>((b >> 6) - zero);
    }
    for (int64_t i = (k / 4) * 4; i < k; ++i) {
      out[i] = static_cast<int16_t>(((row[i / 4] >> (2 * (i % 4))) & 3) - zero);
    }
    return;
  }
  if (bits == 4) {
    for (int64_t j = 0; j < k / 2; ++j) {
      const uint8_t b = row[j];
      out[2 * j] = static_cast<int16_t>((b & 15) - zero);
      out[2 * j + 1] = static_cast<int16_t>((b >> 4) - zero);
    }
    if (k % 2) out[k - 1] = static_cast<int16_t>((row[k / 2] & 15) - zero);
    return;
  }
  if (bits == 3) {
    for (int64_t j = 0; j < k / 8; ++j) {
      const uint8_t* r = row + 3 * j;
      const int32_t v = r[0] | (r[1] << 8) | (r[2] << 16);
      for (int i = 0; i < 8; ++i) out[8 * j + i] = static_cast<int16_t>(((v >> (3 * i)) & 7) - zero);
    }
    for (int64_t i = (k / 8) * 8; i < k; ++i) {
      const int64_t bit = i * 3;
      uint32_t v = row[bit / 8];
      if ((bit % 8) + 3 > 8) v |= static_cast<uint32_t>(row[bit / 8 + 1]) << 8;
      out[i] = static_cast<int16_t>(static_cast<int>((v >> (bit % 8)) & 7) - zero);
    }
    return;
  }
  // any width up to 8: eight codes fill `bits` bytes of the stream
  const uint64_t mask = (1u << bits) - 1u;
  const int64_t whole = k / 8;
  for (int64_t j = 0; j < whole; ++j) {
    uint64_t v = 0;
    std::memcpy(&v, row + j * bits, static_cast<size_t>(bits));  // little-endian hosts
    for (int i = 0; i < 8; ++i) {
      out[8 * j + i] = static_cast<int16_t>(static_cast<int>((v >> (i * bits)) & mask) - zero);
    }
  }
  for (int64_t i = whole * 8; i < k; ++i) {
    const int64_t bit = i * bits;
    uint32_t v = row[bit / 8];
    if ((bit % 8) + bits > 8) v |= static_cast<uint32_t>(row[bit / 8 + 1]) << 8;
    out[i] = static_cast<int16_t>(static_cast<int>((v >> (bit % 8)) & mask) - zero);
  }
}

// one token row as the core's int8-per-token-asym-dynamic mode quantizes it: the codes minus
// their zero point (int16, -255 .. 255) and the scale
float quantize_row(const float* x, int64_t k, int16_t* out) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  float scale = (hi - lo) / 255.0f;
  if (!(scale >= FLT_MIN)) scale = FLT_MIN;
  float zero = -128.0f - std::nearbyint(lo / scale);
  zero = zero < -128.0f ? -128.0f : (zero > 127.0f ? 127.0f : zero);
  const float inverse = 1.0f / scale;
  for (int64_t i = 0; i < k; ++i) {
    float code = std::nearbyint(x[i] * inverse) + zero;
    code = code < -128.0f ? -128.0f : (code > 127.0f ? 127.0f : code);
    out[i] = static_cast<int16_t>(code - zero);
  }
  return scale;
}

int32_t dot(const int16_t* a, const int16_t* b, int64_t n) {
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<int32_t>(a[i]) * b[i];
  return sum;
}

// The in-place path, for a few tokens of 2- or 4-bit codes when the group size and K are
// multiples of 8. The stream is read a byte at a time (P codes: 4 of 2 bits, 2 of 4 bits), and
// each token's codes are laid out in P planes, plane i holding the code of position P*j + i at
// j, so that code i of every word multiplies a contiguous run of the activations (the loops
// vectorize). The codes are summed unsigned and the zero point taken out per group:
// sum_k a_k (c_k - z) = sum_k a_k c_k - z * sum_k a_k, an identity in integers.
template <int Bits>
struct Word;
template <>
struct Word<2> {
  static constexpr int P = 4;
};
template <>
struct Word<4> {
  static constexpr int P = 2;
};

template <int Bits>
void planes_of(const int16_t* a, int64_t k, int16_t* planes) {
  constexpr int P = Word<Bits>::P;
  const int64_t words = k / P;
  for (int64_t j = 0; j < words; ++j) {
    for (int i = 0; i < P; ++i) planes[i * words + j] = a[j * P + i];
  }
}

// sum over the 16 words from j of one row of sum_i plane_i[j] * code_i(word j), codes unsigned
// (a fixed count the compiler unrolls and vectorizes)
constexpr int64_t kStep = 16;
constexpr int64_t kPlaneTokens = 4;  // up to this many tokens take the in-place path

template <int Bits>
inline int32_t plane_dot16(const int16_t* planes, int64_t words, const uint8_t* row, int64_t j0) {
  int32_t sum = 0;
  if constexpr (Bits == 2) {
    const int16_t *p0 = planes + j0, *p1 = planes + words + j0, *p2 = planes + 2 * words + j0,
                  *p3 = planes + 3 * words + j0;
    const uint8_t* r = row + j0;
    for (int64_t j = 0; j < kStep; ++j) {
      const int16_t b = r[j];
      sum += p0[j] * (b & 3) + p1[j] * ((b >> 2) & 3) + p2[j] * ((b >> 4) & 3) +
             p3[j] * (b >> 6);
    }
  } else if constexpr (Bits == 4) {
    const int16_t *p0 = planes + j0, *p1 = planes + words + j0;
    const uint8_t* r = row + j0;
    for (int64_t j = 0; j < kStep; ++j) {
      const int16_t b = r[j];
      sum += p0[j] * (b & 15) + p1[j] * (b >> 4);
    }
  } else {
    static_assert(Bits == 2 || Bits == 4, "the in-place path reads 2- and 4-bit codes");
  }
  return sum;
}

// the same over any count of words (group sizes whose word count is not a multiple of 16)
template <int Bits>
int32_t plane_dot(const int16_t* planes, int64_t words, const uint8_t* row, int64_t w0,
                  int64_t w1) {
  int32_t sum = 0;
  int64_t j = w0;
  for (; j + kStep <= w1; j += kStep) sum += plane_dot16<Bits>(planes, words, row, j);
  for (; j < w1; ++j) {
    if constexpr (Bits == 2) {
      const int b = row[j];
      sum += planes[j] * (b & 3) + planes[words + j] * ((b >> 2) & 3) +
             planes[2 * words + j] * ((b >> 4) & 3) + planes[3 * words + j] * (b >> 6);
    } else if constexpr (Bits == 4) {
      const int b = row[j];
      sum += planes[j] * (b & 15) + planes[words + j] * (b >> 4);
    }
  }
  return sum;
}

template <int Bits>
void fast_rows(const int16_t* codes, const float* token_scale, int64_t m, int64_t k,
               const uint8_t* w, int64_t row_bytes, const Half* s, int64_t groups,
               int64_t group_size, int64_t n, float* y) {
  constexpr int P = Word<Bits>::P;
  const int64_t words = k / P, group_words = group_size / P;
  const int32_t zero = 1 << (Bits - 1);
  std::vector<int16_t> planes(static_cast<size_t>(m * k));
  std::vector<int32_t> group_sums(static_cast<size_t>(m * groups));
  for (int64_t t = 0; t < m; ++t) {
    planes_of<Bits>(codes + t * k, k, planes.data() + t * k);
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t i = g * group_size; i < (g + 1) * group_size; ++i) sum += codes[t * k + i];
      group_sums[t * groups + g] = sum;
    }
  }
  std::vector<float> row_scales(static_cast<size_t>(groups));
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = w + r * row_bytes;
    for (int64_t g = 0; g < groups; ++g) row_scales[g] = static_cast<float>(s[r * groups + g]);
    for (int64_t t = 0; t < m; ++t) {
      const int16_t* p = planes.data() + t * k;
      const int32_t* sums = group_sums.data() + t * groups;
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        const int32_t total =
            plane_dot<Bits>(p, words, row, g * group_words, (g + 1) * group_words) -
            zero * sums[g];
        const float term = row_scales[g] * static_cast<float>(total);
        acc = acc + term;
      }
      y[t * n + r] = acc * token_scale[t];
    }
  }
}

}  // namespace

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
  const float* xs = x.const_data_ptr<float>();
  const uint8_t* w = packed.const_data_ptr<uint8_t>();
  const Half* s = scales.const_data_ptr<Half>();
  float* y = out.mutable_data_ptr<float>();

  std::vector<int16_t> codes(static_cast<size_t>(m * k));
  std::vector<float> token_scale(static_cast<size_t>(m));
  for (int64_t t = 0; t < m; ++t) {
    token_scale[t] = quantize_row(xs + t * k, k, codes.data() + t * k);
  }
  const int64_t row_bytes = packed.size(1);
  // a few tokens (decode): read the packed codes in place; more (prefill): unpack each row once
  // and reuse it for every token
  if (m <= kPlaneTokens && k % 8 == 0 && group_size % 8 == 0 && k % group_size == 0 &&
      (bits == 2 || bits == 4)) {
    if (bits == 2) fast_rows<2>(codes.data(), token_scale.data(), m, k, w, row_bytes, s, groups,
                                group_size, n, y);
    if (bits == 4) fast_rows<4>(codes.data(), token_scale.data(), m, k, w, row_bytes, s, groups,
                                group_size, n, y);
    return out;
  }
  std::vector<int16_t> row(static_cast<size_t>(k));
  std::vector<float> row_scales(static_cast<size_t>(groups));
  for (int64_t j = 0; j < n; ++j) {
    unpack_row(w + j * row_bytes, static_cast<int>(bits), k, row.data());
    for (int64_t g = 0; g < groups; ++g) row_scales[g] = static_cast<float>(s[j * groups + g]);
    for (int64_t t = 0; t < m; ++t) {
      const int16_t* a = codes.data() + t * k;
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t begin = g * group_size;
        const int64_t len = begin + group_size <= k ? group_size : k - begin;
        const int32_t sum = dot(a + begin, row.data() + begin, len);
        const float term = row_scales[g] * static_cast<float>(sum);
        acc = acc + term;
      }
      y[t * n + j] = acc * token_scale[t];
    }
  }
  return out;
}

namespace {

constexpr char kLowbitLinear[] = "apq::lowbit_linear.out";

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
  }
};

const Registration registration;

}  // namespace
}  // namespace apq_lowbit
