"""Atomic file output: nothing half-written is ever visible under the final name."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


#: signals received by the CLI's handlers. Python raises the handler's exception wherever the
#: main thread happens to be, and inside a finalizer (__del__, a weakref callback) it is printed
#: and dropped, so a Ctrl-C or SIGTERM could be lost and the work committed anyway: outputs are
#: committed only after checking this too.
_SIGNALS: list[int] = []


def note_signal(signum: int) -> None:
    _SIGNALS.append(int(signum))


def raise_if_interrupted() -> None:
    """Re-raise a signal the CLI received, even if its exception was swallowed on the way."""
    if _SIGNALS:
        import signal

        if _SIGNALS[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + _SIGNALS[0])


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        raise_if_interrupted()
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
    (replacing an older one) and `KeepAs.error` is raised.
    """
    import secrets

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # the name is chosen before the directory exists, so an interruption at any point (even
    # between mkdir and the first statement after it) leaves a name the cleanup knows
    tmp = final.parent / f".{final.name}.{tag}-{secrets.token_hex(6)}"
    _pending(tmp)
    try:
        os.mkdir(tmp, 0o777)  # the umask applies, as for any mkdir (mkdtemp would give 0700)
        fill(tmp)
        raise_if_interrupted()
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
        _remove_tree(tmp)
        raise
    finally:
        if not os.path.lexists(tmp):
            _PENDING.discard(tmp)
    return final


#: temporary directories of atomic_directory calls still under way, or whose cleanup could not
#: finish (something kept writing into one): removed again when the interpreter exits
_PENDING: set[Path] = set()


def _pending(path: Path) -> None:
    global _AT_EXIT
    if not _AT_EXIT:
        import atexit

        atexit.register(_remove_pending)
        _AT_EXIT = True
    _PENDING.add(path)


_AT_EXIT = False


def _remove_pending() -> None:
    for path in sorted(_PENDING):
        _remove_tree(path)
    _PENDING.clear()


def _remove_tree(path: Path) -> None:
    """Remove `path` and everything in it. Something still finishing a write (a file an
    extension writes from its own thread, a child process) can make a pass leave a directory:
    then try again for up to about two seconds; what is still left then is removed at exit."""
    import time

    delay = 0.01
    for _ in range(9):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(delay)
        delay *= 2


def file_mode() -> int:
    """The permissions a plain open() would give a new file (0666 less the umask): files made
    through mkstemp (0600) get them before they are renamed into place."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """apq-sdk's cache (converted models, sensitivity maps, quantized models): $APQ_CACHE_DIR or
    ~/.cache/apq-sdk. Everything in it can be rebuilt; deleting it only costs time."""
    from .errors import ApqError

    path = Path(os.environ.get("APQ_CACHE_DIR", Path.home() / ".cache" / "apq-sdk"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ApqError(f"the cache directory {path} cannot be created ({exc.strerror}); set "
                       f"APQ_CACHE_DIR to a writable directory") from None
    return path


def check_cache_writable() -> Path:
    """The cache directory, refused up front when it cannot be written (read-only, full)."""
    path = cache_dir()
    _probe(path, "the cache directory", "set APQ_CACHE_DIR to a writable directory")
    return path


def _probe(directory: Path, what: str, fix: str) -> None:
    from .errors import ApqError

    try:
        fd, name = tempfile.mkstemp(prefix=".apq-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ApqError(f"cannot write to {what} {directory} ({exc.strerror}); {fix}") from None


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_output_dir(path, *, what: str, replaceable=None, overwrite: bool = False) -> Path:
    """Check, before any work starts, that a directory output can be written to `path`:

    * not the current directory or one above it (replacing it would delete your work);
    * not an existing file, and inside a writable directory (its nearest existing parent);
    * if it exists and is not empty, only when `replaceable(path)` says it is an earlier output
      of the same kind, or with `overwrite` (a user's own files are never deleted silently).
    """
    from .errors import UsageError

    path = Path(path)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UsageError(f"{what} {path} would replace the directory you are working in "
                         f"({cwd}); name a new directory, e.g. -o out")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is an existing file; name a directory")
    parent = _existing_parent(resolved)
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite and \
            not (replaceable is not None and replaceable(path)):
        raise UsageError(f"{what} {path} exists and holds files that are not an earlier output of "
                         f"this command; it would be replaced. Name another directory, or pass "
                         f"--overwrite to replace it")
    _probe(parent, "the directory that would hold", "choose another output directory")
    return path


def check_output_file(path, *, what: str) -> Path:
    """Check, before any work starts, that a file output can be written to `path`."""
    from .errors import UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory; name a file")
    parent = _existing_parent(path.resolve())
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is a file, not a directory")
    _probe(parent, "the output directory", "choose another output path")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
