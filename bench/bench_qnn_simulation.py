"""The qualcomm target's accuracy, simulated in torch, beside ExecuTorch's own QNN PTQ.

QNN's HTP runs static graphs: every activation a uint16 on a per-tensor range calibrated ahead of
time, 4-bit weights per block in QNN's block encoding. Nothing of it runs here without Qualcomm's
SDK, but ExecuTorch's QNN quantizer does: its converted graph (quantize/dequantize at every
activation, float32 between them) is the simulation. On the same windows:

* `FP32` : the unquantized model (for the demo: FP32, dequantized Q4_1);
* `APQ, weight-only` : the qualcomm plan's torch reference (the core's GPTQ codes on QNN's grid,
  float activations);
* `APQ + QNN static uint16` : the same weights in QnnQuantizer's 16a4w_block graph
  (targets/executorch/qnn.py: the checkpoint's codes and scales bit for bit, activation ranges
  calibrated on `--calib-windows` windows of wikitext2-valid);
* `QNN PTQ (ExecuTorch's QnnQuantizer)` : what a user of ExecuTorch's Qualcomm flow gets:
  QnnQuantizer on the unquantized model, its own weight observer (min/max per block of
  `--block`), the same calibration, then QNN's re-encoding of the block scales
  (qnn.encode_blocks), all linears 4-bit;
* `QNN PTQ weights, weight-only` : the same weights with float activations.

The qualcomm plan is made at the size of the PTQ's (every linear and the head 4-bit in blocks of
`--block`, as the capability table counts it), so the two are compared at equal size. Both leave
the embedding lookup out of QNN's quantizer (a tied head's lookup reads the plan's 4-bit codes;
the PTQ's stays float, which favours it slightly). Attention in both graphs adds a bounded causal
mask (-100), as Qualcomm's own LLM adaptations do. Not simulated: the HTP's fixed-point kernels
inside each op.

    python bench/bench_qnn_simulation.py --model demo

Writes OUT.json and OUT.md (default bench/results/qnn-simulation).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
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
FP32, APQ, APQ_QNN, PTQ_QNN, PTQ = ("FP32", "APQ, weight-only", "APQ + QNN static uint16",
                                    "QNN PTQ (ExecuTorch's QnnQuantizer)",
                                    "QNN PTQ weights, weight-only")


def main() -> None:
    from apq_sdk.targets.executorch.qnn import DEFAULT_SOC, QNN_SOCS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--block", type=int, default=64,
                        help="the PTQ's block size; the plan is made at the PTQ's size")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--soc", default=DEFAULT_SOC, choices=QNN_SOCS)
    parser.add_argument("--checkpoint", default=None,
                        help="where the qualcomm checkpoint is kept (made when missing or of "
                             "another plan); default: a folder in the cache")
    parser.add_argument("--out", default=None, help="default: bench/results/qnn-simulation")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import apq_sdk
    from apq_sdk.builder import profile_cache_path, store_profile
    from apq_sdk.calibration import (CALIB_FILE, data_dir, eval_text_path, eval_windows,
                                     load_calibration)
    from apq_sdk.checkpoint import read_checkpoint
    from apq_sdk.errors import ApqError
    from apq_sdk.fsutil import cache_dir
    from apq_sdk.model_io import load_model
    from apq_sdk.plan_file import plan_sha256
    from apq_sdk.planning import Budget, make_plan
    from apq_sdk.sensitivity import ProfileSettings, SensitivityMap, profile_model
    from apq_sdk.targets.executorch import qnn
    from apq_sdk.targets.executorch.target import QUALCOMM_CAPABILITIES

    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    caps = QUALCOMM_CAPABILITIES
    model, tokenizer, info = load_model(args.model)
    model.eval()
    widths = sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)})
    if args.block not in caps.group_sizes or any(k % args.block for k in widths):
        fits = [g for g in caps.group_sizes if not any(k % g for k in widths)]
        raise SystemExit(f"--block {args.block}: QNN's blocks must be one of the qualcomm "
                         f"table's {list(caps.group_sizes)} and divide every linear's input "
                         f"width ({widths}); this model takes {fits}")

    # 1. the profile (the build's cache), the PTQ's size and the plan at that size
    ids, calib_info = load_calibration(tokenizer, None, num_samples=128, seq_len=512, seed=0)
    settings = ProfileSettings.for_capabilities(caps, seed=0)
    path = profile_cache_path(info, calib_info, settings)
    if path.is_file():
        log(f"profile: cached ({path.name[:12]})")
        sens = SensitivityMap.from_dict(json.loads(path.read_text()))
        sens.model = info.to_plan_model()
    else:
        log("profile: 128 x 512 calibration tokens")
        fit, _ = load_calibration(tokenizer, None, num_samples=settings.fit_samples,
                                  seq_len=512, seed=1)
        sens = profile_model(model, info, ids, calib_info, settings, "cpu", fit_samples=fit)
        store_profile(sens, path)
    uniform = dataclasses.replace(caps, name=f"qualcomm-g{args.block}",
                                  group_sizes=(args.block,))
    ptq_plan = make_plan(sens, Budget(bits_per_weight=16.0), caps=uniform, head_bits="4")
    size_bits = ptq_plan.totals.target_bits_per_weight
    plan = apq_sdk.plan(sens, bits_per_weight=size_bits, target="qualcomm")
    log(f"plan at the PTQ's size, {size_bits:.4f} bits per weight: "
        f"{plan.totals.target_bits_per_weight:.4f}")

    # 2. the checkpoint (GPTQ on QNN's grid), kept between runs
    where = Path(args.checkpoint) if args.checkpoint else \
        cache_dir() / "bench" / f"qnn-{plan_sha256(plan)[:16]}"
    try:
        checkpoint = read_checkpoint(where)
        if plan_sha256(checkpoint.plan) != plan_sha256(plan):
            raise ValueError("another plan")
        log(f"quantize: kept ({where})")
    except (ApqError, OSError, ValueError):  # missing, unreadable or of another plan: made again
        log(f"quantize: GPTQ into {where}")
        apq_sdk.quantize(args.model, plan, where,
                         loaded=(copy.deepcopy(model), tokenizer, info))  # GPTQ edits it
        checkpoint = read_checkpoint(where)

    # 3. the graphs
    windows = eval_windows(tokenizer, eval_text_path(), args.window_len, args.windows)
    calib_text = data_dir() / CALIB_FILE if data_dir() else None
    calib = eval_windows(tokenizer, calib_text, args.window_len, args.calib_windows) \
        if calib_text and calib_text.is_file() else ids[:args.calib_windows, :args.window_len]
    def calibrated(done: int, total: int) -> None:
        if done == total or done % 4 == 0:
            log(f"  calibration window {done}/{total}")

    log("APQ + QNN: export, annotate, calibrate, convert")
    apq_graph = qnn.quantize_graph(checkpoint, calib, soc=args.soc, progress=calibrated)
    reference = apq_sdk.load(checkpoint.path)
    log("QNN PTQ: export, annotate, calibrate, convert")
    ptq_model = qnn.use_bounded_mask(copy.deepcopy(model))
    linears = {n: args.block for n, m in ptq_model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    ptq_graph = qnn.convert(ptq_model, calib, linears, soc=args.soc, progress=calibrated)
    qnn.encode_blocks(ptq_graph)
    ptq_weights = _weight_only(ptq_graph, copy.deepcopy(model))

    variants = {
        APQ: lambda row: reference(row).logits,
        APQ_QNN: lambda row: apq_graph.module(row),
        PTQ_QNN: lambda row: ptq_graph.module(row),
        PTQ: lambda row: ptq_weights(input_ids=row, use_cache=False).logits,
    }
    sums = {v: [0.0, 0.0] for v in [FP32, *variants]}
    count = 0
    with torch.no_grad():
        for i, row in enumerate(windows):
            fp32_logp = torch.log_softmax(model(row[None]).logits[0, :-1].double(), -1)
            targets = (torch.arange(len(row) - 1), row[1:])
            sums[FP32][0] -= float(fp32_logp[targets].sum())
            for name, run in variants.items():
                logp = torch.log_softmax(run(row[None])[0, :-1].double(), -1)
                sums[name][0] -= float(logp[targets].sum())
                sums[name][1] += float((fp32_logp.exp() * (fp32_logp - logp)).sum())
            count += len(row) - 1
            log(f"window {i + 1}/{len(windows)}")
    scores = {v: {"perplexity": math.exp(nll / count), "kl_mean": kl / count}
              for v, (nll, kl) in sums.items()}
    groups = sorted({m.group_size for m in plan.modules.values() if m.bits != 16})
    result = {
        "command": "python bench/bench_qnn_simulation.py " + " ".join(sys.argv[1:]),
        "model": info.name, "soc": args.soc, "block": args.block,
        "bits_per_weight": {"apq": plan.totals.target_bits_per_weight, "ptq": size_bits},
        "apq_group_sizes": groups,
        "windows": int(windows.shape[0]), "window_len": int(windows.shape[1]),
        "calibration_windows": int(calib.shape[0]),
        "calibration_text": str(calib_text) if calib_text else "apq-sdk's built-in excerpt",
        "variants": scores, "total_seconds": time.time() - started}
    write_results(args.out or RESULTS / "qnn-simulation", result, render_markdown(result))


def _weight_only(graph, model):
    """`model` (a fresh float copy) with the graph's dequantized weights (codes x the scales QNN
    runs): the PTQ's weights without its activation quantization."""
    import torch

    module = graph.module
    nodes = {node.name: node for node in module.graph.nodes}
    for name, node_name in graph.linears.items():
        dq = nodes[node_name].args[1]
        codes, block, scale = dq.args[0], dq.args[1], dq.args[2]
        q = getattr(module, codes.target).float()
        s = getattr(module, scale.target).repeat_interleave(block[1], dim=1)
        model.get_submodule(name).weight = torch.nn.Parameter(q * s, requires_grad=False)
    return model.eval()


