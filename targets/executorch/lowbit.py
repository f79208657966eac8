"""apq::lowbit_linear and apq::lowbit_embedding: what XNNPACK cannot hold, as ExecuTorch custom ops.

XNNPACK (ExecuTorch 1.5.1) delegates 4-bit groups only (target.py). The `android-lowbit` target
keeps its 4-bit layers there and lowers each 2- or 3-bit layer to

    apq::lowbit_linear(Tensor x, Tensor packed, Tensor scales, int bits, int group_size)

over the checkpoint's own qweight bytes (uint8, unchanged) and float16 scales (unchanged), with
int8 per-token asymmetric dynamic activations: the function the kernel in
runtime_kernels/executorch_lowbit_linear.cpp computes (its header states it). This module

* defines the op (and its `.out` variant, what an ExecuTorch program calls) for torch, with
  `reference`, a torch implementation that computes the kernel's function bit for bit (integer
  group sums, then the groups summed in order in float32);
* compiles the kernel against the headers and `libexecutorch.so` the executorch wheel ships and
  loads it into this process, where it registers with the same runtime the Python bindings use
  (`load_kernel_library`): how verify and the benches run a program that calls it;
* `LowbitLinear`, the module a planned 2/3-bit layer becomes in the exportable model, and
  `LowbitEmbedding`, a tied head's lookup over the head's own operands
  (apq::lowbit_embedding), so the program holds a tied 4-bit head once: that head is a
  LowbitLinear too.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

KERNEL_NAME = "apq::lowbit_linear.out"  # what the program calls (ExecuTorch's out variant)
EMBEDDING_KERNEL_NAME = "apq::lowbit_embedding.out"  # a tied head's lookup over its operands
KERNEL_SOURCE = "executorch_lowbit_linear.cpp"
KERNEL_HEADER = "apq_lowbit_linear.hpp"  # the arithmetic, included by the source
#: bit widths the target sends the op: XNNPACK takes 4 bits; 2 and 3 have no XNNPACK kernel
BITS = (2, 3)
#: what the op computes: also 4 bits, for a tied head whose lookup shares its operands
KERNEL_BITS = (2, 3, 4)
CXXFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c++17", "-ffp-contract=off",
            # the definitions the wheel's CMake config gives its consumers
            "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED",
            "-DET_USE_THREADPOOL")  # output rows over the runtime's thread pool

_LIBRARY = None  # torch.library.Library of the op definitions (kept alive)
_LOADED: dict[Path, ctypes.CDLL] = {}


def reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int,
              group_size: int) -> torch.Tensor:
    """The kernel's function in torch, bit for bit (runtime_kernels/executorch_lowbit_linear.cpp).
    """
    from apq_sdk.quant.modules import quantize_activations_per_token_asym

    k = x.shape[-1]
    n = packed.shape[0]
    groups = -(-k // group_size)
    codes, scale, zero = quantize_activations_per_token_asym(x.reshape(-1, k))
    a = (codes - zero).to(torch.int32)  # [M, K], -255 .. 255
    w = unpack(packed, bits, k).to(torch.int32) - (1 << (bits - 1))  # [N, K]
    pad = groups * group_size - k
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    # exact integer group sums [M, N, G] (|sum| < 255 * 128 * K fits int64 and float32's
    # conversion is the kernel's: int32 -> float)
    sums = torch.einsum("mgk,ngk->mng", a.reshape(-1, groups, group_size).to(torch.int64),
                        w.reshape(n, groups, group_size).to(torch.int64)).to(torch.int32)
    s = scales.float()
    acc = torch.zeros(a.shape[0], n, dtype=torch.float32)
    for g in range(groups):
        acc = acc + s[:, g] * sums[:, :, g].float()
    return (acc * scale).reshape(*x.shape[:-1], n)


def embedding_reference(packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                        ids: torch.Tensor, k: int) -> torch.Tensor:
    """apq::lowbit_embedding: rows `ids` of the packed table, (code - 2^(bits-1)) * scale in
    float32 (exact: a small integer times a float16 value)."""
    rows = unpack(packed[ids.reshape(-1)], bits, k).to(torch.float32) - (1 << (bits - 1))
    s = scales[ids.reshape(-1)].float().repeat_interleave(group_size, 1)[:, :k]
    return (rows * s).reshape(*ids.shape, k)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 codes [N, k] of LSB-first packed rows (apq_sdk.quant.packing.unpack_bits)."""
    from apq_sdk.quant.packing import unpack_bits

    return torch.from_numpy(unpack_bits(packed.numpy(), bits, k).astype(np.uint8))


