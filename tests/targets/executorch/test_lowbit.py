"""apq::lowbit_linear (runtime_kernels/executorch_lowbit_linear.cpp, targets/executorch/lowbit.py):
the compiled kernel, run by ExecuTorch's runtime, equals its torch reference bit for bit, and the
reference computes what the core's reference modules compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="pip install 'apq-sdk[executorch]' torch==2.13.0")

from apq_sdk.quant.modules import fake_quantize_activations_asym  # noqa: E402
from apq_sdk.quant.packing import pack_bits  # noqa: E402
from apq_sdk.targets.executorch import lowbit  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def kernel():
    import shutil

    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("a C++ compiler is needed to build apq::lowbit_linear")
    return lowbit.load_kernel_library()


class _Op(torch.nn.Module):
    def __init__(self, packed, scales, bits, group):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.bits, self.group = bits, group

    def forward(self, x):
        return torch.ops.apq.lowbit_linear(x, self.packed, self.scales, self.bits, self.group)


def _program(packed, scales, bits, group, k, max_tokens=32):
    """The op alone as an ExecuTorch program (dynamic token count), loaded (the method holds
    its program and bytes)."""
    from executorch.exir import EdgeCompileConfig, to_edge

    from apq_sdk.targets.executorch.program import LoadedMethod

    exported = torch.export.export(
        _Op(packed, scales, bits, group), (torch.zeros(1, 2, k),),
        dynamic_shapes=({1: torch.export.Dim("tokens", min=1, max=max_tokens)},), strict=True)
    buffer = to_edge(exported, compile_config=EdgeCompileConfig(_check_ir_validity=False)) \
        .to_executorch().buffer
    return LoadedMethod(buffer)


def _layer(bits, n, k, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8).numpy()
    packed = torch.from_numpy(pack_bits(codes, bits, pad=True))
    scales = (torch.rand(n, -(-k // group), generator=gen) * 0.05 + 1e-3).half()
    return codes, packed, scales


def _activations(tokens, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, k, generator=gen) * 2
    x[0, 0, 3] = 120.0  # an outlier token (a massive activation)
    if tokens > 2:
        x[0, 1] = 0.0  # an all-zero token: the smallest-normal scale
        x[0, 2] = x[0, 2].abs()  # no negative value: zero point -128
    return x


# 2 and 3 bits are what the target sends the kernel; 4 bits exercises the same paths. K=200
# with groups of 64 has a short last group and takes the general path; 1-4 tokens read the codes
# in place, more tokens unpack each row once.
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n,group", [(576, 96, 64), (256, 40, 32), (384, 24, 128),
                                       (200, 24, 64)])
def test_the_kernel_is_its_reference_bit_for_bit(bits, k, n, group):
    codes, packed, scales = _layer(bits, n, k, group)
    method = _program(packed, scales, bits, group, k)
    for tokens in (1, 3, 4, 5, 17):
        x = _activations(tokens, k)
        got = method.execute([x])[0]
        want = lowbit.reference(x, packed, scales, bits, group)
        assert got.shape == (1, tokens, n)
        assert torch.equal(got, want), (tokens, (got - want).abs().max())


@pytest.mark.parametrize("bits", [2, 3])
def test_the_reference_is_the_cores_int8_asym_linear(bits):
    """What the kernel computes is the plan's reference (QuantLinear: the activations fake-
    quantized per token, asymmetric, times the dequantized weights), up to float32 rounding."""
    k, n, group = 576, 64, 64
    codes, packed, scales = _layer(bits, n, k, group, seed=3)
    x = _activations(9, k, seed=4)
    weight = (torch.from_numpy(codes.astype(np.float32)) - (1 << (bits - 1))) * \
        scales.float().repeat_interleave(group, 1)
    want = torch.nn.functional.linear(fake_quantize_activations_asym(x), weight)
    got = lowbit.reference(x, packed, scales, bits, group)
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()


def test_the_kernel_refuses_operands_that_do_not_fit():
    """Scales of the wrong shape fail the method (the kernel's check), not a read past the end."""
    k, n, group = 128, 16, 32
    _, packed, scales = _layer(2, n, k, group)
    method = _program(packed, scales[:, :2].contiguous(), 2, group, k)
    with pytest.raises(RuntimeError):
        method.execute([torch.randn(1, 3, k)])


def test_the_kernel_library_is_built_once_and_cached(tmp_path, monkeypatch):
    """The compiled library lives under a key of its source, compiler, flags and runtime: a
    second build is the same file."""
    first = lowbit.build_kernel_library(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert lowbit.build_kernel_library(tmp_path) == first
    assert first.stat().st_mtime_ns == mtime


# -- the arithmetic alone, on every path it has -----------------------------------------------------

HARNESS = r"""
#include <cstdio>
#include <vector>
static const char* taken = "";  // the path lowbit_linear took
#define APQ_LOWBIT_TRACE(path) (taken = (path))
#include "apq_lowbit_linear.hpp"
// stdin: int64 m, k, n, bits, group; float32 x[m*k]; uint8 packed[n*row]; uint16 scales[n*G]
// stdout: float32 y[m*n], then the SIMD on this CPU, a newline and the path taken
int main() {
  long long h[5];
  if (std::fread(h, sizeof h, 1, stdin) != 1) return 2;
  const long long m = h[0], k = h[1], n = h[2], bits = h[3], group = h[4];
  const long long row = (k * bits + 7) / 8, groups = (k + group - 1) / group;
  std::vector<float> x(m * k), y(m * n);
  std::vector<unsigned char> packed(n * row);
  std::vector<unsigned short> scales(n * groups);
  if (std::fread(x.data(), 4, x.size(), stdin) != x.size() ||
      std::fread(packed.data(), 1, packed.size(), stdin) != packed.size() ||
      std::fread(scales.data(), 2, scales.size(), stdin) != scales.size()) return 3;
  apq_lowbit::lowbit_linear(x.data(), m, k, packed.data(), scales.data(), n, (int)bits, group,
                            y.data());
  std::fwrite(y.data(), 4, y.size(), stdout);
  std::printf("%s\n%s", apq_lowbit::simd_path(), taken);
  return 0;
}
"""


def _compilers():
    import shutil

    out = []
    cxx = shutil.which("g++")
    if cxx:
        flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() \
            else []
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi"]
        for name, isa, wanted in (
                ("ssse3", ["-mssse3", "-mbmi2"], ["ssse3", "bmi2"]),
                ("avx2", ["-mavx2", "-mbmi2"], ["avx2", "bmi2"]),
                ("avx512vnni", [*avx512, "-mbmi2", "-mf16c"],
                 ["avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"])):
            missing = [f for f in wanted if f not in flags]
            out.append(pytest.param([cxx, "-O2", *isa], [], name, id=f"x86-64-{name}",
                                    marks=[pytest.mark.skip(reason=f"this CPU lacks {missing}")]
                                    if missing else []))
        out.append(pytest.param([cxx, "-O2", "-march=x86-64"], [], "none", id="x86-64-scalar"))
    # aarch64 under qemu-user: Android's baseline armv8-a build takes the dot product (SDOT) at
    # run time where the CPU has it (qemu's "max" CPU) and the plain NEON path where it does not
    # (Cortex-A53); a build for armv8.2-a+dotprod takes it always
    cross, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    for name, march, cpu, simd in (("neon", "armv8-a", "cortex-a53", "neon"),
                                   ("dispatch-dotprod", "armv8-a", "max", "neon+dotprod"),
                                   ("dotprod", "armv8.2-a+dotprod", "max", "neon+dotprod")):
        if cross and qemu:
            out.append(pytest.param([cross, "-O2", "-static", f"-march={march}"],
                                    [qemu, "-cpu", cpu], simd, id=f"aarch64-{name}"))
        else:
            out.append(pytest.param(None, None, None, id=f"aarch64-{name}", marks=pytest.mark.skip(
                reason="aarch64 cross toolchain or qemu missing: apt-get install "
                       "g++-aarch64-linux-gnu qemu-user")))
    # clang, the Android NDK's compiler, whose target attribute differs from GCC's (the GCC
    # cross toolchain's sysroot serves it)
    clang = next(filter(None, map(shutil.which, ("clang++", *(f"clang++-{v}"
                                                               for v in range(21, 15, -1))))), None)
    for name, cpu, simd in (("neon", "cortex-a53", "neon"),
                            ("dispatch-dotprod", "max", "neon+dotprod")):
        if clang and cross and qemu:
            out.append(pytest.param([clang, "--target=aarch64-linux-gnu", "-O2", "-static",
                                     "-march=armv8-a"], [qemu, "-cpu", cpu], simd,
                                    id=f"aarch64-clang-{name}"))
        else:
            out.append(pytest.param(None, None, None, id=f"aarch64-clang-{name}",
                                    marks=pytest.mark.skip(
                reason="clang 16 or later, the aarch64 cross toolchain or qemu missing: apt-get "
                       "install clang-16 g++-aarch64-linux-gnu qemu-user")))
    return out


def _path(simd, bits, k, group, tokens):
    """The path lowbit_linear takes (its dispatch)."""
    if not (tokens <= 4 and k % group == 0 and group % (8 if bits == 3 else 8 // bits) == 0):
        return "unpack"
    if simd == "avx512vnni" and group % 64 == 0:
        return "avx512"
    if simd == "neon+dotprod" and group % (16 if bits == 4 else 32) == 0:
        return "dotprod"
    return "in-place"


@pytest.mark.parametrize("compiler,launcher,simd", _compilers())
def test_every_path_of_the_arithmetic_is_the_reference_bit_for_bit(compiler, launcher, simd,
                                                                   tmp_path):
    """apq_lowbit_linear.hpp compiled alone: with SSSE3 or AVX2 (and BMI2's PDEP for 3 bits),
    without SIMD, and for aarch64 with NEON and with the dot product (run under qemu), decode
    and prefill, 2/3/4 bits, groups the SIMD loops take whole, in half steps (the dot product)
    and groups they leave to the scalar loop: the Python reference's exact floats, on the path
    the dispatch should take (the harness prints it)."""
    import signal
    import subprocess

    from apq_sdk.runtime_kernels_build import kernel_source_dir

    source = tmp_path / "harness.cpp"
    source.write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run([*compiler, "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
                    f"-I{kernel_source_dir()}",
                    str(source), "-o", str(exe)], check=True, capture_output=True)
    # rows: whole blocks of 16 (AVX-512) or 8 (the dot product) and a short last one, groups of
    # one and two 64-code chunks, of half a dot-product step (2 and 3 bits: 32, 4 bits: 16) and
    # of whole steps and a half (96)
    cases = [(2, 576, 40, 64), (2, 512, 24, 128), (4, 256, 24, 32), (4, 576, 16, 64),
             (4, 512, 21, 128), (3, 576, 16, 64), (3, 512, 19, 128), (3, 576, 8, 32),
             (3, 1536, 33, 64), (2, 200, 8, 64), (2, 576, 19, 32), (2, 384, 13, 96),
             (3, 384, 13, 96), (4, 320, 11, 16)]

    def inputs(bits, k, n, group):
        codes, packed, scales = _layer(bits, n, k, group, seed=bits * 7 + k)
        for tokens in (1, 4, 6):
            yield _activations(tokens, k, seed=tokens), packed, scales
        # large group sums (the top codes, activations >= 0: most |S| past 2^13), where the
        # product scale * float(S) rounds: a fused multiply-add would show
        gen = torch.Generator().manual_seed(k + n)
        top = torch.randint(3 << (bits - 2), 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
        packed = torch.from_numpy(pack_bits(top.numpy(), bits, pad=True))
        for tokens in (1, 4):
            yield torch.rand(1, tokens, k, generator=gen), packed, scales

    decode = None  # a decode input, for the SIGILL check below
    for bits, k, n, group in cases:
        for x, packed, scales in inputs(bits, k, n, group):
            tokens = x.shape[1]
            header = np.array([tokens, k, n, bits, group], dtype=np.int64).tobytes()
            data = header + x.numpy().astype(np.float32).tobytes() + packed.numpy().tobytes() + \
                scales.view(torch.int16).numpy().tobytes()
            decode = decode or data
            done = subprocess.run([*launcher, str(exe)], input=data, capture_output=True,
                                  check=True, timeout=120)
            got = np.frombuffer(done.stdout[:4 * tokens * n], dtype=np.float32)
            assert done.stdout[4 * tokens * n:].decode().split("\n") == \
                [simd, _path(simd, bits, k, group, tokens)], (bits, k, group, tokens)
            want = lowbit.reference(x, packed, scales, bits, group).numpy().ravel()
            assert np.array_equal(got, want), (bits, k, group, tokens)
    if "-march=armv8.2-a+dotprod" in compiler:
        # qemu's Cortex-A53 really lacks the Armv8.2 instructions this build runs: SIGILL
        done = subprocess.run([launcher[0], "-cpu", "cortex-a53", str(exe)], input=decode,
                              capture_output=True, timeout=120)
        assert done.returncode in (-signal.SIGILL, 128 + signal.SIGILL), done.returncode


def test_the_threads_split_rows_without_changing_a_bit():
    """With ExecuTorch's thread pool at two threads the kernel splits its output rows; every
    output is computed as on one thread."""
    from executorch.extension.pybindings import portable_lib

    k, n, group = 576, 1536, 64
    before = portable_lib._threadpool_get_thread_count()
    try:
        for bits in (2, 3, 4):
            _, packed, scales = _layer(bits, n, k, group, seed=11)
            method = _program(packed, scales, bits, group, k)
            for tokens in (1, 9):
                x = _activations(tokens, k, seed=5)
                portable_lib._unsafe_reset_threadpool(1)
                one = method.execute([x])[0].clone()
                portable_lib._unsafe_reset_threadpool(2)
                two = method.execute([x])[0]
                assert torch.equal(one, two)
                assert torch.equal(two, lowbit.reference(x, packed, scales, bits, group))
    finally:
        portable_lib._unsafe_reset_threadpool(before)
