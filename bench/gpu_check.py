"""`--device cuda` check: the whole core pipeline on an NVIDIA GPU, compared with the CPU.

For every supported family (tiny random-init models), profile -> plan -> quantize runs on cuda and
on cpu from the same inputs; the plans must pick the same bits (the sensitivity maps agree to float
tolerance), and the quantized models' logits must agree. A larger random Llama (about 0.5B
parameters) then gives a profile + quantize time on the GPU. `--device-map` checks accelerate
placement: the Llama tiny model through a per-block map on cuda:0 (hooked path, one GPU) and,
with two or more GPUs, `--device-map balanced` over all of them; each plan must match the plain
cuda run's and the logits must agree. Writes JSON and markdown.

    python bench/gpu_check.py --out bench/results/gpu_check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apq_sdk.calibration import load_calibration  # noqa: E402
from apq_sdk.evaluate import evaluate  # noqa: E402
from apq_sdk.model_io import load_model  # noqa: E402
from apq_sdk.planning import Budget, make_plan  # noqa: E402
from apq_sdk.sensitivity import ProfileSettings, profile_model  # noqa: E402
from apq_sdk.quantizer import quantize_model  # noqa: E402
from apq_sdk.testing import FAMILIES, make_tiny_model  # noqa: E402


def pipeline(path, device: str, samples: int = 16, seq_len: int = 64, device_map=None):
    model, tok, info = load_model(path, device=device, device_map=device_map)
    if device_map:
        from apq_sdk.placement import input_device

        device = input_device(model)
    ids, calib = load_calibration(tok, num_samples=samples, seq_len=seq_len, seed=0)
    fit, _ = load_calibration(tok, num_samples=4, seq_len=seq_len, seed=1)
    t = time.time()
    sens = profile_model(model, info, ids, calib, ProfileSettings(batch_size=8), device, fit_samples=fit)
    plan = make_plan(sens, Budget(bits_per_weight=4.0, scope="linear"), head_bits="8")
    quantize_model(model, info, plan, ids, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, plan, ids, time.time() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/gpu_check")
    parser.add_argument("--big", action="store_true", help="also time a ~0.5B random Llama on cuda")
    parser.add_argument("--device-map", action="store_true",
                        help="also check accelerate device maps (one GPU, and all GPUs if several)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs --device cuda")
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for family in FAMILIES:
        path = make_tiny_model(tmp / family, family)
        gpu_model, gpu_plan, ids, gpu_s = pipeline(path, "cuda")
        cpu_model, cpu_plan, _, cpu_s = pipeline(path, "cpu")
        same_bits = sum(gpu_plan.modules[n].bits == cpu_plan.modules[n].bits for n in gpu_plan.modules)
        with torch.no_grad():
            a = gpu_model(input_ids=ids[:2].cuda()).logits.float().cpu()
            b = cpu_model(input_ids=ids[:2]).logits.float()
        reference, _, _ = load_model(path, device="cuda")
        kl = evaluate(gpu_model, ids[:4], reference=reference, device="cuda").kl_divergence
        rows.append({"family": family, "gpu_seconds": gpu_s, "cpu_seconds": cpu_s,
                     "modules_same_bits": f"{same_bits}/{len(gpu_plan.modules)}",
                     "max_abs_logit_diff_gpu_vs_cpu": float((a - b).abs().max()),
                     "logit_scale": float(b.abs().max()), "kl_vs_fp32_on_gpu": kl})
        print(json.dumps(rows[-1]), flush=True)
    placements = []
    if args.device_map:
        placements = placement_check(tmp)
    big = None
    if args.big:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                             num_attention_heads=12, num_key_value_heads=4, vocab_size=384,
                             max_position_embeddings=1024)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp / "big")
        from apq_sdk.testing import make_tokenizer

        make_tokenizer(384).save_pretrained(tmp / "big")
        params = sum(p.numel() for p in model.parameters())
        del model
        _m, plan, _ids, seconds = pipeline(tmp / "big", "cuda", samples=128, seq_len=512)
        big = {"params": params, "samples": "128 x 512", "profile_plan_quantize_seconds": seconds,
               "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
               "linear_bpw": plan.totals.linear_bits_per_weight}
        print(json.dumps(big), flush=True)
    result = {"command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "rows": rows, "big_model": big, "device_maps": placements}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# --device cuda check ({result['device']}, torch {result['torch']})", "",
             f"Command: `{result['command']}`", "",
             "| family | modules with same bits (cuda vs cpu plan) | max logit diff cuda vs cpu | "
             "logit scale | KL vs FP32 (cuda) | cuda s | cpu s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['family']} | {r['modules_same_bits']} | {r['max_abs_logit_diff_gpu_vs_cpu']:.2e} | "
              f"{r['logit_scale']:.2f} | {r['kl_vs_fp32_on_gpu']:.5f} | {r['gpu_seconds']:.1f} | "
              f"{r['cpu_seconds']:.1f} |" for r in rows]
    if big:
        lines += ["", f"Random Llama, {big['params'] / 1e6:.0f}M parameters, {big['samples']} calibration "
                  f"tokens: profile + plan + quantize {big['profile_plan_quantize_seconds']:.0f} s on the GPU, "
                  f"peak GPU memory {big['peak_gpu_memory_gb']:.1f} GB."]
    if placements:
        lines += ["", "| device map | devices used | modules with same bits as plain cuda | "
                  "max logit diff |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['map']} | {r['devices_used']} | {r['modules_same_bits']} | "
                  f"{r['max_abs_logit_diff']:.2e} |" for r in placements]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def placement_check(tmp: Path, device: str = "cuda") -> list[dict]:
    """Plans and logits through accelerate device maps against the plain single-device run
    (`device` "cpu" runs the same check without a GPU)."""
    path = tmp / "llama"
    if not path.exists():
        make_tiny_model(path, "llama")
    plain_model, plain_plan, ids, _ = pipeline(path, device)
    slot = 0 if device == "cuda" else device
    model, _, info = load_model(path)
    base_path, layers_name = info.layers_path.rsplit(".", 1)
    per_block = {f"{base_path}.{n}": slot for n, _ in model.get_submodule(base_path).named_children()
                 if n != layers_name}
    per_block.update({f"{info.layers_path}.{i}": slot for i in range(info.num_layers)})
    per_block.update({n: slot for n, _ in model.named_children() if n != base_path})
    map_file = tmp / "per-block-map.json"
    map_file.write_text(json.dumps(per_block))
    maps = [(f"per-block, {'cuda:0' if device == 'cuda' else device}", str(map_file))]
    if device == "cuda" and torch.cuda.device_count() > 1:
        maps.append((f"balanced over {torch.cuda.device_count()} GPUs", "balanced"))
    rows = []
    for label, spec in maps:
        mapped, plan, _, _ = pipeline(path, device, device_map=spec)
        gpus = sorted({str(p.device) for p in mapped.parameters()})
        same = sum(plan.modules[n].bits == plain_plan.modules[n].bits for n in plan.modules)
        with torch.no_grad():
            a = mapped(input_ids=ids[:2].to(device)).logits.float().cpu()
            b = plain_model(input_ids=ids[:2].to(device)).logits.float().cpu()
        rows.append({"map": label, "devices_used": ", ".join(gpus),
                     "modules_same_bits": f"{same}/{len(plan.modules)}",
                     "max_abs_logit_diff": float((a - b).abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
