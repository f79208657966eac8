"""What the qualcomm target's static 16-bit activations would cost in accuracy, simulated in torch.

QNN's HTP (Snapdragon NPU) runs statically quantized graphs: activation ranges are calibrated
ahead of time and every activation is a 16-bit integer on that fixed grid ("16a4w", "16a8w"),
where the plan asks for per-token dynamic int8 activations (what XNNPACK computes). This bench
takes a package's plan and checkpoint (the same 4/16-bit weights) and runs its torch reference
three ways on the same windows:

* `dynamic int8 (plan)` : the plan as written (int8 per token, asymmetric; the android package);
* `static uint16` : every linear layer's input fake-quantized to uint16 per tensor over a range
  calibrated on the calibration split (min/max over `--calib-windows` windows of
  wikitext2-valid), the quantization QNN's 16-bit activations apply;
* `float activations` : weight-only (the weights' own error).

Perplexity and mean KL(unquantized || variant) on the first N windows of wikitext2-test, beside
the unquantized model (FP32, dequantized Q4_1). Not simulated: QNN's own rounding of the
weights' block scales (its block encoding stores a per-channel scale and per-block integer
multipliers) and of the other ops (norms, attention, softmax), which run in 16 bits too.

    python bench/bench_qnn_simulation.py --package apq-out/SmolLM2-135M-Instruct-android

Writes OUT.json and OUT.md (default bench/results/qnn-simulation).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True, help="a package directory (its plan and "
                                                         "checkpoint are simulated)")
    parser.add_argument("--model", default=None, help="the unquantized model (default: the "
                                                      "manifest's)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--text", default=None, help="evaluation text (default: wikitext2-test)")
    parser.add_argument("--calib-text", default=None,
                        help="calibration text (default: wikitext2-valid)")
    parser.add_argument("--out", default=str(RESULTS / "qnn-simulation"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from apq_sdk.calibration import CALIB_FILE, data_dir, eval_text_path, eval_windows
    from apq_sdk.checkpoint import load_quantized, read_checkpoint
    from apq_sdk.model_io import load_model
    from apq_sdk.package import read_manifest, reference_dir
    from apq_sdk.quant.modules import ACT_NONE, Float16Linear, QuantLinear

    started = time.time()
    package = Path(args.package)
    manifest = read_manifest(package)
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
    planned = {n: m.activation for n, m in linears.items()}

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

    def scores(setup) -> dict:
        handles = setup()
        nll = kl = 0.0
        count = 0
        with torch.no_grad():
            for row in windows:
                logits = reference(row[None]).logits[0].float()
                fp32 = float_model(row[None]).logits[0].float()
                logp = torch.log_softmax(logits[:-1].double(), -1)
                fp32_logp = torch.log_softmax(fp32[:-1].double(), -1)
                nll -= float(logp[torch.arange(len(row) - 1), row[1:]].sum())
                kl += float((fp32_logp.exp() * (fp32_logp - logp)).sum())
                count += len(row) - 1
        for h in handles:
            h.remove()
        return {"perplexity": math.exp(nll / count), "kl_mean": kl / count}

    def plan_activations():
        for n, m in linears.items():
            m.activation = planned[n]
        return []

    def float_activations():
        for m in linears.values():
            m.activation = ACT_NONE
        return []

    def static_activations():
        float_activations()
        return [m.register_forward_pre_hook(static16(n)) for n, m in linears.items()]

    variants = {"dynamic int8 (plan)": scores(plan_activations),
                "static uint16 (QNN HTP, simulated)": scores(static_activations),
                "float activations": scores(float_activations)}
    nll = count = 0
    with torch.no_grad():
        for row in windows:
            logp = torch.log_softmax(float_model(row[None]).logits[0, :-1].double(), -1)
            nll -= float(logp[torch.arange(len(row) - 1), row[1:]].sum())
            count += len(row) - 1
    result = {
        "command": "python bench/bench_qnn_simulation.py " + " ".join(sys.argv[1:]),
        "model": info.name, "package": str(package),
        "plan_activations": sorted(set(planned.values())),
        "windows": int(windows.shape[0]), "window_len": int(windows.shape[1]),
        "calibration_windows": int(calib.shape[0]), "text": str(text),
        "calibration_text": str(calib_text), "variants": variants,
        "fp32_perplexity": math.exp(nll / count), "total_seconds": time.time() - started}
    write_results(args.out, result, render_markdown(result))


def render_markdown(r: dict) -> str:
    base = r["variants"]["dynamic int8 (plan)"]
    lines = [f"# Static 16-bit activations (qualcomm target), simulated: {r['model']}", "",
             f"Command: `{r['command']}`", "",
             f"The package's weights ({Path(r['package']).name}) with three activation "
             f"treatments; first {r['windows']} windows of {r['window_len']} tokens of "
             f"{Path(r['text']).name}; static ranges from {r['calibration_windows']} windows of "
             f"{Path(r['calibration_text']).name}. The unquantized model (FP32, dequantized "
             f"Q4_1): perplexity {r['fp32_perplexity']:.3f}.", "",
             "| activations | perplexity | KL(unquantized \\|\\| variant) | KL vs the plan |",
             "| --- | ---: | ---: | ---: |"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['perplexity']:.3f} | {v['kl_mean']:.4f} | "
                     f"x{v['kl_mean'] / base['kl_mean']:.2f} |")
    lines += ["", "Not simulated: QNN's block encoding of the weight scales, and 16-bit "
                  "arithmetic in the other ops.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
