"""The macos/ios Core AI assets of the demo model against Apple's own default recipes, side by
side in one run, every asset built the same way (the apq-sdk decoder, torch.export, coreai-torch)
and run in coreai-core's CPU reference runtime for Linux, so only the weights differ:

* `apq-sdk @ B` : macos packages planned at B bits per weight (default 4.0 and 3.0), GPTQ,
  2/4/8/16-bit layers as the plan says;
* `Apple int4 (coreai-opt)` : apple/coreai-models' macOS default `4bit` preset
  (export/presets.py): coreai-opt `Quantizer`, int4 `symmetric_with_clipping` per block of 32
  along the input, every linear and the embedding (LlamaRMSNorm excluded, as Apple excludes its
  own norm), no calibration;
* `Apple palettized 4-bit g32 (coreai-opt)` : its iOS default `4bit_weight_palettized_group32`:
  coreai-opt `KMeansPalettizer`, a 16-entry table per 32 output channels, the embedding left
  float16.

Per variant: the asset's bytes and bits per weight (against FP16 of every parameter), and, on
the first N windows of wikitext2-test, perplexity and mean KL(FP32 || variant) over every
predicted position, and decode speed in the reference runtime (median of runs of 32 steps after
a 128-token prefill; the Linux runtime is a CPU reference, not a device). For the apq-sdk assets
it also reads every compressed op back and compares the bits it stores with the plan.

    apq-sdk build --target macos --model demo -o apq-out        # caches the profile
    python bench/bench_coreai.py --windows 8

Writes OUT.json and OUT.md (default bench/results/coreai).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: results_io, bench_executorch

import numpy as np  # noqa: E402
from bench_executorch import Scores, decode_speed, log_softmax  # noqa: E402
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INT4_PRESET = {  # apple/coreai-models python/src/coreai_models/export/presets.py, MACOS "4bit"
    "execution_mode": "eager",
    "global_config": {"op_state_spec": {"weight": {
        "dtype": "int4", "qscheme": "symmetric_with_clipping",
        "granularity": {"type": "per_block", "block_size": 32, "axis": 1}}},
        "op_input_spec": None, "op_output_spec": None},
}
PALETTE_PRESET = {  # IOS "4bit_weight_palettized_group32"
    "global_config": {"op_state_spec": {"weight": {
        "n_bits": 4, "granularity": {"type": "per_grouped_channel", "axis": 0,
                                     "group_size": 32}}}},
    "module_type_configs": {"torch.nn.modules.sparse.Embedding": None},
}


class PeerCheckpoint:
    """What the Core AI decoder reads (spec, modules, tensors) for a recipe's weights."""

    def __init__(self, config, modules: dict, tensors: dict):
        from apq_sdk.families import decoder_spec

        self.config, self.modules, self.tensors = config, modules, tensors
        self.spec = decoder_spec(config)


def float_tensors(model) -> dict:
    """Every parameter of the float model that no recipe touches (norms), float32."""
    return {n: p.detach().float().numpy() for n, p in model.named_parameters()
            if "norm" in n}


def apple_int4(model, example) -> dict:
    """Apple's macOS int4 preset on `model`: {name: CheckpointModule (packed, symmetric)}."""
    import torch.nn.utils.parametrize as parametrize
    from coreai_opt.base_model_compressor import ExportBackend
    from coreai_opt.quantization import Quantizer, QuantizerConfig

    from apq_sdk.checkpoint import CheckpointModule
    from apq_sdk.quant.packing import pack_bits

    preset = copy.deepcopy(INT4_PRESET)
    norm = type(model.model.norm)
    preset["module_type_configs"] = {f"{norm.__module__}.{norm.__name__}": None}
    quantizer = Quantizer(model, QuantizerConfig.from_dict({"quantization_config": preset}))
    done = quantizer.finalize(quantizer.prepare(example_inputs=example),
                              backend=ExportBackend.CoreAI)
    out = {}
    for name, module in done.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        dq = module.parametrizations.weight[0]
        codes = dq.quantized_data.numpy().astype(np.int16)
        if np.any(dq.zero_point.numpy()):
            raise SystemExit(f"{name}: the int4 preset stored zero points; expected none")
        n, k = codes.shape
        out[name] = CheckpointModule(
            name=name, kind="packed", shape=(n, k), bits=4, group_size=k // dq.scale.shape[1],
            arrays={"qweight": pack_bits((codes + 8).astype(np.uint8), 4),
                    "scales": dq.scale.detach().numpy().astype(np.float16)})
    return out


