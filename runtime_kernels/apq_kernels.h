/*
 * apq_kernels.h - dependency-free C99 runtime kernels of apq-sdk.
 *
 * These kernels implement docs/formats.md bit for bit; the numpy reference in
 * apq_sdk/quant/packing.py implements the same contract and tests/runtime_kernels/ checks through
 * ctypes that both produce identical bytes and identical float32 bit patterns.
 *
 * Layout
 * ------
 * A linear layer W has shape [N, K] (out, in features), quantized in groups of g consecutive
 * weights along K (g % 8 == 0, K % 8 == 0, G = ceil(K / g) groups per row; when g does not divide
 * K the last group of each row is shorter, K - (G-1)*g weights, e.g. K = 576 with g = 128), with
 * b in {2, 3, 4, 8} bits:
 *
 *   qweight  uint8   [N, K*b/8]          b-bit codes of each row, packed (below)
 *   scales   float16 [N, G]              one scale per group, passed as raw IEEE binary16 bits
 *   qzeros   uint8   [N, ceil(G*b/8)]    asymmetric only (NULL = symmetric, zero point 2^(b-1))
 *
 * Bit packing: each row is a little-endian bit stream. Element j occupies stream bits
 * [j*b, (j+1)*b) and stream bit i is bit (i % 8), least significant first, of byte (i / 8).
 * 4-bit codes {1, 2} pack to the byte 0x21; eight 3-bit codes fill three bytes. A row of n codes
 * takes ceil(n*b/8) bytes; unused trailing bits are zero.
 *
 * Dequantization: w[n,k] = (float)(q[n,k] - z[n,k/g]) * fp16_to_float(scales[n,k/g]).
 * (k/g is the group index, integer division, also for the shorter last group.)
 *
 * Activations (per token t, float32, in this order):
 *   amax = max_k |x[t,k]|;  scale = (amax * clip) / 127.0f;  scale = 1.0f if scale == 0
 *   xq[t,k] = clamp(rintf(x[t,k] / scale), -127, 127)           (round half to even)
 *
 * Mixed-bit matmul:
 *   acc     = sum_{k in grp} (int32)xq[t,k] * (int32)(q[n,k] - z[n,grp])   (exact int32; the
 *             last group sums its K - (G-1)*g weights)
 *   y[t,n]  = 0.0f; for grp = 0 .. G-1: y[t,n] = y[t,n] + scale_f32[n,grp] * (float)acc
 *   y[t,n]  = y[t,n] * scale[t]
 *
 * Build with -std=c99 -ffp-contract=off (no fused multiply-add) on a target whose float
 * arithmetic is IEEE binary32 evaluated in single precision (FLT_EVAL_METHOD == 0, e.g. x86-64
 * SSE, AArch64, Cortex-M4F/M7 with a single-precision FPU) and the default round-to-nearest mode.
 * The kernels use no heap, no global state and only <stdint.h>, <stddef.h>, <math.h>, <string.h>.
 * All arrays are dense, row major. Every function returns APQK_OK (0) or a negative APQK_ERR_*.
 * Every name defined here has the prefix apqk_ / APQK_: a C file can include this header and a
 * package's generated apq_model.h (the C API, prefix apq_ / APQ_) side by side.
 */
#ifndef APQ_KERNELS_H
#define APQ_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define APQK_KERNELS_VERSION 3 /* 2: group_size need not divide K; 3: the apqk_ / APQK_ prefix */

#define APQK_OK 0
#define APQK_ERR_NULL (-1)       /* a required pointer is NULL */
#define APQK_ERR_BITS (-2)       /* bits not in {2, 3, 4, 8} */
#define APQK_ERR_SHAPE (-3)      /* negative size, K <= 0, or K % 8 != 0 (layer kernels) */
#define APQK_ERR_GROUP (-4)      /* group_size <= 0, not a multiple of 8, or > 65536 */
#define APQK_ERR_CLIP (-5)       /* clip not in (0, 1] */
#define APQK_ERR_RANGE (-6)      /* a code >= 2^bits given to apqk_pack_bits */

/* Largest group size whose int32 group sum cannot overflow: 65536 * 127 * 255 < 2^31. */
#define APQK_MAX_GROUP_SIZE 65536

/* Bytes one packed row of n b-bit codes occupies: ceil(n*b/8). */
size_t apqk_packed_row_bytes(int n, int bits);

/* IEEE binary16 bits -> float, exact (normals, subnormals, zeros, infinities, NaN payloads). */
float apqk_fp16_to_float(uint16_t h);

/*
 * Pack codes [rows, n] (each < 2^bits) into out [rows, ceil(n*bits/8)].
 * n*bits need not be a multiple of 8 here (trailing bits are zero-padded, the qzeros layout).
 */
int apqk_pack_bits(const uint8_t *codes, int rows, int n, int bits, uint8_t *out);

/* Unpack packed [rows, ceil(n*bits/8)] into codes [rows, n]. */
int apqk_unpack_bits(const uint8_t *packed, int rows, int n, int bits, uint8_t *codes);

/* Per-token dynamic int8 quantization: x [T, K] -> xq [T, K], scale [T]. */
int apqk_quantize_activations_per_token(const float *x, int T, int K, float clip,
                                       int8_t *xq, float *scale);

/* Dequantize a packed layer into w [N, K] float32. qzeros may be NULL (symmetric). */
int apqk_dequantize(const uint8_t *qweight, const uint16_t *scales_fp16_bits,
                   const uint8_t *qzeros, int N, int K, int bits, int group_size, float *w);

/*
 * y [T, N] = mixed-bit matmul of x [T, K] with the packed layer, activations quantized per token
 * to int8 on the fly (no workspace needed). qzeros may be NULL (symmetric).
 */
int apqk_matmul_int8_dynamic(const float *x, int T, int K, const uint8_t *qweight,
                            const uint16_t *scales_fp16_bits, const uint8_t *qzeros /* NULL if symmetric */,
                            int N, int bits, int group_size, float clip, float *y);

#ifdef __cplusplus
}
#endif

#endif /* APQ_KERNELS_H */
