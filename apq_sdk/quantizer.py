"""Stage 3: apply a plan. GPTQ at the planned bits, block by block, then packed storage.

Block i is calibrated on the outputs of the already-quantized blocks before it, so each block's
error compensation sees the errors it must absorb. The output head is quantized last, from the
final hidden states; a tied embedding shares the quantized head weights.

A quantized model directory holds `model.safetensors` (packed codes, float16 scales, packed zero
points; every other tensor as it was), `config.json`, the tokenizer files and `plan.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from .blockwise import (HessianCollector, block_linears, capture_block_inputs, compute_dtype,
                        run_block)
from .errors import ApqError, ModelLoadError
from .fsutil import atomic_directory
from .model_io import ModelInfo
from .placement import replace_module
from .plan_file import Plan, load_plan, save_plan
from .progress import progress_bar
from .quant.modules import Float16Linear, QuantLinear
from .quant.weights import GptqTask, QuantizedWeight, gptq_quantize, gptq_quantize_many, quantize_rtn

MODEL_FILE = "model.safetensors"
PLAN_FILE = "plan.json"


def _check_plan_matches(plan: Plan, info: ModelInfo) -> None:
    if plan.model.config_sha256 != info.config_sha256:
        raise ApqError(f"plan was made for a model with config sha256 {plan.model.config_sha256[:12]}…, "
                       f"this model has {info.config_sha256[:12]}…; make a plan for this model")
    if plan.model.weights_sha256 != info.weights_sha256:
        raise ApqError(f"plan was made for weights {plan.model.weights_sha256[:12]}…, this model has "
                       f"{info.weights_sha256[:12]}…; make a plan for these weights")
    names = {li.name for li in info.linears}
    missing = sorted(names - set(plan.modules))
    if missing:
        raise ApqError(f"plan has no entry for {len(missing)} linear layers, e.g. {missing[0]}; "
                       f"make a plan for this model")


def _quantized_module(module: nn.Module, entry, hessian: torch.Tensor | None, method: str,
                      act_order: bool) -> nn.Module:
    weight = module.weight.data.float()
    bias = getattr(module, "bias", None)
    if entry.bits == 16:
        return Float16Linear(weight, bias, entry.activation, entry.act_clip)
    if method == "gptq" and hessian is not None:
        qweight = gptq_quantize(weight, hessian, entry.bits, entry.group_size, entry.symmetric,
                                act_order=act_order)
    else:
        qweight = quantize_rtn(weight, entry.bits, entry.group_size, entry.symmetric,
                               None if hessian is None else torch.diag(hessian))
    return QuantLinear(qweight, bias, entry.activation, entry.act_clip)


def _gptq_group(modules: dict[str, nn.Module], plan: Plan, hessian: torch.Tensor,
                act_order: bool) -> dict[str, nn.Module]:
    """Quantized replacements of layers that read one input, in one shared GPTQ sweep per
    symmetry mode."""
    out: dict[str, nn.Module] = {}
    by_symmetry: dict[bool, list[str]] = {}
    for name, module in modules.items():
        entry = plan.modules[name]
        if entry.bits == 16:
            out[name] = _quantized_module(module, entry, hessian, "gptq", act_order)
        else:
            by_symmetry.setdefault(entry.symmetric, []).append(name)
    for symmetric, names in by_symmetry.items():
        tasks = [GptqTask(modules[n].weight.data.float(), plan.modules[n].bits,
                          plan.modules[n].group_size) for n in names]
        for name, qweight in zip(names, gptq_quantize_many(tasks, hessian, symmetric, act_order)):
            entry = plan.modules[name]
            out[name] = QuantLinear(qweight, getattr(modules[name], "bias", None), entry.activation,
                                    entry.act_clip)
    return {name: out[name] for name in modules}


@torch.no_grad()
def quantize_model(model: nn.Module, info: ModelInfo, plan: Plan, samples: torch.Tensor,
                   device: str = "cpu", method: str = "gptq", act_order: bool = True,
                   batch_size: int = 8, forward_dtype: str = "bfloat16") -> nn.Module:
    """Replace every planned module of `model` in place; returns the model.

    Calibration forwards run in `forward_dtype` (bfloat16 halves their time on CPU, as GPTQ's
    reference runs them in float16); Hessians and GPTQ itself are float32.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method: expected 'gptq' or 'rtn', found {method!r}")
    _check_plan_matches(plan, info)
    layers = model.get_submodule(info.layers_path)
    cdt = getattr(torch, forward_dtype)
    batches = (capture_block_inputs(model, info, samples, batch_size, device, dtype=cdt)
               if method == "gptq" else [])
    with progress_bar() as bar:
        task = bar.add_task(f"quantizing ({method})", total=len(layers) + 1)
        for index, block in enumerate(layers):
            prefix = f"{info.layers_path}.{index}"
            linears = block_linears(block, prefix)
            if method == "gptq":
                collector = HessianCollector(linears)
                with compute_dtype(block, cdt):
                    collector.collect(block, batches)
                collector.remove()
                groups = collector.input_groups(linears)
                replacements = {}
                for owner, members in groups.items():
                    replacements.update(_gptq_group(
                        {name: linears[name] for name in members}, plan,
                        collector.hessian(owner), act_order))
            else:
                replacements = {name: _quantized_module(module, plan.modules[name], None, method,
                                                        act_order)
                                for name, module in linears.items()}
            for name in linears:
                replace_module(model, name, replacements[name])
            if method == "gptq":
                with compute_dtype(block, cdt):
                    outputs = run_block(block, batches)
                batches = [type(b)(o, b.kwargs) for b, o in zip(batches, outputs)]
            bar.advance(task)
        _quantize_head(model, info, plan, batches, method, act_order)
        bar.advance(task)
    return model


