"""The C runtime kernels must agree bit for bit with the numpy reference (docs/formats.md).

Floats are compared as uint32 bit patterns, so any difference in rounding, summation order or fused
multiply-adds fails. Skipped only when no C compiler is installed.
"""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest

from apq_sdk.quant.packing import (
    dequantize,
    matmul_int8_dynamic,
    pack_bits,
    quantize_activations_per_token,
    unpack_bits,
)
from apq_sdk.runtime_kernels_build import (
    KERNEL_SOURCE,
    CompilerNotFoundError,
    build_kernels,
    find_compiler,
    kernel_source_dir,
    load_kernels,
)

BITS = (2, 3, 4, 8)
P_U8 = ctypes.POINTER(ctypes.c_uint8)
P_I8 = ctypes.POINTER(ctypes.c_int8)
P_U16 = ctypes.POINTER(ctypes.c_uint16)
P_F32 = ctypes.POINTER(ctypes.c_float)

APQK_OK, APQK_ERR_NULL, APQK_ERR_BITS, APQK_ERR_SHAPE, APQK_ERR_GROUP, APQK_ERR_CLIP, APQK_ERR_RANGE = (
    0, -1, -2, -3, -4, -5, -6,
)


def _compiler_or_skip() -> str:
    try:
        return find_compiler()
    except CompilerNotFoundError as exc:
        pytest.skip(f"no C compiler available to build the runtime kernels: {exc}")


@pytest.fixture(scope="module")
def kern(tmp_path_factory):
    _compiler_or_skip()
    return load_kernels(out_dir=tmp_path_factory.mktemp("apq_kernels"))


def _p(arr: np.ndarray | None, ptype):
    if arr is None:
        return None
    assert arr.flags.c_contiguous
    return arr.ctypes.data_as(ptype)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == np.float32 and b.dtype == np.float32 and a.shape == b.shape
    ua, ub = a.view(np.uint32), b.view(np.uint32)
    if not np.array_equal(ua, ub):
        idx = np.argwhere(ua != ub)[0]
        pytest.fail(
            f"{int((ua != ub).sum())} of {ua.size} float32 values differ in bits; first at "
            f"{tuple(idx)}: {a[tuple(idx)]!r} vs {b[tuple(idx)]!r}"
        )


