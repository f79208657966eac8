"""A device package on disk: its manifest (every file with SHA-256 and size), verify.json, and the
checks `apq-sdk verify` runs on them.

`manifest.json` lists every file of the package except itself and the files written after it
(`verify.json`, `report.html`), with the target and its capability table, the model, the plan's
hash, the runtime versions and what verification measured at build time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .fsutil import atomic_write_text, sha256_file

PACKAGE_FORMAT = "apq-package"
PACKAGE_VERSION = 1
MANIFEST = "manifest.json"
VERIFY_FILE = "verify.json"
REPORT_FILE = "report.html"
AFTER_MANIFEST = (VERIFY_FILE, REPORT_FILE)


def is_package_dir(path) -> bool:
    """Whether `path` holds an earlier apq-sdk package (which a new build may replace)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == PACKAGE_FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def safe_name(text: str) -> str:
    """A directory-name-safe form of a model or target name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"
    return cleaned[:80]


def write_manifest(package_dir: Path, data: dict) -> dict:
    files = []
    for path in sorted(p for p in package_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(package_dir).as_posix()
        if rel in (MANIFEST, *AFTER_MANIFEST):
            continue
        files.append({"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    manifest = {**data, "files": files, "written_after_manifest": list(AFTER_MANIFEST)}
    (package_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(package_dir: Path) -> dict:
    """The package's manifest.json, checked: an apq-sdk package manifest of a version this SDK
    reads, whose file list names files inside the package. ApqError says what is wrong."""
    from .errors import ApqError

    path = Path(package_dir) / MANIFEST

    def bad(what: str) -> ApqError:
        return ApqError(f"{path}: {what}; it is not a manifest this apq-sdk wrote: build the "
                        f"package again")

    if not path.is_file():
        raise ApqError(f"{path} is missing: not an apq-sdk package")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise bad(f"expected an object with format {PACKAGE_FORMAT!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= PACKAGE_VERSION:
        raise bad(f"expected version 1 to {PACKAGE_VERSION}, found {version!r}")
    target = manifest.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("name"), str):
        raise bad("expected target.name, a string")
    reference = manifest.get("reference")
    key = reference.get("quantized_cache_key") if isinstance(reference, dict) else None
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{8,64}", key):
        raise bad("expected reference.quantized_cache_key, a hex digest")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise bad("expected files, a list")
    for i, entry in enumerate(files):
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or \
                any(part in ("", ".", "..") for part in rel.split("/")):
            raise bad(f"files[{i}].path must be a relative path inside the package, found {rel!r}")
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}",
                                                                         entry["sha256"]):
            raise bad(f"files[{i}].sha256 must be a hex SHA-256")
        if not isinstance(entry.get("bytes"), int) or isinstance(entry["bytes"], bool) \
                or entry["bytes"] < 0:
            raise bad(f"files[{i}].bytes must be a non-negative integer")
    return manifest


def reference_dir(package_dir: Path, manifest: dict | None = None) -> Path:
    """The cached quantized checkpoint a package was built from (its torch reference), from the
    manifest (read and checked when not given); ApqError when it is not in the cache."""
    from .errors import ApqError
    from .fsutil import cache_dir

    manifest = read_manifest(package_dir) if manifest is None else manifest
    path = cache_dir() / "quantized" / manifest["reference"]["quantized_cache_key"]
    if not (path / "model.safetensors").is_file():
        raise ApqError(f"the torch reference of {package_dir} is not in the cache ({path}): "
                       f"build the package again (its build puts the reference there), or give "
                       f"apq-sdk verify --reference QUANTIZED_DIR (apq-sdk quantize with the same "
                       f"plan)")
    return path


def check_manifest(package_dir: Path) -> list[str]:
    """Problems with the package's files against its manifest (empty when all match); ApqError
    when there is no manifest or it is malformed."""
    package_dir = Path(package_dir)
    manifest = read_manifest(package_dir)
    problems = []
    listed = set()
    for entry in manifest["files"]:
        listed.add(entry["path"])
        file = package_dir / entry["path"]
        if not file.is_file():
            problems.append(f"{entry['path']}: missing")
        elif file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest")
    for file in package_dir.rglob("*"):
        rel = file.relative_to(package_dir).as_posix()
        if file.is_file() and rel not in listed and rel not in (MANIFEST, *AFTER_MANIFEST):
            problems.append(f"{rel}: not listed in the manifest")
    return problems


def write_verify(package_dir: Path, result: dict, problems: list[str]) -> None:
    data = {**result, "manifest_problems": problems}
    atomic_write_text(Path(package_dir) / VERIFY_FILE,
                      json.dumps(data, indent=2, sort_keys=True) + "\n")
