"""The arm64-linux (onnxruntime) package beside an FP32 ONNX export of the same model, same runtime.

Both graphs come from targets/onnx_graph.py (same decoder, attention and KV cache): the package
from a quantized directory made for this target (MatMulNBits weights), the FP32 export from the
float model (plain MatMul on float32 weights). Measured side by side in one process: model file
size, perplexity on the first N non-overlapping windows of wikitext2-test, prefill latency of a
128-token prompt (median) and decode tokens/s (median over single-token steps after it).

    # a quantized model for this target at ~4.0 bits per weight: `apq-sdk build` plans with the
    # target's capabilities and keeps the quantized directory in its cache
    apq-sdk build --target arm64-linux --model demo --bits-per-weight 4.0 -o apq-out
    python bench/bench_onnxruntime.py --model demo --quantized apq-out/SmolLM2-135M-Instruct-arm64-linux
    # --quantized takes a quantized directory (apq-sdk quantize) or a built package (its manifest
    # names the cached quantized directory); a quick run on a tiny model:
    python bench/bench_onnxruntime.py --model TINY_DIR --quantized Q_DIR --text t.txt --windows 1 --out /tmp/x

Writes OUT.json and OUT.md (default bench/results/onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: results_io
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def perplexity(runner, windows: np.ndarray) -> float:
    from apq_sdk.verification import nll as window_nll

    nll = sum(window_nll(runner.full(row), row) for row in windows)
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def resolve_quantized(path: Path) -> Path:
    """A quantized directory, or the cached one a built package's manifest names."""
    if (path / "model.safetensors").is_file() or not (path / "manifest.json").is_file():
        return path
    from apq_sdk.package import reference_dir

    return reference_dir(path)


