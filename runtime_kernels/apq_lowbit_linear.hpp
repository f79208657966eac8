// apq_lowbit_linear.hpp - the arithmetic of apq::lowbit_linear, with no runtime attached: low-bit
// group-quantized weights in the core's packed layout times int8 per-token asymmetric dynamic
// activations. executorch_lowbit_linear.cpp registers it with ExecuTorch; the tests compile it
// alone too (x86-64 with and without SIMD, aarch64 with and without the dot product under qemu)
// and compare every path with the Python reference (targets/executorch/lowbit.py) bit for bit.
//
//   y[t, n] = (((0 + s[n,0] * S[t,n,0]) + s[n,1] * S[t,n,1]) + ...) * scale[t]   (float32)
//   S[t,n,g] = sum over k in group g of (code_x[t,k] - zero_x[t]) * (code_w[n,k] - 2^(bits-1))
//
// x [m, k] float32; packed [n, ceil(k*bits/8)]: codes 0 .. 2^bits-1, an LSB-first bit stream
// per row (docs/formats.md); scales [n, ceil(k/group)] float16 bits. The activations are
// quantized per token as the core's int8-per-token-asym-dynamic mode does it
// (apq_sdk/quant/modules.py): lo = min(x, 0), hi = max(x, 0), scale = max((hi - lo) / 255,
// FLT_MIN), zero = clamp(-128 - round(lo / scale), -128, 127), code = clamp(round(x * (1 /
// scale)) + zero, -128, 127), rounding half to even.
//
// Every S is an exact integer (int32), however it is computed; the float sums run over groups
// in order, one multiply and one add each: compile with -ffp-contract=off, so no fused
// multiply-add changes a rounding. The paths:
//   * a few tokens (decode), 2, 3 or 4 bits, groups of whole 64-code chunks, on x86-64 with
//     AVX-512 VNNI and VBMI: a chunk of one row becomes one register of 64 code bytes (4 bits:
//     nibbles split; 2 bits: a variable shift per 128-bit lane; 3 bits: VPERMB gives each 3-byte
//     word a 64-bit lane, VPMULTISHIFTQB cuts its eight codes), the activations are laid out in
//     the same order, and VPDPBUSD sums cw * cx and cw * (-zx). Sixteen rows run side by side:
//     their lanes are reduced together, and each row's float chain is one lane of a register.
//     4-bit groups of 64 go two at a time (one 64-byte load, lanes 0-7 one group, 8-15 the
//     next). The next block's codes and scales are prefetched;
//   * a few tokens, 2, 3 or 4 bits, whole groups of a multiple of 32 codes (4 bits: 16), on
//     aarch64 with the Armv8.2 dot product: always where the compiler targets it (+dotprod),
//     else on Linux and Android (GCC, clang 16 on) compiled with a target attribute and taken
//     where getauxval says the CPU has it, so an armv8-a build runs it on the phones that do
//     (APQ_LOWBIT_NO_DOTPROD leaves it out). A group's steps (16 bytes of 2- or 4-bit codes,
//     eight 3-byte words, and at most one half step) are cut into registers of code bytes (3
//     bits: vld3 splits the words, two rows share a register), the activations are laid out
//     in the same order, and SDOT sums cw * cx and, SDOT or UDOT, cw * (-zx). Eight rows at a
//     time as two blocks of four: a block's lanes are reduced together and its four float
//     chains are the lanes of one register;
//   * otherwise a few tokens, 2, 3 or 4 bits, whole groups: the packed codes read in place.
//     The activations are laid out in planes (plane i holds the code of position P*j + i at j,
//     a word holding P codes: a byte of four 2-bit or two 4-bit codes, three bytes of eight
//     3-bit codes); unsigned weight codes meet signed activation codes and the zero points are
//     taken out per group, S = sum cx*cw - zw * sum cx - zx * sum cw + len * zx * zw. SIMD
//     where the compiler targets it: SSSE3 (AVX2 for 32-byte groups; 3-bit words spread by
//     BMI2's PDEP) on x86-64, NEON on aarch64 (3-bit words split by vld3); rows four at a time,
//     their sums reduced together and their float chains side by side (SSE4.1 or NEON).
//     Without SIMD the same sums one byte at a time;
//   * otherwise (prefill, short groups): each row unpacked once, then reused for every token.
// Float16 scales are converted exactly (F16C, FCVT, or in software). Output rows may be split
// over threads (the `parallel` argument); each output is computed the same way wherever it runs.
#ifndef APQ_LOWBIT_LINEAR_HPP
#define APQ_LOWBIT_LINEAR_HPP

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
// GCC 12 warns of its own _mm512_undefined_* inside these headers (GCC bug 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define APQ_LOWBIT_AVX512 1
#define APQ_LOWBIT_SIMD "avx512vnni"
#elif defined(__AVX2__)
#include <immintrin.h>
#define APQ_LOWBIT_SIMD "avx2"
#elif defined(__SSSE3__)
#include <immintrin.h>
#define APQ_LOWBIT_SIMD "ssse3"
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define APQ_LOWBIT_DOTPROD 2  // the compiler targets the dot product: always taken
#define APQ_LOWBIT_SIMD "neon+dotprod"
#else
#define APQ_LOWBIT_SIMD "neon"
// Compiled for the dot product (a target attribute) and taken where the CPU has it (getauxval,
// Linux and Android). Clang before 16 declares vdotq_s32 only under __ARM_FEATURE_DOTPROD.
#if defined(__aarch64__) && defined(__linux__) && !defined(APQ_LOWBIT_NO_DOTPROD) && \
    (!defined(__clang__) || __clang_major__ >= 16)
#define APQ_LOWBIT_DOTPROD 1
#include <sys/auxv.h>
#endif
#endif
#else
#define APQ_LOWBIT_SIMD "none"
#endif

// APQ_LOWBIT_TRACE(path), if defined before this header, is called with the path each call of
// lowbit_linear takes: "avx512", "dotprod", "in-place" or "unpack" (the tests' harness prints it)
#ifndef APQ_LOWBIT_TRACE
#define APQ_LOWBIT_TRACE(path) ((void)0)
#endif

namespace apq_lowbit {

// up to this many tokens read the packed codes in place
constexpr int64_t kInPlaceTokens = 4;

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);  // exact, subnormals included
#elif defined(__aarch64__)
  __fp16 value;
  std::memcpy(&value, &h, sizeof value);
  return static_cast<float>(value);  // FCVT: exact
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1Fu) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
#endif
}

// one token row's int8 codes and zero point; returns the scale
inline float quantize_row(const float* x, int64_t k, int8_t* codes, int32_t* zero_point) {
  float lo = 0.0f, hi = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  // min and max in any order (a -0.0 for a 0.0 changes neither the scale nor the zero point)
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  lo = _mm512_reduce_min_ps(vlo);
  hi = _mm512_reduce_max_ps(vhi);
#endif
  for (; i < k; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  float scale = (hi - lo) / 255.0f;
  if (!(scale >= FLT_MIN)) scale = FLT_MIN;
  float zero = -128.0f - std::nearbyint(lo / scale);
  zero = zero < -128.0f ? -128.0f : (zero > 127.0f ? 127.0f : zero);
  const float inverse = 1.0f / scale;
  i = 0;
#if defined(__AVX512F__)
  // the same operations 16 at a time: one rounding multiply, round half to even, one add
  for (; i + 16 <= k; i += 16) {
    const __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(inverse));
    __m512 code = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    code = _mm512_add_ps(code, _mm512_set1_ps(zero));
    code = _mm512_min_ps(_mm512_max_ps(code, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(code)));
  }
#endif
  for (; i < k; ++i) {
    float code = std::nearbyint(x[i] * inverse) + zero;
    code = code < -128.0f ? -128.0f : (code > 127.0f ? 127.0f : code);
    codes[i] = static_cast<int8_t>(code);
  }
  *zero_point = static_cast<int32_t>(zero);
  return scale;
}

