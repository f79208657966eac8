"""The qualcomm target without Qualcomm's QNN SDK: the build stops before any work, saying what
is missing and where it comes from, and `build --target all` skips it."""

from __future__ import annotations

import subprocess
import sys

from apq_sdk.targets.base import get_target


def test_without_the_sdk_the_build_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    env = {k: v for k, v in __import__("os").environ.items() if k != "QNN_SDK_ROOT"}
    env["APQ_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "apq_sdk.cli", "build", "--target", "qualcomm",
                             "-m", str(tmp_path / "no-such-model"), "-o", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "QNN_SDK_ROOT" in result.stderr and "softwarecenter.qualcomm.com" in result.stderr
    assert "libQnnHtp.so" in result.stderr
    # nothing was loaded (the model path does not exist) and nothing was written
    assert "no-such-model" not in result.stderr
    assert not out.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))


def test_the_sdk_is_found_by_its_library(tmp_path, monkeypatch):
    tool = next(t for t in get_target("qualcomm").tools if t.kind == "sdk")
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    assert not tool.present()
    lib = tmp_path / tool.requires
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    assert tool.present()
    monkeypatch.setenv("QNN_SDK_ROOT", "")
    assert not tool.present()


def test_its_table_says_what_the_npu_runs():
    caps = get_target("qualcomm").capabilities
    assert caps.symmetric_only and caps.whole_groups
    assert "static 16-bit activations" in caps.notes
    assert get_target("qualcomm").maven_artifact == "org.pytorch:executorch-android-qnn"
