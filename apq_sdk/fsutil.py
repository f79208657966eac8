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


def atomic_directory(final: Path, fill: Callable[[Path], None], tag: str = "building") -> Path:
    """Let `fill` populate a hidden temporary directory beside `final`, then rename it into place.

    On any error or interruption (KeyboardInterrupt, SystemExit from SIGTERM) the temporary
    directory is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}-", dir=final.parent))
    try:
        fill(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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
