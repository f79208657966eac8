"""The android (ExecuTorch + XNNPACK) package of the demo model against what a user would
otherwise ship, side by side in one run.

Variants, all but export_llm's exported the same way (the package's attention, program.json
"attention": ExecuTorch's custom SDPA and KV-cache ops for Llama-like families; torch.export,
XNNPACK partitioner, ExecuTorch's runtime) so only the weights differ:

* `apq-sdk` : the package (the plan's 4/16-bit layers, GPTQ, int8 per-token dynamic activations;
  an android-lowbit package also has 2/3-bit layers and a tied head on apq::lowbit_linear);
* `apq-sdk <target>` (with --also-package): further android or android-lowbit packages of the
  same model, e.g. the 4.0-bits-per-weight android-lowbit package beside the android one;
* `apq-sdk @ recipe size` (with --match-recipe-size): an android package built with the
  recipe's bits per weight as its budget, so accuracy is compared at equal size;
* `ExecuTorch export_llm 8da4w` : what a user of ExecuTorch would ship, the peer the ratios are
  against: `export_llm` itself (ExecuTorch's own Llama transformer with its custom SDPA and
  KV-cache operators, dynamic shapes, XNNPACK) on the same float weights, `quantization.qmode=
  8da4w` at the group size it accepts for this model (64: 128 does not divide SmolLM2's
  576-wide layers), default quantizer, embeddings as it leaves them (float), the package's
  maximum context; Llama-architecture models only;
* `ExecuTorch 8da4w, apq-sdk program` : the same recipe (`quantize_model_`, what export_llm runs
  for 8da4w) in apq-sdk's program, so only the weights differ from `apq-sdk`;
* `float .pte` : the unquantized model (FP32, dequantized Q4_1) in the same program;
* `ONNX Runtime` (with --ort-package): the arm64-linux package of the same model.

Per variant: model file size, perplexity on the first N windows of wikitext2-test, mean
KL(unquantized || variant) over every predicted position, and decode speed here (x86-64, the
same thread count for every runtime): median over rounds of 32 decode steps after a 128-token
prefill, each round timing every runtime once, in turn.

    apq-sdk build --target android --model demo -o apq-out
    apq-sdk build --target android-lowbit --model demo -o apq-out    # 4.0 bits per weight
    python bench/bench_executorch.py --package apq-out/SmolLM2-135M-Instruct-android \\
        --also-package apq-out/SmolLM2-135M-Instruct-android-lowbit \\
        --ort-package apq-out/SmolLM2-135M-Instruct-arm64-linux --match-recipe-size

Writes OUT.json and OUT.md (default bench/results/executorch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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
PEER = "ExecuTorch export_llm 8da4w"  # the ratios' denominator
RECIPE = "ExecuTorch 8da4w, apq-sdk program"
PREFILL, DECODE = 128, 32


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class Scores:
    """Summed NLL and KL(unquantized || variant) over the windows."""

    def __init__(self):
        self.nll = 0.0
        self.kl = 0.0
        self.count = 0

    def add(self, logits: np.ndarray, fp32_logp: np.ndarray, row: np.ndarray) -> None:
        logp = log_softmax(logits[:-1])
        self.nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        p = np.exp(fp32_logp[:-1])
        self.kl += float((p * (fp32_logp[:-1] - logp)).sum())
        self.count += len(row) - 1

    def to_dict(self) -> dict:
        return {"perplexity": math.exp(self.nll / self.count), "kl_mean": self.kl / self.count}


def pte_program(model, max_context: int, attention: str, partitioner_factory) -> bytes:
    from apq_sdk.targets.executorch.program import export_program, lower_program

    import torch

    with torch.no_grad():
        exported = export_program(model, max_context, attention)
    return lower_program(exported, partitioner_factory(), {}).to_executorch().buffer


def decode_run(runner, ids: np.ndarray, steps: int = DECODE, prefill: int = PREFILL) -> float:
    """Seconds for `steps` greedy decode steps after a `prefill`-token prompt."""
    logits, state = runner.step(ids[:prefill], None)
    token = int(np.argmax(logits[-1]))
    started = time.perf_counter()
    for _ in range(steps):
        logits, state = runner.step(np.array([token]), state)
        token = int(np.argmax(logits[-1]))
    return time.perf_counter() - started


def decode_speed(runner, ids: np.ndarray, runs: int, steps: int = DECODE,
                 prefill: int = PREFILL) -> dict:
    """Median over `runs` of `steps` greedy decode steps after a `prefill`-token prompt."""
    return decode_speeds({"runner": runner}, ids, runs, steps, prefill)["runner"]


def decode_speeds(runners: dict, ids: np.ndarray, runs: int, steps: int = DECODE,
                  prefill: int = PREFILL) -> dict:
    """Median over `runs` rounds; each round times every runner once, in turn, so a slow spell
    of a shared machine falls on all of them alike rather than on whichever ran then."""
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, runner in runners.items():
            times[name].append(decode_run(runner, ids, steps, prefill))
    return {name: {"decode_tokens_per_s": steps / statistics.median(t), "runs": runs,
                   "seconds": [round(x, 4) for x in t]} for name, t in times.items()}


def export_llm_program(float_model, max_context: int, group: int, work: Path) -> Path:
    """ExecuTorch's `export_llm` (export_llama) with its 8da4w recipe on `float_model`'s weights,
    written as a Meta-layout checkpoint and params file (`use_hf_rope`: transformers' rotary
    layout, so q and k need no permutation). Returns the .pte."""
    import torch
    from executorch.examples.models.llama.export_llama_lib import export_llama
    from executorch.extension.llm.export.config.llm_config import LlmConfig, ModelType

    config = float_model.config
    if config.model_type != "llama":
        raise ValueError(f"export_llm's Llama transformer does not run {config.model_type!r}")
    state = float_model.state_dict()
    roles = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    meta = {"tok_embeddings.weight": state["model.embed_tokens.weight"],
            "norm.weight": state["model.norm.weight"]}
    for i in range(config.num_hidden_layers):
        for hf, name in roles.items():
            meta[f"layers.{i}.{name}.weight"] = state[f"model.layers.{i}.{hf}.weight"]
    meta["output.weight"] = state.get("lm_head.weight", meta["tok_embeddings.weight"])
    checkpoint, params = work / "export_llm.pth", work / "export_llm_params.json"
    torch.save({k: v.contiguous().clone() for k, v in meta.items()}, checkpoint)
    rope = getattr(config, "rope_parameters", None) or {}
    params.write_text(json.dumps({
        "dim": config.hidden_size, "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size, "hidden_dim": config.intermediate_size,
        "norm_eps": config.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
        "use_scaled_rope": False, "use_hf_rope": True}))
    llm = LlmConfig()
    llm.base.model_class = ModelType("smollm2")  # export_llama's Llama transformer
    llm.base.params, llm.base.checkpoint = str(params), str(checkpoint)
    llm.base.metadata = json.dumps({"get_bos_id": config.bos_token_id,
                                    "get_eos_ids": [config.eos_token_id]})
    llm.model.use_kv_cache = llm.model.use_sdpa_with_kv_cache = True
    llm.model.enable_dynamic_shape = True
    llm.export.max_seq_length = llm.export.max_context_length = max_context
    # a name ending in .pte is used as it is (not joined to output_dir)
    llm.export.output_dir, llm.export.output_name = str(work), str(work / "export_llm_8da4w.pte")
    llm.debug.generate_full_logits = True  # perplexity needs every position's logits
    llm.quantization.qmode, llm.quantization.group_size = "8da4w", group
    llm.backend.xnnpack.enabled = llm.backend.xnnpack.extended_ops = True
    written = Path(export_llama(llm))
    checkpoint.unlink()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True, help="an android package directory")
    parser.add_argument("--also-package", action="append", default=[],
                        help="another android or android-lowbit package of the model (repeat)")
    parser.add_argument("--ort-package", default=None, help="an arm64-linux package of the model")
    parser.add_argument("--model", default=None,
                        help="the unquantized model (default: the one the manifest names)")
    parser.add_argument("--recipe-group", type=int, default=64)
    parser.add_argument("--match-recipe-size", action="store_true",
                        help="also build an android package at the recipe's bits per weight")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5,
                        help="decode timing rounds, every runtime once a round (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text", default=None, help="default: wikitext2-test")
    parser.add_argument("--out", default=str(RESULTS / "executorch"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.extension.llm.export.quantize import quantize_model_

    from apq_sdk.builder import BuildRequest, build
    from apq_sdk.calibration import eval_text_path, eval_windows
    from apq_sdk.checkpoint import load_quantized, read_checkpoint
    from apq_sdk.model_io import load_model
    from apq_sdk.package import read_manifest, reference_dir
    from apq_sdk.targets.executorch.target import PteDecoder

    class ExportLlmDecoder(PteDecoder):
        """export_llm's program: forward(tokens [1, n], input_pos [1]), its custom ops loaded."""

        def __init__(self, path, threads=1):
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

            super().__init__(path, threads=threads)

        def _run(self, ids, start):
            ids = np.asarray(ids, dtype=np.int64)
            logits = self.method.execute([torch.from_numpy(ids.copy())[None],
                                          torch.tensor([start], dtype=torch.long)])[0]
            return logits.reshape(-1, logits.shape[-1]).numpy().astype(np.float32, copy=True)

    started = time.time()
    package = Path(args.package)
    manifest = read_manifest(package)
    android = ("android", "android-lowbit")
    for path in (package, *map(Path, args.also_package)):
        built_for = read_manifest(path)["target"]["name"]
        if built_for not in android:
            raise SystemExit(f"bench_executorch: {path} was built for {built_for}; this bench "
                             f"measures {' and '.join(android)} packages")
    checkpoint = read_checkpoint(reference_dir(package, manifest))
    model_spec = args.model or manifest["model"]["spec"]
    float_model, tokenizer, info = load_model(model_spec)
    float_model.eval()
    program = json.loads((package / "program.json").read_text())
    window_len = min(args.window_len, program["max_context"])
    text = Path(args.text) if args.text else eval_text_path()
    windows = eval_windows(tokenizer, text, window_len, args.windows or None).numpy()
    n_params = checkpoint.plan.totals.model_params

    work = Path(tempfile.mkdtemp(prefix="apq-bench-et-"))
    variants: dict[str, dict] = {}
    runners: dict[str, object] = {}

    def add_pte(name: str, path: Path, what: str, extra: dict | None = None,
                runner=PteDecoder) -> None:
        runners[name] = runner(path, threads=args.threads)
        size = path.stat().st_size
        variants[name] = {"what": what, "model_bytes": size,
                          "bits_per_weight": 8 * size / n_params, **(extra or {})}

    from apq_sdk.targets.base import get_target

    def package_runner(path):  # the target's own runner (it loads apq-sdk's kernels if needed)
        return lambda pte, threads: get_target(read_manifest(path)["target"]["name"])().runner(
            path, threads=threads)

    t = checkpoint.plan.totals
    add_pte("apq-sdk", package / "model.pte",
            f"this package ({manifest['target']['name']}; apq-sdk plan, GPTQ)",
            {"planned_bits_per_weight": t.target_bits_per_weight}, runner=package_runner(package))
    for other in map(Path, args.also_package):
        other_manifest = read_manifest(other)
        totals = read_checkpoint(reference_dir(other, other_manifest)).plan.totals
        name = f"apq-sdk {other_manifest['target']['name']}"
        add_pte(name, other / "model.pte",
                f"the {other_manifest['target']['name']} package {other.name} (apq-sdk plan at "
                f"{totals.target_bits_per_weight:.2f} bits per weight, GPTQ)",
                {"planned_bits_per_weight": totals.target_bits_per_weight},
                runner=package_runner(other))

    print("float .pte: export and lower", flush=True)
    fp32_path = work / "float.pte"
    attention = program.get("attention", "static-cache")
    fp32_path.write_bytes(pte_program(load_model(model_spec)[0].eval(), program["max_context"],
                                      attention, lambda: [XnnpackPartitioner()]))
    add_pte("float .pte", fp32_path, "the unquantized model (FP32) in the same program")

    print(f"ExecuTorch export_llm 8da4w (group {args.recipe_group}): export and lower",
          flush=True)
    try:
        peer_path = export_llm_program(load_model(model_spec)[0].eval(), program["max_context"],
                                       args.recipe_group, work)
    except ValueError as exc:
        print(f"ExecuTorch export_llm 8da4w: skipped ({exc})", flush=True)
    else:
        add_pte(PEER, peer_path,
                f"ExecuTorch's export_llm: its Llama transformer with custom SDPA and KV-cache "
                f"ops, quantization.qmode=8da4w, group_size={args.recipe_group}, embeddings "
                f"left float, max context {program['max_context']}",
                runner=ExportLlmDecoder)

    print(f"ExecuTorch 8da4w (group {args.recipe_group}) in apq-sdk's program: quantize, "
          f"export and lower", flush=True)
    recipe_model = load_model(model_spec)[0].eval()
    quantize_model_(recipe_model, qlinear_config="8da4w", qlinear_group_size=args.recipe_group)
    recipe_path = work / "recipe.pte"
    recipe_path.write_bytes(pte_program(recipe_model, program["max_context"], attention,
                                        lambda: [XnnpackPartitioner()]))
    del recipe_model
    add_pte(RECIPE, recipe_path,
            f"ExecuTorch's LLM recipe in apq-sdk's program: quantize_model_(qlinear_config="
            f"'8da4w', qlinear_group_size={args.recipe_group}), embeddings left float")

    if args.match_recipe_size:
        bpw = min(16.0, math.floor(variants[RECIPE]["bits_per_weight"] * 1000) / 1000)
        print(f"apq-sdk at the recipe's size: building at {bpw} bits per weight", flush=True)
        calib = checkpoint.plan.calibration  # the package's own calibration settings
        source = calib.source.split(":", 1)[-1] if calib.kind == "file" else None
        matched = build(BuildRequest(target="android", model=model_spec, output=work / "matched",
                                     bits_per_weight=bpw, verify=False, calib=source,
                                     samples=calib.num_samples, seq_len=calib.seq_len,
                                     seed=calib.seed), log=print)
        add_pte("apq-sdk @ recipe size", matched / "model.pte",
                f"an android package built with --bits-per-weight {bpw}",
                {"planned_bits_per_weight": read_checkpoint(reference_dir(matched)).plan.totals
                 .target_bits_per_weight})

    if args.ort_package:
        ort_dir = Path(args.ort_package)
        ort_target = get_target(read_manifest(ort_dir)["target"]["name"])()
        runners["ONNX Runtime"] = ort_target.runner(ort_dir, threads=args.threads)
        size = sum(p.stat().st_size for p in ort_target.model_files(ort_dir))
        variants["ONNX Runtime"] = {"what": f"the {ort_target.name} package (MatMulNBits)",
                                    "model_bytes": size, "bits_per_weight": 8 * size / n_params}

    reference = load_quantized(checkpoint.path, checkpoint=checkpoint).eval()
    scores = {name: Scores() for name in [*runners, "apq-sdk torch reference", "FP32 torch"]}
    for i, row in enumerate(windows):
        ids = row.astype(np.int64)
        with torch.no_grad():
            fp32 = float_model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
            ref = reference(torch.from_numpy(ids)[None]).logits[0].float().numpy()
        fp32_logp = log_softmax(fp32)
        scores["FP32 torch"].add(fp32, fp32_logp, ids)
        scores["apq-sdk torch reference"].add(ref, fp32_logp, ids)
        for name, runner in runners.items():
            scores[name].add(runner.full(ids), fp32_logp, ids)
        print(f"window {i + 1}/{len(windows)}", flush=True)
    for name in runners:
        variants[name].update(scores[name].to_dict())
    print(f"decode: {args.runs} rounds over {len(runners)} runtimes", flush=True)
    for name, speed in decode_speeds(runners, windows[0].astype(np.int64), args.runs).items():
        variants[name].update(speed)
    torch_rows = {name: scores[name].to_dict() for name in ("apq-sdk torch reference",
                                                            "FP32 torch")}
    import executorch.version

    result = {
        "command": "python bench/bench_executorch.py " + " ".join(sys.argv[1:]),
        "model": info.name, "package": str(package), "params": n_params,
        "executorch": executorch.version.__version__, "threads": args.threads,
        "plan": {"target_bits_per_weight": t.target_bits_per_weight,
                 "linear_bits_per_weight": t.linear_bits_per_weight,
                 "bits": sorted({m.bits for m in checkpoint.plan.modules.values()}),
                 "group_sizes": sorted({m.group_size for m in checkpoint.plan.modules.values()
                                        if m.group_size}),
                 "head_bits": checkpoint.plan.modules["lm_head"].bits},
        "windows": int(windows.shape[0]), "window_len": int(window_len), "text": str(text),
        "decode": {"prefill": PREFILL, "decode_steps": DECODE},
        "variants": variants, "torch": torch_rows,
        "total_seconds": time.time() - started,
    }
    write_results(args.out, result, render_markdown(result))