def define_ops() -> None:
    """Define apq::lowbit_linear and apq::lowbit_linear.out for torch (once per process)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    if hasattr(torch.ops, "apq") and hasattr(torch.ops.apq, "lowbit_linear"):
        return  # defined by another copy of this module
    lib = torch.library.Library("apq", "DEF")
    lib.define("lowbit_linear(Tensor x, Tensor packed, Tensor scales, int bits, int group_size)"
               " -> Tensor")
    lib.define("lowbit_linear.out(Tensor x, Tensor packed, Tensor scales, int bits, "
               "int group_size, *, Tensor(a!) out) -> Tensor(a!)")

    def functional(x, packed, scales, bits, group_size):
        return reference(x, packed, scales, bits, group_size)

    def out_variant(x, packed, scales, bits, group_size, *, out):
        result = reference(x, packed, scales, bits, group_size)
        out.resize_(result.shape)
        out.copy_(result)
        return out

    def meta(x, packed, scales, bits, group_size):
        return x.new_empty((*x.shape[:-1], packed.shape[0]))

    def meta_out(x, packed, scales, bits, group_size, *, out):
        out.resize_((*x.shape[:-1], packed.shape[0]))
        return out

    lib.define("lowbit_embedding(Tensor packed, Tensor scales, int bits, int group_size, "
               "Tensor ids, int k) -> Tensor")
    lib.define("lowbit_embedding.out(Tensor packed, Tensor scales, int bits, int group_size, "
               "Tensor ids, int k, *, Tensor(a!) out) -> Tensor(a!)")

    def embedding(packed, scales, bits, group_size, ids, k):
        return embedding_reference(packed, scales, bits, group_size, ids, k)

    def embedding_out(packed, scales, bits, group_size, ids, k, *, out):
        result = embedding_reference(packed, scales, bits, group_size, ids, k)
        out.resize_(result.shape)
        out.copy_(result)
        return out

    def embedding_meta(packed, scales, bits, group_size, ids, k):
        return scales.new_empty((*ids.shape, k), dtype=torch.float32)

    def embedding_meta_out(packed, scales, bits, group_size, ids, k, *, out):
        out.resize_((*ids.shape, k))
        return out

    lib.impl("lowbit_embedding", embedding, "CompositeExplicitAutograd")
    lib.impl("lowbit_embedding.out", embedding_out, "CompositeExplicitAutograd")
    lib.impl("lowbit_embedding", embedding_meta, "Meta")
    lib.impl("lowbit_embedding.out", embedding_meta_out, "Meta")
    lib.impl("lowbit_linear", functional, "CompositeExplicitAutograd")
    lib.impl("lowbit_linear.out", out_variant, "CompositeExplicitAutograd")
    lib.impl("lowbit_linear", meta, "Meta")
    lib.impl("lowbit_linear.out", meta_out, "Meta")
    _LIBRARY = lib


class LowbitLinear(nn.Module):
    """A planned 2/3-bit linear as the program holds it: the checkpoint's qweight bytes and
    float16 scales, computed by apq::lowbit_linear (and the bias, if any, added after)."""

    def __init__(self, module, bias: torch.Tensor | None):
        super().__init__()
        define_ops()
        if module.bits not in KERNEL_BITS or not module.symmetric:
            raise ValueError(f"LowbitLinear: expected symmetric {KERNEL_BITS}-bit groups, found "
                             f"{module.bits}-bit "
                             f"{'symmetric' if module.symmetric else 'asymmetric'}")
        self.bits = int(module.bits)
        self.group_size = int(module.group_size)
        self.out_features, self.in_features = module.shape
        self.register_buffer("packed", torch.from_numpy(
            np.ascontiguousarray(module.arrays["qweight"], dtype=np.uint8)))
        self.register_buffer("scales", torch.from_numpy(
            np.ascontiguousarray(module.arrays["scales"], dtype=np.float16)))
        self.register_buffer("bias", bias)

    def forward(self, x):
        y = torch.ops.apq.lowbit_linear(x, self.packed, self.scales, self.bits, self.group_size)
        return y if self.bias is None else y + self.bias


class LowbitEmbedding(nn.Module):
    """A tied head's embedding lookup over the head's own operands (the same tensors as its
    LowbitLinear: the program holds them once), by apq::lowbit_embedding; rows float32."""

    def __init__(self, head: LowbitLinear, scale=None):
        super().__init__()
        self.head = head  # the same buffers, not a copy
        self.register_buffer("embed_scale", scale)

    def forward(self, ids):
        head = self.head
        rows = torch.ops.apq.lowbit_embedding(head.packed, head.scales, head.bits,
                                              head.group_size, ids, head.in_features)
        return rows if self.embed_scale is None else rows * self.embed_scale


# -- the compiled kernel ---------------------------------------------------------------------------

def executorch_root() -> Path:
    """The portion of the executorch package that holds the wheel's headers and runtime."""
    import executorch

    for portion in executorch.__path__:
        root = Path(portion)
        if (root / "include" / "executorch").is_dir() and (root / "lib").is_dir():
            return root
    from apq_sdk.runtime_kernels_build import KernelBuildError

    raise KernelBuildError(
        f"no portion of the executorch package ({', '.join(executorch.__path__)}) holds the "
        f"wheel's include/executorch and lib/: install the executorch wheel "
        f"(pip install 'apq-sdk[executorch]' torch==2.13.0)")