// the codes of one packed row, minus the symmetric zero point, as int16
inline void unpack_row(const uint8_t* row, int bits, int64_t k, int16_t* out) {
  const int zero = 1 << (bits - 1);
  const int mask = (1 << bits) - 1;
  if (bits == 2) {
    for (int64_t j = 0; j < k / 4; ++j) {
      const int b = row[j];
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
      const int b = row[j];
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
  // any other width: eight codes fill `bits` bytes of the stream
  for (int64_t j = 0; j < k / 8; ++j) {
    uint64_t v = 0;
    for (int i = 0; i < bits; ++i) v |= static_cast<uint64_t>(row[j * bits + i]) << (8 * i);
    for (int i = 0; i < 8; ++i) {
      out[8 * j + i] = static_cast<int16_t>(static_cast<int>((v >> (i * bits)) & mask) - zero);
    }
  }
  for (int64_t i = (k / 8) * 8; i < k; ++i) {
    const int64_t bit = i * bits;
    uint32_t v = row[bit / 8];
    if ((bit % 8) + bits > 8) v |= static_cast<uint32_t>(row[bit / 8 + 1]) << 8;
    out[i] = static_cast<int16_t>(static_cast<int>((v >> (bit % 8)) & mask) - zero);
  }
}

inline int32_t dot16(const int16_t* a, const int16_t* b, int64_t n) {
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<int32_t>(a[i]) * b[i];
  return sum;
}

// sum over `bytes` packed bytes (P = 8 / bits codes each) of code_i(byte j) * plane_i[j], and the
// sum of the codes; planes[i] points at plane i's entry for the first byte
struct GroupSums {
  int32_t products;
  int32_t codes;
};

inline GroupSums group_sums_scalar(const uint8_t* row, const int8_t* const* planes, int bits,
                                   int64_t bytes) {
  const int per = 8 / bits, mask = (1 << bits) - 1;
  int32_t products = 0, codes = 0;
  for (int64_t j = 0; j < bytes; ++j) {
    const int b = row[j];
    for (int i = 0; i < per; ++i) {
      const int c = (b >> (bits * i)) & mask;
      products += c * planes[i][j];
      codes += c;
    }
  }
  return {products, codes};
}

// 3 bits: eight codes in each 3-byte word (code i at bits 3i .. 3i+2 of the little-endian word).
// `planes[i]` as above (plane i holds the activation of position 8j + i at j), `inorder` the
// group's activations in their own order, `words` the group's words.
inline GroupSums group_sums3_scalar(const uint8_t* row, const int8_t* const* planes,
                                    int64_t words) {
  int32_t products = 0, codes = 0;
  for (int64_t j = 0; j < words; ++j) {
    const int32_t v = row[3 * j] | (row[3 * j + 1] << 8) | (row[3 * j + 2] << 16);
    for (int i = 0; i < 8; ++i) {
      const int c = (v >> (3 * i)) & 7;
      products += c * planes[i][j];
      codes += c;
    }
  }
  return {products, codes};
}

// The SIMD group sums keep four int32 lanes (Lanes) per group, reduced either one group at a
// time (lanes_sum) or four rows at once (the block epilogue in lowbit_linear).
#if defined(__SSSE3__) || defined(__AVX2__)
#define APQ_LOWBIT_LANES 1
using Lanes = __m128i;
inline int32_t lanes_sum(Lanes v) {
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
  return _mm_cvtsi128_si32(v);
}
struct GroupLanes {
  Lanes products;
  Lanes codes;  // PSADBW's two 64-bit sums, read as four int32 lanes (the high halves are 0)
};

#if defined(__AVX2__)
// bytes: a multiple of 32 (the 16-byte loop below, twice as wide)
inline GroupLanes group_lanes_avx2(const uint8_t* row, const int8_t* const* planes, int bits,
                                   int64_t bytes) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i zero = _mm256_setzero_si256();
  __m256i products = zero, codes = zero;
  auto plane = [&](int i, int64_t j) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(planes[i] + j));
  };
  for (int64_t j = 0; j < bytes; j += 32) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
    __m256i acc, total;
    if (bits == 2) {
      const __m256i mask = _mm256_set1_epi8(3);
      const __m256i c0 = _mm256_and_si256(b, mask);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(b, 2), mask);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
      const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(b, 6), mask);
      acc = _mm256_add_epi16(
          _mm256_add_epi16(_mm256_maddubs_epi16(c0, plane(0, j)),
                           _mm256_maddubs_epi16(c1, plane(1, j))),
          _mm256_add_epi16(_mm256_maddubs_epi16(c2, plane(2, j)),
                           _mm256_maddubs_epi16(c3, plane(3, j))));
      total = _mm256_add_epi8(_mm256_add_epi8(c0, c1), _mm256_add_epi8(c2, c3));
    } else {
      const __m256i mask = _mm256_set1_epi8(15);
      const __m256i c0 = _mm256_and_si256(b, mask);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
      acc = _mm256_add_epi16(_mm256_maddubs_epi16(c0, plane(0, j)),
                             _mm256_maddubs_epi16(c1, plane(1, j)));
      total = _mm256_add_epi8(c0, c1);
    }
    products = _mm256_add_epi32(products, _mm256_madd_epi16(acc, ones));
    codes = _mm256_add_epi64(codes, _mm256_sad_epu8(total, zero));
  }
  return {_mm_add_epi32(_mm256_castsi256_si128(products), _mm256_extracti128_si256(products, 1)),
          _mm_add_epi64(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1))};
}
#endif

// 2 or 4 bits; bytes: a multiple of 16
inline GroupLanes group_lanes(const uint8_t* row, const int8_t* const* planes, int bits,
                              int64_t bytes) {
#if defined(__AVX2__)
  if (bytes % 32 == 0) return group_lanes_avx2(row, planes, bits, bytes);
#endif
  const __m128i ones = _mm_set1_epi16(1);
  const __m128i zero = _mm_setzero_si128();
  __m128i products = zero, codes = zero;
  auto plane = [&](int i, int64_t j) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes[i] + j));
  };
  for (int64_t j = 0; j < bytes; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
    __m128i acc, total;
    if (bits == 2) {
      const __m128i mask = _mm_set1_epi8(3);
      const __m128i c0 = _mm_and_si128(b, mask);
      const __m128i c1 = _mm_and_si128(_mm_srli_epi16(b, 2), mask);
      const __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      const __m128i c3 = _mm_and_si128(_mm_srli_epi16(b, 6), mask);
      // |each product pair| <= 2 * 3 * 128: four of them fit int16
      acc = _mm_add_epi16(_mm_add_epi16(_mm_maddubs_epi16(c0, plane(0, j)),
                                        _mm_maddubs_epi16(c1, plane(1, j))),
                          _mm_add_epi16(_mm_maddubs_epi16(c2, plane(2, j)),
                                        _mm_maddubs_epi16(c3, plane(3, j))));
      total = _mm_add_epi8(_mm_add_epi8(c0, c1), _mm_add_epi8(c2, c3));
    } else {  // 4 bits
      const __m128i mask = _mm_set1_epi8(15);
      const __m128i c0 = _mm_and_si128(b, mask);
      const __m128i c1 = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      // |each product pair| <= 2 * 15 * 128: two of them fit int16
      acc = _mm_add_epi16(_mm_maddubs_epi16(c0, plane(0, j)), _mm_maddubs_epi16(c1, plane(1, j)));
      total = _mm_add_epi8(c0, c1);
    }
    products = _mm_add_epi32(products, _mm_madd_epi16(acc, ones));
    codes = _mm_add_epi64(codes, _mm_sad_epu8(total, zero));
  }
  return {products, codes};
}

