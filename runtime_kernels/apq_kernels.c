/*
 * apq_kernels.c - dependency-free C99 runtime kernels of apq-sdk (see apq_kernels.h and
 * docs/formats.md for the layout and the exact arithmetic). Compile with:
 *
 *   cc -O2 -fPIC -shared -std=c99 -ffp-contract=off -o libapq_kernels.so apq_kernels.c -lm
 *
 * -ffp-contract=off matters: a fused multiply-add in the group accumulation would change the
 * float32 rounding and break bit-exactness with the numpy reference.
 */
#include "apq_kernels.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Activation codes of one group are buffered on the stack when the group is at most this long;
 * longer groups quantize each activation on the fly (same result, more work). */
#define APQK_XQ_STACK 512

static int apqk_bits_ok(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

size_t apqk_packed_row_bytes(int n, int bits)
{
    if (n <= 0 || bits <= 0) {
        return 0;
    }
    return ((size_t)n * (size_t)bits + 7u) / 8u;
}

float apqk_fp16_to_float(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    int32_t exp = (int32_t)((h >> 10) & 0x1Fu);
    uint32_t mant = (uint32_t)h & 0x3FFu;
    uint32_t bits;
    float f;

    if (exp == 0x1F) { /* infinity or NaN: keep the payload */
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp != 0) { /* normal */
        bits = sign | ((uint32_t)(exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) { /* signed zero */
        bits = sign;
    } else { /* subnormal half: normalize, every half subnormal is a normal float */
        exp = 1;
        while ((mant & 0x400u) == 0) {
            mant <<= 1;
            exp -= 1;
        }
        mant &= 0x3FFu;
        bits = sign | ((uint32_t)(exp + 112) << 23) | (mant << 13);
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Code j of a packed row (LSB-first bit stream). Reads at most the two bytes holding it. */
static uint32_t apqk_get_code(const uint8_t *row, size_t j, int bits)
{
    size_t bit = j * (size_t)bits;
    size_t byte = bit >> 3;
    unsigned off = (unsigned)(bit & 7u);
    uint32_t v = (uint32_t)row[byte] >> off;
    if (off + (unsigned)bits > 8u) {
        v |= (uint32_t)row[byte + 1] << (8u - off);
    }
    return v & ((1u << bits) - 1u);
}

int apqk_pack_bits(const uint8_t *codes, int rows, int n, int bits, uint8_t *out)
{
    size_t r, j, row_bytes;
    uint32_t limit;

    if (!apqk_bits_ok(bits)) {
        return APQK_ERR_BITS;
    }
    if (rows < 0 || n < 0) {
        return APQK_ERR_SHAPE;
    }
    if (rows == 0 || n == 0) {
        return APQK_OK;
    }
    if (codes == NULL || out == NULL) {
        return APQK_ERR_NULL;
    }
    limit = 1u << bits;
    for (j = 0; j < (size_t)rows * (size_t)n; ++j) {
        if ((uint32_t)codes[j] >= limit) {
            return APQK_ERR_RANGE;
        }
    }
    row_bytes = apqk_packed_row_bytes(n, bits);
    for (r = 0; r < (size_t)rows; ++r) {
        const uint8_t *src = codes + r * (size_t)n;
        uint8_t *dst = out + r * row_bytes;
        memset(dst, 0, row_bytes);
        for (j = 0; j < (size_t)n; ++j) {
            size_t bit = j * (size_t)bits;
            size_t byte = bit >> 3;
            unsigned off = (unsigned)(bit & 7u);
            uint32_t v = (uint32_t)src[j] << off; /* at most 15 significant bits */
            dst[byte] |= (uint8_t)(v & 0xFFu);
            if (off + (unsigned)bits > 8u) {
                dst[byte + 1] |= (uint8_t)(v >> 8);
            }
        }
    }
    return APQK_OK;
}

int apqk_unpack_bits(const uint8_t *packed, int rows, int n, int bits, uint8_t *codes)
{
    size_t r, j, row_bytes;

    if (!apqk_bits_ok(bits)) {
        return APQK_ERR_BITS;
    }
    if (rows < 0 || n < 0) {
        return APQK_ERR_SHAPE;
    }
    if (rows == 0 || n == 0) {
        return APQK_OK;
    }
    if (packed == NULL || codes == NULL) {
        return APQK_ERR_NULL;
    }
    row_bytes = apqk_packed_row_bytes(n, bits);
    for (r = 0; r < (size_t)rows; ++r) {
        const uint8_t *src = packed + r * row_bytes;
        uint8_t *dst = codes + r * (size_t)n;
        for (j = 0; j < (size_t)n; ++j) {
            dst[j] = (uint8_t)apqk_get_code(src, j, bits);
        }
    }
    return APQK_OK;
}

/* ---------------------------------------------------------------------------------------------
 * activations
 * ------------------------------------------------------------------------------------------- */

static int apqk_clip_ok(float clip) { return clip > 0.0f && clip <= 1.0f; } /* false for NaN */

/* scale[t] = (amax * clip) / 127.0f, 1.0f where that is 0. */
static float apqk_token_scale(const float *xrow, int K, float clip)
{
    float amax = 0.0f;
    float s;
    int k;
    for (k = 0; k < K; ++k) {
        float a = fabsf(xrow[k]);
        if (a > amax) {
            amax = a;
        }
    }
    s = amax * clip;
    s = s / 127.0f;
    if (s == 0.0f) {
        s = 1.0f;
    }
    return s;
}

/* clamp(rint(v / s), -127, 127); rintf rounds half to even in the default rounding mode.
 * Inputs are expected to be finite; a NaN quotient maps to 0 instead of undefined behaviour. */
static int8_t apqk_quant1(float v, float s)
{
    float r = rintf(v / s);
    if (r > 127.0f) {
        r = 127.0f;
    } else if (r < -127.0f) {
        r = -127.0f;
    } else if (r != r) {
        r = 0.0f;
    }
    return (int8_t)r;
}

int apqk_quantize_activations_per_token(const float *x, int T, int K, float clip,
                                       int8_t *xq, float *scale)
{
    size_t t;
    int k;

    if (T < 0 || K <= 0) {
        return APQK_ERR_SHAPE;
    }
    if (!apqk_clip_ok(clip)) {
        return APQK_ERR_CLIP;
    }
    if (T == 0) {
        return APQK_OK;
    }
    if (x == NULL || xq == NULL || scale == NULL) {
        return APQK_ERR_NULL;
    }
    for (t = 0; t < (size_t)T; ++t) {
        const float *xrow = x + t * (size_t)K;
        int8_t *qrow = xq + t * (size_t)K;
        float s = apqk_token_scale(xrow, K, clip);
        scale[t] = s;
        for (k = 0; k < K; ++k) {
            qrow[k] = apqk_quant1(xrow[k], s);
        }
    }
    return APQK_OK;
}

/* ---------------------------------------------------------------------------------------------
 * weights
 * ------------------------------------------------------------------------------------------- */

static int apqk_check_layer(const uint8_t *qweight, const uint16_t *scales, int N, int K, int bits,
                           int group_size)
{
    if (!apqk_bits_ok(bits)) {
        return APQK_ERR_BITS;
    }
    if (N < 0 || K <= 0 || K % 8 != 0) {
        return APQK_ERR_SHAPE;
    }
    /* group_size need not divide K: the last group of a row then holds K - (G-1)*g weights. */
    if (group_size <= 0 || group_size % 8 != 0 || group_size > APQK_MAX_GROUP_SIZE) {
        return APQK_ERR_GROUP;
    }
    if (N > 0 && (qweight == NULL || scales == NULL)) {
        return APQK_ERR_NULL;
    }
    return APQK_OK;
}

/* G = ceil(K / g) groups per row. */
static size_t apqk_n_groups(size_t K, size_t g) { return (K + g - 1u) / g; }

/* Length of group grp: g, or K - (G-1)*g for a shorter last group. */
static size_t apqk_group_len(size_t K, size_t g, size_t grp)
{
    size_t start = grp * g;
    return (K - start < g) ? K - start : g;
}

static int32_t apqk_zero_point(const uint8_t *qzeros, size_t zrow_bytes, size_t n, size_t grp,
                              int bits)
{
    if (qzeros == NULL) {
        return (int32_t)1 << (bits - 1);
    }
    return (int32_t)apqk_get_code(qzeros + n * zrow_bytes, grp, bits);
}

int apqk_dequantize(const uint8_t *qweight, const uint16_t *scales_fp16_bits, const uint8_t *qzeros,
                   int N, int K, int bits, int group_size, float *w)
{
    size_t n, grp, j, G, row_bytes, zrow_bytes, g, end;
    int rc = apqk_check_layer(qweight, scales_fp16_bits, N, K, bits, group_size);

    if (rc != APQK_OK) {
        return rc;
    }
    if (N == 0) {
        return APQK_OK;
    }
    if (w == NULL) {
        return APQK_ERR_NULL;
    }
    g = (size_t)group_size;
    G = apqk_n_groups((size_t)K, g);
    row_bytes = (size_t)K * (size_t)bits / 8u;
    zrow_bytes = (G * (size_t)bits + 7u) / 8u;
    for (n = 0; n < (size_t)N; ++n) {
        const uint8_t *qrow = qweight + n * row_bytes;
        float *wrow = w + n * (size_t)K;
        for (grp = 0; grp < G; ++grp) {
            int32_t z = apqk_zero_point(qzeros, zrow_bytes, n, grp, bits);
            float s = apqk_fp16_to_float(scales_fp16_bits[n * G + grp]);
            end = grp * g + apqk_group_len((size_t)K, g, grp);
            for (j = grp * g; j < end; ++j) {
                int32_t d = (int32_t)apqk_get_code(qrow, j, bits) - z;
                wrow[j] = (float)d * s;
            }
        }
    }
    return APQK_OK;
}

/* Exact int32 sum over one group of xq[k] * (q[k] - z), g codes long (g % 8 == 0, also for a
 * shorter last group since K % 8 == 0), the group starting at a byte boundary: every 8 codes fill
 * exactly `bits` bytes, decoded as one little-endian word. */
static int32_t apqk_group_dot(const int8_t *xq, const uint8_t *qgrp, size_t g, int bits, int32_t z)
{
    int32_t acc = 0;
    uint64_t mask = ((uint64_t)1 << bits) - 1u;
    size_t blk, i;
    for (blk = 0; blk < g / 8u; ++blk) {
        const uint8_t *p = qgrp + blk * (size_t)bits;
        uint64_t word = 0;
        for (i = 0; i < (size_t)bits; ++i) {
            word |= (uint64_t)p[i] << (8u * i);
        }
        for (i = 0; i < 8u; ++i) {
            int32_t q = (int32_t)((word >> ((size_t)bits * i)) & mask);
            acc += (int32_t)xq[blk * 8u + i] * (q - z);
        }
    }
    return acc;
}

/* Same as apqk_group_dot but quantizes the activations on the fly (groups longer than the stack
 * buffer). */
static int32_t apqk_group_dot_fly(const float *xg, float s, const uint8_t *qgrp, size_t g, int bits,
                                 int32_t z)
{
    int32_t acc = 0;
    size_t j;
    for (j = 0; j < g; ++j) {
        int32_t q = (int32_t)apqk_get_code(qgrp, j, bits);
        acc += (int32_t)apqk_quant1(xg[j], s) * (q - z);
    }
    return acc;
}

int apqk_matmul_int8_dynamic(const float *x, int T, int K, const uint8_t *qweight,
                            const uint16_t *scales_fp16_bits, const uint8_t *qzeros, int N, int bits,
                            int group_size, float clip, float *y)
{
    int8_t xq[APQK_XQ_STACK];
    size_t t, n, grp, j, G, g, glen, row_bytes, grp_bytes, zrow_bytes;
    int rc = apqk_check_layer(qweight, scales_fp16_bits, N, K, bits, group_size);

    if (rc != APQK_OK) {
        return rc;
    }
    if (T < 0) {
        return APQK_ERR_SHAPE;
    }
    if (!apqk_clip_ok(clip)) {
        return APQK_ERR_CLIP;
    }
    if (T == 0 || N == 0) {
        return APQK_OK;
    }
    if (x == NULL || y == NULL) {
        return APQK_ERR_NULL;
    }
    g = (size_t)group_size;
    G = apqk_n_groups((size_t)K, g);
    row_bytes = (size_t)K * (size_t)bits / 8u;
    grp_bytes = g * (size_t)bits / 8u;
    zrow_bytes = (G * (size_t)bits + 7u) / 8u;

    for (t = 0; t < (size_t)T; ++t) {
        const float *xrow = x + t * (size_t)K;
        float *yrow = y + t * (size_t)N;
        float s_tok = apqk_token_scale(xrow, K, clip);

        for (n = 0; n < (size_t)N; ++n) {
            yrow[n] = 0.0f;
        }
        /* Groups in order 0 .. G-1 for every output: y = y + scale * (float)acc, in float32. */
        for (grp = 0; grp < G; ++grp) {
            const float *xg = xrow + grp * g;
            glen = apqk_group_len((size_t)K, g, grp); /* g, or less for the last group */
            if (glen <= APQK_XQ_STACK) {
                for (j = 0; j < glen; ++j) {
                    xq[j] = apqk_quant1(xg[j], s_tok);
                }
            }
            for (n = 0; n < (size_t)N; ++n) {
                const uint8_t *qgrp = qweight + n * row_bytes + grp * grp_bytes;
                int32_t z = apqk_zero_point(qzeros, zrow_bytes, n, grp, bits);
                float s_w = apqk_fp16_to_float(scales_fp16_bits[n * G + grp]);
                int32_t acc = (glen <= APQK_XQ_STACK)
                                  ? apqk_group_dot(xq, qgrp, glen, bits, z)
                                  : apqk_group_dot_fly(xg, s_tok, qgrp, glen, bits, z);
                float prod = s_w * (float)acc;
                yrow[n] = yrow[n] + prod;
            }
        }
        for (n = 0; n < (size_t)N; ++n) {
            yrow[n] = yrow[n] * s_tok;
        }
    }
    return APQK_OK;
}
