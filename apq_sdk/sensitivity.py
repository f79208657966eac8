"""Stage 1: sensitivity profiling, one decoder block at a time, without backpropagation.

For every linear layer and candidate (bits, group size) the predicted loss increase is

    predicted(l, c) = alpha * gain(l) * e(l, c)

* e(l, c) = tr(dW H dW^T) / 2 is the increase of the layer's mean squared output error when its weight
  is quantized by GPTQ at candidate c, with H = 2/n X^T X from the calibration activations (the
  second-order term of OBS/GPTQ; the first-order term vanishes at a trained minimum of that error).
* gain(l) = depth(block) * block_gain(l) converts a layer's output error into KL divergence at the
  logits, in two measured steps, both forwards only (no gradient):
  - block_gain(l): the relative error the layer causes in the residual stream at the end of its
    decoder block, from one forward of the block on a few calibration sequences with the layer
    perturbed, so it captures what the block does with the error (softmax, gating, the residual add);
  - depth(block): the KL at the logits per unit of that relative error, measured by perturbing every
    linear of the block at the reference candidate (3 bits) and running the rest of the network on
    one calibration sequence. Errors early in the network are damped or amplified by the blocks after
    them, and the last blocks feed the head almost directly; a relative error alone misses that.
* alpha is a global correction (ideally 1) for what the sum of per-layer predictions misses when
  every layer is quantized at once. It is fitted after the sweep from a few forwards of the whole
  model, quantized uniformly by round-to-nearest, on held-out calibration sequences; the same runs
  fit the mapping from KL to relative perplexity increase that `plan --max-loss` uses.

The tied or untied output head is last in the network, so its effect is computed directly: with
logits z and p = softmax(z), KL(p || p + dp) ~= 1/2 * E_t[sum_v p_v dz_v^2 - (sum_v p_v dz_v)^2].

Per-head salience splits q/k/v rows and o columns by attention head (GQA groups for k and v).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .blockwise import (HessianCollector, block_linears, block_output, capture_block_inputs,
                        cast_batches, compute_dtype, run_block, slice_batch)
from .calibration import CalibrationInfo
from .families import FAMILIES
from .model_io import ModelInfo
from .progress import progress_bar
from .quant.modules import fake_quantize_activations, fake_quantize_activations_per_block
from .loss_model import fit_candidates
from .quant.weights import GptqTask, gptq_quantize_many, output_error, quantize_rtn

log = logging.getLogger("apq_sdk")

SENSITIVITY_FORMAT = "apq-sensitivity"
SENSITIVITY_VERSION = 2  # 2: parameters outside the plan ("fixed") and the untied embedding
DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_GROUPS = (64, 128)
HEAD_BITS = (4, 8)
ACT_CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6)
REFERENCE_BITS = 3


def candidate_key(bits: int, group_size: int | None) -> str:
    return "fp16" if bits == 16 else f"b{bits}g{group_size}"


def parse_candidate_key(key: str) -> tuple[int, int | None]:
    if key == "fp16":
        return 16, None
    bits, group = key[1:].split("g")
    return int(bits), int(group)


@dataclass
class ProfileSettings:
    bits: tuple[int, ...] = DEFAULT_BITS
    group_sizes: tuple[int, ...] = DEFAULT_GROUPS
    symmetric: bool = False
    act_order: bool = True
    batch_size: int = 8
    gain_samples: int = 2
    depth_samples: int = 1  # sequences propagated to the logits for the per-block depth factor
    fit_samples: int = 4  # held-out sequences of the loss-model fit
    head_bits: tuple[int, ...] = HEAD_BITS
    seed: int = 0
    compute_dtype: str = "bfloat16"  # dtype of the calibration forwards; Hessians stay float32

    @classmethod
    def for_capabilities(cls, caps, **overrides) -> "ProfileSettings":
        """The candidates a capability table needs: its preferred group sizes (64 and 128 where
        it runs them, else its own), its symmetry, and the bit-widths it runs, always with 3 and
        4 bits (3 is the reference perturbation of the gains, 3 and 4 fit the loss model). A
        4/16-bit table (TensorRT) so profiles half the candidates of a 2/3/4/8-bit one."""
        bits = tuple(b for b in DEFAULT_BITS if b in caps.weight_bits or b in (REFERENCE_BITS, 4))
        head = tuple(b for b in HEAD_BITS if b in caps.head_bits) or HEAD_BITS[:1]
        settings = dict(group_sizes=caps.profile_group_sizes(), symmetric=caps.symmetric,
                        bits=bits, head_bits=head)
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict:
        return {"bits": list(self.bits), "group_sizes": list(self.group_sizes),
                "symmetric": self.symmetric, "act_order": self.act_order,
                "gain_samples": self.gain_samples,
                "depth_samples": self.depth_samples, "fit_samples": self.fit_samples,
                "head_bits": list(self.head_bits), "compute_dtype": self.compute_dtype}


@dataclass
class SensitivityMap:
    model: dict
    calibration: dict
    settings: dict
    modules: dict[str, dict] = field(default_factory=dict)
    heads: dict[str, dict] = field(default_factory=dict)
    loss_model: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=lambda: {"params": 0, "bytes": 0})  # norms, biases

    def to_dict(self) -> dict:
        return {"format": SENSITIVITY_FORMAT, "version": SENSITIVITY_VERSION, "model": self.model,
                "calibration": self.calibration, "settings": self.settings,
                "loss_model": self.loss_model, "modules": self.modules, "heads": self.heads,
                "fixed": self.fixed}

    @classmethod
    def from_dict(cls, data: dict) -> "SensitivityMap":
        if data.get("format") != SENSITIVITY_FORMAT:
            raise ValueError(f"format: expected {SENSITIVITY_FORMAT!r}, found {data.get('format')!r}")
        if data.get("version") != SENSITIVITY_VERSION:
            raise ValueError(f"version: expected {SENSITIVITY_VERSION}, found {data.get('version')!r} "
                             f"(written by another apq-sdk: profile again)")
        _validate(data)
        return cls(data["model"], data["calibration"], data["settings"], data["modules"],
                   data.get("heads", {}), data.get("loss_model", {}), data["fixed"])

    def predicted(self, name: str, key: str) -> float:
        entry = self.modules[name]
        if key == "fp16":
            return 0.0
        return self.loss_model["alpha"] * entry["gain"] * entry["errors"][key] \
            if entry["kind"] == "linear" else entry["errors"][key]


def _validate(data) -> None:
    """Every field the planner and the report read, with its type and range: a map from a file
    is refused with the path of the first bad field (ValueError) instead of failing later."""
    import math

    from .plan_file import CalibrationInfo, ModelInfo, PlanError

    def fail(path: str, expected: str, found) -> ValueError:
        shown = repr(found)
        return ValueError(f"{path}: expected {expected}, found {shown[:60]}")

    def number(path, value, minimum=0.0, positive=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < minimum or (positive and value <= 0):
            raise fail(path, f"a finite number {'> 0' if positive else f'>= {minimum:g}'}", value)

    def integer(path, value, minimum=0):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise fail(path, f"an integer >= {minimum}", value)

    def mapping(path, value):
        if not isinstance(value, dict):
            raise fail(path, "an object", value)
        return value

    mapping("(map)", data)
    try:
        ModelInfo(**mapping("model", data.get("model")))
        CalibrationInfo(**mapping("calibration", data.get("calibration")))
    except (PlanError, TypeError) as exc:
        raise ValueError(str(exc)) from None
    settings = mapping("settings", data.get("settings"))
    groups = settings.get("group_sizes")
    if not isinstance(groups, list) or not groups:
        raise fail("settings.group_sizes", "a non-empty list", groups)
    for g in groups:
        integer("settings.group_sizes[]", g, 8)
    if not isinstance(settings.get("symmetric"), bool):
        raise fail("settings.symmetric", "true or false", settings.get("symmetric"))
    fixed = mapping("fixed", data.get("fixed"))
    integer("fixed.params", fixed.get("params"))
    integer("fixed.bytes", fixed.get("bytes"))
    loss = mapping("loss_model", data.get("loss_model", {}))
    if loss:
        number("loss_model.alpha", loss.get("alpha"), positive=True)
        number("loss_model.kappa", loss.get("kappa"), positive=True)
        if not isinstance(loss.get("kind"), str):
            raise fail("loss_model.kind", "a string", loss.get("kind"))
    modules = mapping("modules", data.get("modules"))
    if "lm_head" not in modules:
        raise fail("modules", 'an entry "lm_head"', sorted(modules)[:3])
    for name, entry in modules.items():
        where = f"modules[{name!r}]"
        mapping(where, entry)
        if entry.get("kind") not in ("linear", "lm_head", "embedding"):
            raise fail(f"{where}.kind", "linear, lm_head or embedding", entry.get("kind"))
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise fail(f"{where}.shape", "[out, in]", shape)
        for d in shape:
            integer(f"{where}.shape[]", d, 1)
        integer(f"{where}.layer", entry.get("layer"), -1)
        if not isinstance(entry.get("role"), str):
            raise fail(f"{where}.role", "a string", entry.get("role"))
        number(f"{where}.gain", entry.get("gain"), positive=True)
        for key, value in mapping(f"{where}.errors", entry.get("errors")).items():
            try:
                parse_candidate_key(key)
            except (ValueError, IndexError):
                raise fail(f"{where}.errors", "keys like b4g64", key) from None
            number(f"{where}.errors[{key!r}]", value)
        for key in ("act_error", "act_clip"):
            if key in entry:
                number(f"{where}.{key}", entry[key])
        for key, value in mapping(f"{where}.act_error_block",
                                  entry.get("act_error_block", {})).items():
            number(f"{where}.act_error_block[{key!r}]", value)
    mapping("heads", data.get("heads", {}))


def _per_head_errors(delta: torch.Tensor, hessian: torch.Tensor, role: str, info: ModelInfo,
                     weight: torch.Tensor, rows: torch.Tensor,
                     head_norms: dict[str, nn.Module]) -> dict[str, list[float]]:
    """Output error per attention head of a q/k/v (or fused qkv) projection's rows, or of an o
    projection's columns, in the head layout of the model: `num_attention_heads` query and output
    heads, `num_key_value_heads` key and value heads (GQA), `head_dim` as the config gives it.

    Where the family normalises every query and key head before RoPE (q/k norms: Qwen3, Gemma 3),
    the error that reaches attention is the one after that norm, which divides out any change of
    a head's scale: it is measured through the model's own norm on the kept input rows (mean
    squared error per token, the unit of output_error)."""
    d = info.head_dim
    if role == "o":
        heads = delta.shape[1] // d
        return {"o": [float(output_error(delta[:, h * d:(h + 1) * d],
                                         hessian[h * d:(h + 1) * d, h * d:(h + 1) * d]).sum())
                      for h in range(heads)]}
    if role == "qkv":  # stored fused (Phi-3): rows are [q heads | k heads | v heads]
        sizes = [info.num_attention_heads * d, info.num_key_value_heads * d,
                 info.num_key_value_heads * d]
        if sum(sizes) != delta.shape[0]:
            return {}
        parts = zip(("q", "k", "v"), delta.split(sizes), weight.split(sizes))
    elif role in ("q", "k", "v"):
        parts = [(role, delta, weight)]
    else:
        return {}
    out = {}
    for part, part_delta, part_weight in parts:
        norm = head_norms.get(part)
        if norm is None:
            out[part] = output_error(part_delta, hessian).view(-1, d).sum(-1).tolist()
            continue
        x = rows.to(part_weight.dtype)
        clean = (x @ part_weight.T).view(x.shape[0], -1, d)
        noisy = (x @ (part_weight + part_delta).T).view(x.shape[0], -1, d)
        norm_dtype = next(norm.parameters()).dtype
        error = (norm(noisy.to(norm_dtype)).float() - norm(clean.to(norm_dtype)).float()) ** 2
        out[part] = error.sum(-1).mean(0).tolist()
    return out


def _head_norms(model: nn.Module, info: ModelInfo, index: int) -> dict[str, nn.Module]:
    """The per-head q/k norm modules of decoder layer `index`, where the model's family has them
    (an architecture the registry does not describe gets none: its heads are measured before any
    norm it may have)."""
    family = FAMILIES.get(info.model_type)
    if family is None or not family.qk_norm:
        return {}
    names = family.norm_names(index, prefix=info.layers_path)
    return {role: model.get_submodule(names[role]) for role in ("q", "k")}


def _kv_groups(heads: dict[str, list[float]], info: ModelInfo) -> list[float] | None:
    """Each KV head's share of its layer's attention error: the mean over q, k, v and o of the
    share of that projection's error carried by the heads of the group (the query and output
    heads that read the KV head, and the KV head itself). Sums to 1 over the groups."""
    groups = info.num_key_value_heads
    if groups < 1 or info.num_attention_heads % groups or not heads:
        return None
    rep = info.num_attention_heads // groups
    shares = []
    for role, values in heads.items():
        total = sum(values)
        if total <= 0:
            continue
        size = rep if len(values) == info.num_attention_heads else 1
        shares.append([sum(values[g * size:(g + 1) * size]) / total for g in range(groups)])
    if not shares:
        return None
    return [sum(s[g] for s in shares) / len(shares) for g in range(groups)]


def _choose_act_clip(weight: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Clip factor minimising the output error of per-token int8 activations; (clip, error)."""
    reference = x @ weight.T
    best = (1.0, math.inf)
    for clip in ACT_CLIP_GRID:
        err = float(((fake_quantize_activations(x, clip) @ weight.T - reference) ** 2).sum(-1).mean())
        if err < best[1]:
            best = (clip, err)
    return best