#if defined(__BMI2__)
#define APQ_LOWBIT_LANES3 2  // words per step
// 3 bits; words: even. PDEP spreads a word's eight 3-bit codes into eight bytes, in order, so
// they meet the group's activations in their own order (`inorder`).
inline GroupLanes group_lanes3(const uint8_t* row, const int8_t* const*, const int8_t* inorder,
                               int64_t words) {
  const __m128i ones = _mm_set1_epi16(1);
  const __m128i zero = _mm_setzero_si128();
  const uint64_t spread = 0x0707070707070707ull;
  __m128i products = zero, codes = zero;
  for (int64_t j = 0; j < words; j += 2) {
    const uint8_t* w = row + 3 * j;
    const uint64_t lo = _pdep_u64(w[0] | (w[1] << 8) | (static_cast<uint64_t>(w[2]) << 16), spread);
    const uint64_t hi = _pdep_u64(w[3] | (w[4] << 8) | (static_cast<uint64_t>(w[5]) << 16), spread);
    const __m128i c = _mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo));
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(inorder + 8 * j));
    // |each product pair| <= 2 * 7 * 128
    products = _mm_add_epi32(products, _mm_madd_epi16(_mm_maddubs_epi16(c, a), ones));
    codes = _mm_add_epi64(codes, _mm_sad_epu8(c, zero));
  }
  return {products, codes};
}
#endif

#if defined(__SSE4_1__)
#define APQ_LOWBIT_BLOCK 1
// four rows' lanes -> [row 0, row 1, row 2, row 3]
inline Lanes lanes_of_four(Lanes a, Lanes b, Lanes c, Lanes d) {
  return _mm_hadd_epi32(_mm_hadd_epi32(a, b), _mm_hadd_epi32(c, d));
}
// the block epilogue: acc += scale * float(products - offset - zx * codes), lane by lane
inline void block_step(float* acc, const float* scale, Lanes products, Lanes codes,
                       int32_t offset, int32_t zx) {
  const __m128i exact = _mm_sub_epi32(_mm_sub_epi32(products, _mm_set1_epi32(offset)),
                                      _mm_mullo_epi32(codes, _mm_set1_epi32(zx)));
  const __m128 term = _mm_mul_ps(_mm_loadu_ps(scale), _mm_cvtepi32_ps(exact));
  _mm_storeu_ps(acc, _mm_add_ps(_mm_loadu_ps(acc), term));
}
#endif

#elif defined(__ARM_NEON)
#define APQ_LOWBIT_LANES 1
#define APQ_LOWBIT_BLOCK 1
using Lanes = int32x4_t;
inline int32_t lanes_sum(Lanes v) { return vaddvq_s32(v); }
struct GroupLanes {
  Lanes products;
  Lanes codes;
};

// 2 or 4 bits; bytes: a multiple of 16
inline GroupLanes group_lanes(const uint8_t* row, const int8_t* const* planes, int bits,
                              int64_t bytes) {
  int32x4_t products = vdupq_n_s32(0);
  uint32x4_t codes = vdupq_n_u32(0);
  const int per = 8 / bits;
  const uint8x16_t mask = vdupq_n_u8(static_cast<uint8_t>((1 << bits) - 1));
  for (int64_t j = 0; j < bytes; j += 16) {
    const uint8x16_t b = vld1q_u8(row + j);
    uint8x16_t total = vdupq_n_u8(0);
    for (int i = 0; i < per; ++i) {
      uint8x16_t c;
      switch (i) {  // shift counts must be constants
        case 0: c = vandq_u8(b, mask); break;
        case 1: c = vandq_u8(bits == 2 ? vshrq_n_u8(b, 2) : vshrq_n_u8(b, 4), mask); break;
        case 2: c = vandq_u8(vshrq_n_u8(b, 4), mask); break;
        default: c = vshrq_n_u8(b, 6); break;
      }
      const int8x16_t p = vld1q_s8(planes[i] + j);
      const int8x16_t cs = vreinterpretq_s8_u8(c);  // codes <= 15: exact as int8
      int16x8_t wide = vmull_s8(vget_low_s8(cs), vget_low_s8(p));
      wide = vmlal_s8(wide, vget_high_s8(cs), vget_high_s8(p));  // |.| <= 2 * 15 * 128
      products = vpadalq_s16(products, wide);
      total = vaddq_u8(total, c);
    }
    codes = vpadalq_u16(codes, vpaddlq_u8(total));
  }
  return {products, vreinterpretq_s32_u32(codes)};
}

#define APQ_LOWBIT_LANES3 8  // words per step
// 3 bits; words: a multiple of 8. vld3 splits eight words into their first, second and third
// bytes; code i of each word meets plane i.
inline GroupLanes group_lanes3(const uint8_t* row, const int8_t* const* planes, const int8_t*,
                               int64_t words) {
  int32x4_t products = vdupq_n_s32(0);
  uint32x4_t codes = vdupq_n_u32(0);
  const uint8x8_t seven = vdup_n_u8(7);
  for (int64_t j = 0; j < words; j += 8) {
    const uint8x8x3_t b = vld3_u8(row + 3 * j);
    uint8x8_t c[8];
    c[0] = vand_u8(b.val[0], seven);
    c[1] = vand_u8(vshr_n_u8(b.val[0], 3), seven);
    c[2] = vorr_u8(vshr_n_u8(b.val[0], 6), vshl_n_u8(vand_u8(b.val[1], vdup_n_u8(1)), 2));
    c[3] = vand_u8(vshr_n_u8(b.val[1], 1), seven);
    c[4] = vand_u8(vshr_n_u8(b.val[1], 4), seven);
    c[5] = vorr_u8(vshr_n_u8(b.val[1], 7), vshl_n_u8(vand_u8(b.val[2], vdup_n_u8(3)), 1));
    c[6] = vand_u8(vshr_n_u8(b.val[2], 2), seven);
    c[7] = vshr_n_u8(b.val[2], 5);
    uint8x8_t total = vdup_n_u8(0);
    for (int i = 0; i < 8; ++i) {
      // |product| <= 7 * 128
      products = vpadalq_s16(products,
                             vmull_s8(vreinterpret_s8_u8(c[i]), vld1_s8(planes[i] + j)));
      total = vadd_u8(total, c[i]);
    }
    codes = vpadalq_u16(codes, vmovl_u8(total));
  }
  return {products, vreinterpretq_s32_u32(codes)};
}

inline Lanes lanes_of_four(Lanes a, Lanes b, Lanes c, Lanes d) {
  return vpaddq_s32(vpaddq_s32(a, b), vpaddq_s32(c, d));
}
inline void block_step(float* acc, const float* scale, Lanes products, Lanes codes,
                       int32_t offset, int32_t zx) {
  const int32x4_t exact =
      vsubq_s32(vsubq_s32(products, vdupq_n_s32(offset)), vmulq_n_s32(codes, zx));
  const float32x4_t term = vmulq_f32(vld1q_f32(scale), vcvtq_f32_s32(exact));
  vst1q_f32(acc, vaddq_f32(vld1q_f32(acc), term));
}
#endif

#if defined(APQ_LOWBIT_DOTPROD)
// Armv8.2's dot product (SDOT: sixteen int8 products summed four by four into four int32 lanes
// in one instruction; the plain NEON loop takes SMULL, SMLAL and SADALP for eight). Codes are
// 0 .. 2^bits - 1, exact as int8, so SDOT meets them with the token's int8 activation codes
// directly, and their sum meets -zx (SDOT, or UDOT where zx <= 0: -zx may be 128), as VPDPBUSD
// does on AVX-512. A group is a run of steps, 16 bytes of 2- or 4-bit codes (64 codes: the
// registers of the codes at bits 0, 2, 4, 6; 32 codes: low and high nibbles) or eight 3-byte
// words of 3-bit codes (vld3 splits the words' bytes; a register holds code i of eight words of
// two rows, cut by immediate shifts), and at most one half step (8 bytes; four words, split by
// TBL; the rest zero codes). The token's activation codes are laid out in the same order
// (dot_order; 3 bits: twice, once per row; a half step's others zero). Eight rows run as
// two blocks of four: a block's lanes are reduced together and its float chains are the lanes
// of one register, each lane the operations of its row alone, its groups in order.
#if APQ_LOWBIT_DOTPROD == 1
// GCC declares vdotq_s32 for armv8.2-a+dotprod (its "+dotprod" alone does not inline it); a
// CPU with the dot product implements Armv8.2 (FEAT_DotProd is optional from Armv8.2 on)
#if defined(__clang__)
#define APQ_LOWBIT_DOTPROD_FN __attribute__((target("dotprod")))
#else
#define APQ_LOWBIT_DOTPROD_FN __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#else
#define APQ_LOWBIT_DOTPROD_FN
#endif

