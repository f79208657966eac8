"""FP32 (dequantized Q4_1) perplexity of the demo model on the first N windows of wikitext2-test.

    python bench/reference_ppl.py --windows 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from apq_sdk.calibration import eval_text_path, eval_windows  # noqa: E402
from apq_sdk.evaluate import evaluate  # noqa: E402
from apq_sdk.model_io import load_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--windows", type=int, default=40, help="0 = the whole test split")
args = parser.parse_args()
model, tok, _ = load_model("demo")
windows = eval_windows(tok, eval_text_path(), 512, args.windows or None)
result = evaluate(model, windows)
print(json.dumps({"model": "demo", "windows": result.windows, "tokens": result.tokens,
                  "perplexity": result.perplexity}))
