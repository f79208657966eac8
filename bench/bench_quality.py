"""Accuracy against size on the demo model: APQ mixed plans beside single-bit-width baselines.

Calibration: 128 x 512 tokens of wikitext2-valid (seed 0); loss-model fit on 4 other validation
sequences. apq-X is a mixed plan at X bits per weight (4.1745 and 3.1628 are the sizes of GPTQ
4-bit and 3-bit g128); a suffix -int8 or -int8block adds per-token or per-block int8 activations. Evaluation: the first 40 non-overlapping 512-token windows of wikitext2-test, as in
../shared/anchors.md (20,440 predicted tokens). Every configuration runs in this one process against
the same FP32 (dequantized Q4_1) reference. Bits per weight are those of the 210 decoder linear
layers, scales and zero points included; the output head (tied embedding) stays float16 here, as the
anchors keep it in float, unless a row says otherwise. Group sizes are 64 or 128 (never 32: the
model's Q4_1 origin makes 4-bit g32 reproduce its weights exactly).

    python bench/bench_quality.py                     # the table in docs/results.md
    python bench/bench_quality.py --configs apq-4.0,gptq-b4g128 --windows 8   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apq_sdk.calibration import eval_text_path, eval_windows, load_calibration  # noqa: E402
from apq_sdk.evaluate import reference_log_probs  # noqa: E402
from apq_sdk.model_io import load_model  # noqa: E402
from apq_sdk.planning import Budget, make_plan, uniform_plan  # noqa: E402
from apq_sdk.sensitivity import ProfileSettings, SensitivityMap, profile_model  # noqa: E402
from apq_sdk.quantizer import quantize_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CONFIGS = ("rtn-b4g128,gptq-b4g128,apq-4.0,apq-4.1745,rtn-b3g128,gptq-b3g128,apq-3.0,"
                   "apq-3.1628,apq-6.4,apq-maxloss-2%,apq-maxloss-0.5%,apq-4.0-int8block")


def build_plan(name: str, sens: SensitivityMap):
    """(plan, method) for a configuration name."""
    kind, _, arg = name.partition("-")
    if kind in ("rtn", "gptq"):
        bits, group = arg[1:].split("g")
        return uniform_plan(sens, int(bits), int(group)), kind
    if kind == "apq":
        activation = "none"
        for suffix, mode in (("-int8block", "int8-per-block-dynamic"),
                             ("-int8", "int8-per-token-dynamic")):
            if arg.endswith(suffix):
                activation, arg = mode, arg.removesuffix(suffix)
                break
        if arg.startswith("maxloss-"):
            value = arg.removeprefix("maxloss-")
            budget = Budget(max_loss=float(value.rstrip("%")) / 100)
        else:
            # the decoder linears' bits per weight (the figure GPTQ and the anchors report),
            # head kept in float16: the rows of docs/results.md
            budget = Budget(bits_per_weight=float(arg), scope="linear")
        return make_plan(sens, budget, activation=activation, head_bits="16"), "gptq"
    raise SystemExit(f"unknown configuration {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40, help="0 = the whole test split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sensitivity", default=str(RESULTS / "demo-sensitivity.json"),
                        help="reused when it exists (same model and calibration), else written")
    parser.add_argument("--out", default=str(RESULTS / "quality"))
    parser.add_argument("--from-log", default=None,
                        help="rebuild the JSON/markdown from the per-row lines a run printed "
                             "(for a run stopped before its last configuration)")
    parser.add_argument("--reference-ppl", type=float, default=None,
                        help="with --from-log, when the log has no reference row: the FP32 "
                             "perplexity of the same windows, measured separately")
    args = parser.parse_args()
    if args.from_log:
        rebuild_from_log(Path(args.from_log), Path(args.out), args.reference_ppl)
        return
    started = time.time()
    model, tok, info = load_model("demo", device=args.device)
    ids, calib = load_calibration(tok, num_samples=args.samples, seq_len=args.seq_len, seed=0)
    sens_path = Path(args.sensitivity)
    sens = None
    if sens_path.exists():
        sens = SensitivityMap.from_dict(json.loads(sens_path.read_text()))
        if (sens.calibration != calib.to_dict() or sens.model["weights_sha256"] != info.weights_sha256
                or sens.settings != ProfileSettings().to_dict()):
            sens = None
    profile_seconds = 0.0
    if sens is None:
        fit, _ = load_calibration(tok, num_samples=ProfileSettings().fit_samples,
                                  seq_len=args.seq_len, seed=1)
        t = time.time()
        sens = profile_model(model, info, ids, calib, ProfileSettings(), args.device, fit_samples=fit)
        profile_seconds = time.time() - t
        sens_path.parent.mkdir(parents=True, exist_ok=True)
        sens_path.write_text(json.dumps(sens.to_dict(), sort_keys=True) + "\n")
    windows = eval_windows(tok, eval_text_path(), 512, args.windows or None)
    cached = reference_log_probs(model, windows, args.device)
    reference_ce = 0.0
    for i in range(windows.shape[0]):
        targets = windows[i, 1:].to(args.device)
        reference_ce -= float(cached[i].float().gather(-1, targets[:, None]).sum())
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    reference_ppl = math.exp(reference_ce / tokens)
    rows = [{"config": "fp32-reference", "linear_bpw": 32.0, "ppl": reference_ppl, "kl": 0.0,
             "top1": 1.0, "predicted_kl": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    del model
    gc.collect()
    for name in args.configs.split(","):
        plan, method = build_plan(name, sens)
        qmodel, _, _ = load_model("demo", device=args.device)
        t = time.time()
        quantize_model(qmodel, info, plan, ids, args.device, method=method)
        seconds = time.time() - t
        kl, dce, top1 = compare_with_top1(qmodel, windows, cached, args.device)
        row = {"config": name, "method": method, "linear_bpw": plan.totals.linear_bits_per_weight,
               "linear_bytes": plan.totals.linear_bytes, "ppl": math.exp(reference_ce / tokens + dce),
               "kl": kl, "top1": top1, "predicted_kl": plan.totals.predicted_loss,
               "bits_histogram": _histogram(plan), "quantize_seconds": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del qmodel
        gc.collect()
    result = {"command": "python bench/bench_quality.py " + " ".join(sys.argv[1:]),
              "model": info.name, "calibration": calib.to_dict(), "windows": windows.shape[0],
              "predicted_tokens": tokens, "device": args.device, "torch": torch.__version__,
              "profile_seconds": profile_seconds, "total_seconds": time.time() - started,
              "loss_model": {k: v for k, v in sens.loss_model.items() if k != "points"},
              "rows": rows}
    write_outputs(result, Path(args.out))


@torch.no_grad()
def compare_with_top1(model, windows, cached, device):
    from torch.nn import functional as F

    kl, dce, agree, count = 0.0, 0.0, 0, 0
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1].to(device)
        logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
        ref = cached[i].float()
        targets = ids[0, 1:]
        kl += float((ref.exp() * (ref - logp)).sum())
        dce += float(F.nll_loss(logp, targets, reduction="sum") - F.nll_loss(ref, targets, reduction="sum"))
        agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        count += targets.numel()
    return kl / count, dce / count, agree / count


def _histogram(plan) -> dict:
    hist: dict[str, int] = {}
    for entry in plan.modules.values():
        if entry.kind == "linear":
            key = "fp16" if entry.bits == 16 else f"b{entry.bits}g{entry.group_size}"
            hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items()))


def rebuild_from_log(log: Path, out: Path, reference_ppl: float | None) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"config"')]
    if not rows or rows[0]["config"] != "fp32-reference":
        if reference_ppl is None:
            raise SystemExit(f"{log} has no reference row: pass --reference-ppl")
        rows.insert(0, {"config": "fp32-reference", "linear_bpw": 32.0, "ppl": reference_ppl,
                        "kl": 0.0, "top1": 1.0, "predicted_kl": 0.0})
    configs = ",".join(r["config"] for r in rows[1:])
    source = "" if reference_ppl is None else \
        f"; FP32 perplexity {reference_ppl:.4f} from `python bench/reference_ppl.py --windows 40`"
    result = {"command": f"python bench/bench_quality.py --configs {configs}",
              "note": f"One process, stopped after these configurations; table rebuilt with "
                      f"--from-log{source}.",
              "model": "SmolLM2-135M-Instruct", "calibration": {"num_samples": 128, "seq_len": 512},
              "windows": 40, "predicted_tokens": 40 * 511, "device": "cpu", "torch": torch.__version__,
              "total_seconds": None, "rows": rows}
    write_outputs(result, out)


def write_outputs(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    ref = result["rows"][0]["ppl"]
    lines = [f"# Quality against size: {result['model']}", "",
             f"Command: `{result['command']}` ({result['device']}, torch {result['torch']}"
             + (f", {result['total_seconds'] / 60:.0f} min" if result.get("total_seconds") else "")
             + ")", "",
             *([result["note"], ""] if result.get("note") else []),
             f"Evaluation: first {result['windows']} windows x 512 tokens of wikitext2-test "
             f"({result['predicted_tokens']} predicted tokens). Calibration: "
             f"{result['calibration']['num_samples']} x {result['calibration']['seq_len']} tokens "
             f"of wikitext2-valid. Linear bpw includes scales and zero points; the head stays "
             f"float16.", "",
             "| config | linear bpw | PPL | dPPL | KLD | top-1 | predicted KL | layers by format |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        hist = ", ".join(f"{k}:{v}" for k, v in r.get("bits_histogram", {}).items())
        lines.append(f"| {r['config']} | {r['linear_bpw']:.3f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / ref - 1):+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.1f}% | "
                     f"{r['predicted_kl']:.4f} | {hist} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
