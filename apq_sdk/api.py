"""The public Python API: the pipeline's verbs, as `apq-sdk` runs them.

    import apq_sdk

    sens = apq_sdk.profile("demo", target="arm64-linux")        # stage 1: a SensitivityMap
    plan = apq_sdk.plan(sens, bits_per_weight=4.0, target="arm64-linux")   # stage 2: a Plan
    ckpt = apq_sdk.quantize("demo", plan, "q/")                 # stage 3: a checkpoint directory
    model = apq_sdk.load("q/")                                  # the torch reference
    package = apq_sdk.build("arm64-linux", model="demo")        # all of it, lowered and verified
    result = apq_sdk.verify(package)                            # a VerifyResult

Every verb takes what the CLI takes, as keyword arguments; models are `"demo"`, a `.gguf` file or a
Hugging Face directory; sensitivity maps and plans may be objects or paths to their files. Errors
are `apq_sdk.errors.ApqError` (bad input, impossible budget) or `UsageError` (contradicting options).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["profile", "plan", "quantize", "load", "build", "verify"]


def _capabilities(target):
    from .capabilities import GENERIC, Capabilities
    from .errors import UsageError

    if target is None:
        return GENERIC
    if isinstance(target, Capabilities):
        return target
    from .targets.base import get_target

    try:
        return get_target(target).capabilities
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None


def profile(model="demo", *, calib=None, samples: int = 128, seq_len: int = 512, seed: int = 0,
            target=None, group_sizes=None, symmetric: bool | None = None, device: str = "cpu",
            allow_unknown: bool = False, loaded=None):
    """Stage 1: the sensitivity map of `model` (apq_sdk.sensitivity.SensitivityMap).

    `target` (a name or a Capabilities table) chooses the candidates it runs; `group_sizes` and
    `symmetric` override them. The map is also stored in the cache, where `build` finds it.
    `allow_unknown` runs a causal LM whose family the registry does not describe.
    `loaded` = (model, tokenizer, info) from apq_sdk.model_io.load_model skips loading.
    """
    from .builder import profile_cache_path, store_profile
    from .calibration import check_seq_len, load_calibration
    from .model_io import load_model
    from .sensitivity import ProfileSettings, profile_model

    overrides = {"seed": seed}
    if group_sizes is not None:
        overrides["group_sizes"] = tuple(group_sizes)
    if symmetric is not None:
        overrides["symmetric"] = bool(symmetric)
    settings = ProfileSettings.for_capabilities(_capabilities(target), **overrides)
    m, tok, info = loaded if loaded is not None else load_model(model, device=device,
                                                                allow_unknown=allow_unknown)
    check_seq_len(seq_len, m.config)
    ids, calib_info = load_calibration(tok, calib, num_samples=samples, seq_len=seq_len, seed=seed)
    fit, _ = load_calibration(tok, calib, num_samples=settings.fit_samples, seq_len=seq_len,
                              seed=seed + 1)
    sens = profile_model(m, info, ids, calib_info, settings, device, fit_samples=fit)
    store_profile(sens, profile_cache_path(info, calib_info, settings))
    return sens


def _sensitivity(value):
    from .errors import ApqError
    from .sensitivity import SensitivityMap

    if isinstance(value, SensitivityMap):
        return value
    path = Path(value)
    try:
        return SensitivityMap.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ApqError(f"sensitivity map {path} does not exist; run apq-sdk profile first") from None
    except RecursionError:
        raise ApqError(f"{path} is not a valid sensitivity map (JSON nested too deeply); run "
                       f"apq-sdk profile again") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ApqError(f"{path} is not a valid sensitivity map ({exc}); run apq-sdk profile "
                       f"again") from None


def plan(sensitivity, *, bits_per_weight: float | None = None,
         linear_bits_per_weight: float | None = None, memory_reduction: float | None = None,
         max_loss=None, target=None, activations: str | None = None, head_bits="auto",
         share_fused: bool = True):
    """Stage 2: the plan of least predicted loss within one budget (apq_sdk.plan_file.Plan).

    `bits_per_weight` and `memory_reduction` count the whole model (llama.cpp's bits per weight);
    `linear_bits_per_weight` the decoder linears only (then fix the head with `head_bits`).
    `max_loss` is a relative perplexity increase (0.005 or "0.5%"). `target` (a name or a
    Capabilities table) limits the plan to what it runs; `activations` defaults to weight-only.
    """
    from dataclasses import replace

    from .errors import UsageError
    from .planning import Budget, make_plan, parse_relative

    if isinstance(max_loss, str):
        max_loss = parse_relative(max_loss)
    if linear_bits_per_weight is not None:
        if bits_per_weight is not None:
            raise UsageError("give one budget: --bits-per-weight (whole model) or "
                             "--linear-bits-per-weight (decoder linears), not both")
        bits_per_weight, scope = linear_bits_per_weight, "linear"
    else:
        scope = "model"
    budget = Budget(bits_per_weight=bits_per_weight, memory_reduction=memory_reduction,
                    max_loss=max_loss, scope=scope)
    caps = _capabilities(target)
    if not share_fused:
        caps = replace(caps, name=f"{caps.name}-unfused", fused=())
    return make_plan(_sensitivity(sensitivity), budget, caps=caps,
                     activation=activations or "none", head_bits=str(head_bits))


def _plan(value):
    from .errors import ApqError
    from .plan_file import Plan, PlanError, load_plan

    if isinstance(value, Plan):
        return value
    try:
        return load_plan(Path(value))
    except PlanError as exc:
        raise ApqError(str(exc)) from exc


def quantize(model, plan, output, *, calib=None, samples: int = 128, seq_len: int = 512,
             seed: int = 0, method: str = "gptq", device: str = "cpu", allow_unknown: bool = False,
             loaded=None) -> Path:
    """Stage 3: apply `plan` (GPTQ at the planned bits) and write the quantized checkpoint
    (apq_sdk.checkpoint) to `output`; returns its path. `allow_unknown`: as for profile."""
    from .calibration import check_seq_len, load_calibration
    from .model_io import load_model
    from .quantizer import quantize_model, save_quantized

    the_plan = _plan(plan)
    m, tok, info = loaded if loaded is not None else load_model(model, device=device,
                                                                allow_unknown=allow_unknown)
    check_seq_len(seq_len, m.config)
    ids, _ = load_calibration(tok, calib, num_samples=samples, seq_len=seq_len, seed=seed)
    quantize_model(m, info, the_plan, ids, device, method=method)
    return save_quantized(m, tok, the_plan, Path(output))


def load(path, device: str = "cpu"):
    """The torch reference of a quantized checkpoint: a transformers-style module with forward
    (input_ids -> logits) and generate; `.apq_plan` is its plan."""
    from .checkpoint import load_quantized

    return load_quantized(path, device=device)


def build(target: str, model="demo", *, output="apq-out", plan=None, **options) -> Path:
    """Build a device package for `target` (profile, plan, quantize, lower, verify; cached);
    returns the package directory. `options` are the fields of apq_sdk.builder.BuildRequest
    (bits_per_weight, memory_reduction, max_loss, activations, head_bits, calib, samples,
    seq_len, seed, replan, verify, verify_windows, device)."""
    from .builder import BuildRequest
    from .builder import build as run_build

    request = BuildRequest(target=target, model=str(model), output=Path(output),
                           plan_path=None if plan is None else Path(plan), **options)
    return run_build(request, log=lambda _: None)


def verify(package, *, reference=None, windows: int = 8, text=None, model=None):
    """Re-check a package's hashes and run it against the torch reference here
    (apq_sdk.verification.VerifyResult); raises ApqError when it does not pass. `model` is the
    unquantized model for the accuracy checks (default: the one the manifest names)."""
    from .verification import verify_package

    return verify_package(Path(package), None if reference is None else Path(reference), windows,
                          None if text is None else Path(text), model)
