"""`apq-sdk build` and `apq-sdk verify`: from a model and a budget (or a plan) to a device package.

A build checks the plan against the target's capabilities before any work starts, profiles only when
no cached profile of the same model, calibration and settings exists (the cache key is a content
hash), quantizes once per plan (cached too, as the reference that `verify` compares against), lets
the target lower the quantized model, and writes `DIR/<model>-<target>/` through a temporary
directory renamed into place, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import ApqError, UsageError
from .fsutil import atomic_directory, atomic_write_text, cache_dir
from .package import PACKAGE_FORMAT, PACKAGE_VERSION, safe_name, write_manifest, write_verify

def _json_sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass
class BuildRequest:
    target: str
    model: str = "demo"
    plan_path: Path | None = None
    bits_per_weight: float | None = None
    memory_reduction: float | None = None
    max_loss: str | None = None
    activations: str | None = None  # None: the target's default activation mode
    head_bits: str = "8"
    output: Path = Path("apq-out")
    replan: bool = False
    verify: bool = True
    calib: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    device: str = "cpu"
    verify_windows: int = 8


def profile_cache_path(info, calib, settings) -> Path:
    """Where the sensitivity map of (model, calibration, settings) is cached: a content hash."""
    key = _json_sha({"sdk": __version__, "weights": info.weights_sha256, "config": info.config_sha256,
                     "calibration": calib.to_dict(), "settings": settings.to_dict()})
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
        return SensitivityMap.from_dict(json.loads(path.read_text())), ids
    fit, _ = load_calibration(tok, req.calib, num_samples=settings.fit_samples, seq_len=req.seq_len,
                              seed=req.seed + 1)
    sens = profile_model(model, info, ids, calib, settings, req.device, fit_samples=fit)
    store_profile(sens, path)
    return sens, ids


def _refusal(target_cls, violations) -> str:
    shown = "\n".join(f"  - {v}" for v in violations[:12])
    more = f"\n  … and {len(violations) - 12} more" if len(violations) > 12 else ""
    return (f"the plan asks for what target {target_cls.name!r} cannot run "
            f"({len(violations)} modules):\n{shown}{more}\n"
            f"Fix: pass --replan to re-plan for {target_cls.name!r} under the same budget, or make "
            f"a plan for it (apq-sdk build without --plan plans for the target's capabilities).")


def resolve_plan(req: BuildRequest, target_cls, model, tok, info, log):
    """(plan, calibration ids): the given plan (checked, or re-planned) or a new one."""
    from .plan_file import PlanError, load_plan
    from .planning import Budget, make_plan, parse_relative

    caps = target_cls.capabilities
    budget_given = any(v is not None for v in (req.bits_per_weight, req.memory_reduction, req.max_loss))
    if req.plan_path is not None:
        try:
            plan = load_plan(Path(req.plan_path))
        except PlanError as exc:
            raise ApqError(str(exc)) from exc
        if plan.model.weights_sha256 != info.weights_sha256:
            raise ApqError(f"plan {req.plan_path} was made for other weights "
                           f"({plan.model.weights_sha256[:12]}…, this model has "
                           f"{info.weights_sha256[:12]}…); make a plan for this model")
        violations = target_cls.check_plan(plan)
        if not violations:
            from .calibration import load_calibration

            ids, _ = load_calibration(tok, req.calib, num_samples=req.samples,
                                      seq_len=req.seq_len, seed=req.seed)
            return plan, ids, None
        if not req.replan:
            raise ApqError(_refusal(target_cls, violations))
        objective = plan.objective
        budget = Budget(bits_per_weight=objective.bits_per_weight,
                        memory_reduction=objective.memory_reduction, max_loss=objective.max_loss)
        if budget_given:
            raise UsageError("--replan keeps the plan's own budget; do not pass another one")
        activation = next((m.activation for m in plan.modules.values()
                           if m.kind == "linear" and m.bits != 16), None)
        if activation not in caps.activation_modes:
            activation = req.activations or caps.default_activation
        head = plan.modules.get("lm_head")
        head_bits = str(head.bits) if head is not None else req.head_bits
        log(f"re-planning for {target_cls.name} under the plan's budget "
            f"({len(violations)} modules were not runnable)")
    else:
        budget = Budget(
            bits_per_weight=req.bits_per_weight if budget_given else 4.0,
            memory_reduction=req.memory_reduction,
            max_loss=parse_relative(req.max_loss) if req.max_loss is not None else None)
        activation = req.activations or caps.default_activation
        head_bits = req.head_bits
    sens, ids = _profile_cached(model, tok, info, req, caps, log)
    plan = make_plan(sens, budget, caps=caps, activation=activation, head_bits=head_bits)
    left = target_cls.check_plan(plan)
    if left:
        raise ApqError(_refusal(target_cls, left))
    return plan, ids, sens


def _quantized_cached(model, tok, info, plan, ids, req, log) -> Path:
    """The quantized model directory of `plan` (cached by plan hash and calibration)."""
    from .plan_file import plan_sha256
    from .quantizer import quantize_model, save_quantized

    key = _json_sha({"plan": plan_sha256(plan), "calib": [req.calib, req.samples, req.seq_len, req.seed],
                     "sdk": __version__})
    path = cache_dir() / "quantized" / key
    if (path / "model.safetensors").is_file():
        log(f"quantize: cached ({key[:12]}…)")
        return path
    quantize_model(model, info, plan, ids, req.device)
    return save_quantized(model, tok, plan, path)


def build(req: BuildRequest, log=print) -> Path:
    """Build one target; returns the package directory."""
    from .checkpoint import read_checkpoint
    from .model_io import load_model
    from .plan_file import plan_sha256, save_plan
    from .targets.base import BuildContext, get_target

    try:
        target_cls = get_target(req.target)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    missing = target_cls.missing_tools("build")
    if missing:
        raise ApqError(f"target {target_cls.name!r} needs " + "; ".join(
            f"{t.name} ({t.how_to_get})" for t in missing))
    started = time.time()
    model, tok, info = load_model(req.model, device=req.device)
    plan, ids, sens = resolve_plan(req, target_cls, model, tok, info, log)
    checkpoint = read_checkpoint(_quantized_cached(model, tok, info, plan, ids, req, log))
    del model
    package_name = f"{safe_name(info.name)}-{target_cls.name}"
    final = Path(req.output) / package_name

    def fill(tmp: Path) -> None:
        target = target_cls()
        target.lower(BuildContext(package_dir=tmp, checkpoint=checkpoint, model_name=info.name,
                                  package_name=package_name))
        save_plan(plan, tmp / "plan.json")
        measured = None
        result = None
        if req.verify:
            result = _run_verify(target, tmp, checkpoint, req.verify_windows).to_dict()
            measured = {k: v for k, v in result.items() if k != "timings"}
        manifest = write_manifest(tmp, {
            "format": PACKAGE_FORMAT, "version": PACKAGE_VERSION, "sdk_version": __version__,
            "target": {"name": target_cls.name, "capabilities": target_cls.capabilities.to_dict()},
            "model": _plan_model(plan),
            "plan": {"file": "plan.json", "sha256": plan_sha256(plan)},
            "reference": {"quantized_cache_key": checkpoint.path.name},
            "runtimes": target_cls.runtime_versions(),
            "size": {"planned_bytes": plan.totals.bytes,
                     "linear_bits_per_weight": plan.totals.linear_bits_per_weight,
                     "bits_per_weight": plan.totals.bits_per_weight},
            "measured_at_build": measured,
        })
        if result is not None:
            write_verify(tmp, result, problems=[])
        from .report import write_package_report

        write_package_report(tmp, plan, manifest, result, sens)
        if result is not None and not result.get("passed", False):
            raise ApqError(f"verification failed for {target_cls.name}: "
                           f"{json.dumps(measured, sort_keys=True)[:600]}")

    out = atomic_directory(final, fill)
    log(f"built {out} in {time.time() - started:.0f} s")
    return out


def _plan_model(plan) -> dict:
    return json.loads(plan.to_json())["model"]


def _run_verify(target, package_dir: Path, checkpoint, windows: int):
    from .calibration import eval_text_path

    try:
        text = eval_text_path()
    except ApqError:
        text = None
    return target.verify(package_dir, checkpoint=checkpoint, text_path=text, windows=windows)
