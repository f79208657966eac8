"""`apq-sdk build`: from a model and a budget (or a plan) to a verified device package.

A build checks the request (budget, target, plan) before it loads anything, profiles only when no
cached profile of the same model, calibration and settings exists (the cache key is a content
hash), quantizes once per plan (cached too, as the reference that `verify` compares against), lets
the target lower the checkpoint, verifies the package here, and writes `DIR/<model>-<target>/`
through a temporary directory renamed into place, so an interrupted build leaves nothing
half-written. A package that fails verification is kept as `DIR/<model>-<target>.failed/` with
its verify.json, never under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import ApqError, UsageError
from .fsutil import KeepAs, atomic_directory, atomic_write_text, cache_dir
from .package import (PACKAGE_FORMAT, PACKAGE_VERSION, VERIFY_FILE, safe_name, write_manifest,
                      write_verify)

DEFAULT_BITS_PER_WEIGHT = 4.0


def _json_sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass
class BuildRequest:
    target: str
    model: str = "demo"
    plan_path: Path | None = None
    bits_per_weight: float | None = None  # whole model (the default budget: 4.0)
    linear_bits_per_weight: float | None = None  # decoder linears only, head fixed
    memory_reduction: float | None = None
    max_loss: str | None = None
    activations: str | None = None  # None: the target's default activation mode
    head_bits: str = "auto"
    output: Path = Path("apq-out")
    replan: bool = False
    verify: bool = True
    verify_text: Path | None = None  # None: the verification text shipped with apq-sdk
    overwrite: bool = False  # replace OUTPUT/<model>-<target> even if it is not a package
    calib: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    device: str = "cpu"
    verify_windows: int = 8
    target_options: dict = field(default_factory=dict)  # --target-option NAME=VALUE



def request_budget(req: BuildRequest):
    """The request's budget (None with --plan), checked before any work starts."""
    from .planning import Budget, parse_relative

    named = _named_budgets(req)
    if req.plan_path is not None:
        if named:
            raise UsageError(f"--plan carries its own budget; {', '.join(named)} would be "
                             f"ignored: drop {'it' if len(named) == 1 else 'them'} (with --replan "
                             f"the plan is re-planned under its own budget)")
        return None
    if len(named) > 1:
        raise UsageError(f"give one budget, found {', '.join(named)}")
    if req.linear_bits_per_weight is not None:
        return Budget(bits_per_weight=req.linear_bits_per_weight, scope="linear")
    return Budget(
        bits_per_weight=req.bits_per_weight if named else DEFAULT_BITS_PER_WEIGHT,
        memory_reduction=req.memory_reduction,
        max_loss=parse_relative(req.max_loss) if req.max_loss is not None else None)


def _named_budgets(req: BuildRequest) -> list[str]:
    """The budget options the request names."""
    given = {"--bits-per-weight": req.bits_per_weight,
             "--linear-bits-per-weight": req.linear_bits_per_weight,
             "--memory-reduction": req.memory_reduction, "--max-loss": req.max_loss}
    return [flag for flag, value in given.items() if value is not None]


def _is_default_budget(req: BuildRequest) -> bool:
    """Whether the request names no budget and no plan (so DEFAULT_BITS_PER_WEIGHT applies)."""
    return req.plan_path is None and not _named_budgets(req)


def check_request(req: BuildRequest, target_cls):
    """Everything that can be checked before loading the model; returns the budget."""
    budget = request_budget(req)
    target_cls.resolve_options(req.target_options)
    caps = target_cls.capabilities
    if req.head_bits != "auto" and int(req.head_bits) not in caps.head_bits:
        raise UsageError(f"--head-bits {req.head_bits}: target {target_cls.name!r} runs head bits "
                         f"{caps.head_bits}; choose one of them or 'auto'")
    if budget is not None and budget.scope == "linear" and req.head_bits == "auto":
        raise UsageError("--linear-bits-per-weight budgets the decoder linears only, so the head "
                         "must be fixed: pass --head-bits 4, 8 or 16 (or use --bits-per-weight, "
                         "which budgets the whole model)")
    if req.activations is not None and req.activations not in caps.activation_modes:
        raise UsageError(f"--activations {req.activations}: target {target_cls.name!r} runs "
                         f"{', '.join(caps.activation_modes)}")
    if req.verify_text is not None and not Path(req.verify_text).is_file():
        raise UsageError(f"--verify-text {req.verify_text}: no such file")
    from .fsutil import check_cache_writable, check_output_dir
    from .model_io import config_model_type, resolve_model
    from .package import is_package_dir

    source = resolve_model(req.model)
    if source.kind == "hf":  # a GGUF's model type is known once transformers has read it
        check_family(target_cls, config_model_type(source.path / "config.json"))
    check_output_dir(package_path(req, target_cls, source.name),
                     what="the package directory", replaceable=is_package_dir,
                     overwrite=req.overwrite)
    check_cache_writable()
    return budget