constexpr int64_t kDotRows = 8;

// whether the CPU runs SDOT (read once)
inline bool cpu_has_dotprod() {
#if APQ_LOWBIT_DOTPROD == 2
  return true;
#else
  static const bool has = (getauxval(AT_HWCAP) & (1ul << 20)) != 0;  // HWCAP_ASIMDDP
  return has;
#endif
}

// the codes of a step, and the bytes of its activations
constexpr int64_t dot_step(int bits) { return bits == 4 ? 32 : 64; }
constexpr int64_t dot_step_act(int bits) { return bits == 3 ? 128 : dot_step(bits); }

// groups of whole steps and at most one half step
inline bool dot_fits(int bits, int64_t group) {
  return (bits == 2 || bits == 3 || bits == 4) && group % (dot_step(bits) / 2) == 0;
}

// the position in its step of the code that meets activation byte p of the step (register
// p / 16, lane p % 16), or -1 where a half step has no code
inline int dot_order(int bits, int p, bool half) {
  if (bits == 3) {  // register i: code i of words 0-7, twice
    return half && p % 8 >= 4 ? -1 : 8 * (p % 8) + p / 16;
  }
  return half && p % 16 >= 8 ? -1 : (8 / bits) * (p % 16) + p / 16;
}

// the zero point's term: sum + -zx * the codes' sums
template <bool ZeroUnsigned>
APQ_LOWBIT_DOTPROD_FN inline int32x4_t dot_zero(int32x4_t sum, uint8x16_t total,
                                                uint8x16_t minus_zx) {
  if constexpr (ZeroUnsigned) {  // -zx: 0 .. 128
    return vreinterpretq_s32_u32(vdotq_u32(vreinterpretq_u32_s32(sum), total, minus_zx));
  } else {  // -zx: -127 .. -1
    return vdotq_s32(sum, vreinterpretq_s8_u8(total), vreinterpretq_s8_u8(minus_zx));
  }
}

// one step of one row, 2 or 4 bits: sum + its codes * the activations a - zx * its codes
template <int Bits, bool Half, bool ZeroUnsigned>
APQ_LOWBIT_DOTPROD_FN inline int32x4_t dot_row_step(int32x4_t sum, const uint8_t* w,
                                                    const int8_t* a, uint8x16_t minus_zx) {
  const uint8x16_t b = Half ? vcombine_u8(vld1_u8(w), vcreate_u8(0)) : vld1q_u8(w);
  uint8x16_t total;
  if constexpr (Bits == 4) {
    const uint8x16_t lo = vandq_u8(b, vdupq_n_u8(15)), hi = vshrq_n_u8(b, 4);
    sum = vdotq_s32(sum, vreinterpretq_s8_u8(lo), vld1q_s8(a));
    sum = vdotq_s32(sum, vreinterpretq_s8_u8(hi), vld1q_s8(a + 16));
    total = vaddq_u8(lo, hi);  // <= 30
  } else {
    const uint8x16_t three = vdupq_n_u8(3);
    const uint8x16_t c0 = vandq_u8(b, three), c1 = vandq_u8(vshrq_n_u8(b, 2), three);
    const uint8x16_t c2 = vandq_u8(vshrq_n_u8(b, 4), three), c3 = vshrq_n_u8(b, 6);
    sum = vdotq_s32(sum, vreinterpretq_s8_u8(c0), vld1q_s8(a));
    sum = vdotq_s32(sum, vreinterpretq_s8_u8(c1), vld1q_s8(a + 16));
    sum = vdotq_s32(sum, vreinterpretq_s8_u8(c2), vld1q_s8(a + 32));
    sum = vdotq_s32(sum, vreinterpretq_s8_u8(c3), vld1q_s8(a + 48));
    total = vaddq_u8(vaddq_u8(c0, c1), vaddq_u8(c2, c3));  // <= 12
  }
  return dot_zero<ZeroUnsigned>(sum, total, minus_zx);
}

// eight 3-bit words' bytes 0, 1 and 2 (a half step: four words, 12 bytes, nothing past them
// read; the other lanes 0)
template <bool Half>
APQ_LOWBIT_DOTPROD_FN inline uint8x8x3_t words3(const uint8_t* w) {
  if constexpr (Half) {
    uint64_t lo;
    uint32_t hi;
    std::memcpy(&lo, w, sizeof lo);
    std::memcpy(&hi, w + 8, sizeof hi);
    const uint8x16_t b = vcombine_u8(vcreate_u8(lo), vcreate_u8(hi));
    uint8x8x3_t out;  // index 255: 0
    out.val[0] = vqtbl1_u8(b, vcreate_u8(0xFFFFFFFF09060300ull));
    out.val[1] = vqtbl1_u8(b, vcreate_u8(0xFFFFFFFF0A070401ull));
    out.val[2] = vqtbl1_u8(b, vcreate_u8(0xFFFFFFFF0B080502ull));
    return out;
  } else {
    return vld3_u8(w);
  }
}

// one step of two rows, 3 bits (lanes 0-1 the first row's, 2-3 the second's): sum + their
// codes * the activations a - zx * their codes. Code i is bits 3i .. 3i + 2 of its word; codes
// 2 and 5 straddle bytes (SLI joins their parts).
template <bool Half, bool ZeroUnsigned>
APQ_LOWBIT_DOTPROD_FN inline int32x4_t dot_pair_step3(int32x4_t sum, const uint8_t* w0,
                                                      const uint8_t* w1, const int8_t* a,
                                                      uint8x16_t minus_zx) {
  const uint8x8x3_t r0 = words3<Half>(w0), r1 = words3<Half>(w1);
  const uint8x16_t b0 = vcombine_u8(r0.val[0], r1.val[0]);
  const uint8x16_t b1 = vcombine_u8(r0.val[1], r1.val[1]);
  const uint8x16_t b2 = vcombine_u8(r0.val[2], r1.val[2]);
  const uint8x16_t seven = vdupq_n_u8(7);
  uint8x16_t c[8];
  c[0] = vandq_u8(b0, seven);
  c[1] = vandq_u8(vshrq_n_u8(b0, 3), seven);
  c[2] = vandq_u8(vsliq_n_u8(vshrq_n_u8(b0, 6), b1, 2), seven);
  c[3] = vandq_u8(vshrq_n_u8(b1, 1), seven);
  c[4] = vandq_u8(vshrq_n_u8(b1, 4), seven);
  c[5] = vandq_u8(vsliq_n_u8(vshrq_n_u8(b1, 7), b2, 1), seven);
  c[6] = vandq_u8(vshrq_n_u8(b2, 2), seven);
  c[7] = vshrq_n_u8(b2, 5);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    sum = vdotq_s32(sum, vreinterpretq_s8_u8(c[i]), vld1q_s8(a + 16 * i));
  }
  const uint8x16_t total = vaddq_u8(vaddq_u8(vaddq_u8(c[0], c[1]), vaddq_u8(c[2], c[3])),
                                    vaddq_u8(vaddq_u8(c[4], c[5]), vaddq_u8(c[6], c[7])));
  return dot_zero<ZeroUnsigned>(sum, total, minus_zx);  // total <= 56
}

// one step of four rows (w: their codes, `at` bytes in): their lanes
template <int Bits, bool Half, bool ZeroUnsigned>
APQ_LOWBIT_DOTPROD_FN inline void dot_step4(int32x4_t* lanes, const uint8_t* const* w,
                                            int64_t at, const int8_t* a, uint8x16_t minus_zx) {
  if constexpr (Bits == 3) {
    lanes[0] = dot_pair_step3<Half, ZeroUnsigned>(lanes[0], w[0] + at, w[1] + at, a, minus_zx);
    lanes[1] = dot_pair_step3<Half, ZeroUnsigned>(lanes[1], w[2] + at, w[3] + at, a, minus_zx);
  } else {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      lanes[q] = dot_row_step<Bits, Half, ZeroUnsigned>(lanes[q], w[q] + at, a, minus_zx);
    }
  }
}

