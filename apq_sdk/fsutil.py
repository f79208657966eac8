"""Atomic file output: nothing half-written is ever visible under the final name."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class KeepAs(Exception):
    """Raised by an `atomic_directory` fill function to keep what it wrote under another name
    (`path`) instead of deleting it, then re-raise `error` (a failed verification keeps the
    package for inspection, clearly named, and never under the final name)."""

    def __init__(self, path: Path, error: BaseException):
        super().__init__(str(error))
        self.path = Path(path)
        self.error = error


def atomic_directory(final: Path, fill: Callable[[Path], None], tag: str = "building") -> Path:
    """Let `fill` populate a hidden temporary directory beside `final`, then rename it into place.

    On any error or interruption (KeyboardInterrupt, SystemExit from SIGTERM) the temporary
    directory is removed and `final` is left as it was; on `KeepAs` it is renamed to `KeepAs.path`
    (replacing an older one) and `KeepAs.error` is raised. The directory gets the permissions a
    plain mkdir would (0777 less the umask), not mkdtemp's 0700.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        fill(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except KeepAs as keep:
        if keep.path.exists():
            shutil.rmtree(keep.path)
        tmp.rename(keep.path)
        raise keep.error from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """apq-sdk's cache (converted models, sensitivity maps, quantized models): $APQ_CACHE_DIR or
    ~/.cache/apq-sdk. Everything in it can be rebuilt; deleting it only costs time."""
    path = Path(os.environ.get("APQ_CACHE_DIR", Path.home() / ".cache" / "apq-sdk"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
