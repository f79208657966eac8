"""Tests of the numpy reference for packed low-bit storage and kernel arithmetic (docs/formats.md)."""

from __future__ import annotations

import numpy as np
import pytest

from apq_sdk.quant.packing import (
    SUPPORTED_BITS,
    dequantize,
    effective_bits,
    matmul_int8_dynamic,
    pack_bits,
    quantize_activations_per_token,
    stored_bytes,
    unpack_bits,
)

BITS = list(SUPPORTED_BITS)


def _bitstream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent, element-by-element implementation of the layout sentence of formats.md."""
    rows, n = codes.shape
    out = np.zeros((rows, (n * bits + 7) // 8), dtype=np.uint8)
    for r in range(rows):
        for j in range(n):
            for i in range(bits):
                if (int(codes[r, j]) >> i) & 1:
                    stream_bit = j * bits + i
                    out[r, stream_bit // 8] |= 1 << (stream_bit % 8)
    return out


def _random_layer(rng, n_out, n_in, bits, group_size, symmetric):
    n_groups = -(-n_in // group_size)  # G = ceil(K / g): the last group may be shorter
    codes = rng.integers(0, 1 << bits, size=(n_out, n_in), dtype=np.uint8)
    qweight = pack_bits(codes, bits)
    scales = (rng.standard_normal((n_out, n_groups)) * 0.02).astype(np.float16)
    zeros = None
    qzeros = None
    if not symmetric:
        zeros = rng.integers(0, 1 << bits, size=(n_out, n_groups), dtype=np.uint8)
        qzeros = pack_bits(zeros, bits, pad=True)
    return codes, zeros, qweight, scales, qzeros


# ------------------------------------------------------------------------------------------------
# packing layout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        (4, [1, 2], [0x21]),
        (4, [0xF, 0x0, 0x3, 0xA], [0x0F, 0xA3]),
        (2, [1, 2, 3, 0], [0x39]),
        (2, [3, 3, 3, 3, 0, 1, 0, 0], [0xFF, 0x04]),
        # 3-bit: 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 | 0<<21 = 0x1F58D1
        (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F]),
        (3, [7, 0, 0, 0, 0, 0, 0, 7], [0x07, 0x00, 0xE0]),
        (8, [5, 200, 0, 255], [5, 200, 0, 255]),
    ],
)
def test_known_layout(bits, codes, expected):
    packed = pack_bits(np.array(codes, dtype=np.uint8), bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.tolist() == expected
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (5, 64), (2, 200), (0, 24)])
def test_round_trip_and_matches_bitstream_definition(bits, shape):
    rng = np.random.default_rng(1234 + bits)
    codes = rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (shape[0], shape[1] * bits // 8)
    np.testing.assert_array_equal(packed, _bitstream_pack(codes, bits))
    back = unpack_bits(packed, bits, shape[1])
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", BITS)
def test_rows_are_independent(bits):
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 1 << bits, size=(4, 32), dtype=np.uint8)
    packed = pack_bits(codes, bits)
    for r in range(4):
        np.testing.assert_array_equal(packed[r], pack_bits(codes[r], bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 3, 5, 7, 9])
def test_pad_packs_partial_bytes_with_zero_bits(bits, n):
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 1 << bits, size=(3, n), dtype=np.uint8)
    packed = pack_bits(codes, bits, pad=True)
    assert packed.shape == (3, (n * bits + 7) // 8)
    np.testing.assert_array_equal(packed, _bitstream_pack(codes, bits))
    np.testing.assert_array_equal(unpack_bits(packed, bits, n), codes)


def test_unpack_max_codes():
    for bits in BITS:
        codes = np.full((2, 16), (1 << bits) - 1, dtype=np.uint8)
        packed = pack_bits(codes, bits)
        assert (packed == 0xFF).all()
        np.testing.assert_array_equal(unpack_bits(packed, bits, 16), codes)


@pytest.mark.parametrize(
    "codes, bits, match",
    [
        (np.zeros((2, 8), np.uint8), 5, r"bits must be one of \(2, 3, 4, 8\).*found 5"),
        (np.zeros((2, 8), np.uint8), 16, r"found 16"),
        (np.array([[16, 0]], np.uint8), 4, r"< 2\*\*4 = 16.*found max value 16"),
        (np.array([[4, 0, 0, 0]], np.uint8), 2, r"found max value 4"),
        (np.zeros((2, 3), np.uint8), 4, r"multiple of 8.*n=3, bits=4"),
        (np.zeros((1, 4), np.uint8), 3, r"multiple of 8.*n=4, bits=3"),
        (np.zeros((2, 8), np.int32), 4, r"dtype uint8, found int32"),
        (np.zeros((2, 2, 8), np.uint8), 4, r"1-D or 2-D.*found 3-D"),
    ],
)
def test_pack_errors(codes, bits, match):
    with pytest.raises(ValueError, match=match):
        pack_bits(codes, bits)


def test_unpack_errors():
    with pytest.raises(ValueError, match=r"ceil\(n\*bits/8\) = 4 bytes.*found 3"):
        unpack_bits(np.zeros((2, 3), np.uint8), 4, 8)
    with pytest.raises(ValueError, match=r"found 7"):
        unpack_bits(np.zeros((2, 3), np.uint8), 7, 8)
    with pytest.raises(ValueError, match=r"dtype uint8"):
        unpack_bits(np.zeros((2, 4), np.float32), 4, 8)


# ------------------------------------------------------------------------------------------------
# storage size
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        # 4096x4096, 4-bit, g=128: 8388608 code bytes + 4096*32*2 scale bytes
        ((4096, 4096, 4, 128, True), 8_650_752),
        # + 4096 * ceil(32*4/8)=16 zero bytes
        ((4096, 4096, 4, 128, False), 8_716_288),
        # 2x192, 3-bit, g=64 -> G=3: 144 + 12 + 2*ceil(9/8)=4
        ((2, 192, 3, 64, False), 160),
        ((2, 192, 3, 64, True), 156),
        # 3x64, 2-bit, g=32 -> G=2: 48 + 12 + 3*ceil(4/8)=3
        ((3, 64, 2, 32, False), 63),
        # 1x32, 8-bit, g=32: 32 + 2 + 1
        ((1, 32, 8, 32, False), 35),
        ((3, 5, 16, 0, True), 30),
        # ragged last group (g does not divide K): G = ceil(K / g)
        # 576x576, 4-bit, g=128 -> G=5 (4 x 128 + 64): 576*288 + 576*5*2 + 576*ceil(20/8)=576*3
        ((576, 576, 4, 128, False), 165_888 + 5_760 + 1_728),
        ((576, 576, 4, 128, True), 165_888 + 5_760),
        # 2x200, 3-bit, g=64 -> G=4 (3 x 64 + 8): 2*75 + 2*4*2 + 2*ceil(12/8)=4
        ((2, 200, 3, 64, False), 170),
        # 1x64, 2-bit, g=128 > K -> G=1 (one group of 64): 16 + 2 + 1
        ((1, 64, 2, 128, False), 19),
    ],
)
def test_stored_bytes_hand_computed(args, expected):
    assert stored_bytes(*args) == expected


def test_stored_bytes_hand_computed_576():
    assert stored_bytes(576, 576, 4, 128, False) == 173_376


def test_stored_bytes_matches_real_arrays():
    rng = np.random.default_rng(3)
    for bits in BITS:
        for n_in, g in [(384, 32), (384, 64), (384, 128), (576, 128), (200, 64), (72, 32), (40, 64)]:
            for sym in (True, False):
                _, _, qw, sc, qz = _random_layer(rng, 5, n_in, bits, g, sym)
                assert sc.shape == (5, -(-n_in // g))
                actual = qw.nbytes + sc.nbytes + (0 if qz is None else qz.nbytes)
                assert stored_bytes(5, n_in, bits, g, sym) == actual


def test_effective_bits():
    assert effective_bits(4096, 4096, 4, 128, True) == pytest.approx(4.125)
    assert effective_bits(10, 10, 16, 0, True) == 16.0


@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 100, 4, 32, True), r"K must be a positive multiple of 8.*found K=100"),
        ((4, 100, 4, 128, True), r"K must be a positive multiple of 8.*found K=100"),
        ((4, 96, 4, 12, True), r"group_size must be a positive multiple of 8, found 12"),
        ((4, 96, 4, 0, True), r"group_size must be a positive multiple of 8, found 0"),
        ((4, 96, 4, -32, True), r"group_size must be a positive multiple of 8, found -32"),
        ((4, 96, 5, 32, True), r"found 5"),
        ((0, 96, 4, 32, True), r"positive"),
    ],
)
def test_stored_bytes_errors(args, match):
    with pytest.raises(ValueError, match=match):
        stored_bytes(*args)


@pytest.mark.parametrize("n_in, group_size", [(96, 64), (576, 128), (200, 64), (8, 16), (40, 48)])
def test_stored_bytes_accepts_group_not_dividing_k(n_in, group_size):
    n_groups = -(-n_in // group_size)
    assert n_in % group_size != 0
    assert stored_bytes(3, n_in, 4, group_size, False) == 3 * n_in // 2 + 3 * n_groups * 2 + 3 * (
        (n_groups * 4 + 7) // 8
    )


# ------------------------------------------------------------------------------------------------
# dequantization
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "n_in, group_size",
    # ragged: 576 = 4 x 128 + 64, 200 = 3 x 64 + 8, 72 = 2 x 32 + 8, 40 < 64 (one short group)
    [(256, 32), (256, 64), (256, 128), (576, 128), (200, 64), (72, 32), (40, 64)],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_matches_definition(bits, n_in, group_size, symmetric):
    rng = np.random.default_rng(bits * 1000 + group_size + symmetric + n_in)
    n_out = 6
    codes, zeros, qw, sc, qz = _random_layer(rng, n_out, n_in, bits, group_size, symmetric)
    w = dequantize(qw, sc, qz, bits, group_size, n_in)
    assert w.dtype == np.float32 and w.shape == (n_out, n_in)
    last_start = (sc.shape[1] - 1) * group_size
    for n in range(n_out):
        for k in sorted(set(range(0, n_in, 13)) | set(range(last_start, n_in))):
            grp = k // group_size
            z = (1 << (bits - 1)) if symmetric else int(zeros[n, grp])
            expect = np.float32(int(codes[n, k]) - z) * np.float32(sc[n, grp])
            assert w[n, k].view(np.uint32) == np.float32(expect).view(np.uint32)


def test_dequantize_hand_example():
    # 4-bit, one row, K=8, g=8, symmetric -> z = 8, scale 0.5
    codes = np.array([[0, 8, 9, 15, 1, 2, 3, 4]], np.uint8)
    w = dequantize(pack_bits(codes, 4), np.array([[0.5]], np.float16), None, 4, 8, 8)
    assert w.tolist() == [[-4.0, 0.0, 0.5, 3.5, -3.5, -3.0, -2.5, -2.0]]
    # asymmetric with zero point 3 stored packed in one byte (pad)
    qz = pack_bits(np.array([[3]], np.uint8), 4, pad=True)
    assert qz.tolist() == [[0x03]]
    w = dequantize(pack_bits(codes, 4), np.array([[2.0]], np.float16), qz, 4, 8, 8)
    assert w.tolist() == [[-6.0, 10.0, 12.0, 24.0, -4.0, -2.0, 0.0, 2.0]]


def test_dequantize_ragged_hand_example():
    # 4-bit, one row, K=24, g=16 -> G=2: columns 0..15 in group 0, 16..23 in the short group 1
    codes = np.array([[9] * 16 + [0, 1, 2, 3, 4, 5, 6, 7]], np.uint8)
    qz = pack_bits(np.array([[8, 2]], np.uint8), 4, pad=True)
    assert qz.tolist() == [[0x28]]
    sc = np.array([[0.25, 4.0]], np.float16)
    w = dequantize(pack_bits(codes, 4), sc, qz, 4, 16, 24)
    assert w.tolist() == [[0.25] * 16 + [-8.0, -4.0, 0.0, 4.0, 8.0, 12.0, 16.0, 20.0]]


def test_dequantize_errors():
    qw = np.zeros((2, 32), np.uint8)
    sc = np.ones((2, 1), np.float16)
    with pytest.raises(ValueError, match="float16"):
        dequantize(qw, sc.astype(np.float32), None, 4, 64, 64)
    with pytest.raises(ValueError, match=r"\[N, K\*bits/8\] = \[2, 24\]"):
        dequantize(qw, sc, None, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[N, G\] = \[2, 2\]"):
        dequantize(qw, sc, None, 4, 32, 64)
    with pytest.raises(ValueError, match=r"qzeros must be uint8 .* \[2, 1\]"):
        dequantize(qw, sc, np.zeros((2, 2), np.uint8), 4, 64, 64)
    # ragged: g=48 does not divide K=64, so G = 2 scales per row are needed
    with pytest.raises(ValueError, match=r"\[N, G\] = \[2, 2\]"):
        dequantize(qw, sc, None, 4, 48, 64)
    with pytest.raises(ValueError, match=r"K must be a positive multiple of 8.*found K=60"):
        dequantize(np.zeros((2, 30), np.uint8), sc, None, 4, 64, 60)


# ------------------------------------------------------------------------------------------------
# per-token activations
# ------------------------------------------------------------------------------------------------


def _direct_per_token(x: np.ndarray, clip: float):
    """Scalar-by-scalar evaluation of the formats.md pseudo-code with np.float32 scalars."""
    t_count, k_count = x.shape
    xq = np.zeros((t_count, k_count), np.int8)
    scale = np.zeros(t_count, np.float32)
    c = np.float32(clip)
    for t in range(t_count):
        amax = np.float32(0.0)
        for k in range(k_count):
            amax = max(amax, np.float32(abs(x[t, k])))
        s = np.float32(np.float32(amax * c) / np.float32(127.0))
        if s == np.float32(0.0):
            s = np.float32(1.0)
        scale[t] = s
        for k in range(k_count):
            v = np.float32(x[t, k] / s)
            r = round(float(v))  # Python round() is round half to even
            xq[t, k] = min(127, max(-127, r))
    return xq, scale


@pytest.mark.parametrize("clip", [1.0, 0.9, 0.5, 0.05])
@pytest.mark.parametrize("shape", [(1, 64), (7, 40), (3, 256)])
def test_per_token_matches_direct_computation(clip, shape):
    rng = np.random.default_rng(int(clip * 100) + shape[0])
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10.0, size=(shape[0], 1))).astype(np.float32)
    x[0, 3] = 0.0
    xq, scale = quantize_activations_per_token(x, clip)
    exq, escale = _direct_per_token(x, clip)
    assert xq.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_array_equal(scale.view(np.uint32), escale.view(np.uint32))
    np.testing.assert_array_equal(xq, exq)
    if clip < 1.0:
        assert np.abs(xq).max() == 127  # saturation happens


def test_per_token_all_zero_row_and_ties():
    x = np.zeros((3, 8), np.float32)
    # row 1: amax 127 -> scale exactly 1.0, exact .5 ties round half to even
    x[1] = [127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -126.5]
    # row 2: negative amax, clip 1 -> scale 2.0
    x[2] = [-254.0, 1.0, 3.0, 5.0, 0.0, 0.0, 0.0, 254.0]
    xq, scale = quantize_activations_per_token(x)
    assert scale.tolist() == [1.0, 1.0, 2.0]
    assert xq[0].tolist() == [0] * 8
    assert xq[1].tolist() == [127, 0, 2, 2, -2, 0, 4, -126]
    assert xq[2].tolist() == [-127, 0, 2, 2, 0, 0, 0, 127]


def division_probe_row() -> tuple[np.ndarray, list[int]]:
    """A token whose quotients x/scale are exact .5 ties that x * (1/scale) would miss."""
    scale = np.float32(100.0) / np.float32(127.0)
    xs = [np.float32(100.0)] + [np.float32((k + 0.5) * float(scale)) for k in (3, 5, 11)]
    for k, v in zip((3, 5, 11), xs[1:]):
        assert v / scale == np.float32(k + 0.5)  # exact ties under division ...
        assert v * (np.float32(1.0) / scale) != v / scale  # ... but not under the reciprocal
    return np.array([xs], np.float32), [127, 4, 6, 12]


def test_per_token_divides_by_the_scale():
    x, expected = division_probe_row()
    xq, scale = quantize_activations_per_token(x)
    assert scale[0] == np.float32(100.0) / np.float32(127.0)
    assert xq[0].tolist() == expected


def test_per_token_scale_order_and_clip_saturation():
    x = np.array([[3.0, -1.0, 0.25]], np.float32)
    xq, scale = quantize_activations_per_token(x, clip=0.5)
    expect = np.float32(np.float32(3.0) * np.float32(0.5)) / np.float32(127.0)
    assert scale[0].view(np.uint32) == np.float32(expect).view(np.uint32)
    assert xq.tolist() == [[127, -85, 21]]  # 3/s = 254 -> 127; -1/s = -84.67; 0.25/s = 21.17


def test_per_token_errors():
    with pytest.raises(ValueError, match=r"clip must be in \(0, 1\]"):
        quantize_activations_per_token(np.ones((1, 4), np.float32), clip=1.5)
    with pytest.raises(ValueError, match=r"clip must be in \(0, 1\]"):
        quantize_activations_per_token(np.ones((1, 4), np.float32), clip=0.0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_activations_per_token(np.ones(4, np.float32))


# ------------------------------------------------------------------------------------------------
# mixed-bit matmul reference
# ------------------------------------------------------------------------------------------------


def _direct_matmul(x, codes, zeros, scales, bits, group_size, clip):
    """Loop-by-loop evaluation of the formats.md matmul pseudo-code."""
    xq, tok = _direct_per_token(x, clip)
    t_count, n_in = x.shape
    n_out = codes.shape[0]
    y = np.zeros((t_count, n_out), np.float32)
    for t in range(t_count):
        for n in range(n_out):
            acc_y = np.float32(0.0)
            for grp in range(-(-n_in // group_size)):  # G = ceil(K / g), last group may be shorter
                z = (1 << (bits - 1)) if zeros is None else int(zeros[n, grp])
                sl = slice(grp * group_size, (grp + 1) * group_size)
                acc = int(np.dot(xq[t, sl].astype(np.int64), codes[n, sl].astype(np.int64) - z))
                acc_y = np.float32(acc_y + np.float32(np.float32(scales[n, grp]) * np.float32(acc)))
            y[t, n] = np.float32(acc_y * tok[t])
    return y


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_in, group_size", [(128, 32), (128, 64), (200, 64), (576, 128), (40, 64)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_matches_direct_loops(bits, n_in, group_size, symmetric):
    rng = np.random.default_rng(bits + group_size * 3 + symmetric + n_in)
    n_out, t_count = 3, 2
    codes, zeros, qw, sc, qz = _random_layer(rng, n_out, n_in, bits, group_size, symmetric)
    x = rng.standard_normal((t_count, n_in)).astype(np.float32)
    y = matmul_int8_dynamic(x, qw, sc, qz, bits, group_size, clip=0.9)
    expect = _direct_matmul(x, codes, zeros, sc, bits, group_size, 0.9)
    assert y.dtype == np.float32 and y.shape == (t_count, n_out)
    np.testing.assert_array_equal(y.view(np.uint32), expect.view(np.uint32))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n_in, group_size", [(256, 64), (576, 128)])
def test_matmul_close_to_float_matmul(bits, n_in, group_size):
    rng = np.random.default_rng(11)
    _, _, qw, sc, qz = _random_layer(rng, 16, n_in, bits, group_size, False)
    x = rng.standard_normal((5, n_in)).astype(np.float32)
    y = matmul_int8_dynamic(x, qw, sc, qz, bits, group_size)
    ref = x @ dequantize(qw, sc, qz, bits, group_size, n_in).T
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err < 0.03


def test_matmul_zero_input_gives_zero():
    rng = np.random.default_rng(5)
    _, _, qw, sc, qz = _random_layer(rng, 4, 64, 4, 32, False)
    y = matmul_int8_dynamic(np.zeros((2, 64), np.float32), qw, sc, qz, 4, 32)
    assert (y == 0).all()


def test_matmul_errors():
    rng = np.random.default_rng(5)
    _, _, qw, sc, qz = _random_layer(rng, 4, 64, 4, 32, False)
    with pytest.raises(ValueError, match=r"\[N, K\*bits/8\] = \[4, 64\]"):
        matmul_int8_dynamic(np.zeros((2, 128), np.float32), qw, sc, qz, 4, 32)
    with pytest.raises(ValueError, match=r"clip"):
        matmul_int8_dynamic(np.zeros((2, 64), np.float32), qw, sc, qz, 4, 32, clip=2.0)
    with pytest.raises(ValueError, match=r"group_size must be a positive multiple of 8, found 20"):
        matmul_int8_dynamic(np.zeros((2, 64), np.float32), qw, sc, qz, 4, 20)
    # g=48 does not divide K=64: accepted, G = ceil(64/48) = 2 like the layer's g=32
    assert matmul_int8_dynamic(np.ones((2, 64), np.float32), qw, sc, qz, 4, 48).shape == (2, 4)
    with pytest.raises(ValueError, match=r"K must be a positive multiple of 8.*found K=60"):
        matmul_int8_dynamic(np.zeros((2, 60), np.float32), qw[:, :30], sc, qz, 4, 32)