// eight rows of one token (w: the rows' codes; a short block repeats its last row): y[q] for
// the first `rows`. A row's group sum is sum cw * cx - zx * sum cw - zw * (sum cx - group * zx):
// `act` the token's codes in dot_order, group by group (each whole steps), `offset[g]` = zw *
// (the sum of group g's cx - group * zx), `scales8` [groups][8] the rows' scales as floats.
template <int Bits, bool ZeroUnsigned>
APQ_LOWBIT_DOTPROD_FN inline void rows8_dot(const int8_t* act, const int32_t* offset, int32_t zx,
                                            const uint8_t* const* w, int64_t groups,
                                            int64_t group, const float* scales8,
                                            float token_scale, int64_t rows, float* y) {
  constexpr int64_t step = dot_step(Bits), step_bytes = step * Bits / 8;
  constexpr int64_t step_act = dot_step_act(Bits);
  const int64_t full = group / step, group_bytes = group * Bits / 8;
  const bool half = group % step != 0;
  const int64_t group_act = (full + (half ? 1 : 0)) * step_act;
  const uint8x16_t minus_zx = vdupq_n_u8(static_cast<uint8_t>(-zx));
  float32x4_t acc[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* a = act + g * group_act;
    const int64_t at = g * group_bytes;
    for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3: acc += scale * float(exact)
      int32x4_t lanes[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
      for (int64_t s = 0; s < full; ++s) {
        dot_step4<Bits, false, ZeroUnsigned>(lanes, w + 4 * h, at + s * step_bytes,
                                             a + s * step_act, minus_zx);
      }
      if (half) {
        dot_step4<Bits, true, ZeroUnsigned>(lanes, w + 4 * h, at + full * step_bytes,
                                            a + full * step_act, minus_zx);
      }
      const int32x4_t sums =
          Bits == 3 ? vpaddq_s32(lanes[0], lanes[1])
                    : vpaddq_s32(vpaddq_s32(lanes[0], lanes[1]), vpaddq_s32(lanes[2], lanes[3]));
      const int32x4_t exact = vsubq_s32(sums, vdupq_n_s32(offset[g]));
      const float32x4_t term = vmulq_f32(vld1q_f32(scales8 + g * kDotRows + 4 * h),
                                         vcvtq_f32_s32(exact));
      acc[h] = vaddq_f32(acc[h], term);
    }
  }
  alignas(16) float out[kDotRows];
  vst1q_f32(out, acc[0]);
  vst1q_f32(out + 4, acc[1]);
  for (int64_t q = 0; q < rows; ++q) y[q] = out[q] * token_scale;
}

// rows8_dot with the zero point's instruction chosen for zx
template <int Bits>
inline void rows8_dot_token(const int8_t* act, const int32_t* offset, int32_t zx,
                            const uint8_t* const* w, int64_t groups, int64_t group,
                            const float* scales8, float token_scale, int64_t rows, float* y) {
  if (zx > 0) {
    rows8_dot<Bits, false>(act, offset, zx, w, groups, group, scales8, token_scale, rows, y);
  } else {
    rows8_dot<Bits, true>(act, offset, zx, w, groups, group, scales8, token_scale, rows, y);
  }
}

// the whole in-place operator for dot_fits groups (k % group == 0)
template <class Parallel>
inline void lowbit_linear_dotprod(const int8_t* codes, const int32_t* zx, const float* token_scale,
                                  int64_t m, int64_t k, const uint8_t* packed,
                                  const uint16_t* scales, int64_t n, int bits, int64_t group,
                                  float* y, Parallel&& parallel, int64_t grain) {
  const int64_t groups = k / group, row_bytes = k * bits / 8;
  const int64_t step = dot_step(bits), step_act = dot_step_act(bits);
  const int64_t group_act = (group + step - 1) / step * step_act;
  const int32_t zw = 1 << (bits - 1);
  std::vector<int8_t> act(static_cast<size_t>(m * groups * group_act));
  std::vector<int32_t> offset(static_cast<size_t>(m * groups));
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* c = codes + t * k + g * group;
      int8_t* out = act.data() + (t * groups + g) * group_act;
      for (int64_t s = 0; s < group; s += step, out += step_act) {
        const bool half = group - s < step;
        for (int p = 0; p < step_act; ++p) {
          const int at = dot_order(bits, p, half);
          out[p] = at < 0 ? int8_t{0} : c[s + at];
        }
      }
      int32_t sum = 0;
      for (int64_t i = 0; i < group; ++i) sum += c[i];
      offset[t * groups + g] = zw * (sum - static_cast<int32_t>(group) * zx[t]);
    }
  }
  const int64_t blocks = (n + kDotRows - 1) / kDotRows;
  parallel(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> scales8(static_cast<size_t>(groups * kDotRows));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = kDotRows * b, rows = n - r0 < kDotRows ? n - r0 : kDotRows;
      const uint8_t* w[kDotRows];
      for (int64_t q = 0; q < kDotRows; ++q) {
        w[q] = packed + (r0 + (q < rows ? q : rows - 1)) * row_bytes;
        for (int64_t g = 0; g < groups; ++g) {
          scales8[g * kDotRows + q] =
              q < rows ? half_to_float(scales[(r0 + q) * groups + g]) : 0.0f;
        }
      }
      for (int64_t t = 0; t < m; ++t) {
        const int8_t* a = act.data() + t * groups * group_act;
        const int32_t* off = offset.data() + t * groups;
        float* out = y + t * n + r0;
        const float* s8 = scales8.data();
        if (bits == 4) {
          rows8_dot_token<4>(a, off, zx[t], w, groups, group, s8, token_scale[t], rows, out);
        } else if (bits == 3) {
          rows8_dot_token<3>(a, off, zx[t], w, groups, group, s8, token_scale[t], rows, out);
        } else {
          rows8_dot_token<2>(a, off, zx[t], w, groups, group, s8, token_scale[t], rows, out);
        }
      }
    }
  });
}
#endif

#if defined(APQ_LOWBIT_AVX512)
// AVX-512 VNNI (with VBMI): a chunk of 64 codes of one row becomes one register of 64 unsigned
// bytes (4 bits: the 32 low nibbles, then the 32 high ones; 2 bits: the four 16-byte lanes hold
// the codes at bits 0, 2, 4 and 6 of the chunk's 16 bytes; 3 bits: PERMB gives each 3-byte word
// a 64-bit lane and MULTISHIFT cuts its eight codes, in order). The token's activation codes are
// laid out in the same order (chunk_order), so VPDPBUSD meets each code with its activation.
// Sixteen rows run side by side: their lanes are reduced together (reduce16, reduce16_pairs),
// and the float chains of the sixteen rows sit in the sixteen lanes of one register, each lane
// the operations of its row alone, its groups in order.
constexpr int64_t kChunk = 64;

// the position in the chunk of the register's byte p
inline int chunk_order(int bits, int p) {
  if (bits == 4) return p < 32 ? 2 * p : 2 * (p - 32) + 1;
  if (bits == 2) return 4 * (p % 16) + p / 16;
  return p;  // 3 bits: in order
}