def build_kernel_library(out_dir: Path | str | None = None) -> Path:
    """Compile runtime_kernels/executorch_lowbit_linear.cpp against the executorch wheel's
    runtime into a shared library for this CPU, cached under a key of the sources, the compiler,
    the CPU, the flags and the runtime's version (APQ_CACHE_DIR or ~/.cache/apq-sdk/kernels)."""
    from executorch.version import __version__ as et_version

    from apq_sdk.runtime_kernels_build import (KernelBuildError, _cache_root, _compiler_identity,
                                               kernel_source_dir)

    source = kernel_source_dir() / KERNEL_SOURCE
    cxx = next((shutil.which(c) for c in (os.environ.get("CXX") or "", "c++", "g++", "clang++")
                if c and shutil.which(c)), None)
    if cxx is None:
        raise KernelBuildError(
            f"no C++ compiler found (tried $CXX, c++, g++, clang++) to build {KERNEL_SOURCE}, "
            f"the kernel of the 2- and 3-bit layers: install g++ (apt-get install g++)")
    root = executorch_root()
    digest = hashlib.sha256()
    for part in (source.read_bytes(), (source.parent / KERNEL_HEADER).read_bytes(),
                 _compiler_identity(cxx).encode(), _cpu_identity().encode(),
                 " ".join(CXXFLAGS).encode(), et_version.encode(), str(root).encode()):
        digest.update(part)
        digest.update(b"\0")
    target_dir = _cache_root(out_dir) / f"et-{digest.hexdigest()[:16]}"
    lib = target_dir / "libapq_executorch_lowbit.so"
    if lib.is_file():
        return lib
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=target_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    include = root / "include"
    cmd = [cxx, *CXXFLAGS, "-I", str(include), "-I",
           str(include / "executorch" / "runtime" / "core" / "portable_type" / "c10"),
           "-o", str(tmp), str(source),
           "-L", str(root / "lib"), "-lexecutorch", "-lexecutorch_threadpool",
           f"-Wl,-rpath,{root / 'lib'}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise KernelBuildError(f"compiling {KERNEL_SOURCE} failed (exit code "
                                   f"{done.returncode}):\n  {' '.join(cmd)}\n"
                                   f"{done.stderr.strip()[-4000:]}")
        os.replace(tmp, lib)
    finally:
        if tmp.exists():
            tmp.unlink()
    return lib


def _cpu_identity() -> str:
    """What -march=native compiles for: this CPU's model and flags (a cache directory shared with
    another machine must not hand it a library built for other instructions)."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(sorted({line for line in lines
                                                if line.split(":")[0].strip() in wanted}))


def load_kernel_library(out_dir: Path | str | None = None) -> Path:
    """Build (if needed) and load the kernel into this process: it registers
    apq::lowbit_linear.out with the ExecuTorch runtime the Python bindings use (both resolve
    the wheel's libexecutorch.so). Returns the library's path."""
    from apq_sdk.runtime_kernels_build import KernelBuildError

    define_ops()
    from executorch.extension.pybindings import portable_lib  # noqa: F401  (the runtime first)

    path = build_kernel_library(out_dir).resolve()
    if path not in _LOADED:
        try:
            _LOADED[path] = ctypes.CDLL(str(path))
        except OSError as exc:
            raise KernelBuildError(f"cannot load {path}: {exc}") from exc
    return path
