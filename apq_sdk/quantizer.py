"""Stage 3: apply a plan. GPTQ at the planned bits, block by block, then packed storage.

Block i is calibrated on the outputs of the already-quantized blocks before it, so each block's
error compensation sees the errors it must absorb. The output head is quantized last, from the
final hidden states; a tied embedding shares the quantized head weights.

The result is written as a quantized checkpoint (apq_sdk.checkpoint: packed codes, float16 scales,
packed zero points, every other tensor as it was, config, tokenizer and plan).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .blockwise import (HessianCollector, block_linears, capture_block_inputs, compute_dtype,
                        run_block)
from .checkpoint import load_quantized, write_checkpoint  # noqa: F401  (load_quantized re-exported)
from .errors import ApqError
from .model_io import ModelInfo
from .placement import replace_module
from .plan_file import Plan
from .progress import progress_bar
from .quant.modules import Float16Linear, QuantLinear
from .quant.weights import GptqTask, gptq_quantize, gptq_quantize_many, quantize_rtn


def _check_plan_matches(plan: Plan, info: ModelInfo) -> None:
    if plan.model.config_sha256 != info.config_sha256:
        raise ApqError(f"plan was made for a model with config sha256 {plan.model.config_sha256[:12]}…, "
                       f"this model has {info.config_sha256[:12]}…; make a plan for this model")
    if plan.model.weights_sha256 != info.weights_sha256:
        raise ApqError(f"plan was made for weights {plan.model.weights_sha256[:12]}…, this model has "
                       f"{info.weights_sha256[:12]}…; make a plan for these weights")
    if plan.model.tokenizer_sha256 not in (None, info.tokenizer_sha256):
        raise ApqError(f"plan was made with another tokenizer ({plan.model.tokenizer_sha256[:12]}…, "
                       f"this model has {str(info.tokenizer_sha256)[:12]}…): its calibration "
                       f"tokens differ; make a plan for this model")
    linears = {li.name: (li.out_features, li.in_features) for li in info.linears}
    missing = sorted(set(linears) - set(plan.modules))
    if missing:
        raise ApqError(f"plan has no entry for {len(missing)} linear layers, e.g. {missing[0]}; "
                       f"make a plan for this model")
    known = dict(linears, lm_head=(info.vocab_size, info.hidden_size))
    if not info.tie_word_embeddings:
        known["model.embed_tokens"] = (info.vocab_size, info.hidden_size)
    for name, entry in plan.modules.items():
        if name not in known:
            raise ApqError(f"plan names a module this model does not have: {name!r} (its linear "
                           f"layers are like {next(iter(linears))!r}); make a plan for this model")
        if tuple(entry.shape) != tuple(known[name]):
            raise ApqError(f"plan gives {name} the shape {list(entry.shape)}, the model has "
                           f"{list(known[name])}; make a plan for this model")


def _quantized_module(module: nn.Module, entry, hessian: torch.Tensor | None, method: str,
                      act_order: bool) -> nn.Module:
    weight = module.weight.data.float()
    bias = getattr(module, "bias", None)
    if entry.bits == 16:
        return Float16Linear(weight, bias, entry.activation, entry.act_clip)
    if method == "gptq" and hessian is not None:
        qweight = gptq_quantize(weight, hessian, entry.bits, entry.group_size, entry.symmetric,
                                act_order=act_order, scale_dtype=entry.scale_dtype)
    else:
        qweight = quantize_rtn(weight, entry.bits, entry.group_size, entry.symmetric,
                               None if hessian is None else torch.diag(hessian),
                               scale_dtype=entry.scale_dtype)
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
                          plan.modules[n].group_size, plan.modules[n].scale_dtype) for n in names]
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
                batches = [b.advanced(o) for b, o in zip(batches, outputs)]
            bar.advance(task)
        _quantize_head(model, info, plan, batches, method, act_order)
        for name, entry in plan.modules.items():  # an untied embedding: a float16 table
            if entry.kind == "embedding":
                table = model.get_submodule(name).weight
                table.data = table.data.half().to(table.dtype)
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
            elif isinstance(module, (Float16Linear, nn.Embedding)):  # 16-bit: float16 storage
                tensors[f"{name}.weight"] = module.weight.detach().half().cpu().numpy()
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
    """Write the quantized checkpoint directory atomically (apq_sdk.checkpoint)."""
    return write_checkpoint(out_dir, _collect_tensors(model, plan), model.config.to_dict(), plan,
                            tokenizer)