def _block_act_error(weight: torch.Tensor, x: torch.Tensor, block: int) -> float:
    """Mean squared output error per token of int8-per-block-dynamic activations."""
    reference = x @ weight.T
    quantized = fake_quantize_activations_per_block(x, block) @ weight.T
    return float(((quantized - reference) ** 2).sum(-1).mean())


@torch.no_grad()
def _block_gains(block: nn.Module, linears: dict[str, nn.Module], batches, outputs,
                 deltas: dict[str, torch.Tensor], local_err: dict[str, float]):
    """gain(l) = mean over tokens of |dh_t|^2 / |h_t|^2 at the block output, per unit of e(l, ref).

    The ratio is taken per token: a few tokens with huge residual norms ("massive activations")
    would otherwise dominate the energy and hide the error every other token sees.
    """
    gains = {}
    for name, module in linears.items():
        original = module.weight.data.clone()
        module.weight.data += deltas[name].to(original.dtype)
        perturbed = run_block(block, batches)
        module.weight.data.copy_(original)
        relative = torch.cat([(((p - o) ** 2).sum(-1) / (o ** 2).sum(-1).clamp(min=1e-12)).flatten()
                              for p, o in zip(perturbed, outputs)])
        gains[name] = float(relative.mean()) / max(local_err[name], 1e-30)
    return gains


