"""A bounds-checked reader of a GGUF file's header, run before transformers parses the file.

transformers (through gguf-py and numpy) trusts the header: a truncated file fails deep inside
numpy, and a header that claims 2**62 tensors asks for impossible buffers. This reader walks the
header with every length, count and offset checked against the bytes the file really has, never
allocates more than the file holds, and says what is wrong with which file:

* magic and version (1 to 3);
* every key/value (strings, arrays, nesting at most 4 deep) inside the file;
* every tensor's name, dimensions, type (a known ggml type) and data range inside the file, after
  the aligned start of the data section (so a truncated download is named as such);
* `general.architecture`, for a clear "not supported" before transformers is asked.

Layout (little-endian): b"GGUF", u32 version, u64 tensor_count, u64 kv_count, kv_count key/values
(string key, u32 type, value), tensor_count infos (string name, u32 n_dims, n_dims x u64 dims, u32
type, u64 offset), padding to `general.alignment` (default 32), then the tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError

MAGIC = b"GGUF"
MAX_DEPTH = 4
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ModelLoadError):
    """The file is not a GGUF file this reader can vouch for (the message says why and what to do)."""


@dataclass
class GGUFHeader:
    version: int
    size: int
    metadata: dict = field(default_factory=dict)  # scalar and string values only
    tensors: list[tuple[str, tuple[int, ...], int, int]] = field(default_factory=list)
    data_start: int = 0

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> GGUFHeaderError:
        return GGUFHeaderError(
            f"{self.path}: {what} (at byte {self.pos:,} of {len(self.data):,}); the file is "
            f"truncated or corrupt: download or convert it again")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"{what} needs {n:,} bytes, only {len(self.data) - self.pos:,} are left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"the length of {what}")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            if depth >= MAX_DEPTH:
                raise self.fail(f"{what} nests arrays more than {MAX_DEPTH} deep")
            item = self.scalar("<I", f"the item type of {what}")
            count = self.scalar("<Q", f"the length of {what}")
            if item in _SCALARS:  # fixed-size items: check the whole array fits, then skip it
                self.take(count * struct.calcsize(_SCALARS[item]), what)
                return None
            if item not in (_STRING, _ARRAY):
                raise self.fail(f"{what} has an unknown item type {item}")
            if count > len(self.data) - self.pos:  # every item takes at least one byte
                raise self.fail(f"{what} claims {count:,} items")
            for i in range(count):
                self.value(item, f"{what}[{i}]", depth + 1)
            return None
        raise self.fail(f"{what} has an unknown value type {kind}")


def _tensor_bytes(dims: tuple[int, ...], kind: int) -> int | None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        return None
    count = 1
    for d in dims:
        count *= d
    return count // block * size


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read and check the header of the GGUF file at `path` (see the module docstring)."""
    import mmap

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise GGUFHeaderError(f"{path} has {size} bytes, too few for a GGUF header; the file is "
                              f"truncated or not a GGUF file")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _read(_Reader(data, path), path, size)


def _read(r: _Reader, path: Path, size: int) -> GGUFHeader:
    if r.take(4, "the magic bytes") != MAGIC:
        raise GGUFHeaderError(f"{path} is not a GGUF file (expected the magic bytes b'GGUF'); "
                              f"pass a .gguf file or a Hugging Face directory")
    version = r.scalar("<I", "the version")
    if version not in (1, 2, 3):
        raise GGUFHeaderError(f"{path}: GGUF version {version} is not one apq-sdk reads (1 to 3)")
    tensor_count = r.scalar("<Q", "the tensor count")
    kv_count = r.scalar("<Q", "the key/value count")
    # each key/value takes at least 12 bytes, each tensor info at least 24: a count the file
    # cannot hold is refused before anything is read for it
    if kv_count * 12 + tensor_count * 24 > size:
        raise GGUFHeaderError(f"{path}: the header claims {tensor_count:,} tensors and "
                              f"{kv_count:,} keys, more than a {size:,}-byte file can hold; the "
                              f"file is corrupt: download or convert it again")
    header = GGUFHeader(version=version, size=size)
    for i in range(kv_count):
        key = r.string(f"key #{i}")
        kind = r.scalar("<I", f"the type of {key!r}")
        value = r.value(kind, f"the value of {key!r}")
        if value is not None:
            header.metadata[key] = value
    for i in range(tensor_count):
        name = r.string(f"the name of tensor #{i}")
        n_dims = r.scalar("<I", f"the rank of {name!r}")
        if n_dims > 8:
            raise r.fail(f"tensor {name!r} claims {n_dims} dimensions")
        dims = tuple(r.scalar("<Q", f"a dimension of {name!r}") for _ in range(n_dims))
        kind = r.scalar("<I", f"the type of {name!r}")
        offset = r.scalar("<Q", f"the data offset of {name!r}")
        header.tensors.append((name, dims, kind, offset))
    alignment = header.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFHeaderError(f"{path}: general.alignment {alignment!r} is not a power of two")
    header.data_start = -(-r.pos // alignment) * alignment
    available = size - header.data_start
    for name, dims, kind, offset in header.tensors:
        nbytes = _tensor_bytes(dims, kind)
        if nbytes is None:
            raise GGUFHeaderError(f"{path}: tensor {name!r} has an unknown ggml type {kind}; "
                                  f"convert the model with a current llama.cpp")
        if offset + nbytes > available:
            raise GGUFHeaderError(
                f"{path}: tensor {name!r} needs bytes {header.data_start + offset:,} to "
                f"{header.data_start + offset + nbytes:,}, but the file has {size:,}; the file is "
                f"truncated (an interrupted download or copy): download or convert it again")
    return header
