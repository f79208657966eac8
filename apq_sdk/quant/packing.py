"""Packed low-bit weight storage and the numpy reference of the runtime kernel arithmetic.

This module implements ``docs/formats.md`` exactly; the C kernels in ``runtime_kernels/`` implement
the same contract and ``tests/runtime_kernels/`` checks that the two agree bit for bit.

* Bit packing: every row is a little-endian bit stream. Element ``j`` occupies stream bits
  ``[j*b, (j+1)*b)`` and stream bit ``i`` is bit ``i % 8`` (least significant first) of byte
  ``i // 8``. For b = 2, 4, 8 this is ONNX Runtime's ``MatMulNBits`` layout; for b = 3 eight codes
  fill three bytes.
* Weights ``W[N, K]`` are quantized in groups of ``g`` consecutive weights along ``K``
  (``g % 8 == 0``, ``K % 8 == 0``, ``G = ceil(K / g)``; when ``g`` does not divide ``K`` the last
  group of each row is shorter, ``K - (G-1)*g`` weights, e.g. K = 576 with g = 128):
  ``qweight`` uint8 ``[N, K*b/8]``, ``scales`` float16 ``[N, G]``, ``qzeros`` uint8
  ``[N, ceil(G*b/8)]`` (asymmetric only; symmetric layers use the zero point ``2**(b-1)``).
* Activations are quantized per token to int8 with a dynamic float32 scale, and the mixed-bit
  matmul sums exact integer products per group, then accumulates the groups in float32 in order.

Everything is vectorized numpy; the only Python loop is the ordered loop over groups that the
contract requires for the float32 accumulation.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SUPPORTED_BITS",
    "MAX_GROUP_SIZE",
    "pack_bits",
    "unpack_bits",
    "packed_row_bytes",
    "stored_bytes",
    "effective_bits",
    "dequantize",
    "quantize_activations_per_token",
    "matmul_int8_dynamic",
]

SUPPORTED_BITS = (2, 3, 4, 8)

#: Largest group size for which the per-group integer sum provably fits in int32
#: (65536 * 127 * 255 < 2**31), as the C kernel accumulates in int32.
MAX_GROUP_SIZE = 65536

_F127 = np.float32(127.0)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(
            f"bits must be one of {SUPPORTED_BITS} (16 means float16 and is not packed), found {bits!r}"
        )
    return int(bits)


def _check_group(group_size: int, n_in: int) -> int:
    """Validate ``group_size`` and the input features ``n_in`` (K); return ``g``.

    ``g`` need not divide ``K``: the last group of a row is then shorter (``K - (G-1)*g``).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size must be an integer, found {group_size!r}")
    g = int(group_size)
    if g <= 0 or g % 8 != 0:
        raise ValueError(f"group_size must be a positive multiple of 8, found {g}")
    n_in = int(n_in)
    if n_in <= 0 or n_in % 8 != 0:
        raise ValueError(
            f"the input features K must be a positive multiple of 8 (whole packed bytes per row), "
            f"found K={n_in}"
        )
    return g