// one chunk (64 codes) of a row as 64 unsigned bytes, in chunk_order
template <int Bits>
inline __m512i chunk_codes(const uint8_t* at) {
  if constexpr (Bits == 4) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
    const __m512i both = _mm512_inserti64x4(_mm512_zextsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(15));
  } else if constexpr (Bits == 2) {
    const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
    const __m512i shifted = _mm512_srlv_epi64(b, _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0));
    return _mm512_and_si512(shifted, _mm512_set1_epi8(3));
  } else {
    // 24 bytes (a masked load: nothing past the chunk is read); word w's bytes to lane w
    const __m512i b = _mm512_zextsi256_si512(_mm256_maskz_loadu_epi8(0x00FFFFFFu, at));
    const __m512i index = _mm512_set_epi8(
        28, 27, 26, 25, 24, 23, 22, 21, 25, 24, 23, 22, 21, 20, 19, 18,
        22, 21, 20, 19, 18, 17, 16, 15, 19, 18, 17, 16, 15, 14, 13, 12,
        16, 15, 14, 13, 12, 11, 10, 9, 13, 12, 11, 10, 9, 8, 7, 6,
        10, 9, 8, 7, 6, 5, 4, 3, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i words = _mm512_permutexvar_epi8(index, b);
    const __m512i shifts = _mm512_set1_epi64(0x15120F0C09060300ll);  // 21 18 15 12 9 6 3 0
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, words), _mm512_set1_epi8(7));
  }
}

// sixteen registers of int32 lanes -> four, u[i] holding in each 128-bit lane the partial sums
// of rows 4i .. 4i+3 (v[4i] .. v[4i+3]) over that lane
inline void reduce16_to_lanes(const __m512i* v, __m512i* u) {
  __m512i t[8];
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                            _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  }
}

// the 128-bit lanes of u[0..3] summed in pairs: [rows 0-3 lanes 0+1, rows 0-3 lanes 2+3, rows 4-7
// lanes 0+1, rows 4-7 lanes 2+3] (w0) and the same for rows 8-15 (w1)
inline void pair_lanes(const __m512i* u, __m512i* w0, __m512i* w1) {
  *w0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88),
                         _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
  *w1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88),
                         _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
}

// sixteen registers of int32 lanes -> one register, lane r the sum of v[r]'s lanes
inline __m512i reduce16(const __m512i* v) {
  __m512i u[4], w0, w1;
  reduce16_to_lanes(v, u);
  pair_lanes(u, &w0, &w1);
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, 0x88), _mm512_shuffle_i32x4(w0, w1, 0xDD));
}

// sixteen registers, lanes 0-7 one group's and 8-15 the next group's -> two registers, lane r
// the sums of v[r]'s lanes 0-7 (first) and 8-15 (second)
inline void reduce16_pairs(const __m512i* v, __m512i* first, __m512i* second) {
  __m512i u[4], w0, w1;
  reduce16_to_lanes(v, u);  // u[i]'s lanes 0, 1: the first group; lanes 2, 3: the second
  pair_lanes(u, &w0, &w1);
  *first = _mm512_shuffle_i32x4(w0, w1, 0x88);
  *second = _mm512_shuffle_i32x4(w0, w1, 0xDD);
}

// v[i] lane j -> v[j] lane i
inline void transpose16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    auto lo = [](__m512 a, __m512 b) {
      return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    auto hi = [](__m512 a, __m512 b) {
      return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    v[i] = lo(t[i], t[i + 2]);
    v[i + 1] = hi(t[i], t[i + 2]);
    v[i + 2] = lo(t[i + 1], t[i + 3]);
    v[i + 3] = hi(t[i + 1], t[i + 3]);
  }
  // now v[4a + b] holds, in 128-bit lane c, column 4c + b of rows 4a .. 4a + 3
  for (int b = 0; b < 4; ++b) {
    t[b] = _mm512_shuffle_f32x4(v[b], v[4 + b], 0x88);       // lanes 0, 2 of rows 0-3, 4-7
    t[4 + b] = _mm512_shuffle_f32x4(v[b], v[4 + b], 0xDD);   // lanes 1, 3
    t[8 + b] = _mm512_shuffle_f32x4(v[8 + b], v[12 + b], 0x88);
    t[12 + b] = _mm512_shuffle_f32x4(v[8 + b], v[12 + b], 0xDD);
  }
  for (int b = 0; b < 4; ++b) {
    v[b] = _mm512_shuffle_f32x4(t[b], t[8 + b], 0x88);         // column b
    v[8 + b] = _mm512_shuffle_f32x4(t[b], t[8 + b], 0xDD);     // column 8 + b
    v[4 + b] = _mm512_shuffle_f32x4(t[4 + b], t[12 + b], 0x88);  // column 4 + b
    v[12 + b] = _mm512_shuffle_f32x4(t[4 + b], t[12 + b], 0xDD);  // column 12 + b
  }
}

// rows [r0, r0 + 16) (those below n) of one token: y[r] for each. A row's group sum is
// sum cw * cx - zx * sum cw - zw * (sum cx - group * zx): the codes meet the activation codes
// `act` (chunk_order) and -zx in two VPDPBUSD (-zx fits int8 unless zx is -128: then 127 and 1
// more); `offset[g]` = zw * (sum of the group's cx - group * zx); `scales16` [groups][16] the
// rows' scales as floats.
template <int Bits>
inline void rows16(const int8_t* act, const int32_t* offset, int32_t zx, const uint8_t* packed,
                   int64_t row_bytes, int64_t r0, int64_t n, int64_t k, int64_t group,
                   const float* scales16, float token_scale, float* y) {
  const int64_t groups = k / group, chunks_per_group = group / kChunk;
  const int64_t chunk_bytes = kChunk * Bits / 8;
  const int64_t rows = n - r0 < 16 ? n - r0 : 16;
  const bool split = zx == -128;
  const __m512i minus_zx = _mm512_set1_epi8(static_cast<char>(split ? 127 : -zx));
  const __m512i one = _mm512_set1_epi8(1);
  __m512 acc = _mm512_setzero_ps();
  const uint8_t* block = packed + r0 * row_bytes;
  int64_t g = 0;
  if constexpr (Bits == 4) {
    // groups of 64 in pairs: one 64-byte load holds two groups' codes, its low nibbles meet the
    // two groups' even activations and its high nibbles the odd ones, lanes 0-7 summing the
    // first group and 8-15 the second; the zero point meets the nibbles' sum (at most 30)
    if (rows == 16 && group == kChunk && !split) {
      for (; g + 2 <= groups; g += 2) {
        const int8_t* a0 = act + g * kChunk;
        const __m512i even = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + kChunk)), 1);
        const __m512i odd = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + 32))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + kChunk + 32)), 1);
        const __m512i nibble = _mm512_set1_epi8(15);
        __m512i lanes[16];
#pragma GCC unroll 16
        for (int q = 0; q < 16; ++q) {
          const __m512i b = _mm512_loadu_si512(block + q * row_bytes + g * 32);
          const __m512i lo = _mm512_and_si512(b, nibble);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
          __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, even);
          sum = _mm512_dpbusd_epi32(sum, hi, odd);
          lanes[q] = _mm512_dpbusd_epi32(sum, _mm512_add_epi8(lo, hi), minus_zx);
        }
        __m512i first, second;
        reduce16_pairs(lanes, &first, &second);
        for (int64_t j = 0; j < 2; ++j) {
          const __m512i exact = _mm512_sub_epi32(j == 0 ? first : second,
                                                 _mm512_set1_epi32(offset[g + j]));
          const __m512 term = _mm512_mul_ps(_mm512_loadu_ps(scales16 + (g + j) * 16),
                                            _mm512_cvtepi32_ps(exact));
          acc = _mm512_add_ps(acc, term);
        }
      }
    }
  }
  for (; g < groups; ++g) {
    __m512i lanes[16];
    const int8_t* a_group = act + g * group;
    const uint8_t* w_group = block + g * chunks_per_group * chunk_bytes;
    if (rows == 16 && chunks_per_group == 1 && !split) {  // the common case, unrolled
      const __m512i a = _mm512_loadu_si512(a_group);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) {
        const __m512i codes = chunk_codes<Bits>(w_group + q * row_bytes);
        lanes[q] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, a),
                                       codes, minus_zx);
      }
    } else {
      for (int64_t q = 0; q < 16; ++q) {
        __m512i sum = _mm512_setzero_si512();
        if (q < rows) {
          for (int64_t c = 0; c < chunks_per_group; ++c) {
            const __m512i codes = chunk_codes<Bits>(w_group + q * row_bytes + c * chunk_bytes);
            sum = _mm512_dpbusd_epi32(sum, codes, _mm512_loadu_si512(a_group + c * kChunk));
            sum = _mm512_dpbusd_epi32(sum, codes, minus_zx);
            if (split) sum = _mm512_dpbusd_epi32(sum, codes, one);
          }
        }
        lanes[q] = sum;
      }
    }
    const __m512i exact = _mm512_sub_epi32(reduce16(lanes), _mm512_set1_epi32(offset[g]));
    const __m512 term =
        _mm512_mul_ps(_mm512_loadu_ps(scales16 + g * 16), _mm512_cvtepi32_ps(exact));
    acc = _mm512_add_ps(acc, term);
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, _mm512_mul_ps(acc, _mm512_set1_ps(token_scale)));
  for (int64_t q = 0; q < rows; ++q) y[r0 + q] = out[q];
}