def paired_speed(x: dict, peer: dict) -> str:
    """The speed ratio round by round (the same round's seconds of the peer over x's): its
    median and range, where both were timed in the same rounds."""
    mine, theirs = x.get("seconds") or [], peer.get("seconds") or []
    if len(mine) < 2 or len(mine) != len(theirs):
        return ""
    ratios = sorted(p / m for p, m in zip(theirs, mine))
    return (f" (round by round: median x{statistics.median(ratios):.2f}, "
            f"x{ratios[0]:.2f}-x{ratios[-1]:.2f})")


def render_markdown(r: dict) -> str:
    v = r["variants"]
    peer_name = PEER if PEER in v else RECIPE
    peer = v.get(peer_name)
    lines = [f"# ExecuTorch + XNNPACK (android targets): {r['model']}", "",
             f"Command: `{r['command']}`", "",
             f"ExecuTorch {r['executorch']}, {r['threads']} thread(s), x86-64 (XNNPACK's x86 "
             f"kernels; a phone runs its Arm ones). Perplexity and KL(unquantized || variant): "
             f"first {r['windows']} windows of {r['window_len']} tokens of {Path(r['text']).name}"
             f". Decode: median of {next(iter(v.values()))['runs']} rounds, every runtime "
             f"once a round, of {r['decode']['decode_steps']} steps after a "
             f"{r['decode']['prefill']}-token prefill.", "",
             f"| variant | model file | bits/weight | perplexity | KL | decode tok/s | vs "
             f"{peer_name} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, x in v.items():
        ratio = ""
        if peer is not None and name != peer_name:
            ratio = (f"size x{x['model_bytes'] / peer['model_bytes']:.2f}, KL "
                     f"x{x['kl_mean'] / peer['kl_mean']:.2f}, speed "
                     f"x{x['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}"
                     f"{paired_speed(x, peer)}")
        lines.append(f"| {name} | {x['model_bytes'] / 2**20:.1f} MiB | "
                     f"{x['bits_per_weight']:.2f} | {x['perplexity']:.3f} | {x['kl_mean']:.4f} | "
                     f"{x['decode_tokens_per_s']:.1f} | {ratio} |")
    for name, x in r["torch"].items():
        lines.append(f"| {name} | | | {x['perplexity']:.3f} | {x['kl_mean']:.4f} | | |")
    lines += ["", "Variants:", ""]
    lines += [f"- **{name}**: {x['what']}" for name, x in v.items()]
    p = r["plan"]
    lines += ["", f"The package's plan: {p['target_bits_per_weight']:.3f} bits per weight as "
                  f"its target stores it, decoder linears {p['linear_bits_per_weight']:.3f}, "
                  f"bit-widths {p['bits']}, groups {p['group_sizes']}, head {p['head_bits']}-bit.",
              "", f"Total run time {r['total_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