def check_family(target_cls, model_type) -> None:
    """Refuse a model family the target does not lower, with the list, before the work."""
    families = target_cls.capabilities.families
    if families is not None and model_type not in families:
        raise UsageError(f"target {target_cls.name!r} does not lower {model_type!r} models; it "
                         f"lowers {', '.join(families)}. The core stages (profile, plan, "
                         f"quantize, eval) run on other models with --allow-unknown-arch")


def package_path(req: BuildRequest, target_cls, model_name: str) -> Path:
    return Path(req.output) / f"{safe_name(model_name)}-{target_cls.name}"


def profile_cache_path(info, calib, settings) -> Path:
    """Where the sensitivity map of (model, calibration, settings) is cached: a content hash."""
    from .sensitivity import SENSITIVITY_VERSION

    key = _json_sha({"sdk": __version__, "format": SENSITIVITY_VERSION,
                     "weights": info.weights_sha256, "config": info.config_sha256,
                     "tokenizer": info.tokenizer_sha256, "calibration": calib.to_dict(),
                     "settings": settings.to_dict()})
    return cache_dir() / "profiles" / f"{key}.json"


def store_profile(sens, path: Path) -> None:
    atomic_write_text(path, json.dumps(sens.to_dict(), sort_keys=True) + "\n")


def _profile_cached(model, tok, info, req: BuildRequest, caps, log):
    """The sensitivity map for (model, calibration, settings), from the cache when present."""
    from .calibration import load_calibration
    from .sensitivity import ProfileSettings, SensitivityMap, profile_model

    ids, calib = load_calibration(tok, req.calib, num_samples=req.samples, seq_len=req.seq_len,
                                  seed=req.seed)
    settings = ProfileSettings.for_capabilities(caps, seed=req.seed)
    path = profile_cache_path(info, calib, settings)
    if path.is_file():
        log(f"profile: cached ({path.name[:12]}…)")
        sens = SensitivityMap.from_dict(json.loads(path.read_text()))
        # the entry was made for the same weights, config, tokenizer and calibration, maybe from
        # another copy of the model: its name and source are this one's
        sens.model = info.to_plan_model()
        return sens, ids, calib
    log(f"profile: {req.samples} x {req.seq_len} calibration tokens from {calib.source}, groups "
        f"{list(settings.group_sizes)}{', symmetric' if settings.symmetric else ''}")
    fit, _ = load_calibration(tok, req.calib, num_samples=settings.fit_samples, seq_len=req.seq_len,
                              seed=req.seed + 1)
    sens = profile_model(model, info, ids, calib, settings, req.device, fit_samples=fit)
    store_profile(sens, path)
    return sens, ids, calib


def _refusal(target_cls, violations) -> str:
    shown = "\n".join(f"  - {v}" for v in violations[:12])
    more = f"\n  … and {len(violations) - 12} more" if len(violations) > 12 else ""
    return (f"the plan asks for what target {target_cls.name!r} cannot run "
            f"({len(violations)} modules):\n{shown}{more}\n"
            f"Fix: pass --replan to re-plan for {target_cls.name!r} under the same budget, or make "
            f"a plan for it (apq-sdk build without --plan plans for the target's capabilities).")