def _random_layer(rng, n_out, n_in, bits, group_size, symmetric):
    n_groups = -(-n_in // group_size)  # G = ceil(K / g): the last group may be shorter
    codes = rng.integers(0, 1 << bits, size=(n_out, n_in), dtype=np.uint8)
    qweight = pack_bits(codes, bits)
    mag = rng.choice([1e-2, 1e-4, 3e-7], size=(n_out, n_groups))  # 3e-7 is an fp16 subnormal
    sign = rng.choice([-1.0, 1.0], size=(n_out, n_groups))
    scales = (rng.uniform(0.5, 2.0, size=(n_out, n_groups)) * mag * sign).astype(np.float16)
    qzeros = None
    if not symmetric:
        zeros = rng.integers(0, 1 << bits, size=(n_out, n_groups), dtype=np.uint8)
        qzeros = pack_bits(zeros, bits, pad=True)
    return qweight, scales, qzeros


def _c_quantize(kern, x, clip):
    t_count, k_count = x.shape
    xq = np.empty((t_count, k_count), np.int8)
    scale = np.empty(t_count, np.float32)
    rc = kern.apqk_quantize_activations_per_token(
        _p(x, P_F32), t_count, k_count, clip, _p(xq, P_I8), _p(scale, P_F32)
    )
    assert rc == APQK_OK
    return xq, scale


def _c_dequantize(kern, qw, sc, qz, n_in, bits, group_size):
    n_out = qw.shape[0]
    w = np.empty((n_out, n_in), np.float32)
    sc_bits = np.ascontiguousarray(sc).view(np.uint16)
    rc = kern.apqk_dequantize(
        _p(qw, P_U8), _p(sc_bits, P_U16), _p(qz, P_U8), n_out, n_in, bits, group_size, _p(w, P_F32)
    )
    assert rc == APQK_OK
    return w


def _c_matmul(kern, x, qw, sc, qz, bits, group_size, clip):
    t_count, n_in = x.shape
    n_out = qw.shape[0]
    y = np.full((t_count, n_out), np.nan, np.float32)
    sc_bits = np.ascontiguousarray(sc).view(np.uint16)
    rc = kern.apqk_matmul_int8_dynamic(
        _p(x, P_F32), t_count, n_in, _p(qw, P_U8), _p(sc_bits, P_U16), _p(qz, P_U8),
        n_out, bits, group_size, clip, _p(y, P_F32),
    )
    assert rc == APQK_OK
    return y


def _activations(rng, t_count, n_in):
    x = (rng.standard_normal((t_count, n_in)) * rng.uniform(0.01, 50.0, size=(t_count, 1))).astype(np.float32)
    if t_count > 1:
        x[1] = 0.0  # all-zero token: scale falls back to 1.0
    if t_count > 2:
        x[2, :] = np.float32(0.5) * rng.integers(-40, 40, size=n_in)  # many exact .5 ties
        x[2, 0] = 127.0  # amax 127 -> scale exactly 1.0 with clip 1
    return x


# ------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------


def test_source_compiles_warning_free(tmp_path):
    cc = _compiler_or_skip()
    src = kernel_source_dir() / KERNEL_SOURCE
    proc = subprocess.run(
        [cc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-O2",
         "-c", str(src), "-o", str(tmp_path / "apq_kernels.o")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_kernels_and_a_package_c_api_share_one_c_file(tmp_path):
    """Firmware links the kernels and includes a package's C API in the same source: the
    kernels' apqk_/APQK_ names must not collide with the C API's apq_/APQ_ ones."""
    from apq_sdk.native_glue import render_templates

    cc = _compiler_or_skip()
    render_templates("common", {"package_name": "p", "model_name": "m", "target": "t",
                                "runtime": "r", "sdk_version": "0", "vocab_size": 8,
                                "num_layers": 1, "num_kv_heads": 1, "head_dim": 8,
                                "max_context": 16, "eos_token_id": 1, "bos_token_id": -1},
                     tmp_path / "pkg")
    probe = tmp_path / "both.c"
    probe.write_text('#include "apq_model.h"\n#include "apq_kernels.h"\n'
                     "int main(void) { return APQ_OK + APQK_OK + (int)apqk_packed_row_bytes(8, 4); }\n")
    proc = subprocess.run(
        [cc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", f"-I{tmp_path / 'pkg' / 'include'}",
         f"-I{kernel_source_dir()}", "-c", str(probe), "-o", str(tmp_path / "both.o")],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_build_is_cached_and_honours_cache_dir(tmp_path, monkeypatch):
    _compiler_or_skip()
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    lib = build_kernels()
    assert lib.is_file() and lib.parent.parent == tmp_path / "cache"
    assert len(lib.parent.name) == 16
    mtime = lib.stat().st_mtime_ns
    assert build_kernels() == lib
    assert lib.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temp files left behind


def test_missing_compiler_error_names_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(CompilerNotFoundError, match=r"tried cc, gcc, clang.*install"):
        build_kernels(out_dir=tmp_path)
    with pytest.raises(CompilerNotFoundError, match=r"tried /nonexistent/xcc-apq"):
        build_kernels(out_dir=tmp_path, cc="/nonexistent/xcc-apq")
    assert not any(tmp_path.iterdir())


def test_source_dir_has_sources():
    d = kernel_source_dir()
    assert (d / "apq_kernels.c").is_file() and (d / "apq_kernels.h").is_file()


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows, n", [(1, 8), (3, 64), (5, 256), (4, 3), (2, 13)])
def test_pack_unpack_bytes_equal(kern, bits, rows, n):
    rng = np.random.default_rng(bits * 100 + n)
    codes = rng.integers(0, 1 << bits, size=(rows, n), dtype=np.uint8)
    row_bytes = (n * bits + 7) // 8
    assert kern.apqk_packed_row_bytes(n, bits) == row_bytes
    c_packed = np.full((rows, row_bytes), 0xAA, np.uint8)  # garbage: the kernel must clear padding
    assert kern.apqk_pack_bits(_p(codes, P_U8), rows, n, bits, _p(c_packed, P_U8)) == APQK_OK
    np.testing.assert_array_equal(c_packed, pack_bits(codes, bits, pad=True))
    c_codes = np.empty((rows, n), np.uint8)
    assert kern.apqk_unpack_bits(_p(c_packed, P_U8), rows, n, bits, _p(c_codes, P_U8)) == APQK_OK
    np.testing.assert_array_equal(c_codes, codes)
    np.testing.assert_array_equal(c_codes, unpack_bits(c_packed, bits, n))


@pytest.mark.parametrize(
    "bits, codes, expected",
    [(4, [1, 2], [0x21]), (2, [1, 2, 3, 0], [0x39]), (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F])],
)
def test_c_pack_known_layout(kern, bits, codes, expected):
    c = np.array(codes, np.uint8)
    out = np.zeros(len(expected), np.uint8)
    assert kern.apqk_pack_bits(_p(c, P_U8), 1, len(codes), bits, _p(out, P_U8)) == APQK_OK
    assert out.tolist() == expected


def test_c_pack_rejects_bad_input(kern):
    c = np.array([[16, 0]], np.uint8)
    out = np.zeros(1, np.uint8)
    assert kern.apqk_pack_bits(_p(c, P_U8), 1, 2, 4, _p(out, P_U8)) == APQK_ERR_RANGE
    assert kern.apqk_pack_bits(_p(c, P_U8), 1, 2, 5, _p(out, P_U8)) == APQK_ERR_BITS
    assert kern.apqk_pack_bits(_p(c, P_U8), -1, 2, 8, _p(out, P_U8)) == APQK_ERR_SHAPE
    assert kern.apqk_pack_bits(None, 1, 2, 8, _p(out, P_U8)) == APQK_ERR_NULL
    assert kern.apqk_unpack_bits(_p(out, P_U8), 1, 2, 7, _p(c, P_U8)) == APQK_ERR_BITS


# ------------------------------------------------------------------------------------------------
# fp16 and activations
# ------------------------------------------------------------------------------------------------


def test_fp16_to_float_all_bit_patterns(kern):
    half_bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = half_bits.view(np.float16).astype(np.float32)
    f = kern.apqk_fp16_to_float
    got = np.array([f(int(h)) for h in half_bits.tolist()], dtype=np.float32)
    finite = ~np.isnan(ref)
    _bits_equal(got[finite], ref[finite])  # includes zeros, subnormals, normals and infinities
    assert np.isnan(got[~finite]).all()
    np.testing.assert_array_equal(np.signbit(got[~finite]), np.signbit(ref[~finite]))
    assert int(finite.sum()) == 65536 - 2046


@pytest.mark.parametrize("clip", [1.0, 0.9, 0.5, 0.01])
@pytest.mark.parametrize("t_count, n_in", [(1, 64), (7, 256), (3, 40)])
def test_quantize_activations_bit_identical(kern, clip, t_count, n_in):
    rng = np.random.default_rng(t_count * 7 + n_in + int(clip * 100))
    x = _activations(rng, t_count, n_in)
    xq_c, s_c = _c_quantize(kern, x, clip)
    xq_py, s_py = quantize_activations_per_token(x, clip)
    _bits_equal(s_c, s_py)
    np.testing.assert_array_equal(xq_c, xq_py)
    if t_count > 1:
        assert s_c[1] == 1.0 and not xq_c[1].any()


def test_quantize_activations_ties_half_to_even(kern):
    x = np.array([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -126.5]], np.float32)
    xq, scale = _c_quantize(kern, x, 1.0)
    assert scale.tolist() == [1.0]
    assert xq.tolist() == [[127, 0, 2, 2, -2, 0, 4, -126]]


def test_quantize_activations_divides_by_the_scale(kern):
    scale = np.float32(100.0) / np.float32(127.0)
    ks = (3, 5, 11)
    x = np.array([[100.0] + [np.float32((k + 0.5) * float(scale)) for k in ks]], np.float32)
    assert all(x[0, i + 1] / scale == np.float32(k + 0.5) for i, k in enumerate(ks))  # exact ties
    assert all(x[0, i + 1] * (np.float32(1.0) / scale) != np.float32(k + 0.5) for i, k in enumerate(ks))
    xq, s = _c_quantize(kern, x, 1.0)
    assert s[0].view(np.uint32) == scale.view(np.uint32)
    assert xq.tolist() == [[127, 4, 6, 12]]


def test_quantize_activations_rejects_bad_input(kern):
    x = np.ones((2, 4), np.float32)
    xq = np.empty((2, 4), np.int8)
    s = np.empty(2, np.float32)
    f = kern.apqk_quantize_activations_per_token
    assert f(_p(x, P_F32), 2, 4, 0.0, _p(xq, P_I8), _p(s, P_F32)) == APQK_ERR_CLIP
    assert f(_p(x, P_F32), 2, 4, 1.5, _p(xq, P_I8), _p(s, P_F32)) == APQK_ERR_CLIP
    assert f(_p(x, P_F32), 2, 0, 1.0, _p(xq, P_I8), _p(s, P_F32)) == APQK_ERR_SHAPE
    assert f(_p(x, P_F32), 2, 4, 1.0, None, _p(s, P_F32)) == APQK_ERR_NULL


# ------------------------------------------------------------------------------------------------
# dequantize and matmul
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "n_in, group_size",
    # 384: G = 12, 6, 3, so G*bits is not always a multiple of 8 (padded qzeros).
    # Ragged (g does not divide K, shorter last group): 576 = 4 x 128 + 64, 200 = 3 x 64 + 8,
    # 72 = 2 x 32 + 8, and 40 < g = 64 (a single short group).
    [(384, 32), (384, 64), (384, 128), (576, 128), (200, 64), (72, 32), (40, 64)],
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dequantize_bit_identical(kern, bits, n_in, group_size, symmetric):
    rng = np.random.default_rng(bits * 31 + group_size + symmetric + n_in)
    n_out = 24
    qw, sc, qz = _random_layer(rng, n_out, n_in, bits, group_size, symmetric)
    _bits_equal(_c_dequantize(kern, qw, sc, qz, n_in, bits, group_size), dequantize(qw, sc, qz, bits, group_size, n_in))


_MATMUL_CASES = [
    (bits, g, sym, t, n, k)
    for bits in BITS
    for k in (64, 256)
    for g in (32, 64, 128)
    if k % g == 0
    for sym in (True, False)
    for t in (1, 7)
    for n in (8, 24)
] + [
    # ragged last group: g does not divide K (hidden size 576 with g = 128, ...)
    (bits, g, sym, t, n, k)
    for bits in BITS
    for k, g in ((576, 128), (200, 64), (72, 32), (40, 64), (96, 64))
    for sym in (True, False)
    for t in (1, 7)
    for n in (8,)
]


@pytest.mark.parametrize("bits, group_size, symmetric, t_count, n_out, n_in", _MATMUL_CASES)
def test_matmul_bit_identical(kern, bits, group_size, symmetric, t_count, n_out, n_in):
    seed = bits * 100003 + group_size * 1009 + symmetric * 101 + t_count * 13 + n_out * 7 + n_in
    rng = np.random.default_rng(seed)
    clip = (1.0, 0.9, 0.6)[seed % 3]
    qw, sc, qz = _random_layer(rng, n_out, n_in, bits, group_size, symmetric)
    x = _activations(rng, t_count, n_in)
    y_c = _c_matmul(kern, x, qw, sc, qz, bits, group_size, clip)
    y_py = matmul_int8_dynamic(x, qw, sc, qz, bits, group_size, clip)
    _bits_equal(y_c, y_py)
    assert np.isfinite(y_c).all()


@pytest.mark.parametrize("clip", [1.0, 0.75, 0.3])
@pytest.mark.parametrize("bits", [3, 4])
def test_matmul_clip_values_bit_identical(kern, clip, bits):
    rng = np.random.default_rng(int(clip * 1000) + bits)
    qw, sc, qz = _random_layer(rng, 16, 128, bits, 32, False)
    x = _activations(rng, 5, 128)
    _bits_equal(_c_matmul(kern, x, qw, sc, qz, bits, 32, clip), matmul_int8_dynamic(x, qw, sc, qz, bits, 32, clip))


@pytest.mark.parametrize("bits, group_size, n_in", [(3, 1024, 1536), (4, 1024, 1560), (8, 768, 776)])
def test_matmul_long_ragged_groups_bit_identical(kern, bits, group_size, n_in):
    """Ragged layers with groups longer than the C stack buffer: last group of 512 (stack path
    after on-the-fly full groups), 536 (on-the-fly too) and 8 (stack)."""
    rng = np.random.default_rng(bits + group_size + n_in)
    qw, sc, qz = _random_layer(rng, 8, n_in, bits, group_size, False)
    x = _activations(rng, 3, n_in)
    _bits_equal(_c_matmul(kern, x, qw, sc, qz, bits, group_size, 0.9),
                matmul_int8_dynamic(x, qw, sc, qz, bits, group_size, 0.9))
    _bits_equal(_c_dequantize(kern, qw, sc, qz, n_in, bits, group_size),
                dequantize(qw, sc, qz, bits, group_size, n_in))


@pytest.mark.parametrize("bits, group_size", [(2, 1024), (8, 2048)])
def test_matmul_long_groups_bit_identical(kern, bits, group_size):
    """Groups longer than the C stack buffer (on-the-fly path); 8-bit extremes make the integer
    group sums exceed 2**24 so their conversion to float32 has to round identically."""
    rng = np.random.default_rng(bits + group_size)
    n_in, n_out = 2 * group_size, 8
    if bits == 8:
        codes = rng.choice(np.array([0, 255], np.uint8), size=(n_out, n_in))
        qw = pack_bits(codes, 8)
        sc = np.full((n_out, 2), 0.001, np.float16)
        qz = None
        signs = np.where(codes[0] > 0, 1.0, -1.0).astype(np.float32)[None, :]
        x = signs * rng.uniform(0.99, 1.0, (3, n_in)).astype(np.float32)
    else:
        qw, sc, qz = _random_layer(rng, n_out, n_in, bits, group_size, False)
        x = _activations(rng, 3, n_in)
    y_c = _c_matmul(kern, x, qw, sc, qz, bits, group_size, 1.0)
    y_py = matmul_int8_dynamic(x, qw, sc, qz, bits, group_size, 1.0)
    _bits_equal(y_c, y_py)
    if bits == 8:
        # the first output row is aligned with the signs: its group sums are far above 2**24
        xq, _ = quantize_activations_per_token(x)
        acc = xq[0, :group_size].astype(np.int64) @ (codes[0, :group_size].astype(np.int64) - 128)
        assert acc > 2**24


def test_matmul_rejects_bad_input(kern):
    rng = np.random.default_rng(0)
    qw, sc, qz = _random_layer(rng, 4, 64, 4, 32, False)
    x = np.ones((2, 64), np.float32)
    y = np.empty((2, 4), np.float32)
    scb = sc.view(np.uint16)
    f = kern.apqk_matmul_int8_dynamic

    def call(t=2, k=64, n=4, bits=4, g=32, clip=1.0, xp=_p(x, P_F32)):
        return f(xp, t, k, _p(qw, P_U8), _p(scb, P_U16), _p(qz, P_U8), n, bits, g, clip, _p(y, P_F32))

    assert call() == APQK_OK
    assert call(g=48) == APQK_OK  # need not divide K: G = ceil(64 / 48) = 2, last group of 16
    assert call(g=12) == APQK_ERR_GROUP  # not a multiple of 8
    assert call(g=0) == APQK_ERR_GROUP
    assert call(g=65536 + 8) == APQK_ERR_GROUP  # int32 group sums could overflow
    assert call(k=60) == APQK_ERR_SHAPE  # K not a multiple of 8
    assert call(k=0) == APQK_ERR_SHAPE
    assert call(bits=5) == APQK_ERR_BITS
    assert call(clip=0.0) == APQK_ERR_CLIP
    assert call(t=-1) == APQK_ERR_SHAPE
    assert call(xp=None) == APQK_ERR_NULL
    w = np.empty((4, 64), np.float32)
    assert kern.apqk_dequantize(_p(qw, P_U8), None, None, 4, 64, 4, 32, _p(w, P_F32)) == APQK_ERR_NULL
    deq = kern.apqk_dequantize
    assert deq(_p(qw, P_U8), _p(scb, P_U16), _p(qz, P_U8), 4, 60, 4, 32, _p(w, P_F32)) == APQK_ERR_SHAPE
    assert deq(_p(qw, P_U8), _p(scb, P_U16), _p(qz, P_U8), 4, 64, 4, 20, _p(w, P_F32)) == APQK_ERR_GROUP
    assert deq(_p(qw, P_U8), _p(scb, P_U16), _p(qz, P_U8), 4, 64, 4, 48, _p(w, P_F32)) == APQK_OK
    _bits_equal(w, dequantize(qw, sc, qz, 4, 48, 64))

