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


def check_manifest(package_dir: Path) -> list[str]:
    """Problems with the package's files against its manifest (empty when all match)."""
    path = package_dir / MANIFEST
    if not path.is_file():
        return [f"{path} is missing: not an apq-sdk package"]
    manifest = json.loads(path.read_text())
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