def resolve_plan(req: BuildRequest, target_cls, budget, model, tok, info, log):
    """(plan, calibration ids, sensitivity map or None): the given plan (checked, or
    re-planned) or a new one."""
    from .calibration import load_calibration
    from .plan_file import PlanError, load_plan
    from .planning import Budget, BudgetTooSmall, make_plan

    caps = target_cls.capabilities
    if req.plan_path is not None:
        try:
            plan = load_plan(Path(req.plan_path))
        except PlanError as exc:
            raise ApqError(str(exc)) from exc
        if plan.model.weights_sha256 != info.weights_sha256:
            raise ApqError(f"plan {req.plan_path} was made for other weights "
                           f"({plan.model.weights_sha256[:12]}…, this model has "
                           f"{info.weights_sha256[:12]}…); make a plan for this model")
        if plan.model.tokenizer_sha256 not in (None, info.tokenizer_sha256):
            raise ApqError(f"plan {req.plan_path} was made with another tokenizer; make a plan "
                           f"for this model")
        violations = target_cls.check_plan(plan)
        if not violations:
            ids, _ = load_calibration(tok, req.calib, num_samples=req.samples,
                                      seq_len=req.seq_len, seed=req.seed)
            return plan, ids, None
        if not req.replan:
            raise ApqError(_refusal(target_cls, violations))
        objective = plan.objective
        budget = Budget(bits_per_weight=objective.bits_per_weight,
                        memory_reduction=objective.memory_reduction, max_loss=objective.max_loss,
                        scope=objective.scope)
        activation = next((m.activation for m in plan.modules.values()
                           if m.kind == "linear" and m.bits != 16), None)
        if activation not in caps.activation_modes:
            activation = req.activations or caps.default_activation
        head = plan.modules.get("lm_head")
        head_bits = str(head.bits) if head is not None and objective.scope == "linear" \
            else req.head_bits
        log(f"re-planning for {target_cls.name} under the plan's budget "
            f"({len(violations)} modules were not runnable)")
    else:
        activation = req.activations or caps.default_activation
        head_bits = req.head_bits
    sens, ids, _ = _profile_cached(model, tok, info, req, caps, log)
    try:
        plan = make_plan(sens, budget, caps=caps, activation=activation, head_bits=head_bits)
    except BudgetTooSmall as exc:
        if not _is_default_budget(req) or exc.least_bits_per_weight is None:
            raise
        # the default budget is a starting point, not the user's demand: a target that cannot
        # store the model that small gets the least it can store (rounded up to 0.01)
        least = math.ceil(exc.least_bits_per_weight * 100) / 100
        log(f"plan: {target_cls.name} cannot store this model in the default "
            f"{DEFAULT_BITS_PER_WEIGHT} bits per weight (the least is "
            f"{exc.least_bits_per_weight:.3f}); planning {least:.2f}. Pass a budget to choose")
        budget = Budget(bits_per_weight=least)
        plan = make_plan(sens, budget, caps=caps, activation=activation, head_bits=head_bits)
    left = target_cls.check_plan(plan)
    if left:
        raise ApqError(_refusal(target_cls, left))
    t = plan.totals
    log(f"plan: whole model {t.target_bits_per_weight:.3f} bits/weight as {target_cls.name} "
        f"stores it ({_mb(t.target_bytes)}; {t.model_bits_per_weight:.3f} in the checkpoint), "
        f"decoder linears {t.linear_bits_per_weight:.3f}, head {plan.modules['lm_head'].bits}-bit, "
        f"predicted KL {t.predicted_loss:.4f}")
    return plan, ids, sens


#: plan fields that say which target asked and why, not what is quantized how
_NOT_QUANTIZATION = ("capabilities", "objective", "totals", "loss_model", "sdk_version")


def quantization_content(plan) -> dict:
    """What a plan's quantized weights depend on: the model (identity, name and source) and each
    module's settings. Not the target's capability table, the budget, the totals or the loss
    model's predictions: two targets whose plans quantize the same modules the same way (device
    presets of one runtime, tables that differ in storage only) share one checkpoint."""
    body = json.loads(plan.to_json())
    for key in _NOT_QUANTIZATION:
        body.pop(key, None)
    for module in body["modules"].values():
        module.pop("predicted_loss", None)
    return body


def _quantized_cached(model, tok, info, plan, ids, calib_sha: str, req, log) -> tuple[Path, bool]:
    """The quantized checkpoint of `plan` (cached by what it quantizes and the calibration
    content), and whether `model` was quantized in place to make it (then it is no longer the
    float model)."""
    from .quantizer import quantize_model, save_quantized

    key = _json_sha({"quantization": quantization_content(plan), "calibration": calib_sha,
                     "samples": [req.samples, req.seq_len, req.seed], "sdk": __version__})
    path = cache_dir() / "quantized" / key
    if (path / "model.safetensors").is_file():
        log(f"quantize: cached ({key[:12]}…)")
        return path, False
    log("quantize: GPTQ at the planned bits, block by block")
    quantize_model(model, info, plan, ids, req.device)
    return save_quantized(model, tok, plan, path), True