def _n_groups(n_in: int, g: int) -> int:
    """``G = ceil(K / g)``: the number of groups per row, the last one possibly shorter."""
    return -(-int(n_in) // int(g))


def _as_2d_uint8(arr: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, found {arr.dtype}")
    if arr.ndim == 1:
        return arr.reshape(1, -1), True
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (rows, n), found {arr.ndim}-D shape {arr.shape}")
    return arr, False


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` ``bits``-bit codes occupies: ``ceil(n * bits / 8)``."""
    return (int(n) * _check_bits(bits) + 7) // 8


# --------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------


def pack_bits(codes: np.ndarray, bits: int, *, pad: bool = False) -> np.ndarray:
    """Pack ``bits``-bit codes into the LSB-first bit stream of ``docs/formats.md``.

    ``codes``: uint8 ``(rows, n)`` (or 1-D ``(n,)``, treated as one row) with values < ``2**bits``.
    Returns uint8 ``(rows, n*bits//8)`` (1-D in, 1-D out).

    ``n * bits`` must be a multiple of 8 unless ``pad=True``, in which case each row is padded with
    zero bits to ``ceil(n*bits/8)`` bytes (the layout of ``qzeros`` when ``G*bits % 8 != 0``).
    """
    b = _check_bits(bits)
    c2, was_1d = _as_2d_uint8(codes, "codes")
    rows, n = c2.shape
    if not pad and (n * b) % 8 != 0:
        raise ValueError(
            f"n * bits must be a multiple of 8 to pack whole bytes: found n={n}, bits={b} "
            f"(n*bits={n * b}); pass pad=True to zero-pad the row to {packed_row_bytes(n, b)} bytes"
        )
    if c2.size and int(c2.max()) >= (1 << b):
        raise ValueError(
            f"codes must be < 2**{b} = {1 << b} for {b}-bit packing, found max value {int(c2.max())}"
        )
    out_bytes = (n * b + 7) // 8
    if b == 8:
        out = c2.copy()
    else:
        # Eight codes always fill exactly `b` bytes: build one uint64 word per 8 codes.
        n8 = -(-n // 8) * 8
        padded = np.zeros((rows, n8), dtype=np.uint64)
        padded[:, :n] = c2
        shifts = (np.arange(8, dtype=np.uint64) * np.uint64(b))
        words = np.bitwise_or.reduce(padded.reshape(rows, n8 // 8, 8) << shifts, axis=-1)
        byte_shifts = np.arange(b, dtype=np.uint64) * np.uint64(8)
        by = ((words[..., None] >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8)
        out = np.ascontiguousarray(by.reshape(rows, (n8 // 8) * b)[:, :out_bytes])
    return out.reshape(-1) if was_1d else out


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: return the first ``n`` ``bits``-bit codes of each packed row.

    ``packed``: uint8 ``(rows, ceil(n*bits/8))`` or 1-D. Returns uint8 ``(rows, n)`` (1-D in, 1-D out).
    Padding bits beyond element ``n-1`` are ignored.
    """
    b = _check_bits(bits)
    p2, was_1d = _as_2d_uint8(packed, "packed")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, found {n}")
    rows, nbytes = p2.shape
    expected = (n * b + 7) // 8
    if nbytes != expected:
        raise ValueError(
            f"packed rows must hold ceil(n*bits/8) = {expected} bytes for n={n}, bits={b}; "
            f"found {nbytes} bytes per row"
        )
    if b == 8:
        out = p2.copy()
    else:
        n8 = -(-n // 8) * 8
        nb8 = (n8 // 8) * b
        buf = np.zeros((rows, nb8), dtype=np.uint64)
        buf[:, :nbytes] = p2
        byte_shifts = np.arange(b, dtype=np.uint64) * np.uint64(8)
        words = np.bitwise_or.reduce(buf.reshape(rows, n8 // 8, b) << byte_shifts, axis=-1)
        shifts = np.arange(8, dtype=np.uint64) * np.uint64(b)
        codes = (words[..., None] >> shifts) & np.uint64((1 << b) - 1)
        out = np.ascontiguousarray(codes.astype(np.uint8).reshape(rows, n8)[:, :n])
    return out.reshape(-1) if was_1d else out


# --------------------------------------------------------------------------------------------
# storage size
# --------------------------------------------------------------------------------------------


def stored_bytes(n_out: int, n_in: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes a quantized ``[n_out, n_in]`` layer occupies, per "Bytes as stored" in formats.md.

    ``N*K*b/8 + N*G*2 + (0 if symmetric else N*ceil(G*b/8))`` with ``G = ceil(K / group_size)``
    (the last group is shorter when ``group_size`` does not divide ``K``);
    ``N*K*2`` for ``bits == 16`` (float16, group_size ignored).
    """
    n_out, n_in = int(n_out), int(n_in)
    if n_out <= 0 or n_in <= 0:
        raise ValueError(f"n_out and n_in must be positive, found n_out={n_out}, n_in={n_in}")
    if bits == 16:
        return n_out * n_in * 2
    b = _check_bits(bits)
    g = _check_group(group_size, n_in)
    n_groups = _n_groups(n_in, g)
    total = n_out * n_in * b // 8 + n_out * n_groups * 2
    if not symmetric:
        total += n_out * ((n_groups * b + 7) // 8)
    return total


def effective_bits(n_out: int, n_in: int, bits: int, group_size: int, symmetric: bool) -> float:
    """Effective bits per weight, ``8 * stored_bytes / (n_out * n_in)``."""
    return 8.0 * stored_bytes(n_out, n_in, bits, group_size, symmetric) / (int(n_out) * int(n_in))


# --------------------------------------------------------------------------------------------
# dequantization
# --------------------------------------------------------------------------------------------


def _weight_codes_minus_zero(
    qweight: np.ndarray,
    scales: np.ndarray,
    qzeros: np.ndarray | None,
    bits: int,
    group_size: int,
    n_in: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate a packed layer; return ``(q - z)`` int32 ``[N, K]``, scales float32 ``[N, G]``, G.

    ``G = ceil(K / g)``; column ``k`` belongs to group ``k // g`` (the last group may be shorter).
    """
    b = _check_bits(bits)
    n_in = int(n_in)
    g = _check_group(group_size, n_in)
    if g > MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be <= {MAX_GROUP_SIZE} (int32 accumulation), found {g}")
    n_groups = _n_groups(n_in, g)
    qweight = np.asarray(qweight)
    if qweight.dtype != np.uint8 or qweight.ndim != 2:
        raise ValueError(f"qweight must be a 2-D uint8 array, found {qweight.ndim}-D {qweight.dtype}")
    n_out = qweight.shape[0]
    if qweight.shape[1] != n_in * b // 8:
        raise ValueError(
            f"qweight must have shape [N, K*bits/8] = [{n_out}, {n_in * b // 8}], found {list(qweight.shape)}"
        )
    scales = np.asarray(scales)
    if scales.dtype != np.float16:
        raise ValueError(f"scales must be float16 as stored, found {scales.dtype}")
    if scales.shape != (n_out, n_groups):
        raise ValueError(f"scales must have shape [N, G] = [{n_out}, {n_groups}], found {list(scales.shape)}")
    q = unpack_bits(qweight, b, n_in).astype(np.int32)
    if qzeros is None:
        z = np.full((n_out, n_groups), 1 << (b - 1), dtype=np.int32)
    else:
        qzeros = np.asarray(qzeros)
        zb = (n_groups * b + 7) // 8
        if qzeros.dtype != np.uint8 or qzeros.shape != (n_out, zb):
            raise ValueError(
                f"qzeros must be uint8 with shape [N, ceil(G*bits/8)] = [{n_out}, {zb}], "
                f"found {qzeros.dtype} {list(qzeros.shape)}"
            )
        z = unpack_bits(qzeros, b, n_groups).astype(np.int32)
    qmz = q - _expand_groups(z, g, n_in)
    return qmz, scales.astype(np.float32), n_groups


def _expand_groups(per_group: np.ndarray, g: int, n_in: int) -> np.ndarray:
    """``[N, G]`` per-group values -> ``[N, K]`` per-column values (``out[:, k] = v[:, k // g]``)."""
    return np.repeat(per_group, g, axis=1)[:, :n_in]


def dequantize(
    qweight: np.ndarray,
    scales: np.ndarray,
    qzeros: np.ndarray | None,
    bits: int,
    group_size: int,
    n_in: int,
) -> np.ndarray:
    """``w_hat[n, k] = (q[n, k] - z[n, k // g]) * float32(scales[n, k // g])`` in float32, ``[N, K]``.

    ``qzeros=None`` means symmetric (zero point ``2**(bits-1)``).
    """
    qmz, s32, _ = _weight_codes_minus_zero(qweight, scales, qzeros, bits, group_size, n_in)
    g = int(group_size)
    return qmz.astype(np.float32) * _expand_groups(s32, g, int(n_in))


# --------------------------------------------------------------------------------------------
# activations and the mixed-bit matmul
# --------------------------------------------------------------------------------------------


def _check_clip(clip: float) -> np.float32:
    c = np.float32(clip)
    if not (np.isfinite(c) and np.float32(0.0) < c <= np.float32(1.0)):
        raise ValueError(f"clip must be in (0, 1], found {clip!r}")
    return c


def _as_activations(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [T, K], found {x.ndim}-D shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError("x must have at least one feature (K > 0), found K=0")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a floating-point array (float32), found {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize_activations_per_token(x: np.ndarray, clip: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-token dynamic int8 quantization of ``x`` float32 ``[T, K]`` (formats.md).

    ``amax = max|x[t]|``; ``scale = (amax * clip) / 127`` (float32, in that order; 0 -> 1);
    ``xq = clamp(rint(x / scale), -127, 127)`` with round-half-to-even.
    Returns ``(xq int8 [T, K], scale float32 [T])``.
    """
    x = _as_activations(x)
    c = _check_clip(clip)
    amax = np.max(np.abs(x), axis=1)  # exact, float32
    scale = (amax * c) / _F127  # float32 multiply, then float32 divide
    scale = np.where(scale == np.float32(0.0), np.float32(1.0), scale).astype(np.float32)
    q = np.rint(x / scale[:, None])  # float32 division, round half to even
    xq = np.clip(q, -127, 127).astype(np.int8)
    return xq, scale


def matmul_int8_dynamic(
    x: np.ndarray,
    qweight: np.ndarray,
    scales: np.ndarray,
    qzeros: np.ndarray | None,
    bits: int,
    group_size: int,
    clip: float = 1.0,
) -> np.ndarray:
    """Reference mixed-bit matmul with per-token dynamic int8 activations, float32 ``[T, N]``.

    ``acc[t, n, grp]`` is the exact integer sum of ``xq * (q - z)`` over the group (the last group
    holds ``K - (G-1)*g`` columns when ``g`` does not divide ``K``); ``y`` starts at
    0.0f and adds ``float32(scales[n, grp]) * float32(acc)`` for grp = 0 .. G-1 in order (float32),
    then is multiplied by the token scale. Bit-identical to ``apq_matmul_int8_dynamic`` in C.
    """
    x = _as_activations(x)
    n_in = x.shape[1]
    qmz, s32, n_groups = _weight_codes_minus_zero(qweight, scales, qzeros, bits, group_size, n_in)
    g = int(group_size)
    xq, tok_scale = quantize_activations_per_token(x, clip)
    t_count, n_out = x.shape[0], qmz.shape[0]
    # Exact integer group sums. Every partial sum is an integer of magnitude < 2**31 (g <= 65536),
    # so float64 BLAS computes them exactly regardless of its internal summation order. A shorter
    # last group (g not dividing K) is zero-padded to g columns: the padding adds exact zeros.
    k_pad = n_groups * g
    xf = np.zeros((t_count, k_pad), np.float64)
    xf[:, :n_in] = xq
    wf = np.zeros((n_out, k_pad), np.float64)
    wf[:, :n_in] = qmz
    xg = xf.reshape(t_count, n_groups, g).transpose(1, 0, 2)  # [G, T, g]
    wg = wf.reshape(n_out, n_groups, g).transpose(1, 2, 0)  # [G, g, N]
    acc = np.matmul(xg, wg)  # [G, T, N], exact integers
    acc32 = acc.astype(np.float32)  # single rounding of an exact integer, as float(int32) in C
    y = np.zeros((t_count, n_out), dtype=np.float32)
    for grp in range(n_groups):
        y = y + s32[None, :, grp] * acc32[grp]
    return y * tok_scale[:, None]

