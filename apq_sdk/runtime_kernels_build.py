"""Compile and load the C runtime kernels (``runtime_kernels/apq_kernels.c``) through ctypes.

``build_kernels()`` compiles the C99 source into a shared library with
``-O2 -fPIC -shared -std=c99 -ffp-contract=off -lm`` and caches it under a directory keyed by the
sha256 of the source, the header, the compiler and the flags, so a rebuild happens only when one of
them changes. The cache root is ``out_dir`` if given, else ``$APQ_CACHE_DIR``, else
``~/.cache/apq-sdk/kernels``. Compilation writes a temporary file and renames it into place with
``os.replace``, so concurrent builders never see a half-written library.

``load_kernels()`` returns a ``ctypes.CDLL`` with ``argtypes``/``restype`` set for every kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from apq_sdk.errors import ApqError

__all__ = [
    "CFLAGS",
    "KERNEL_SOURCE",
    "KERNEL_HEADER",
    "KernelBuildError",
    "CompilerNotFoundError",
    "kernel_source_dir",
    "find_compiler",
    "build_kernels",
    "load_kernels",
]

KERNEL_SOURCE = "apq_kernels.c"
KERNEL_HEADER = "apq_kernels.h"
CFLAGS = ("-O2", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off")
LDLIBS = ("-lm",)
_DEFAULT_COMPILERS = ("cc", "gcc", "clang")

_LOADED: dict[Path, ctypes.CDLL] = {}


class KernelBuildError(ApqError):
    """The C runtime kernels could not be located, compiled or loaded."""


class CompilerNotFoundError(KernelBuildError):
    """No C compiler is available to build the runtime kernels."""


def kernel_source_dir() -> Path:
    """Directory holding ``apq_kernels.c``/``.h``.

    Uses the installed package ``apq_sdk.runtime_kernels`` when importable, otherwise the repository's
    ``runtime_kernels/`` folder next to the ``apq_sdk`` package (a source checkout on PYTHONPATH).
    """
    candidates: list[Path] = []
    try:
        from importlib.resources import files

        res = files("apq_sdk.runtime_kernels")
        candidates.append(Path(str(res)))
    except (ModuleNotFoundError, ImportError, TypeError, ValueError):
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "runtime_kernels")
    for cand in candidates:
        if (cand / KERNEL_SOURCE).is_file() and (cand / KERNEL_HEADER).is_file():
            return cand
    raise KernelBuildError(
        f"expected {KERNEL_SOURCE} and {KERNEL_HEADER} in one of "
        f"{', '.join(str(c) for c in candidates)}, found neither; reinstall apq-sdk "
        "(the wheel ships them as package data of apq_sdk.runtime_kernels)"
    )


def find_compiler(cc: str | None = None) -> str:
    """Absolute path of the C compiler: ``cc`` if given, else ``$CC``, else cc, gcc, clang on PATH."""
    if cc:
        tried = [cc]
    elif os.environ.get("CC"):
        tried = [os.environ["CC"].strip()]
    else:
        tried = list(_DEFAULT_COMPILERS)
    for name in tried:
        path = shutil.which(name)
        if path:
            return path
    if sys.platform == "darwin":
        hint = "install the Xcode command line tools with `xcode-select --install`"
    elif sys.platform.startswith("win"):
        hint = "install a C compiler (e.g. MinGW-w64 gcc or clang) and put it on PATH"
    else:
        hint = "install one, e.g. `apt-get install gcc` (Debian/Ubuntu) or `dnf install gcc`"
    raise CompilerNotFoundError(
        f"no C compiler found to build the apq-sdk runtime kernels: tried {', '.join(tried)}; "
        f"{hint}, or point the CC environment variable (or cc=) at a compiler"
    )


def _compiler_identity(cc_path: str) -> str:
    try:
        proc = subprocess.run(
            [cc_path, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        version = (proc.stdout or proc.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{cc_path}\n{version}"


def _lib_name() -> str:
    if sys.platform == "darwin":
        return "libapq_kernels.dylib"
    if sys.platform.startswith("win"):
        return "apq_kernels.dll"
    return "libapq_kernels.so"


def _cache_root(out_dir: Path | str | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    env = os.environ.get("APQ_CACHE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "apq-sdk" / "kernels"


def build_kernels(out_dir: Path | str | None = None, cc: str | None = None) -> Path:
    """Compile the kernels if needed and return the path of the shared library.

    The library lives at ``<root>/<sha256[:16]>/libapq_kernels.so`` where ``root`` is ``out_dir``,
    ``$APQ_CACHE_DIR`` or ``~/.cache/apq-sdk/kernels`` and the key hashes the C source, the header,
    the compiler (path and ``--version``) and the flags.
    """
    src_dir = kernel_source_dir()
    src = src_dir / KERNEL_SOURCE
    cc_path = find_compiler(cc)
    digest = hashlib.sha256()
    digest.update(src.read_bytes())
    digest.update(b"\0")
    digest.update((src_dir / KERNEL_HEADER).read_bytes())
    digest.update(b"\0")
    digest.update(_compiler_identity(cc_path).encode())
    digest.update(b"\0")
    digest.update(" ".join(CFLAGS + LDLIBS).encode())
    key = digest.hexdigest()[:16]

    target_dir = _cache_root(out_dir) / key
    lib = target_dir / _lib_name()
    if lib.is_file():
        return lib
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelBuildError(
            f"cannot create the kernel cache directory {target_dir}: {exc}; "
            "set APQ_CACHE_DIR to a writable directory"
        ) from exc
    fd, tmp_name = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=target_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [cc_path, *CFLAGS, "-I", str(src_dir), "-o", str(tmp), str(src), *LDLIBS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise KernelBuildError(
                f"compiling the runtime kernels failed (exit code {proc.returncode}):\n"
                f"  {' '.join(cmd)}\n{proc.stderr.strip()}"
            )
        os.replace(tmp, lib)
    except subprocess.TimeoutExpired as exc:
        raise KernelBuildError(f"compiling the runtime kernels timed out: {' '.join(cmd)}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_float, c_size_t = ctypes.c_int, ctypes.c_float, ctypes.c_size_t
    p_u8 = ctypes.POINTER(ctypes.c_uint8)
    p_i8 = ctypes.POINTER(ctypes.c_int8)
    p_u16 = ctypes.POINTER(ctypes.c_uint16)
    p_f32 = ctypes.POINTER(ctypes.c_float)
    sigs = {
        "apqk_packed_row_bytes": (c_size_t, [c_int, c_int]),
        "apqk_fp16_to_float": (c_float, [ctypes.c_uint16]),
        "apqk_pack_bits": (c_int, [p_u8, c_int, c_int, c_int, p_u8]),
        "apqk_unpack_bits": (c_int, [p_u8, c_int, c_int, c_int, p_u8]),
        "apqk_quantize_activations_per_token": (c_int, [p_f32, c_int, c_int, c_float, p_i8, p_f32]),
        "apqk_dequantize": (c_int, [p_u8, p_u16, p_u8, c_int, c_int, c_int, c_int, p_f32]),
        "apqk_matmul_int8_dynamic": (
            c_int,
            [p_f32, c_int, c_int, p_u8, p_u16, p_u8, c_int, c_int, c_int, c_float, p_f32],
        ),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def load_kernels(out_dir: Path | str | None = None, cc: str | None = None) -> ctypes.CDLL:
    """Build (if needed) and load the kernels; returns a ``ctypes.CDLL`` with signatures declared.

    Pointer arguments take ``numpy_array.ctypes.data_as(ctypes.POINTER(...))`` or ``None`` (NULL,
    e.g. ``qzeros`` of a symmetric layer). Every kernel returns 0 on success, negative on bad input.
    """
    path = build_kernels(out_dir=out_dir, cc=cc).resolve()
    lib = _LOADED.get(path)
    if lib is None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise KernelBuildError(f"cannot load the runtime kernels from {path}: {exc}") from exc
        _declare(lib)
        _LOADED[path] = lib
    return lib