def build(req: BuildRequest, log=print) -> Path:
    """Build one target; returns the package directory."""
    from .calibration import check_seq_len
    from .checkpoint import read_checkpoint
    from .model_io import load_model
    from .plan_file import plan_sha256, save_plan
    from .targets.base import BuildContext, get_target

    try:
        target_cls = get_target(req.target)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    missing = target_cls.missing_tools("build") + (target_cls.missing_tools("verify")
                                                   if req.verify else [])
    if missing:
        raise ApqError(f"target {target_cls.name!r} needs " + "; ".join(
            f"{t.name} ({t.how_to_get})" for t in missing))
    refusal = target_cls.build_refusal()
    if refusal:
        raise ApqError(f"target {target_cls.name!r}: {refusal}")
    budget = check_request(req, target_cls)
    started = time.time()
    log(f"model: loading {req.model}")
    # the target's own family list decides (a GGUF's model type is known once it is read)
    model, tok, info = load_model(req.model, device=req.device, allow_unknown=True)
    check_family(target_cls, info.model_type)
    check_seq_len(req.seq_len, model.config)
    plan, ids, sens = resolve_plan(req, target_cls, budget, model, tok, info, log)
    calib_sha = plan.calibration.sha256 if req.plan_path is None else \
        _json_sha([req.calib, req.samples, req.seq_len, req.seed])
    quantized, in_place = _quantized_cached(model, tok, info, plan, ids, calib_sha, req, log)
    checkpoint = read_checkpoint(quantized)
    if checkpoint.plan.to_json() != plan.to_json():
        # made for another target whose plan quantizes the same modules the same way
        if quantization_content(checkpoint.plan) != quantization_content(plan):
            raise ApqError(f"the cached checkpoint {quantized} does not hold this plan's "
                           f"quantization; delete that directory and build again")
        log(f"quantize: sharing the checkpoint of the {checkpoint.plan.capabilities.name!r} "
            f"plan (same modules, same bits)")
        checkpoint = dataclasses.replace(checkpoint, plan=plan)
    if in_place and req.verify:  # verify's accuracy checks need the unquantized model
        del model
        model, _, _ = load_model(req.model, device=req.device)
    final = package_path(req, target_cls, info.name)
    package_name = final.name
    failed = final.with_name(final.name + ".failed")
    options = target_cls.resolve_options(req.target_options)

    def fill(tmp: Path) -> None:
        target = target_cls()
        log(f"lower: {target_cls.name} ({target_cls.description})")
        target.lower(BuildContext(package_dir=tmp, checkpoint=checkpoint, model_name=info.name,
                                  package_name=package_name, options=options))
        save_plan(plan, tmp / "plan.json")
        result = None
        if req.verify:
            log(f"verify: the package against the torch reference on {req.verify_windows} "
                f"windows of {req.verify_text or 'the shipped verification text'}")
            result = target.verify(tmp, checkpoint=checkpoint, text_path=req.verify_text,
                                   windows=req.verify_windows, float_model=model)
        measured = None if result is None else \
            {k: v for k, v in result.to_dict().items() if k != "timings"}
        model_bytes = sum(p.stat().st_size for p in target.model_files(tmp))
        t = plan.totals
        manifest = write_manifest(tmp, {
            "format": PACKAGE_FORMAT, "version": PACKAGE_VERSION, "sdk_version": __version__,
            "target": {"name": target_cls.name, "options": options,
                       "capabilities": target_cls.capabilities.to_dict()},
            "model": {**_plan_model(plan), "spec": str(req.model)},
            "plan": {"file": "plan.json", "sha256": plan_sha256(plan)},
            "reference": {"quantized_cache_key": checkpoint.path.name},
            "runtimes": target_cls.runtime_versions(),
            "size": {"target_bits_per_weight": t.target_bits_per_weight,
                     "target_bytes": t.target_bytes,
                     "model_bits_per_weight": t.model_bits_per_weight,
                     "linear_bits_per_weight": t.linear_bits_per_weight,
                     "planned_bits_per_weight": t.bits_per_weight,
                     "model_bytes_planned": t.model_bytes, "model_params": t.model_params,
                     "fp16_bytes": t.model_fp16_bytes, "model_files_bytes": model_bytes,
                     "model_files_bits_per_weight": 8 * model_bytes / t.model_params,
                     "budget": {"scope": plan.objective.scope,
                                "bits_per_weight": plan.objective.bits_per_weight,
                                "memory_reduction": plan.objective.memory_reduction,
                                "max_loss": plan.objective.max_loss}},
            "measured_at_build": measured,
            **target.manifest_extra(tmp),
        })
        if result is not None:
            write_verify(tmp, result.to_dict(), problems=[])
        from .report import write_package_report

        write_package_report(tmp, plan, manifest, None if result is None else result.to_dict(),
                             sens)
        if result is not None and not result.passed:
            raise KeepAs(failed, ApqError(
                f"verification failed for {target_cls.name}:\n{result.table()}\n"
                f"The package was kept for inspection in {failed}/ (full report: "
                f"{failed / VERIFY_FILE}). Fix what the failed checks name, or build without "
                f"verification with --no-verify."))
        if result is not None:
            log(f"verify: passed\n{result.table()}")

    out = atomic_directory(final, fill)
    if failed.exists():  # an older failed attempt of the same package is stale now
        import shutil

        shutil.rmtree(failed)
    log(f"built {out} in {time.time() - started:.0f} s")
    return out


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _plan_model(plan) -> dict:
    return json.loads(plan.to_json())["model"]
