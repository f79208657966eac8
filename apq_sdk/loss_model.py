"""The mapping from summed per-layer predictions to measured model loss.

Per-layer predictions are on a relative scale (relative residual error, see sensitivity.py). A few
forwards of the whole model, quantized uniformly by round-to-nearest at several candidates, on
held-out calibration sequences (never evaluation text) give measured KL divergence and cross-entropy
increase; `alpha` scales the sum of predictions to KL (least squares in log space) and `kappa`
maps KL to the cross-entropy increase, so relative perplexity increase = exp(kappa * KL) - 1.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .evaluate import compare_to_cached, reference_log_probs
from .quant.weights import quantize_rtn



def fit_candidates(group_sizes) -> tuple[str, ...]:
    """Candidates of the loss-model fit: 3 and 4 bits at the largest profiled group size and 4 bits
    at the smallest (b3g128, b4g128, b4g64 for the default groups 64 and 128)."""
    large, small = max(group_sizes), min(group_sizes)
    return tuple(dict.fromkeys((f"b3g{large}", f"b4g{large}", f"b4g{small}")))


def kl_for_relative_ppl(rel: float, loss_model: dict) -> float:
    return math.log1p(rel) / loss_model["kappa"]


@torch.no_grad()
def fit_loss_model(model, info, sens, fit_samples: torch.Tensor, settings, device: str) -> dict:
    from .progress import progress_bar

    # bfloat16 matmuls (autocast keeps RoPE and softmax in float32) make these forwards ~1.6x
    # faster on CPU; on the demo model they move KL by 1e-3 nats, against fit points of 0.3 to 2.
    def forwards():
        if settings.compute_dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type,
                              dtype=getattr(torch, settings.compute_dtype))

    candidates = fit_candidates(settings.group_sizes)
    with progress_bar() as bar:
        task = bar.add_task("fitting the loss model", total=len(candidates) + 1)
        with forwards():
            cached = reference_log_probs(model, fit_samples, device)
        bar.advance(task)
        points = _fit_points(model, info, sens, fit_samples, settings, device, cached, candidates,
                             forwards, bar, task)
    if not points:
        raise RuntimeError("no candidate of the loss-model fit was profiled")
    log_alpha = sum(math.log(p["kl"] / p["predicted_raw"]) for p in points) / len(points)
    kappa = sum(p["delta_ce"] * p["kl"] for p in points) / sum(p["kl"] ** 2 for p in points)
    return {"kind": "rtn-uniform-fit", "alpha": math.exp(log_alpha), "kappa": max(kappa, 1e-3),
            "points": points, "fit_tokens": int(fit_samples.numel())}


def _fit_points(model, info, sens, fit_samples, settings, device, cached, candidates, forwards,
                bar, task):
    from .sensitivity import parse_candidate_key

    linears = {li.name: model.get_submodule(li.name) for li in info.linears}
    points = []
    for key in candidates:
        if not all(key in sens.modules[n]["rtn_errors"] for n in linears):
            bar.advance(task)
            continue
        bits, group = parse_candidate_key(key)
        originals = {}
        raw = 0.0
        for name, module in linears.items():
            originals[name] = module.weight.data.clone()
            weight = originals[name].float()
            module.weight.data = quantize_rtn(weight, bits, group, settings.symmetric).dequantize() \
                .to(originals[name].dtype)
            entry = sens.modules[name]
            raw += entry["gain"] * entry["rtn_errors"][key]
        try:
            with forwards():
                kl, dce = compare_to_cached(model, fit_samples, cached, device)
        finally:
            for name, module in linears.items():
                module.weight.data = originals[name]
        points.append({"candidate": key, "predicted_raw": raw, "kl": kl, "delta_ce": dce})
        bar.advance(task)
    return points