def _quantize_head(model, info: ModelInfo, plan: Plan, batches, method, act_order) -> None:
    entry = plan.modules.get("lm_head")
    if entry is None:
        return
    head = model.get_output_embeddings()
    hessian = None
    if method == "gptq" and batches:
        norm = model.get_submodule(info.layers_path.rsplit(".", 1)[0] + ".norm")
        k = head.weight.shape[1]
        hessian = torch.zeros(k, k, device=head.weight.device)
        count = 0
        for b in batches:
            x = norm(b.hidden).reshape(-1, k).float().to(hessian.device)
            hessian.addmm_(x.T, x)
            count += x.shape[0]
        hessian *= 2.0 / count
    replacement = replace_module(model, "lm_head",
                                 _quantized_module(head, entry, hessian, method, act_order))
    if info.tie_word_embeddings:
        embed = model.get_input_embeddings()
        embed.weight = nn.Parameter(replacement.weight, requires_grad=False)


def _collect_tensors(model: nn.Module, plan: Plan) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    planned = set(plan.modules)
    for name, module in model.named_modules():
        if name in planned:
            if isinstance(module, QuantLinear):
                for key, array in module.quantized.to_packed().items():
                    tensors[f"{name}.{key}"] = np.ascontiguousarray(array)
            elif isinstance(module, Float16Linear):
                tensors[f"{name}.weight"] = module.weight.half().cpu().numpy()
            if getattr(module, "bias", None) is not None:
                tensors[f"{name}.bias"] = module.bias.detach().float().cpu().numpy()
    skip_prefixes = tuple(f"{p}." for p in planned)
    tied = model.config.tie_word_embeddings and "lm_head" in planned
    embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    for name, param in model.state_dict().items():
        if name.startswith(skip_prefixes) or name in tensors:
            continue
        if tied and name == f"{embed_name}.weight":
            continue
        tensors[name] = param.detach().float().cpu().numpy()
    return tensors


def save_quantized(model: nn.Module, tokenizer, plan: Plan, out_dir) -> Path:
    """Write the quantized model directory atomically (temp dir + rename)."""
    tensors = _collect_tensors(model, plan)

    def write(tmp: Path) -> None:
        save_file(dict(sorted(tensors.items())), str(tmp / MODEL_FILE),
                  # one key: safetensors writes metadata from a hash map, whose order varies
                  # from process to process, so several keys would break byte-identical files
                  metadata={"format": f"apq-quantized/plan-v{plan.version}"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("transformers_version", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_plan(plan, tmp / PLAN_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return atomic_directory(Path(out_dir), write, tag="tmp")


def load_quantized(path, device: str = "cpu", device_map: str | None = None,
                   max_memory: dict | None = None) -> nn.Module:
    """A torch module (transformers model) with the quantized layers of `path`, on `device` or
    spread over the devices of `device_map` (placement.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    for required in (MODEL_FILE, PLAN_FILE, "config.json"):
        if not (path / required).is_file():
            raise ModelLoadError(f"{path} is not a quantized model directory: {required} is missing "
                                 f"(expected the output of apq-sdk quantize)")
    plan = load_plan(path / PLAN_FILE)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().requires_grad_(False)
    try:
        tensors = load_file(str(path / MODEL_FILE))
    except Exception as exc:
        raise ModelLoadError(f"could not read {path / MODEL_FILE}: {exc}; the file may be "
                             f"truncated or corrupt") from exc
    for name, entry in plan.modules.items():
        original = model.get_output_embeddings() if name == "lm_head" else model.get_submodule(name)
        bias = tensors.get(f"{name}.bias")
        bias_t = None if bias is None else torch.from_numpy(bias)
        if entry.bits == 16:
            replacement = Float16Linear(torch.from_numpy(tensors[f"{name}.weight"]).float(), bias_t,
                                        entry.activation, entry.act_clip)
        else:
            arrays = {k: tensors[f"{name}.{k}"] for k in ("qweight", "scales", "qzeros")
                      if f"{name}.{k}" in tensors}
            if "qweight" not in arrays:
                raise ModelLoadError(f"{path / MODEL_FILE} lacks {name}.qweight required by the plan")
            qweight = QuantizedWeight.from_packed(arrays, entry.bits, entry.group_size, entry.shape)
            replacement = QuantLinear(qweight, bias_t, entry.activation, entry.act_clip)
        del original
        replace_module(model, name, replacement)
    rest = {k: torch.from_numpy(v) for k, v in tensors.items()
            if not any(k.startswith(f"{n}.") for n in plan.modules)}
    missing, _unexpected = model.load_state_dict(rest, strict=False)
    tied_embedding = next((f"{n}.weight" for n, m in model.named_modules()
                           if m is model.get_input_embeddings()), None)
    planned_prefixes = tuple(f"{n}." for n in plan.modules)  # rebuilt from their packed arrays
    missing = [k for k in missing if not k.startswith(planned_prefixes)
               and not (config.tie_word_embeddings and k == tied_embedding)]
    if missing:
        raise ModelLoadError(f"{path / MODEL_FILE} lacks {len(missing)} tensors the model needs, "
                             f"e.g. {missing[0]}; the file is incomplete: quantize again")
    if config.tie_word_embeddings and "lm_head" in plan.modules:
        model.get_input_embeddings().weight = nn.Parameter(model.get_output_embeddings().weight,
                                                           requires_grad=False)
    model.apq_plan = plan
    if device_map:
        from .placement import place_model, resolve_device_map

        return place_model(model, resolve_device_map(model, device_map, max_memory))
    return model.to(device)
