"""Does the sensitivity map predict reality? Spearman rank correlation on the demo model.

For layers spread over depth and types, quantize one layer at a time to 3 bits with group 128,
keep all others unquantized, and measure the end-to-end KL divergence and cross-entropy increase on
wikitext2-test windows. Compare the ranks with the profile's predictions, alpha * gain * e, for the
same weight change:

* `--delta gptq` (default) profiles here and uses the GPTQ change the profile predicted;
* `--delta rtn --sensitivity MAP` reuses a saved map (e.g. the 128 x 512 demo profile) and uses the
  round-to-nearest 3-bit change, whose local Hessian error every map records (it feeds the
  loss-model fit); no profiling needed.

    python bench/bench_sensitivity.py --samples 128 --eval-windows 40 --layers 42
    python bench/bench_sensitivity.py --delta rtn --sensitivity bench/results/demo-sensitivity.json \
        --eval-windows 10 --layers 42
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apq_sdk.calibration import eval_text_path, eval_windows, load_calibration  # noqa: E402
from apq_sdk.evaluate import compare_to_cached, reference_log_probs  # noqa: E402
from apq_sdk.model_io import load_model  # noqa: E402
from apq_sdk.sensitivity import ProfileSettings, SensitivityMap, profile_model  # noqa: E402
from apq_sdk.quant.weights import quantize_rtn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def pick_layers(info, count: int) -> list[str]:
    """`count` linears spread over depth, cycling through the roles."""
    by_layer = {}
    for li in info.linears:
        by_layer.setdefault(li.layer, []).append(li.name)
    names = []
    roles_per_layer = len(by_layer[0])
    for i in range(count):
        layer = round(i * (info.num_layers - 1) / max(count - 1, 1))
        names.append(by_layer[layer][i % roles_per_layer])
    return sorted(set(names), key=names.index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--layers", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--delta", choices=("gptq", "rtn"), default="gptq")
    parser.add_argument("--sensitivity", default=None, help="saved map (with --delta rtn)")
    parser.add_argument("--out", default=str(RESULTS / "sensitivity"))
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    model, tok, info = load_model(args.model, device=args.device)
    chosen = pick_layers(info, args.layers)
    deltas = {name: None for name in chosen}
    if args.delta == "rtn":
        if not args.sensitivity:
            raise SystemExit("--delta rtn needs --sensitivity MAP")
        sens = SensitivityMap.from_dict(json.loads(Path(args.sensitivity).read_text()))
        if sens.model["weights_sha256"] != info.weights_sha256:
            raise SystemExit(f"{args.sensitivity} was profiled on other weights")
        calib_dict = sens.calibration
        for name in chosen:
            weight = model.get_submodule(name).weight.data.float()
            deltas[name] = quantize_rtn(weight, 3, 128).dequantize() - weight
        errors_key = "rtn_errors"
    else:
        samples, calib = load_calibration(tok, num_samples=args.samples, seq_len=args.seq_len, seed=0)
        fit, _ = load_calibration(tok, num_samples=ProfileSettings().fit_samples, seq_len=args.seq_len,
                                  seed=1)
        sens = profile_model(model, info, samples, calib, ProfileSettings(), args.device,
                             fit_samples=fit, keep_deltas=deltas)
        calib_dict = calib.to_dict()
        errors_key = "errors"
    windows = eval_windows(tok, eval_text_path(), args.seq_len, args.eval_windows)
    cached = reference_log_probs(model, windows, args.device)
    rows = []
    for name in chosen:
        module = model.get_submodule(name)
        original = module.weight.data.clone()
        module.weight.data += deltas[name].to(original)
        kl, dce = compare_to_cached(model, windows, cached, args.device)
        module.weight.data = original
        entry = sens.modules[name]
        predicted = sens.loss_model["alpha"] * entry["gain"] * entry[errors_key]["b3g128"]
        rows.append({"module": name, "predicted": predicted,
                     "measured_kl": kl, "measured_delta_ce": dce})
        print(f"{name:45s} pred={rows[-1]['predicted']:.5f} kl={kl:.5f} dce={dce:.5f}", flush=True)
    pred = [r["predicted"] for r in rows]
    rho_kl = spearmanr(pred, [r["measured_kl"] for r in rows]).statistic
    rho_ce = spearmanr(pred, [r["measured_delta_ce"] for r in rows]).statistic
    local = [sens.modules[r["module"]][errors_key]["b3g128"] for r in rows]
    rho_local = spearmanr(local, [r["measured_kl"] for r in rows]).statistic
    result = {"command": "python bench/bench_sensitivity.py " + " ".join(sys.argv[1:]),
              "model": info.name, "calibration": calib_dict, "eval_windows": args.eval_windows,
              "candidate": f"b3g128 ({args.delta.upper()})", "layers": len(rows),
              "spearman_predicted_vs_kl": rho_kl, "spearman_predicted_vs_delta_ce": rho_ce,
              "spearman_local_error_only_vs_kl": rho_local, "loss_model": sens.loss_model,
              "seconds": time.time() - start, "device": args.device, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Sensitivity map vs measured loss ({info.name})", "",
             f"Command: `{result['command']}`", "",
             f"One layer at a time quantized to 3 bits ({result['candidate']}), all others FP32; "
             f"map from {calib_dict['num_samples']} x {calib_dict['seq_len']} calibration tokens; measured on "
             f"{args.eval_windows} windows x {args.seq_len} tokens of wikitext2-test.", "",
             "| statistic | value |", "| --- | --- |",
             f"| layers | {len(rows)} |",
             f"| Spearman(predicted, measured KL) | {rho_kl:.3f} |",
             f"| Spearman(predicted, measured cross-entropy increase) | {rho_ce:.3f} |",
             f"| Spearman(local Hessian error alone, measured KL) | {rho_local:.3f} |", "",
             "| module | predicted KL | measured KL | measured dCE |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['module']} | {r['predicted']:.5f} | {r['measured_kl']:.5f} | "
              f"{r['measured_delta_ce']:.5f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.loglog(pred, [max(r["measured_kl"], 1e-6) for r in rows], "o")
        ax.set_xlabel("predicted KL (profile)")
        ax.set_ylabel("measured KL (one layer at 3 bits)")
        ax.set_title(f"Spearman {rho_kl:.2f} over {len(rows)} layers")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except Exception as exc:  # a plot is a bonus; the numbers are the result
        print("plot skipped:", exc)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
