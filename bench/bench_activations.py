"""What a package's activation treatment costs in accuracy, simulated in torch on its own weights.

The plan says how each linear layer's input is treated; targets realize that differently:

* the Apple targets (macos, ios) plan float activations (weight-only): neither Core AI nor Core
  ML has dynamic activation quantization;
* arm64-linux and android run the plan's per-token dynamic int8 activations;
* QNN's HTP (the qualcomm target) runs statically quantized graphs: activation ranges calibrated
  ahead of time, every activation a 16-bit integer on that fixed grid ("16a4w", "16a8w").

This bench takes a package's plan and checkpoint and runs its torch reference with each treatment
on the same windows:

* `as planned` : the plan as written (what the package runs);
* `float activations (weight-only)` : the weights' own error;
* `dynamic int8 per token` : every linear layer's input scaled per token to int8 (the plan's own
  clip where it has one, else none), what arm64-linux and android compute;
* `static uint16 (QNN HTP, simulated)` : every linear layer's input fake-quantized to uint16 per
  tensor over a range calibrated on the calibration split (min/max over `--calib-windows`
  windows of wikitext2-valid).

A treatment equal to the plan's is listed once. Perplexity and mean KL(unquantized || variant) on
the first N windows of wikitext2-test, beside the unquantized model (FP32, dequantized Q4_1 for
the demo). Not simulated: QNN's own rounding of the weights' block scales and of the other ops
(norms, attention, softmax), which run in 16 bits too; bench_qnn_simulation.py runs ExecuTorch's
QNN quantizer graph itself, all of that included, for the qualcomm target's plans.

    python bench/bench_activations.py --package apq-out/SmolLM2-135M-Instruct-android

Writes OUT.json and OUT.md (default bench/results/activations-<target>).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: results_io
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PLANNED, FLOAT, DYNAMIC, STATIC = ("as planned", "float activations (weight-only)",
                                   "dynamic int8 per token", "static uint16 (QNN HTP, simulated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True, help="a package directory (its plan and "
                                                         "checkpoint are simulated)")
    parser.add_argument("--model", default=None, help="the unquantized model (default: the "
                                                      "manifest's)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text", default=None, help="evaluation text (default: wikitext2-test)")
    parser.add_argument("--calib-text", default=None,
                        help="calibration text (default: wikitext2-valid)")
    parser.add_argument("--out", default=None,
                        help="default: bench/results/activations-<target>")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from apq_sdk.calibration import CALIB_FILE, data_dir, eval_text_path, eval_windows
    from apq_sdk.checkpoint import load_quantized, read_checkpoint
    from apq_sdk.model_io import load_model
    from apq_sdk.package import read_manifest, reference_dir
    from apq_sdk.quant.modules import ACT_INT8, ACT_NONE, Float16Linear, QuantLinear

    started = time.time()
    package = Path(args.package)
    manifest = read_manifest(package)
    target = manifest["target"]["name"]
    checkpoint = read_checkpoint(reference_dir(package, manifest))
    float_model, tokenizer, info = load_model(args.model or manifest["model"]["spec"])
    float_model.eval()
    reference = load_quantized(checkpoint.path, checkpoint=checkpoint).eval()
    text = Path(args.text) if args.text else eval_text_path()
    calib_text = Path(args.calib_text) if args.calib_text else data_dir() / CALIB_FILE
    windows = eval_windows(tokenizer, text, args.window_len, args.windows)
    calib = eval_windows(tokenizer, calib_text, args.window_len, args.calib_windows)
    linears = {n: m for n, m in reference.named_modules()
               if isinstance(m, (QuantLinear, Float16Linear))}
    planned = {n: (m.activation, m.act_clip) for n, m in linears.items()}
    modes = sorted({a for a, _ in planned.values()})

    # 1. ranges of every linear input on the calibration split
    ranges: dict[str, list[float]] = {}

    def observe(name):
        def hook(_module, inputs):
            x = inputs[0].detach()
            lo, hi = float(x.min()), float(x.max())
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return hook

    for m in linears.values():
        m.activation = ACT_NONE
    handles = [m.register_forward_pre_hook(observe(n)) for n, m in linears.items()]
    with torch.no_grad():
        for row in calib:
            reference(row[None])
    for h in handles:
        h.remove()

    # 2. static uint16 per tensor on those ranges
    def static16(name):
        lo, hi = min(ranges[name][0], 0.0), max(ranges[name][1], 0.0)
        scale = max((hi - lo) / 65535.0, torch.finfo(torch.float32).tiny)
        zero = round(-lo / scale)

        def hook(_module, inputs):
            x = inputs[0]
            q = torch.clamp(torch.round(x / scale) + zero, 0, 65535)
            return ((q - zero) * scale).to(x.dtype),
        return hook

    def treat(variant: str) -> list:
        """Set every linear's activation treatment; returns hooks to remove afterwards."""
        for n, m in linears.items():
            activation, clip = planned[n]
            if variant == PLANNED:
                m.activation, m.act_clip = activation, clip
            elif variant == DYNAMIC:
                m.activation, m.act_clip = ACT_INT8, clip if activation == ACT_INT8 else 1.0
            else:
                m.activation, m.act_clip = ACT_NONE, clip
        if variant == STATIC:
            return [m.register_forward_pre_hook(static16(n)) for n, m in linears.items()]
        return []

    variants = [PLANNED] + [v for v, same in ((FLOAT, [ACT_NONE]), (DYNAMIC, [ACT_INT8]))
                            if modes != same] + [STATIC]
    sums = {v: [0.0, 0.0] for v in [*variants, "FP32"]}
    count = 0
    with torch.no_grad():
        for i, row in enumerate(windows):
            fp32_logp = torch.log_softmax(float_model(row[None]).logits[0, :-1].double(), -1)
            targets = (torch.arange(len(row) - 1), row[1:])
            sums["FP32"][0] -= float(fp32_logp[targets].sum())
            for variant in variants:
                handles = treat(variant)
                logp = torch.log_softmax(reference(row[None]).logits[0, :-1].double(), -1)
                for h in handles:
                    h.remove()
                sums[variant][0] -= float(logp[targets].sum())
                sums[variant][1] += float((fp32_logp.exp() * (fp32_logp - logp)).sum())
            count += len(row) - 1
            print(f"window {i + 1}/{len(windows)} ({time.time() - started:.0f} s)", flush=True)
    scores = {v: {"perplexity": math.exp(nll / count), "kl_mean": kl / count}
              for v, (nll, kl) in sums.items()}
    result = {
        "command": "python bench/bench_activations.py " + " ".join(sys.argv[1:]),
        "model": info.name, "package": str(package), "target": target,
        "plan_activations": modes, "windows": int(windows.shape[0]),
        "window_len": int(windows.shape[1]), "calibration_windows": int(calib.shape[0]),
        "text": str(text), "calibration_text": str(calib_text),
        "variants": {v: scores[v] for v in variants},
        "fp32_perplexity": scores["FP32"]["perplexity"], "total_seconds": time.time() - started}
    write_results(args.out or RESULTS / f"activations-{target}", result,
                  render_markdown(result))