@torch.no_grad()
def _run_blocks(layers, start: int, batches) -> list[torch.Tensor]:
    """Hidden states after blocks start..end (float32 chain), one tensor per batch."""
    hidden = [b.hidden for b in batches]
    for index in range(start, len(layers)):
        hidden = [block_output(layers[index](h, **b.kwargs_for(index)))
                  for h, b in zip(hidden, batches)]
    return hidden


@torch.no_grad()
def _final_log_probs(model, info: ModelInfo, hidden: list[torch.Tensor],
                     chunk: int = 512) -> list[torch.Tensor]:
    """Next-token log-probabilities (float32) behind final hidden states, in chunks of tokens."""
    norm = model.get_submodule(info.layers_path.rsplit(".", 1)[0] + ".norm")
    head = model.get_output_embeddings()
    flat = torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden])
    return [F.log_softmax(head(norm(flat[start:start + chunk])).float(), -1)
            for start in range(0, flat.shape[0], chunk)]


@torch.no_grad()
def _final_kl(model, info: ModelInfo, clean_log_probs: list[torch.Tensor],
              perturbed: list[torch.Tensor]) -> float:
    """Mean KL(clean || perturbed) of the next-token distributions."""
    total, count = 0.0, 0
    chunk = clean_log_probs[0].shape[0]
    for lc, lp in zip(clean_log_probs, _final_log_probs(model, info, perturbed, chunk)):
        total += float((lc.exp() * (lc - lp)).sum())
        count += lc.shape[0]
    return total / count


