#!/usr/bin/env bash
# The whole APQ pipeline on the demo model (SmolLM2-135M-Instruct): profile -> plan -> quantize -> eval.
# Usage: examples/demo_pipeline.sh [OUT_DIR] [BITS_PER_WEIGHT]
set -euo pipefail
out=${1:-apq-out/demo}
bpw=${2:-4.0}
mkdir -p "$out"
export OMP_WAIT_POLICY=PASSIVE
apq-sdk profile --model demo -o "$out/sensitivity.json"
apq-sdk plan -s "$out/sensitivity.json" --bits-per-weight "$bpw" -o "$out/plan.json"
apq-sdk plan show "$out/plan.json" | tail -n 8
apq-sdk quantize --model demo --plan "$out/plan.json" -o "$out/quantized"
apq-sdk eval --quantized "$out/quantized" --model demo --windows 40 -o "$out/eval.json"