def render_markdown(r: dict) -> str:
    fp32 = "FP32" + (" (dequantized Q4_1)" if r["model"].startswith("SmolLM2") else "")
    v = r["variants"]
    lines = [f"# The qualcomm target simulated: {r['model']}", "",
             f"Command: `{r['command']}`", "",
             f"First {r['windows']} windows of {r['window_len']} tokens of wikitext2-test; "
             f"QNN's static activation ranges from {r['calibration_windows']} windows of "
             f"{Path(r['calibration_text']).name}; ExecuTorch's QnnQuantizer (16a4w_block, "
             f"{r['soc']}) run in torch. APQ: the qualcomm plan at "
             f"{r['bits_per_weight']['apq']:.3f} bits per weight (groups "
             f"{', '.join(map(str, r['apq_group_sizes']))}); QNN PTQ: every linear 4-bit in "
             f"blocks of {r['block']}, {r['bits_per_weight']['ptq']:.3f} bits per weight. "
             f"{fp32}: perplexity {v[FP32]['perplexity']:.3f}.", "",
             "| variant | perplexity | KL(unquantized \\|\\| variant) | KL vs QNN PTQ |",
             "| --- | ---: | ---: | ---: |"]
    for name in (APQ_QNN, PTQ_QNN, APQ, PTQ):
        lines.append(f"| {name} | {v[name]['perplexity']:.3f} | {v[name]['kl_mean']:.4f} | "
                     f"x{v[name]['kl_mean'] / v[PTQ_QNN]['kl_mean']:.2f} |")
    lines += ["", "Both graphs leave the embedding lookup out of QNN's quantizer and attend with "
                  "a bounded mask (-100). Not simulated: the HTP's fixed-point arithmetic inside "
                  "each op. Nothing here ran on a Snapdragon NPU.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