@torch.no_grad()
def _propagated_kl(model, info: ModelInfo, index: int, linears: dict[str, nn.Module],
                   deltas: dict[str, torch.Tensor], batches, clean_final) -> float:
    """KL at the logits when every linear of block `index` carries its reference weight change.

    The perturbed block output runs through the rest of the network (forwards only), so the depth
    factor captures what the later blocks and the head make of an error at this depth.
    """
    layers = model.get_submodule(info.layers_path)
    originals = {name: module.weight.data.clone() for name, module in linears.items()}
    try:
        for name, module in linears.items():
            module.weight.data += deltas[name].to(module.weight.dtype)
        perturbed = [b.advanced(o) for b, o in zip(batches, run_block(layers[index], batches))]
    finally:
        for name, module in linears.items():
            module.weight.data.copy_(originals[name])
    return _final_kl(model, info, clean_final, _run_blocks(layers, index + 1, perturbed))


@torch.no_grad()
def _head_kl(hidden: torch.Tensor, weight: torch.Tensor, deltas: list[torch.Tensor],
             chunk: int = 512) -> list[float]:
    """Second-order KL estimate of each logit perturbation x @ delta.T, averaged over tokens.

    The softmax of the clean logits is computed once per chunk and shared by every delta.
    """
    totals = [0.0] * len(deltas)
    count = 0
    for start in range(0, hidden.shape[0], chunk):
        x = hidden[start:start + chunk]
        p = torch.softmax(x @ weight.T, dim=-1)
        for i, delta in enumerate(deltas):
            dz = x @ delta.T
            totals[i] += float(0.5 * ((p * dz * dz).sum(-1) - (p * dz).sum(-1) ** 2).sum())
        count += x.shape[0]
    return [total / count for total in totals]