def build_fp32(model_spec: str, out_dir: Path) -> tuple[Path, str]:
    import torch

    from apq_sdk.model_io import load_model
    from apq_sdk.targets.onnx_graph import build_decoder, float_weights_from_model, save_model
    from apq_sdk.targets.onnxruntime.linears import MatMulNBitsLowering

    model, tok, info = load_model(model_spec)
    with torch.no_grad():
        config, tensors, modules = float_weights_from_model(model)
        graph = build_decoder(config, tensors, modules, MatMulNBitsLowering(),
                              metadata={"apq.model": info.name, "apq.variant": "fp32"})
    del model
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(graph, out_dir / "model.onnx")
    tok.save_pretrained(str(out_dir))
    return out_dir, info.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or a model path (the FP32 side)")
    parser.add_argument("--quantized", required=True,
                        help="quantized model directory made for arm64-linux (apq-sdk quantize)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--text", default=None, help="default: wikitext2-test (apq_sdk.calibration)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--runs", type=int, default=5, help="prefill timing runs")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--verify-windows", type=int, default=4,
                        help="also run the target's verify (package vs torch reference) on this many "
                             "windows; 0 skips it")
    parser.add_argument("--out", default=str(RESULTS / "onnxruntime"),
                        help="results path without suffix (.json and .md are written)")
    parser.add_argument("--note", default="", help="conditions of the run, printed under the table")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, args.threads))
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    from apq_sdk.calibration import eval_text_path, eval_windows
    from apq_sdk.checkpoint import read_checkpoint
    from apq_sdk.targets.base import BuildContext
    from apq_sdk.targets.onnxruntime.target import OnnxDecoder, OnnxRuntimeTarget
    from apq_sdk.verification import measure_timings

    started = time.time()
    quantized = resolve_quantized(Path(args.quantized))
    checkpoint = read_checkpoint(quantized)
    plan = checkpoint.plan
    text = Path(args.text) if args.text else eval_text_path()
    config = AutoConfig.from_pretrained(quantized)
    window_len = min(args.window_len, config.max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(str(quantized))
    windows = eval_windows(tokenizer, text, window_len, args.windows or None).numpy().astype(np.int64)
    prefill = min(128, config.max_position_embeddings - args.decode_tokens)

    rows = []
    with tempfile.TemporaryDirectory(prefix="apq-bench-ort-") as tmp:
        tmp = Path(tmp)
        target = OnnxRuntimeTarget()
        t = time.time()
        target.lower(BuildContext(package_dir=tmp / "quantized", checkpoint=checkpoint,
                                  model_name=plan.model.name, package_name="bench"))
        lower_s = time.time() - t
        check = None
        if args.verify_windows > 0:
            v = target.verify(tmp / "quantized", checkpoint=checkpoint, text_path=text,
                              windows=args.verify_windows, seq_len=window_len,
                              threads=args.threads).to_dict()
            check = {"windows": args.verify_windows, "passed": v["passed"],
                     "logits_relative": v["logits"]["relative"], "kl_mean": v["logits"]["kl_mean"],
                     "ppl_onnx": round(v["perplexity"]["package"], 4),
                     "ppl_torch": round(v["perplexity"]["torch"], 4), "failures": v["failures"],
                     "float_twin": v.get("float_twin")}
            print(json.dumps({"verify": check}), flush=True)
        t = time.time()
        fp32_dir, model_name = build_fp32(args.model, tmp / "fp32")
        export_s = time.time() - t
        for label, package, build_s in (("fp32-onnx", fp32_dir, export_s),
                                        ("apq-matmulnbits", tmp / "quantized", lower_s)):
            runner = OnnxDecoder(package / "model.onnx", threads=args.threads)
            ppl = perplexity(runner, windows)
            timing = measure_timings(runner, windows[0], prefill_tokens=prefill,
                                     decode_tokens=args.decode_tokens, runs=args.runs)
            row = {"model": label,
                   "model_file_bytes": sum(p.stat().st_size for p in target.model_files(package)),
                   "perplexity": ppl,
                   "prefill_tokens": timing["prefill_tokens"],
                   "prefill_ms_median": timing["prefill_ms_median"],
                   "decode_tokens_per_s_median": timing["decode_tokens_per_s_median"],
                   "build_seconds": build_s}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del runner

    fp32, quant = rows
    result = {
        "command": "python bench/bench_onnxruntime.py " + " ".join(sys.argv[1:]),
        "model": model_name, "quantized_dir": str(quantized),
        "plan": {"target_bits_per_weight": plan.totals.target_bits_per_weight,
                 "model_bits_per_weight": plan.totals.model_bits_per_weight,
                 "budget": {"scope": plan.objective.scope,
                            "bits_per_weight": plan.objective.bits_per_weight},
                 "linear_bits_per_weight": plan.totals.linear_bits_per_weight,
                 "head_bits": plan.modules["lm_head"].bits if "lm_head" in plan.modules else None,
                 "activations": sorted({m.activation for m in plan.modules.values()
                                        if m.kind == "linear"})},
        "text": str(text), "windows": int(windows.shape[0]), "window_len": int(window_len),
        "predicted_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "onnxruntime": ort.__version__, "threads": args.threads, "provider": "CPUExecutionProvider",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(), "decode_tokens": args.decode_tokens, "prefill_runs": args.runs,
        "rows": rows, "verify": check,
        "note": args.note,
        "ratios": {"size": quant["model_file_bytes"] / fp32["model_file_bytes"],
                   # every weight of the FP32 export is float32, so half its file is the FP16 model
                   "smaller_than_fp16": 1 - quant["model_file_bytes"] / (fp32["model_file_bytes"] / 2),
                   "perplexity": quant["perplexity"] / fp32["perplexity"],
                   "prefill_speedup": fp32["prefill_ms_median"] / quant["prefill_ms_median"],
                   "decode_speedup": (quant["decode_tokens_per_s_median"]
                                      / fp32["decode_tokens_per_s_median"])},
        "total_seconds": time.time() - started,
    }
    write_results(args.out, result, render_markdown(result))


def render_markdown(result: dict) -> str:
    lines = [
        f"# onnxruntime (arm64-linux target): {result['model']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"onnxruntime {result['onnxruntime']}, {result['provider']}, {result['threads']} intra-op "
        f"thread(s), {result['machine']} ({result['cpu_count']} CPUs). Perplexity: first "
        f"{result['windows']} windows of {result['window_len']} tokens of "
        f"`{Path(result['text']).name}` ({result['predicted_tokens']:,} predicted tokens). Prefill: "
        f"one {result['rows'][0]['prefill_tokens']}-token prompt, median of {result['prefill_runs']} "
        f"runs. Decode: median of "
        f"{result['decode_tokens']} single-token steps after it.",
        "",
        f"Quantized plan: {result['plan']['target_bits_per_weight']:.3f} bits per weight for the "
        f"whole model as this target stores it ({result['plan']['model_bits_per_weight']:.3f} in "
        f"the checkpoint, float16 scales), {result['plan']['linear_bits_per_weight']:.3f} for the "
        f"decoder linears, head "
        f"{result['plan']['head_bits']} bits, activations {', '.join(result['plan']['activations'])}.",
        "",
        "| model | file size | perplexity | prefill (ms) | decode (tokens/s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['model_file_bytes'] / 2**20:,.1f} MiB | "
                     f"{row['perplexity']:.3f} | {row['prefill_ms_median']:.1f} | "
                     f"{row['decode_tokens_per_s_median']:.1f} |")
    r = result["ratios"]
    lines += ["", f"Model files {100 * r['smaller_than_fp16']:.1f} % smaller than the whole model in "
                  f"float16 (embeddings included; half the FP32 export).",
              "", f"Quantized / FP32: size x{r['size']:.3f}, perplexity x{r['perplexity']:.4f}; speed "
                  f"of the quantized package relative to FP32 (> 1 = faster): prefill "
                  f"x{r['prefill_speedup']:.2f}, decode x{r['decode_speedup']:.2f}."]
    check = result.get("verify")
    if check:
        lines += ["", f"Package against the torch reference (`verify`, {check['windows']} window(s)): "
                      f"passed={check['passed']}, max logit diff {check['logits_relative']:.2e} of the "
                      f"logit scale, KL {check['kl_mean']:.2e} nats/token, perplexity {check['ppl_onnx']} "
                      f"(onnx) vs {check['ppl_torch']} (torch)."]
        twin = check.get("float_twin")
        if twin:
            lines += ["", f"Its float-activation twin (accuracy_level 0 against the reference with float "
                          f"activations, the exact check of weights and graph): max logit diff "
                          f"{twin['relative']:.2e} of the logit scale, KL {twin['kl_mean']:.2e}."]
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", "Timings vary from run to run and with machine load.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