// the whole in-place operator for whole groups of whole chunks (group % 64 == 0, k % group == 0)
template <class Parallel>
inline void lowbit_linear_avx512(const int8_t* codes, const int32_t* zx, const float* token_scale,
                                 int64_t m, int64_t k, const uint8_t* packed,
                                 const uint16_t* scales, int64_t n, int bits, int64_t group,
                                 float* y, Parallel&& parallel, int64_t grain) {
  const int64_t groups = k / group, row_bytes = k * bits / 8;
  const int32_t zw = 1 << (bits - 1);
  std::vector<int8_t> act(static_cast<size_t>(m * k));
  std::vector<int32_t> offset(static_cast<size_t>(m * groups));
  alignas(64) int8_t order[kChunk];
  for (int p = 0; p < kChunk; ++p) order[p] = static_cast<int8_t>(chunk_order(bits, p));
  const __m512i index = _mm512_load_si512(order);
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t chunks_per_group = group / kChunk;
  for (int64_t t = 0; t < m; ++t) {
    const int8_t* c = codes + t * k;
    for (int64_t g = 0; g < groups; ++g) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t j = g * chunks_per_group; j < (g + 1) * chunks_per_group; ++j) {
        const __m512i v = _mm512_loadu_si512(c + j * kChunk);
        _mm512_storeu_si512(act.data() + t * k + j * kChunk, _mm512_permutexvar_epi8(index, v));
        sum = _mm512_dpbusd_epi32(sum, ones, v);  // the codes' sum, exact
      }
      offset[t * groups + g] =
          zw * (_mm512_reduce_add_epi32(sum) - static_cast<int32_t>(group) * zx[t]);
    }
  }
  const int64_t blocks = (n + 15) / 16;
  parallel(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> scales16(static_cast<size_t>(groups * 16), 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = 16 * b;
      // the next block's rows and scales (contiguous runs) to the cache while this one runs
      if (b + 1 < b1) {
        const int64_t next_rows = n - r0 - 16 < 16 ? n - r0 - 16 : 16;
        const uint8_t* next = packed + (r0 + 16) * row_bytes;
        for (int64_t i = 0; i < next_rows * row_bytes; i += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T0);
        }
        const uint8_t* next_scales = reinterpret_cast<const uint8_t*>(scales + (r0 + 16) * groups);
        for (int64_t i = 0; i < next_rows * groups * 2; i += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(next_scales + i), _MM_HINT_T0);
        }
      }
      // the block's scales, float16 [rows][groups] (contiguous), to floats [groups][16]: 16
      // columns at a time, each row converted (F16C: exact) and the 16x16 tile transposed
      const int64_t rows = n - r0 < 16 ? n - r0 : 16;
      const uint16_t* tile = scales + r0 * groups;
      for (int64_t g0 = 0; g0 < groups; g0 += 16) {
        const int64_t width = groups - g0 < 16 ? groups - g0 : 16;
        const __mmask16 columns = static_cast<__mmask16>((1u << width) - 1u);
        __m512 v[16];
        for (int64_t q = 0; q < 16; ++q) {
          v[q] = q < rows ? _mm512_cvtph_ps(
                                _mm256_maskz_loadu_epi16(columns, tile + q * groups + g0))
                          : _mm512_setzero_ps();
        }
        transpose16(v);
        for (int64_t j = 0; j < width; ++j) _mm512_storeu_ps(scales16.data() + (g0 + j) * 16, v[j]);
      }
      for (int64_t t = 0; t < m; ++t) {
        const int8_t* a = act.data() + t * k;
        const int32_t* off = offset.data() + t * groups;
        float* out = y + t * n;
        if (bits == 4) {
          rows16<4>(a, off, zx[t], packed, row_bytes, r0, n, k, group, scales16.data(),
                    token_scale[t], out);
        } else if (bits == 3) {
          rows16<3>(a, off, zx[t], packed, row_bytes, r0, n, k, group, scales16.data(),
                    token_scale[t], out);
        } else {
          rows16<2>(a, off, zx[t], packed, row_bytes, r0, n, k, group, scales16.data(),
                    token_scale[t], out);
        }
      }
    }
  });
}
#endif

// y [m, n] of x [m, k]: the whole operator. `parallel(begin, end, grain, f)` runs f over
// pieces of [begin, end) of at least `grain` items, in any order and on any threads (output rows
// are split between pieces; every output is computed the same way wherever it runs): serially
// by default, ExecuTorch's thread pool in executorch_lowbit_linear.cpp.
template <class Parallel>
inline void lowbit_linear(const float* x, int64_t m, int64_t k, const uint8_t* packed,
                          const uint16_t* scales, int64_t n, int bits, int64_t group, float* y,
                          Parallel&& parallel) {
  // at least ~64k multiply-adds a piece
  auto grain = [](int64_t work_per_item) -> int64_t {
    const int64_t items = (int64_t{1} << 16) / (work_per_item > 0 ? work_per_item : 1);
    return items > 0 ? items : 1;
  };
  const int64_t groups = (k + group - 1) / group;
  const int64_t row_bytes = (k * bits + 7) / 8;
  const int32_t zw = 1 << (bits - 1);
  std::vector<int8_t> codes(static_cast<size_t>(m * k));
  std::vector<int32_t> zx(static_cast<size_t>(m));
  std::vector<float> token_scale(static_cast<size_t>(m));
  for (int64_t t = 0; t < m; ++t) {
    token_scale[t] = quantize_row(x + t * k, k, codes.data() + t * k, &zx[t]);
  }
  // a word holds `per` codes: a byte of 2- or 4-bit codes, three bytes of 3-bit ones
  const int per = bits == 3 ? 8 : 8 / (bits > 0 && bits <= 8 ? bits : 8);
  const bool in_place = m <= kInPlaceTokens && (bits == 2 || bits == 3 || bits == 4) &&
                        k % group == 0 && group % per == 0;
#if defined(APQ_LOWBIT_AVX512)
  if (in_place && group % kChunk == 0) {
    APQ_LOWBIT_TRACE("avx512");
    lowbit_linear_avx512(codes.data(), zx.data(), token_scale.data(), m, k, packed, scales, n,
                         bits, group, y, parallel, grain(16 * k * m));
    return;
  }
#endif
#if defined(APQ_LOWBIT_DOTPROD)
  if (in_place && dot_fits(bits, group) && cpu_has_dotprod()) {
    APQ_LOWBIT_TRACE("dotprod");
    lowbit_linear_dotprod(codes.data(), zx.data(), token_scale.data(), m, k, packed, scales, n,
                          bits, group, y, parallel, grain(kDotRows * k * m));
    return;
  }
#endif
  if (in_place) {
    APQ_LOWBIT_TRACE("in-place");
    const int64_t words = k / per, group_words = group / per, group_bytes = group * bits / 8;
    std::vector<int8_t> planes(static_cast<size_t>(m * k));
    std::vector<int32_t> code_sums(static_cast<size_t>(m * groups));
    for (int64_t t = 0; t < m; ++t) {
      const int8_t* c = codes.data() + t * k;
      int8_t* p = planes.data() + t * k;
      for (int64_t j = 0; j < words; ++j) {
        for (int i = 0; i < per; ++i) p[i * words + j] = c[j * per + i];
      }
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t i = g * group; i < (g + 1) * group; ++i) sum += c[i];
        code_sums[t * groups + g] = sum;
      }
    }
    // the SIMD loops take whole steps: 16 bytes of 2/4-bit codes, 2 (x86) or 8 (NEON) 3-bit words
