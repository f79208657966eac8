"""apq-sdk build / verify: registry, capability checks, manifest, atomic output, reproducibility."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apq_sdk.builder import BuildRequest, build
from apq_sdk.package import check_manifest
from apq_sdk.verification import verify_package
from apq_sdk.errors import ApqError, UsageError
from apq_sdk.targets.base import TARGETS, get_target, load_builtin_targets

SMALL = dict(samples=8, seq_len=48, verify_windows=1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "apq-cache"))


def test_registry_lists_targets_and_refuses_unknown():
    load_builtin_targets()
    assert "arm64-linux" in TARGETS
    with pytest.raises(KeyError, match="registered targets: .*arm64-linux"):
        get_target("toaster")


def test_unknown_target_is_a_usage_error(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="unknown target 'toaster'"):
        build(BuildRequest(target="toaster", model=str(tiny_llama), output=tmp_path, **SMALL))


def _three_bit_plan(tiny_llama, tmp_path) -> Path:
    from click.testing import CliRunner

    from apq_sdk.cli import main

    sens = tmp_path / "s.json"
    plan = tmp_path / "plan3.json"
    runner = CliRunner()
    assert runner.invoke(main, ["profile", "-m", str(tiny_llama), "-n", "8", "-L", "48",
                                "-o", str(sens)]).exit_code == 0
    result = runner.invoke(main, ["plan", "-s", str(sens), "--linear-bits-per-weight", "3.2",
                                  "--head-bits", "8", "-o", str(plan)])
    assert result.exit_code == 0, result.output
    assert any(m["bits"] == 3 for m in json.loads(plan.read_text())["modules"].values())
    return plan


def test_plan_the_target_cannot_run_is_refused_then_replanned(tiny_llama, tmp_path):
    plan = _three_bit_plan(tiny_llama, tmp_path)
    req = BuildRequest(target="arm64-linux", model=str(tiny_llama), plan_path=plan,
                       output=tmp_path / "out", **SMALL)
    with pytest.raises(ApqError) as info:
        build(req)
    message = str(info.value)
    assert "bits=3 not in (2, 4, 8, 16)" in message and "--replan" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    req.replan = True
    package = build(req)
    manifest = json.loads((package / "manifest.json").read_text())
    replanned = json.loads((package / "plan.json").read_text())
    assert {m["bits"] for m in replanned["modules"].values()} <= {2, 4, 8, 16}
    assert replanned["objective"]["bits_per_weight"] == 3.2
    assert manifest["measured_at_build"]["passed"] is True


@pytest.fixture(scope="module")
def built_package(tiny_model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    os.environ["APQ_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "apq-cache")
    return build(BuildRequest(target="arm64-linux", model=str(tiny_model_factory("llama")),
                              output=out, bits_per_weight=4.0, **SMALL))


def test_package_contents_and_manifest(built_package):
    manifest = json.loads((built_package / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {"model.onnx", "plan.json", "README.md"} <= paths
    assert any(p.endswith("apq_model.h") for p in paths) and any(p.endswith("CMakeLists.txt") for p in paths)
    assert (built_package / "report.html").is_file() and (built_package / "verify.json").is_file()
    assert manifest["target"]["name"] == "arm64-linux" and manifest["runtimes"]["onnxruntime"]
    assert check_manifest(built_package) == []


def test_manifest_check_catches_tampering(built_package, tmp_path):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(built_package, copy)
    with open(copy / "plan.json", "a") as fh:
        fh.write(" ")
    (copy / "stray.txt").write_text("x")
    problems = check_manifest(copy)
    assert "plan.json: sha256 differs from the manifest" in problems
    assert "stray.txt: not listed in the manifest" in problems
    with pytest.raises(ApqError, match="manifest check failed"):
        verify_package(copy)


def test_verify_command_passes_on_a_good_package(built_package):
    result = verify_package(built_package, windows=1)
    assert result.passed is True


def test_rebuild_is_byte_identical(built_package, tiny_model_factory, tmp_path):
    again = build(BuildRequest(target="arm64-linux", model=str(tiny_model_factory("llama")),
                               output=tmp_path, bits_per_weight=4.0, **SMALL))
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    first, second = files(built_package), files(again)
    assert first.keys() == second.keys()
    differing = sorted(k for k in first if first[k] != second[k])
    assert set(differing) <= {"verify.json", "report.html"}, differing


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_build_leaves_nothing(tiny_llama, tmp_path, sig):
    out = tmp_path / "out"
    env = {**os.environ, "APQ_NO_PROGRESS": "1", "APQ_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "apq_sdk.cli", "build", "--target", "arm64-linux",
                             "-m", str(tiny_llama), "-o", str(out), "-n", "8", "-L", "48",
                             "--verify-windows", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and any(p.name.startswith(".") and ".building-" in p.name for p in out.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "build finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert list(out.iterdir()) == []


def test_report_is_self_contained_and_renders_headless(built_package, tmp_path):
    import re
    import shutil

    html = (built_package / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html), "report must work offline"
    assert "<script" not in html and html.count("data:image/png;base64,") >= 2
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1200,2000", f"--screenshot={shot}",
                    (built_package / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2000)
    assert len(image.getcolors(maxcolors=256)) > 16, "screenshot is blank"  # grey levels used


def test_two_targets_whose_plans_quantize_alike_share_one_checkpoint(built_package,
                                                                     tiny_model_factory, tmp_path):
    """A device preset of the same runtime (another table name, the same kernels) re-uses the
    quantized checkpoint of the first target's plan instead of running GPTQ again, and its
    package records its own plan and table."""
    import dataclasses

    from apq_sdk.plan_file import load_plan

    first_cls = get_target("arm64-linux")

    class Preset(first_cls):
        name = "arm64-linux-preset"
        description = "the same runtime under another name (test)"
        capabilities = dataclasses.replace(first_cls.capabilities, name="arm64-linux-preset",
                                           max_context=1024)

    try:
        lines = []
        package = build(BuildRequest(target=Preset.name, model=str(tiny_model_factory("llama")),
                                     output=tmp_path, bits_per_weight=4.0, **SMALL),
                        log=lines.append)
    finally:
        TARGETS.pop(Preset.name, None)
    assert any("sharing the checkpoint of the 'arm64-linux' plan" in line for line in lines), lines
    assert not any(line.startswith("quantize: GPTQ") for line in lines), lines
    first = json.loads((built_package / "manifest.json").read_text())
    second = json.loads((package / "manifest.json").read_text())
    assert second["reference"] == first["reference"]  # one checkpoint
    plan, first_plan = load_plan(package / "plan.json"), load_plan(built_package / "plan.json")
    assert plan.capabilities.name == "arm64-linux-preset" != first_plan.capabilities.name
    assert plan.modules == first_plan.modules
    assert (package / "model.onnx").read_bytes() != b""  # lowered from the shared weights
    assert json.loads((package / "verify.json").read_text())["passed"]
    TARGETS[Preset.name] = Preset  # `apq-sdk verify` finds the shared reference later, too
    try:
        assert verify_package(package, windows=1).passed
    finally:
        TARGETS.pop(Preset.name, None)