def render_markdown(r: dict) -> str:
    base = r["variants"][PLANNED]
    fp32 = "FP32" + (", dequantized Q4_1" if r["model"].startswith("SmolLM2") else "")
    lines = [f"# Activation treatments of the {r['target']} package, simulated: {r['model']}", "",
             f"Command: `{r['command']}`", "",
             f"The package's weights ({Path(r['package']).name}; plan activations: "
             f"{', '.join(r['plan_activations'])}) with each activation treatment; first "
             f"{r['windows']} windows of {r['window_len']} tokens of {Path(r['text']).name}; "
             f"static ranges from {r['calibration_windows']} windows of "
             f"{Path(r['calibration_text']).name}. The unquantized model ({fp32}): perplexity "
             f"{r['fp32_perplexity']:.3f}.", "",
             "| activations | perplexity | KL(unquantized \\|\\| variant) | KL vs as planned |",
             "| --- | ---: | ---: | ---: |"]
    for name, v in r["variants"].items():
        label = f"{name} ({', '.join(r['plan_activations'])})" if name == PLANNED else name
        lines.append(f"| {label} | {v['perplexity']:.3f} | {v['kl_mean']:.4f} | "
                     f"x{v['kl_mean'] / base['kl_mean']:.2f} |")
    lines += ["", "Not simulated: QNN's block encoding of the weight scales, and 16-bit "
                  "arithmetic in the other ops.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
