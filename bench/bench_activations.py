"""What a weight-only package gives up by running float activations: the torch reference of each
package's plan as the package runs it (weight-only), beside the same quantized weights with the
core's per-token int8 dynamic activation scaling on every quantized linear (what the plan would
run on a target that has it, e.g. arm64-linux), on the same windows.

The Apple targets (macos, ios) plan activations "none": neither Core AI nor Core ML has dynamic
activation quantization. This bench measures what that choice changes in accuracy, here, in torch.
The activations are scaled per token by their absolute maximum (no clipping: the packages' plans
carry no activation clip search), as apq_sdk.quant.modules.fake_quantize_activations does.

    python bench/bench_activations.py PACKAGE [PACKAGE ...] --windows 8

Writes OUT.json and OUT.md (default bench/results/activations).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_executorch import Scores, log_softmax  # noqa: E402
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="+", help="built packages (apq-sdk build ...)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--text", default=None, help="default: wikitext2-test")
    parser.add_argument("--out", default=str(RESULTS / "activations"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from apq_sdk.calibration import eval_text_path, eval_windows
    from apq_sdk.capabilities import ACT_INT8
    from apq_sdk.checkpoint import load_quantized, read_checkpoint
    from apq_sdk.model_io import load_model
    from apq_sdk.package import read_manifest, reference_dir
    from apq_sdk.quant.modules import QuantLinear

    started = time.time()
    manifests = [read_manifest(Path(p)) for p in args.packages]
    specs = {m["model"]["spec"] for m in manifests}
    if len(specs) != 1:
        raise SystemExit(f"the packages are of different models ({', '.join(sorted(specs))}); "
                         f"give packages of one model")
    float_model, tokenizer, info = load_model(specs.pop())
    float_model.eval()
    text = Path(args.text) if args.text else eval_text_path()
    windows = eval_windows(tokenizer, text, args.window_len, args.windows or None).numpy()
    variants, models = {}, {}
    for path, manifest in zip(args.packages, manifests):
        checkpoint = read_checkpoint(reference_dir(Path(path), manifest))
        modes = sorted({m.activation for m in checkpoint.plan.modules.values()})
        label = (f"{manifest['target']['name']} @ "
                 f"{manifest['size']['target_bits_per_weight']:.2f} bits/weight")
        for activation in ("as planned", ACT_INT8):
            model = load_quantized(checkpoint.path, checkpoint=checkpoint).eval()
            changed = 0
            if activation != "as planned":
                for module in model.modules():
                    if isinstance(module, QuantLinear):
                        module.activation, module.act_clip = ACT_INT8, 1.0
                        changed += 1
            name = f"{label}, activations {'/'.join(modes) if activation == 'as planned' else activation}"
            models[name] = model
            variants[name] = {"package": str(path), "target": manifest["target"]["name"],
                              "planned_activations": modes, "activations": activation,
                              "linears_with_int8_activations": changed}
    scores = {name: Scores() for name in [*models, "FP32"]}
    for i, row in enumerate(windows):
        ids = torch.from_numpy(row.astype(np.int64))[None]
        with torch.no_grad():
            fp32 = float_model(ids).logits[0].float().numpy()
            fp32_logp = log_softmax(fp32)
            scores["FP32"].add(fp32, fp32_logp, row)
            for name, model in models.items():
                scores[name].add(model(ids).logits[0].float().numpy(), fp32_logp, row)
        print(f"window {i + 1}/{len(windows)} ({time.time() - started:.0f} s)", flush=True)
    for name in models:
        variants[name].update(scores[name].to_dict())
    result = {"command": "python bench/bench_activations.py " + " ".join(sys.argv[1:]),
              "model": info.name, "windows": int(windows.shape[0]),
              "window_len": args.window_len, "text": str(text), "fp32": scores["FP32"].to_dict(),
              "variants": variants, "total_seconds": time.time() - started}
    write_results(args.out, result, render_markdown(result))


def render_markdown(r: dict) -> str:
    lines = [f"# Weight-only against per-token int8 activations: {r['model']}", "",
             f"Command: `{r['command']}`", "",
             f"Torch references of each package's quantized weights, perplexity and KL(FP32 || "
             f"variant) on the first {r['windows']} windows of {r['window_len']} tokens of "
             f"{Path(r['text']).name}; FP32"
             f"{' (dequantized Q4_1)' if r['model'].startswith('SmolLM2') else ''} perplexity "
             f"{r['fp32']['perplexity']:.2f}. 'int8-per-token-dynamic': every quantized linear's "
             f"input scaled per token by its absolute maximum to int8 (no clipping).", "",
             "| package plan | activations | perplexity | KL |", "| --- | --- | ---: | ---: |"]
    for name, v in r["variants"].items():
        plan = name.split(", activations")[0]
        lines.append(f"| {plan} | {v['activations']}"
                     f"{' (' + '/'.join(v['planned_activations']) + ')' if v['activations'] == 'as planned' else ''}"
                     f" | {v['perplexity']:.2f} | {v['kl_mean']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