#if defined(APQ_LOWBIT_LANES)
    const bool simd = bits == 3 ?
#if defined(APQ_LOWBIT_LANES3)
                                group_words % APQ_LOWBIT_LANES3 == 0
#else
                                false
#endif
                                : group_bytes % 16 == 0;
#endif
    auto pointers = [&](int64_t t, int64_t g, const int8_t** at) {
      const int8_t* p = planes.data() + t * k;
      for (int i = 0; i < per; ++i) at[i] = p + i * words + g * group_words;
    };
    // one group of one row for one token: the exact integer sum
    auto exact_sum = [&](const uint8_t* row, int64_t g, int64_t t) -> int32_t {
      const int8_t* at[8];
      pointers(t, g, at);
      int32_t products, code_total;
#if defined(APQ_LOWBIT_LANES)
      if (simd) {
        GroupLanes v;
        if (bits == 3) {
#if defined(APQ_LOWBIT_LANES3)
          v = group_lanes3(row + g * group_bytes, at, codes.data() + t * k + g * group,
                           group_words);
#endif
        } else {
          v = group_lanes(row + g * group_bytes, at, bits, group_bytes);
        }
        products = lanes_sum(v.products);
        code_total = lanes_sum(v.codes);
      } else
#endif
      {
        const GroupSums s = bits == 3 ? group_sums3_scalar(row + g * group_bytes, at, group_words)
                                      : group_sums_scalar(row + g * group_bytes, at, bits,
                                                          group_bytes);
        products = s.products;
        code_total = s.codes;
      }
      return products - zw * code_sums[t * groups + g] - zx[t] * code_total +
             static_cast<int32_t>(group) * zx[t] * zw;
    };
    // work units of four rows; each unit's outputs depend on nothing another unit computes
    const int64_t units = (n + 3) / 4;
    parallel(0, units, grain(4 * k * m), [&](int64_t u0, int64_t u1) {
      std::vector<float> unit_scales(static_cast<size_t>(4 * groups));
      for (int64_t u = u0; u < u1; ++u) {
        int64_t r0 = 4 * u;
        const int64_t r1 = r0 + 4 < n ? r0 + 4 : n;
#if defined(APQ_LOWBIT_BLOCK)
        // four rows at once: their lanes reduced together, their four float chains side by
        // side (each lane one row's chain, its groups in order: the operations of one row alone)
        if (simd && r1 - r0 == 4) {
          for (int64_t q = 0; q < 4; ++q) {
            for (int64_t g = 0; g < groups; ++g) {
              unit_scales[g * 4 + q] = half_to_float(scales[(r0 + q) * groups + g]);
            }
          }
          for (int64_t t = 0; t < m; ++t) {
            alignas(16) float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t g = 0; g < groups; ++g) {
              const int8_t* at[8];
              pointers(t, g, at);
              GroupLanes v[4];
              for (int64_t q = 0; q < 4; ++q) {
                const uint8_t* row = packed + (r0 + q) * row_bytes + g * group_bytes;
                if (bits == 3) {
#if defined(APQ_LOWBIT_LANES3)
                  v[q] = group_lanes3(row, at, codes.data() + t * k + g * group, group_words);
#endif
                } else {
                  v[q] = group_lanes(row, at, bits, group_bytes);
                }
              }
              const int32_t offset = zw * code_sums[t * groups + g] -
                                     static_cast<int32_t>(group) * zx[t] * zw;
              block_step(acc, unit_scales.data() + g * 4,
                         lanes_of_four(v[0].products, v[1].products, v[2].products, v[3].products),
                         lanes_of_four(v[0].codes, v[1].codes, v[2].codes, v[3].codes), offset,
                         zx[t]);
            }
            for (int64_t q = 0; q < 4; ++q) y[t * n + r0 + q] = acc[q] * token_scale[t];
          }
          continue;
        }
#endif
        for (; r0 < r1; ++r0) {  // one row at a time
          const uint8_t* row = packed + r0 * row_bytes;
          for (int64_t g = 0; g < groups; ++g) {
            unit_scales[g] = half_to_float(scales[r0 * groups + g]);
          }
          for (int64_t t = 0; t < m; ++t) {
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
              const float term = unit_scales[g] * static_cast<float>(exact_sum(row, g, t));
              acc = acc + term;
            }
            y[t * n + r0] = acc * token_scale[t];
          }
        }
      }
    });
    return;
  }

  // each row unpacked once, reused for every token; activations minus their zero point
  APQ_LOWBIT_TRACE("unpack");
  std::vector<int16_t> a(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) a[i] = static_cast<int16_t>(codes[i] - zx[i / k]);
  parallel(0, n, grain(k * m), [&](int64_t r_begin, int64_t r_end) {
    std::vector<int16_t> w(static_cast<size_t>(k));
    std::vector<float> row_scales(static_cast<size_t>(groups));
    for (int64_t r = r_begin; r < r_end; ++r) {
      unpack_row(packed + r * row_bytes, bits, k, w.data());
      for (int64_t g = 0; g < groups; ++g) row_scales[g] = half_to_float(scales[r * groups + g]);
      for (int64_t t = 0; t < m; ++t) {
        const int16_t* at = a.data() + t * k;
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t begin = g * group;
          const int64_t len = begin + group <= k ? group : k - begin;
          const float term =
              row_scales[g] * static_cast<float>(dot16(at + begin, w.data() + begin, len));
          acc = acc + term;
        }
        y[t * n + r] = acc * token_scale[t];
      }
    }
  });
}

// the SIMD of lowbit_linear's in-place path on this CPU: APQ_LOWBIT_SIMD, or "neon+dotprod"
// where the dot product is chosen at run time
inline const char* simd_path() {
#if defined(APQ_LOWBIT_DOTPROD)
  if (cpu_has_dotprod()) return "neon+dotprod";
#endif
  return APQ_LOWBIT_SIMD;
}

// runs f(begin, end) over [begin, end) in one piece: lowbit_linear's default `parallel`
struct Serial {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t, F&& f) const {
    if (end > begin) f(begin, end);
  }
};

inline void lowbit_linear(const float* x, int64_t m, int64_t k, const uint8_t* packed,
                          const uint16_t* scales, int64_t n, int bits, int64_t group, float* y) {
  lowbit_linear(x, m, k, packed, scales, n, bits, group, y, Serial{});
}

// rows [count, k] float32 of a packed table [rows, ceil(k*bits/8)] with float16 scales: the
// weights (code - 2^(bits-1)) * scale, exact in float32 (a small integer times a float16 value).
// A tied head's lookup reads the head's own codes and scales this way (no second copy). Returns
// false for an id outside the table.
inline bool lowbit_rows(const int64_t* ids, int64_t count, const uint8_t* packed,
                        const uint16_t* scales, int64_t rows, int64_t k, int bits, int64_t group,
                        float* out) {
  const int64_t groups = (k + group - 1) / group;
  const int64_t row_bytes = (k * bits + 7) / 8;
  std::vector<int16_t> w(static_cast<size_t>(k));
  for (int64_t t = 0; t < count; ++t) {
    const int64_t id = ids[t];
    if (id < 0 || id >= rows) return false;
    unpack_row(packed + id * row_bytes, bits, k, w.data());
    for (int64_t i = 0; i < k; ++i) {
      out[t * k + i] = static_cast<float>(w[i]) * half_to_float(scales[id * groups + i / group]);
    }
  }
  return true;
}

}  // namespace apq_lowbit

#endif  // APQ_LOWBIT_LINEAR_HPP