@torch.no_grad()
def profile_model(model: nn.Module, info: ModelInfo, samples: torch.Tensor,
                  calib: CalibrationInfo, settings: ProfileSettings, device: str = "cpu",
                  fit_samples: torch.Tensor | None = None,
                  keep_deltas: dict[str, torch.Tensor | None] | None = None) -> SensitivityMap:
    """Compute the sensitivity map. `fit_samples` are held-out sequences for the loss-model fit.

    `keep_deltas`, a dict whose keys name layers, receives the weight change of the reference
    candidate (3 bits, largest group) for those layers, for validating the predictions.
    """
    sens = SensitivityMap(info.to_plan_model(), calib.to_dict(), settings.to_dict())
    _record_outside_the_plan(model, info, sens)
    layers = model.get_submodule(info.layers_path)
    roles = {li.name: li for li in info.linears}
    cdt = getattr(torch, settings.compute_dtype)
    batches = capture_block_inputs(model, info, samples, settings.batch_size, device, dtype=cdt)
    ref_key = candidate_key(REFERENCE_BITS if REFERENCE_BITS in settings.bits else settings.bits[0],
                            max(settings.group_sizes))
    # float32 inputs of the current block for the few sequences that measure gains and depth
    chain = cast_batches([slice_batch(batches[0], max(settings.gain_samples,
                                                      settings.depth_samples))], torch.float32)
    fit_keys = fit_candidates(settings.group_sizes)
    clean_final = None
    if settings.depth_samples > 0:
        clean_final = _final_log_probs(model, info, _run_blocks(
            layers, 0, [slice_batch(chain[0], settings.depth_samples)]))
    with progress_bar() as bar:
        task = bar.add_task("profiling blocks", total=len(layers) + 1)
        for index, block in enumerate(layers):
            prefix = f"{info.layers_path}.{index}"
            linears = block_linears(block, prefix)
            head_norms = _head_norms(model, info, index)
            collector = HessianCollector(linears, keep_rows=256)
            with compute_dtype(block, cdt):
                outputs = run_block(block, batches)
            collector.remove()
            deltas_ref, errs_ref = {}, {}
            candidates = [(bits, group) for group in settings.group_sizes for bits in settings.bits]
            for owner, members in collector.input_groups(linears).items():
                hessian = collector.hessian(owner)
                tasks = [GptqTask(linears[name].weight.data.float(), bits, group)
                         for name in members for bits, group in candidates]
                results = iter(gptq_quantize_many(tasks, hessian, settings.symmetric,
                                                  settings.act_order))
                for name in members:
                    weight = linears[name].weight.data.float()
                    entry = {"kind": "linear", "layer": index, "role": roles[name].role,
                             "shape": list(weight.shape), "errors": {}, "rtn_errors": {}}
                    for bits, group in candidates:
                        delta = next(results).dequantize() - weight
                        key = candidate_key(bits, group)
                        entry["errors"][key] = float(output_error(delta, hessian).sum())
                        if key in fit_keys:
                            rtn = quantize_rtn(weight, bits, group,
                                               settings.symmetric).dequantize() - weight
                            entry["rtn_errors"][key] = float(output_error(rtn, hessian).sum())
                        if key == ref_key:
                            deltas_ref[name] = delta
                            if keep_deltas is not None and name in keep_deltas:
                                keep_deltas[name] = delta.cpu()
                            errs_ref[name] = entry["errors"][key]
                            heads = _per_head_errors(delta, hessian, entry["role"], info,
                                                     weight, collector.kept_rows(name),
                                                     head_norms)
                            sens.heads.setdefault(str(index), {}).update(heads)
                    x_rows = collector.kept_rows(name)
                    clip, act_err = _choose_act_clip(weight, x_rows)
                    entry["act_clip"] = clip
                    entry["act_error"] = act_err  # unit of errors: mean squared output error/token
                    entry["act_error_block"] = {str(g): _block_act_error(weight, x_rows, g)
                                                for g in settings.group_sizes}
                    sens.modules[name] = entry
            layer_heads = sens.heads.get(str(index))
            if layer_heads:
                groups = _kv_groups(layer_heads, info)
                if groups is not None:
                    layer_heads["kv_group"] = groups
            chain_out = run_block(block, chain)
            gains = _block_gains(block, linears, chain, chain_out, deltas_ref, errs_ref)
            depth = 1.0
            if clean_final is not None:
                relative = sum(gains[n] * errs_ref[n] for n in linears)
                kl = _propagated_kl(model, info, index, linears, deltas_ref,
                                    [slice_batch(chain[0], settings.depth_samples)], clean_final)
                depth = max(kl, 1e-12) / max(relative, 1e-30)
            for name, gain in gains.items():
                sens.modules[name].update(block_gain=gain, depth=depth, gain=gain * depth)
            batches = [b.advanced(o) for b, o in zip(batches, outputs)]
            chain = [b.advanced(o) for b, o in zip(chain, chain_out)]
            bar.advance(task)
        _profile_output_head(model, info, sens, batches, settings)
        bar.advance(task)
    del batches
    if fit_samples is not None:
        from .loss_model import fit_loss_model

        sens.loss_model = fit_loss_model(model, info, sens, fit_samples, settings, device)
    return sens


