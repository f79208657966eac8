"""Every model family apq-sdk describes, through the shared ONNX graph and the arm64-linux package.

No real weights of Qwen3, Gemma 2/3, SmolLM3, Llama 3.2 or Phi-4-mini can be had on this machine
(no model hub), so this measures what a tiny random model of each family and RoPE/window variant
can show (apq_sdk.testing: every weight random, norms and biases too; windows of 8 tokens):

* the float32 ONNX graph against transformers' own forward: the full sequence, and token-by-token
  decode through the KV cache from token 4 to 64 (past every sliding window);
* how far the graph is from transformers with its sliding windows switched off (a window that is
  a no-op would show ~0 here);
* the arm64-linux package (`apq_sdk.build`: profile, plan at 45 % of float16, quantize, lower,
  verify on the shipped text): weights against the checkpoint, the float twin, KV-cache decode
  against the full sequence, and the package's KL to the unquantized model against the torch
  reference's;
* causal LMs the registry does not describe (olmo2, granite): the core with allow_unknown
  (profile, plan, quantize, load, eval against the unquantized model), and the target's refusal.

    python bench/bench_families.py                 # every family (~10 min on 2 cores)
    python bench/bench_families.py --only qwen3 gemma3_text
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import apq_sdk  # noqa: E402
from apq_sdk.calibration import builtin_text  # noqa: E402
from apq_sdk.errors import ApqError  # noqa: E402
from apq_sdk.families import decoder_spec  # noqa: E402
from apq_sdk.model_io import load_model  # noqa: E402
from apq_sdk.plan_file import load_plan  # noqa: E402
from apq_sdk.testing import TINY_MODELS, UNREGISTERED, make_tiny_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = dict(samples=8, seq_len=48)


def rope_kinds(config) -> list[str]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    nested = [v for v in params.values() if isinstance(v, dict)]
    kinds = {p.get("rope_type", "default") for p in (nested or [params])}
    return sorted(k for k in kinds if k != "default")


def features(spec, config) -> str:
    out = [f"RoPE {k}" for k in rope_kinds(config)]
    if spec.stored_fused:
        out.append("fused qkv, gate_up")
    if spec.qk_norm:
        out.append("q/k norm")
    if spec.sandwich_norms:
        out.append("pre+post norms")
    if spec.norm_offset:
        out.append("norm 1+w")
    if spec.embed_scale:
        out.append("embed x sqrt(d)")
    if spec.attn_softcap or spec.final_softcap:
        out.append("soft-caps")
    windows = [w for w in spec.sliding_windows if w is not None]
    if windows:
        out.append(f"window {max(windows)} on {len(windows)}/{spec.num_layers} layers")
    if len(spec.rope_tables) > 1:
        out.append(f"{len(spec.rope_tables)} RoPE tables")
    if any(r is None for r in spec.layer_rope):
        out.append(f"no RoPE on {sum(r is None for r in spec.layer_rope)} of {spec.num_layers} "
                   f"layers")
    rotary = {len(t.inv_freq) * 2 for t in spec.rope_tables.values()}
    if rotary and max(rotary) < spec.head_dim:
        out.append(f"rotary {max(rotary)}/{spec.head_dim}")
    if spec.head_dim * spec.num_heads != spec.hidden_size:
        out.append(f"head_dim {spec.head_dim}")
    if spec.num_kv_heads != spec.num_heads:
        out.append(f"GQA {spec.num_heads}/{spec.num_kv_heads}")
    return ", ".join(out) or "-"


def float_graph(path: Path, work: Path) -> dict:
    """The float32 graph against transformers: full sequence, decode past the window, and the
    graph without windows."""
    from apq_sdk.targets.onnx_graph import (GraphOptions, build_decoder,
                                            float_weights_from_model, save_model)
    from apq_sdk.targets.onnxruntime.linears import MatMulNBitsLowering
    from apq_sdk.targets.onnxruntime.target import OnnxDecoder

    model, _, _ = load_model(path)
    config, tensors, modules = float_weights_from_model(model)
    save_model(build_decoder(config, tensors, modules, MatMulNBitsLowering()), work / "fp32.onnx")
    runner = OnnxDecoder(work / "fp32.onnx")
    ids = np.random.default_rng(0).integers(3, 380, 64).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids[None])).logits[0].numpy()
    scale = float(np.abs(ref).max())
    full = float(np.abs(runner.full(ids) - ref).max()) / scale
    logits, past = runner.step(ids[:4], None)
    decode = 0.0
    for t in range(4, 64):
        logits, past = runner.step(ids[t:t + 1], past)
        decode = max(decode, float(np.abs(logits[0] - ref[t]).max()) / scale)
    spec = decoder_spec(config)
    unwindowed = None
    if any(w is not None for w in spec.sliding_windows):
        save_model(build_decoder(config, tensors, modules, MatMulNBitsLowering(),
                                 options=GraphOptions(sliding_windows=False)),
                   work / "fp32-nowindow.onnx")
        far = OnnxDecoder(work / "fp32-nowindow.onnx").full(ids)
        unwindowed = float(np.abs(far - ref).max()) / scale
    return dict(features=features(spec, model.config), float_full=full, float_decode=decode,
                float_unwindowed=unwindowed, tokens=len(ids))


def package(path: Path, work: Path, calib: Path) -> dict:
    start = time.perf_counter()
    out = apq_sdk.build("arm64-linux", model=path, output=work / "pkg", calib=str(calib),
                        memory_reduction=0.55, verify_windows=1, **SMALL)
    seconds = time.perf_counter() - start
    verify = json.loads((out / "verify.json").read_text())
    totals = load_plan(out / "plan.json").totals
    checks = {c["name"]: c for c in verify["checks"]}
    acc = verify.get("accuracy") or {}
    return dict(
        passed=verify["passed"], build_s=seconds,
        model_bytes=verify["model_bytes"],
        fp16_bytes=2 * totals.model_params, planned_bytes=totals.target_bytes,
        weights_differing=checks["weights equal the checkpoint (modules differing)"]["measured"],
        twin_relative=verify["float_twin"].get("relative") if verify.get("float_twin") else None,
        twin_kl=verify["float_twin"].get("kl_mean") if verify.get("float_twin") else None,
        kv_kl=verify["kv_cache"]["kl_mean"], kv_prefill=verify["kv_cache"]["prefill_tokens"],
        kv_steps=verify["kv_cache"]["decode_steps"],
        kl_package=acc.get("kl_float_package"), kl_reference=acc.get("kl_float_reference"),
        linears_off=checks.get("linears on recorded inputs (nodes off the reference)", {})
        .get("measured"))


def unknown_core(family: str, path: Path, work: Path, calib: Path) -> dict:
    from apq_sdk.calibration import load_calibration
    from apq_sdk.evaluate import evaluate

    sens = apq_sdk.profile(path, calib=str(calib), allow_unknown=True, **SMALL)
    plan = apq_sdk.plan(sens, bits_per_weight=4.5)
    ckpt = apq_sdk.quantize(path, plan, work / "q", calib=str(calib), allow_unknown=True, **SMALL)
    quantized = apq_sdk.load(ckpt)
    reference, tok, _ = load_model(path, allow_unknown=True)
    windows, _ = load_calibration(tok, str(calib), num_samples=4, seq_len=48, seed=7)
    result = evaluate(quantized, windows, reference=reference)
    try:
        apq_sdk.build("arm64-linux", model=path, output=work / "pkg", calib=str(calib), **SMALL)
        refusal = "(built: expected a refusal)"
    except ApqError as exc:
        refusal = str(exc).splitlines()[0]
    return dict(features="not in the registry", bits_per_weight=plan.totals.bits_per_weight,
                kl_core=result.kl_divergence, top1=result.top1_agreement, refusal=refusal)


def fmt(x, spec=".1e") -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], command: str, env: dict) -> str:
    lines = [
        "# Model families: the shared ONNX graph and the arm64-linux package, per family", "",
        f"Command: `{command}` ({env['machine']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, onnxruntime {env['onnxruntime']}).", "",
        "Tiny random models (apq_sdk.testing: 2-4 layers, every weight random, windows of 8 "
        "tokens), so these check structure, not accuracy: no real weights of these families can "
        "be had here. Errors are max |difference| / max |logit| over 64 tokens.", "",
        "| model | what it exercises | float graph, full | float graph, decode 4->64 | without "
        "windows | planned / files, of float16 | weights off | float twin KL | KV decode KL "
        "| KL package / reference | verify |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "kl_core" in r:
            continue
        ratio = (f"{r['kl_package']:.3g} / {r['kl_reference']:.3g}"
                 if r.get("kl_package") is not None else "-")
        lines.append(
            f"| {r['model']} | {r['features']} | {fmt(r['float_full'])} | {fmt(r['float_decode'])} "
            f"| {fmt(r['float_unwindowed'])} | {r['planned_bytes'] / r['fp16_bytes']:.0%} / "
            f"{r['model_bytes'] / r['fp16_bytes']:.0%} "
            f"| {r['weights_differing']} | {fmt(r['twin_kl'])} "
            f"| {fmt(r['kv_kl'])} | {ratio} | {'passed' if r['passed'] else 'FAILED'} |")
    unknown = [r for r in rows if "kl_core" in r]
    if unknown:
        lines += ["", "Causal LMs the registry does not describe, through the core with "
                  "`--allow-unknown-arch` (profile, plan at 4.5 bits per weight, quantize, load, "
                  "eval on 4 windows of the calibration text's tokenizer against the unquantized "
                  "model), and what the target says:", "",
                  "| model | bits per weight | KL to unquantized | top-1 agreement | arm64-linux |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for r in unknown:
            lines.append(f"| {r['model']} | {r['bits_per_weight']:.3f} | {r['kl_core']:.4f} | "
                         f"{r['top1']:.1%} | {r['refusal'].replace('|', '/')} |")
    lines += ["", "`planned / files`: the weight bytes the plan counts (budget: 45 % of float16) "
              "and the model files' bytes, graph structure included (large beside weights this "
              "small). `weights off`: modules whose stored integers or scales differ from the "
              "checkpoint.",
              "`without windows`: the same graph with its sliding windows removed, against "
              "transformers (large: the windows do something, and the graph above matches them). "
              "`KL package / reference`: KL(unquantized || int8 package) beside KL(unquantized || "
              "torch reference of the plan) on the shipped verification text; verify bounds the "
              "first by the second plus its margin."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="models to run (default: all)")
    parser.add_argument("--out", default=str(RESULTS / "families"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    import onnxruntime
    import transformers

    names = list(TINY_MODELS) + list(UNREGISTERED)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            sys.exit(f"unknown models {unknown}; choose from {names}")
        names = [n for n in names if n in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="apq-bench-families-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("APQ_CACHE_DIR", str(tmp / "cache"))
        calib = tmp / "calib.txt"
        calib.write_text(builtin_text()[:60_000])
        for name in names:
            work = tmp / name
            work.mkdir()
            path = make_tiny_model(work / "model", name)
            print(f"[{len(rows) + 1}/{len(names)}] {name}", flush=True)
            if name in UNREGISTERED:
                row = dict(model=name, **unknown_core(name, path, work, calib))
            else:
                row = dict(model=name, **float_graph(path, work), **package(path, work, calib))
            print("   ", {k: v for k, v in row.items() if k != "model"}, flush=True)
            rows.append(row)
    env = dict(machine=f"{platform.machine()}, {os.cpu_count()} CPUs", torch=torch.__version__,
               transformers=transformers.__version__, onnxruntime=onnxruntime.__version__)
    command = "python bench/bench_families.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:]
                                                  else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(command=command, env=env, rows=rows),
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, command, env))
    print(out.with_suffix(".md").read_text())
    failed = [r["model"] for r in rows if r.get("passed") is False]
    if failed:
        sys.exit(f"verify failed for {failed}")


if __name__ == "__main__":
    main()
