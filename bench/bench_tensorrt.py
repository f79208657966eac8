"""The jetson-orin (TensorRT) package of the demo model: size, accuracy, and decode on paper.

What can be measured here (no NVIDIA GPU, no TensorRT): the package's model files against the
whole model in float16; the package's ONNX (run in onnxruntime with the package's own embedding
lookup, DequantizeLinear + MatMul at float activations) against the torch reference of its plan,
max logit error over every position; perplexity on the first N windows of wikitext2-test for the
package, the torch reference and the unquantized model (FP32, dequantized Q4_1) side by side.
On paper: the bytes one decoded token reads (every initializer of the graph, one embedding row,
the KV cache at a context length) and the decode speed that bandwidth bounds on a Jetson Orin
Nano Super (102 GB/s) and an AGX Orin (204.8 GB/s).

    apq-sdk build --target jetson-orin --model demo -o apq-out
    python bench/bench_tensorrt.py --package apq-out/SmolLM2-135M-Instruct-jetson-orin
    # quick run on a tiny package: --model TINY_DIR --text t.txt --windows 1 --out /tmp/x

Writes OUT.json and OUT.md (default bench/results/tensorrt).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: results_io
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BANDWIDTH_GB_S = {"Jetson Orin Nano Super (102 GB/s)": 102.0, "Jetson AGX Orin (204.8 GB/s)": 204.8}
CONTEXTS = (512, 2048)
#: published decode figures near this model's size found while writing this: NVIDIA's TensorRT
#: Edge-LLM benchmark page (its only platform is a Jetson AGX Thor, not an Orin) and a third-party
#: llama.cpp run of this very model on an Orin Nano Super; no MLC figure for a model this small
PEERS = [
    {"what": "SmolLM2-135M, llama.cpp CUDA, Jetson Orin Nano Super 8GB at 25 W (101 MB model "
             "file), decode, batch 1 (third party)", "tokens_per_s": 165.2,
     "source": "https://www.smolhub.com/posts/jetson-nano-super-benchmark-non-reasoning/"},
    {"what": "Qwen3-1.7B NVFP4, TensorRT Edge-LLM 0.7.0 (TensorRT 10.13), Jetson AGX Thor, "
             "generation, batch 1 (NVIDIA)", "tokens_per_s": 170.4,
     "source": "https://nvidia.github.io/TensorRT-Edge-LLM/latest/user_guide/performance/"
               "performance-benchmarks.html"},
    {"what": "Qwen3.5-0.8B (VLM, LLM in NVFP4), TensorRT Edge-LLM 0.7.0, Jetson AGX Thor, "
             "generation, batch 1 (NVIDIA)", "tokens_per_s": 232.2,
     "source": "https://nvidia.github.io/TensorRT-Edge-LLM/latest/user_guide/performance/"
               "performance-benchmarks.html"},
]


def bytes_per_token(model, io: dict, context: int) -> dict:
    """What one decode step reads: every initializer (weights, scales, norms, tables), one
    embedding row and the float32 KV cache of `context` tokens."""
    weights = sum(len(t.raw_data) if t.raw_data else t.ByteSize() for t in model.graph.initializer)
    emb = io["embeddings"]
    if emb["format"] == "blocks":
        row = (emb["cols"] * emb["bits"] + 7) // 8 + 2 * -(-emb["cols"] // emb["group_size"])
    else:
        row = emb["cols"] * (2 if emb["format"] == "float16" else 4)
    kv = 2 * io["num_layers"] * io["num_key_value_heads"] * io["head_dim"] * context * 4
    return {"weights": weights, "embedding_row": row, "kv_cache": kv, "total": weights + row + kv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True, help="a jetson-orin package directory")
    parser.add_argument("--model", default=None,
                        help="the unquantized model (default: the one the manifest names)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--text", default=None, help="default: wikitext2-test (apq_sdk.calibration)")
    parser.add_argument("--out", default=str(RESULTS / "tensorrt"))
    args = parser.parse_args()

    import onnx
    import torch

    torch.set_num_threads(1)
    from apq_sdk.calibration import eval_text_path, eval_windows
    from apq_sdk.checkpoint import load_quantized, read_checkpoint
    from apq_sdk.errors import ApqError
    from apq_sdk.model_io import load_model
    from apq_sdk.package import read_manifest, reference_dir
    from apq_sdk.targets.tensorrt.target import JetsonOrinTarget, TensorRtTarget
    from apq_sdk.targets.base import get_target
    from apq_sdk.verification import nll

    started = time.time()
    package = Path(args.package)
    try:
        manifest = read_manifest(package)
        if not issubclass(get_target(manifest["target"]["name"]), TensorRtTarget):
            raise ApqError(f"{package} was built for {manifest['target']['name']}; this bench "
                           f"measures a jetson-orin or cuda-x86_64 package")
        checkpoint = read_checkpoint(reference_dir(package, manifest))
    except (ApqError, KeyError) as exc:
        raise SystemExit(f"bench_tensorrt: {exc}") from None
    plan = checkpoint.plan
    io = json.loads((package / "onnx_io.json").read_text())
    text = Path(args.text) if args.text else eval_text_path()
    reference = load_quantized(checkpoint.path, checkpoint=checkpoint)
    float_model, tokenizer, info = load_model(args.model or manifest["model"]["spec"])
    window_len = min(args.window_len, io["max_context"])
    windows = eval_windows(tokenizer, text, window_len, args.windows or None).numpy()
    runner = JetsonOrinTarget().runner(package)

    worst_abs, worst_rel, sums = 0.0, 0.0, {"package": 0.0, "reference": 0.0, "fp32": 0.0}
    for i, row in enumerate(windows):
        ids = torch.from_numpy(row.astype(np.int64))[None]
        got = runner.full(row.astype(np.int64))
        with torch.no_grad():
            want = reference(ids).logits[0].float().numpy()
            fp32 = float_model(ids).logits[0].float().numpy()
        diff = float(np.abs(got - want).max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / float(np.abs(want).max()))
        sums["package"] += nll(got, row)
        sums["reference"] += nll(want, row)
        sums["fp32"] += nll(fp32, row)
        print(f"window {i + 1}/{len(windows)}: max |logit diff| {diff:.2e}", flush=True)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    ppl = {k: math.exp(v / predicted) for k, v in sums.items()}

    model_files = JetsonOrinTarget().model_files(package)
    onnx_model = onnx.load(str(package / "model.onnx"))
    per_context = {}
    for context in CONTEXTS:
        b = bytes_per_token(onnx_model, io, min(context, io["max_context"]))
        b["decode_bound_tokens_per_s"] = {name: bw * 1e9 / b["total"]
                                          for name, bw in BANDWIDTH_GB_S.items()}
        per_context[str(context)] = b
    t = plan.totals
    result = {
        "command": "python bench/bench_tensorrt.py " + " ".join(sys.argv[1:]),
        "model": info.name, "package": str(package),
        "plan": {"target_bits_per_weight": t.target_bits_per_weight,
                 "linear_bits_per_weight": t.linear_bits_per_weight,
                 "budget": {"bits_per_weight": plan.objective.bits_per_weight,
                            "memory_reduction": plan.objective.memory_reduction,
                            "max_loss": plan.objective.max_loss},
                 "head_bits": plan.modules["lm_head"].bits,
                 "bits": sorted({m.bits for m in plan.modules.values() if m.kind == "linear"}),
                 "group_sizes": sorted({m.group_size for m in plan.modules.values()
                                        if m.group_size}),
                 "activations": sorted({m.activation for m in plan.modules.values()
                                        if m.kind == "linear"})},
        "sizes": {"model_files": {p.name: p.stat().st_size for p in model_files},
                  "model_files_total": sum(p.stat().st_size for p in model_files),
                  "fp16_whole_model": t.model_fp16_bytes},
        "accuracy": {"windows": int(windows.shape[0]), "window_len": int(window_len),
                     "text": str(text), "predicted_tokens": int(predicted),
                     "max_abs_logit_diff": worst_abs, "max_logit_diff_relative": worst_rel,
                     "perplexity": ppl},
        "decode_on_paper": per_context, "peers": PEERS,
        "not_measured": ["engine build, on-device speed and memory (no NVIDIA GPU or TensorRT "
                         "here)", "TensorRT's float16 numerics under --fp16",
                         "a 2/3-bit plugin kernel's throughput (no plugin: 2/3-bit layers are "
                         "refused by the capability table)"],
        "total_seconds": time.time() - started,
    }
    write_results(args.out, result, render_markdown(result))


def budget_text(budget: dict) -> str:
    if budget["bits_per_weight"] is not None:
        return f"{budget['bits_per_weight']} bits per weight"
    if budget["memory_reduction"] is not None:
        return f"{budget['memory_reduction']:.0%} smaller than float16"
    return f"perplexity at most {budget['max_loss']:.2%} above the unquantized model"


def render_markdown(r: dict) -> str:
    s, a, p = r["sizes"], r["accuracy"], r["plan"]
    files = s["model_files_total"]
    lines = [
        f"# TensorRT (jetson-orin target): {r['model']}", "",
        f"Command: `{r['command']}`", "",
        f"Plan: {p['target_bits_per_weight']:.3f} bits per weight of the whole model as the "
        f"package stores it (budget: {budget_text(p['budget'])}), decoder linears "
        f"{p['linear_bits_per_weight']:.3f}, bit-widths {p['bits']}, groups {p['group_sizes']}, "
        f"head {p['head_bits']}-bit, activations {', '.join(p['activations'])}.", "",
        "| measure | value |", "| --- | ---: |",
        f"| model files ({', '.join(s['model_files'])}) | {files / 2**20:,.1f} MiB |",
        f"| whole model in float16 | {s['fp16_whole_model'] / 2**20:,.1f} MiB |",
        f"| size against float16 | x{files / s['fp16_whole_model']:.3f} "
        f"({100 * (1 - files / s['fp16_whole_model']):.1f} % smaller) |",
        f"| max logit error, ONNX vs torch reference | {a['max_abs_logit_diff']:.2e} "
        f"({a['max_logit_diff_relative']:.2e} of the logit scale) |",
        f"| perplexity, package (ONNX in onnxruntime) | {a['perplexity']['package']:.3f} |",
        f"| perplexity, torch reference of the plan | {a['perplexity']['reference']:.3f} |",
        f"| perplexity, the unquantized model in FP32 | {a['perplexity']['fp32']:.3f} |",
        "", f"Perplexity and logit error: first {a['windows']} windows of {a['window_len']} tokens "
            f"of `{Path(a['text']).name}` ({a['predicted_tokens']:,} predicted tokens), every "
            f"position compared.", "",
        "## Decode on paper", "",
        "Bytes one decoded token reads: every initializer of the graph (INT4 codes with their "
        "float32 scales, float16 layers, norms), one embedding row and the float32 KV cache; the "
        "decode speed bandwidth allows is bandwidth / bytes (an upper bound: it assumes TensorRT "
        "keeps the ONNX's storage and reads nothing twice).", "",
        "| context | weights | KV cache | total | " + " | ".join(BANDWIDTH_GB_S) + " |",
        "| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in BANDWIDTH_GB_S) + " |"]
    for context, b in r["decode_on_paper"].items():
        bounds = " | ".join(f"{v:,.0f} tokens/s" for v in b["decode_bound_tokens_per_s"].values())
        lines.append(f"| {context} | {b['weights'] / 2**20:,.1f} MiB | "
                     f"{b['kv_cache'] / 2**20:,.1f} MiB | {b['total'] / 2**20:,.1f} MiB | {bounds} |")
    lines += ["", "Published figures for comparison:", ""]
    lines += [f"- {peer['what']}: {peer['tokens_per_s']} tokens/s ({peer['source']})"
              for peer in r["peers"]]
    lines += ["- No MLC figure for a model of this size on an Orin was found; none is quoted. "
              "Edge-LLM's page measures a Jetson AGX Thor (Blackwell), not an Orin.", "",
              "Not measured: " + "; ".join(r["not_measured"]) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