class LutWeight:
    """A palettized weight for the decoder: coreai::lut_to_dense(indices, lut)."""

    def __new__(cls, module):
        import torch
        from torch import nn

        class _Lut(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("indices", torch.from_numpy(module.arrays["indices"]))
                self.register_buffer("lut", torch.from_numpy(module.arrays["lut"]))

            def forward(self):
                return torch.ops.coreai.lut_to_dense(self.indices, self.lut, 0)

        return _Lut()


def apple_palettized(model, example) -> dict:
    """Apple's iOS palettization preset: {name: module-like (kind "lut")}."""
    import torch.nn.utils.parametrize as parametrize
    from coreai_opt.base_model_compressor import ExportBackend
    from coreai_opt.palettization.config.palettization_config import KMeansPalettizerConfig
    from coreai_opt.palettization.kmeans import KMeansPalettizer

    from apq_sdk.checkpoint import CheckpointModule

    palettizer = KMeansPalettizer(model, KMeansPalettizerConfig.from_dict(
        {"kmeans_palettization_config": copy.deepcopy(PALETTE_PRESET)}))
    done = palettizer.finalize(palettizer.prepare(example_inputs=example, num_workers=1),
                               backend=ExportBackend.CoreAI)
    out = {}
    for name, module in done.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            pm = module.parametrizations.weight[0]
            out[name] = CheckpointModule(
                name=name, kind="lut", shape=tuple(pm.indices.shape), bits=4,
                arrays={"indices": pm.indices.numpy().astype(np.uint8),
                        "lut": pm.lut.detach().numpy().astype(np.float16)})
    return out


def stored_vs_plan(package: Path, plan) -> dict:
    """Bits each compressed op stores (data, scales, zero points) against the plan's bytes."""
    import json

    from apq_sdk.targets.coreai.weights import stored_weights

    order = json.loads((package / "program.json").read_text())["weights"]["order"]
    records = stored_weights(package / "CoreAI" / "model.aimodel")
    rows, differing = {}, []
    for name, record in zip(order, records):
        entry = plan.modules[name]
        width = int(record["data_type"][2:])
        zero_bits = 0 if entry.symmetric else width * record["zero_point"].size
        stored = width * record["data"].size + 16 * record["scale"].size + zero_bits
        planned = 8 * entry.bytes
        rows[name] = {"planned_bits": entry.bits, "stored_type": record["data_type"],
                      "stored_bits_per_weight": stored / entry.params,
                      "planned_bits_per_weight": planned / entry.params}
        if stored != planned:
            differing.append(name)
    by_bits: dict[int, list] = {}
    for row in rows.values():
        by_bits.setdefault(row["planned_bits"], []).append(row)
    gaps = [r["stored_bits_per_weight"] - r["planned_bits_per_weight"] for r in rows.values()]
    return {"ops": len(rows), "ops_storing_other_than_planned": differing,
            "stored_minus_planned_bits_per_weight": {"min": float(min(gaps)),
                                                     "max": float(max(gaps))},
            "by_bits": {str(b): {"ops": len(r), "stored_types": sorted({x["stored_type"] for x in r}),
                                 "stored_bits_per_weight": float(np.mean(
                                     [x["stored_bits_per_weight"] for x in r]))}
                        for b, r in sorted(by_bits.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--budgets", default="4.0,3.0", help="apq-sdk bits per weight")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--runs", type=int, default=1, help="decode timing runs (median)")
    parser.add_argument("--decode-steps", type=int, default=4,
                        help="decode steps per timing run (the CPU reference runtime expands "
                             "every compressed weight on each call: ~15 s per step on the demo)")
    parser.add_argument("--text", default=None, help="default: wikitext2-test")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration tokens each")
    parser.add_argument("--out", default=str(RESULTS / "coreai"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from importlib.metadata import version

    from apq_sdk.builder import BuildRequest, build
    from apq_sdk.calibration import eval_text_path, eval_windows
    from apq_sdk.checkpoint import load_quantized, read_checkpoint
    from apq_sdk.model_io import load_model
    from apq_sdk.package import reference_dir
    from apq_sdk.targets.coreai.program import export_entry_points, save_asset
    from apq_sdk.targets.coreai.target import ASSET_NAME, BUNDLE_DIR, AssetRunner
    from apq_sdk.targets.coreai.weights import module_weight

    started = time.time()
    float_model, tokenizer, info = load_model(args.model)
    float_model.eval()
    n_params = sum(p.numel() for p in float_model.parameters())
    window_len = args.window_len
    text = Path(args.text) if args.text else eval_text_path()
    windows = eval_windows(tokenizer, text, window_len, args.windows or None).numpy()
    work = Path(tempfile.mkdtemp(prefix="apq-bench-coreai-"))
    max_context = window_len + 1  # prefill a whole window; the decoder's cache is this long
    variants: dict[str, dict] = {}
    runners: dict[str, object] = {}
    references: dict[str, object] = {}

    def add(name: str, asset: Path, what: str, extra: dict | None = None) -> None:
        size = sum(p.stat().st_size for p in asset.rglob("*") if p.is_file())
        runners[name] = AssetRunner(asset)
        variants[name] = {"what": what, "model_bytes": size, "bits_per_weight": 8 * size / n_params,
                          "vs_fp16": size / (2 * n_params), **(extra or {})}

    for budget in [float(b) for b in args.budgets.split(",") if b]:
        name = f"apq-sdk @ {budget}"
        print(f"{name}: plan, quantize, lower", flush=True)
        package = build(BuildRequest(target="macos", model=args.model, output=work / name,
                                     bits_per_weight=budget, verify=False,
                                     samples=args.samples, seq_len=args.seq_len), log=print)
        checkpoint = read_checkpoint(reference_dir(package))
        references[name] = load_quantized(checkpoint.path, checkpoint=checkpoint).eval()
        t = checkpoint.plan.totals
        add(name, package / BUNDLE_DIR / ASSET_NAME,
            f"a macos package at --bits-per-weight {budget} (apq-sdk plan, GPTQ)",
            {"planned_bits_per_weight": t.target_bits_per_weight,
             "bits": sorted({m.bits for m in checkpoint.plan.modules.values()}),
             "stored_vs_plan": stored_vs_plan(package, checkpoint.plan)})

    example = (torch.zeros((1, 8), dtype=torch.long),)
    tensors = float_tensors(float_model)
    for name, recipe, what in (
            ("Apple int4 (coreai-opt)", apple_int4,
             "apple/coreai-models' macOS '4bit' preset: coreai-opt int4 symmetric_with_clipping "
             "per block of 32, embedding included"),
            ("Apple palettized 4-bit g32 (coreai-opt)", apple_palettized,
             "apple/coreai-models' iOS '4bit_weight_palettized_group32' preset: coreai-opt "
             "k-means, 16 entries per 32 output channels, embedding float16")):
        print(f"{name}: compress, export, convert", flush=True)
        modules = recipe(load_model(args.model)[0].eval(), example)
        embedding = "model.embed_tokens"
        if embedding not in modules and "lm_head" in modules:  # the embedding left float16
            from apq_sdk.checkpoint import CheckpointModule

            weight = float_model.get_input_embeddings().weight.detach().numpy()
            modules[embedding] = CheckpointModule(name=embedding, kind="float16",
                                                  shape=tuple(weight.shape),
                                                  arrays={"weight": weight.astype(np.float16)})
        peer = PeerCheckpoint(float_model.config, modules, tensors)

        def weights(module):
            return LutWeight(module) if module.kind == "lut" else module_weight(module)

        programs, order = export_entry_points(peer, max_context, weights)
        asset = work / name.split()[1] / ASSET_NAME
        asset.parent.mkdir(parents=True, exist_ok=True)
        save_asset(programs, order, asset, {"apq.recipe": name})
        add(name, asset, what)

    scores = {name: Scores() for name in [*runners, "FP32 torch"]}
    ref_scores = {name: Scores() for name in references}
    for i, row in enumerate(windows):
        ids = row.astype(np.int64)
        with torch.no_grad():
            fp32 = float_model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
        fp32_logp = log_softmax(fp32)
        scores["FP32 torch"].add(fp32, fp32_logp, ids)
        for name, reference in references.items():
            with torch.no_grad():
                ref = reference(torch.from_numpy(ids)[None]).logits[0].float().numpy()
            ref_scores[name].add(ref, fp32_logp, ids)
        for name, runner in runners.items():
            scores[name].add(runner.full(ids), fp32_logp, ids)
        print(f"window {i + 1}/{len(windows)} ({time.time() - started:.0f} s)", flush=True)
    for name, runner in runners.items():
        variants[name].update(scores[name].to_dict())
        variants[name].update(decode_speed(runner, windows[0].astype(np.int64), args.runs,
                                           args.decode_steps))
    result = {
        "command": "python bench/bench_coreai.py " + " ".join(sys.argv[1:]),
        "model": info.name, "params": n_params, "fp16_bytes": 2 * n_params,
        "coreai_torch": version("coreai-torch"), "coreai_core": version("coreai-core"),
        "coreai_opt": version("coreai-opt"),
        "windows": int(windows.shape[0]), "window_len": int(window_len), "text": str(text),
        "variants": variants, "fp32_torch": scores["FP32 torch"].to_dict(),
        "apq_torch_references": {n: s.to_dict() for n, s in ref_scores.items()},
        "total_seconds": time.time() - started,
    }
    write_results(args.out, result, render_markdown(result))


def render_markdown(r: dict) -> str:
    lines = [f"# Core AI assets of {r['model']}: apq-sdk plans against Apple's default recipes",
             "", f"Command: `{r['command']}`", "",
             f"coreai-torch {r['coreai_torch']}, coreai-core {r['coreai_core']} (CPU reference "
             f"runtime for Linux), coreai-opt {r['coreai_opt']}. Perplexity and KL(FP32 || "
             f"variant) on the first {r['windows']} windows of {r['window_len']} tokens of "
             f"{Path(r['text']).name}; FP32 (dequantized Q4_1) perplexity "
             f"{r['fp32_torch']['perplexity']:.2f}. FP16 of every parameter: "
             f"{r['fp16_bytes'] / 1e6:.1f} MB.", "",
             "| variant | asset MB | bits/weight | vs FP16 | perplexity | KL | decode tok/s (CPU ref.) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['model_bytes'] / 1e6:.1f} | {v['bits_per_weight']:.2f} | "
                     f"{v['vs_fp16']:.3f} | {v['perplexity']:.2f} | {v['kl_mean']:.4f} | "
                     f"{v.get('decode_tokens_per_s', float('nan')):.2f} |")
    lines += ["", "Bits each apq-sdk op stores against its plan (data, float16 scales, zero "
              "points; read back from the saved asset):", ""]
    for name, v in r["variants"].items():
        if "stored_vs_plan" in v:
            s = v["stored_vs_plan"]
            parts = ", ".join(f"{b}-bit: {x['ops']} ops as {'/'.join(x['stored_types'])}, "
                              f"{x['stored_bits_per_weight']:.3f} bits/weight"
                              for b, x in s["by_bits"].items())
            gap = s["stored_minus_planned_bits_per_weight"]
            lines.append(f"* {name}: {s['ops']} ops; {parts}; stored minus planned bits per "
                         f"weight per op: {gap['min']:+.3f} to {gap['max']:+.3f} (the core pads "
                         f"each row's packed zero points to whole bytes; the asset does not)")
    lines += ["", "The torch references of the apq-sdk plans (same weights, torch eager): " + ", ".join(
        f"{n}: perplexity {s['perplexity']:.2f}, KL {s['kl_mean']:.4f}"
        for n, s in r["apq_torch_references"].items()), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