def _record_outside_the_plan(model: nn.Module, info: ModelInfo, sens: SensitivityMap) -> None:
    """The untied embedding (a 16-bit module of the plan: a table lookup keeps its float16 rows)
    and the parameters no plan entry covers (norms, biases: stored as float32), so budgets can
    count the whole model."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    planned = {id(model.get_submodule(li.name).weight) for li in info.linears} | {id(head.weight)}
    if not info.tie_word_embeddings:
        name = next(n for n, m in model.named_modules() if m is embedding)
        sens.modules[name] = {"kind": "embedding", "layer": -1, "role": "embedding",
                              "shape": list(embedding.weight.shape), "errors": {},
                              "rtn_errors": {}, "gain": 1.0, "act_clip": 1.0, "act_error": 0.0}
        planned.add(id(embedding.weight))
    seen: set[int] = set()
    fixed = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) in seen or id(tensor) in planned:
            continue
        seen.add(id(tensor))
        fixed += tensor.numel()
    sens.fixed = {"params": int(fixed), "bytes": int(4 * fixed)}


@torch.no_grad()
def _profile_output_head(model, info: ModelInfo, sens: SensitivityMap, batches, settings):
    """The lm_head (tied or not): exact second-order KL of its quantization on calibration tokens."""
    norm = model.get_submodule(info.layers_path.rsplit(".", 1)[0] + ".norm")
    head = model.get_output_embeddings()
    weight = head.weight.data.float()
    hidden = torch.cat([norm(b.hidden).reshape(-1, weight.shape[1]).to(weight.device)
                        for b in batches])
    generator = torch.Generator().manual_seed(settings.seed)
    pick = torch.randperm(hidden.shape[0], generator=generator)[:2048].to(hidden.device)
    subset = hidden[pick].float()
    hessian = 2.0 * subset.T @ subset / subset.shape[0]
    entry = {"kind": "lm_head", "layer": info.num_layers, "role": "lm_head",
             "shape": list(weight.shape), "tied": info.tie_word_embeddings,
             "errors": {}, "rtn_errors": {}, "gain": 1.0, "act_clip": 1.0, "act_error": 0.0}
    deltas = {candidate_key(bits, group): quantize_rtn(weight, bits, group, settings.symmetric,
                                                        torch.diag(hessian)).dequantize() - weight
              for bits in settings.head_bits for group in settings.group_sizes}
    for key, kl in zip(deltas, _head_kl(subset, weight, list(deltas.values()))):
        entry["errors"][key] = kl
        entry["rtn_errors"][key] = kl
    sens.modules["lm_head"] = entry
