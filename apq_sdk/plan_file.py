"""The quantization plan file: the versioned contract between the apq-sdk core and every target.

A plan says, for one model, calibration set, objective and target capability set, which bit-width,
group size, symmetry and activation mode each module gets, with its size as stored and its predicted
loss. Its JSON form is described by ``apq_sdk/schemas/plan-v2.schema.json`` (JSON Schema 2020-12);
version 1 plans (``plan-v1.schema.json``) are read and upgraded.

* :class:`Plan` and its parts are frozen dataclasses whose ``__post_init__`` checks every field
  and the rules a schema cannot express (bytes consistent with shape/bits/group via
  :func:`apq_sdk.quant.packing.stored_bytes`, totals equal to the sums over the modules, modules
  of one ``tie_group`` sharing bits and group size). So any ``Plan`` object is a valid plan.
  Problems raise :class:`PlanError`, whose message names the JSON path of the offending field,
  what was expected and what was found, and how to fix it.
* :meth:`Plan.to_json` is canonical (sorted keys, 2-space indent, trailing newline): equal plans
  give byte-identical files, and :func:`plan_sha256` hashes that text.
* :func:`load_plan` checks the version first (a newer plan asks to upgrade apq-sdk, since the v1
  schema cannot judge it), then the schema, then the semantics. :func:`save_plan` writes
  atomically.
* :func:`render_plan_table` draws the plan for ``apq-sdk plan show``.

Totals are plain sums over ``modules`` (every module entry is one stored tensor);
``bits_per_weight = 8 * bytes / params`` and ``fp16_bytes = 2 * params``. The whole model adds the
tensors outside the plan (``fixed_params``, stored as float32 in ``fixed_bytes``: norms, biases):
``model_bits_per_weight = 8 * model_bytes / model_params`` is bits per weight as llama.cpp reports
it. :func:`compute_totals` builds them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "SUPPORTED_BITS",
    "PlanError",
    "ModelInfo",
    "CalibrationInfo",
    "Objective",
    "CapabilitiesRef",
    "LossModel",
    "ModulePlan",
    "Totals",
    "Plan",
    "compute_totals",
    "load_plan",
    "save_plan",
    "plan_sha256",
    "render_plan_table",
    "schema_path",
    "current_sdk_version",
]

PLAN_FORMAT = "apq-plan"
PLAN_VERSION = 2
SUPPORTED_BITS = (2, 3, 4, 8, 16)
MODULE_KINDS = ("linear", "embedding", "lm_head")
#: the activation modes of a plan entry (one definition: capabilities, quant and verify import them)
ACT_INT8 = "int8-per-token-dynamic"
ACT_INT8_BLOCK = "int8-per-block-dynamic"
ACT_INT8_ASYM = "int8-per-token-asym-dynamic"
ACT_NONE = "none"
ACTIVATIONS = (ACT_INT8, ACT_INT8_BLOCK, ACT_INT8_ASYM, ACT_NONE)
CALIBRATION_KINDS = ("file", "data-dir", "builtin")
OBJECTIVE_MODES = ("memory", "loss")
BUDGET_SCOPES = ("model", "linear")
#: the grid a module's scales lie on: float16, or bfloat16's (for runtimes that keep bfloat16
#: scales; stored as float16 all the same, every such value being exact in float16), or QNN's
#: block encoding "qnn-lpbq" (symmetric codes in +-(2**(b-1) - 1), and every block scale of a row
#: a multiple 1..16 of one per-row scale, the largest 16 times it: apq_sdk.quant.weights.lpbq)
SCALE_DTYPES = ("float16", "bfloat16", "qnn-lpbq")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REGENERATE = "(or regenerate the plan with `apq-sdk plan`)"
# relative tolerance on derived float totals (bits per weight, summed losses)
_FLOAT_RTOL = 1e-9


class PlanError(ValueError):
    """An invalid plan. ``path`` is the JSON path of the offending field ('' for the whole file)."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def schema_path(version: int = PLAN_VERSION) -> Path:
    """Location of the JSON Schema of a plan version (the current one by default)."""
    return Path(__file__).resolve().parent / "schemas" / f"plan-v{version}.schema.json"


@lru_cache(maxsize=2)
def _schema(version: int = PLAN_VERSION) -> dict:
    with open(schema_path(version), encoding="utf-8") as f:
        return json.load(f)


def current_sdk_version() -> str:
    """The installed apq-sdk version ('0+unknown' when it cannot be determined)."""
    try:  # the package may define it
        from apq_sdk import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("apq-sdk")
    except Exception:
        return "0+unknown"


# --------------------------------------------------------------------------------------------------
# field checks


def _join(path: str, key: str | int, *, mapping: bool = False) -> str:
    """JSON path: ``a.b``, ``modules["x.y"]``, ``shape[0]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if mapping or not _IDENT.match(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


def _fail(path: str, expected: str, found: Any, fix: str | None = None) -> PlanError:
    found_s = found if isinstance(found, str) and found.startswith("<") else _show(found)
    msg = f"{path}: expected {expected}, found {found_s}"
    msg += f"; fix: {fix}" if fix else f"; fix: correct this field {_REGENERATE}"
    return PlanError(msg, path=path)


def _show(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        text = json.dumps(v, default=str)
        text = text if len(text) <= 60 else text[:57] + "..."
        return f"{type(v).__name__} {text}"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str(obj, name: str, path: str, *, nonempty: bool = True) -> None:
    v = getattr(obj, name)
    if not isinstance(v, str) or (nonempty and not v):
        raise _fail(_join(path, name), "a non-empty string", v)


def _int(obj, name: str, path: str, *, minimum: int | None = None, nullable=False) -> None:
    v = getattr(obj, name)
    if v is None and nullable:
        return
    if not _is_int(v):
        raise _fail(_join(path, name), "an integer" + (" or null" if nullable else ""), v)
    if minimum is not None and v < minimum:
        raise _fail(_join(path, name), f"an integer >= {minimum}", v)


def _num(obj, name: str, path: str, *, minimum=None, exclusive_min=None, maximum=None,
         nullable=False) -> None:
    """Check a number and store it as float, so equal plans serialize identically."""
    v = getattr(obj, name)
    if v is None and nullable:
        return
    if not _is_num(v):
        raise _fail(_join(path, name), "a finite number" + (" or null" if nullable else ""), v)
    if minimum is not None and v < minimum:
        raise _fail(_join(path, name), f"a number >= {minimum}", v)
    if exclusive_min is not None and v <= exclusive_min:
        raise _fail(_join(path, name), f"a number > {exclusive_min}", v)
    if maximum is not None and v > maximum:
        raise _fail(_join(path, name), f"a number <= {maximum}", v)
    object.__setattr__(obj, name, float(v))


def _bool(obj, name: str, path: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, bool):
        raise _fail(_join(path, name), "true or false", v)


def _enum(obj, name: str, path: str, allowed: tuple) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or v not in allowed or type(v) is not type(allowed[0]):
        shown = ", ".join(str(a) if _is_int(a) else json.dumps(a) for a in allowed)
        raise _fail(
            _join(path, name), f"one of {shown}", v, f"set it to one of {shown} {_REGENERATE}"
        )


def _sha(obj, name: str, path: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, str) or not _SHA256.match(v):
        raise _fail(_join(path, name), "a lowercase hex SHA-256 digest (64 characters)", v)


# --------------------------------------------------------------------------------------------------
# the dataclasses


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str
    architecture: str
    model_type: str
    source: str
    config_sha256: str
    weights_sha256: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    tokenizer_sha256: str | None = None
    _path: str = field(default="model", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        for n in ("name", "architecture", "model_type", "source"):
            _str(self, n, p)
        _sha(self, "config_sha256", p)
        _sha(self, "weights_sha256", p)
        if self.tokenizer_sha256 is not None:
            _sha(self, "tokenizer_sha256", p)
        for n in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "vocab_size"):
            _int(self, n, p, minimum=1)
        _bool(self, "tie_word_embeddings", p)


@dataclass(frozen=True, kw_only=True)
class CalibrationInfo:
    source: str
    kind: str
    sha256: str
    num_samples: int
    seq_len: int
    seed: int
    _path: str = field(default="calibration", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _str(self, "source", p)
        _enum(self, "kind", p, CALIBRATION_KINDS)
        _sha(self, "sha256", p)
        _int(self, "num_samples", p, minimum=1)
        _int(self, "seq_len", p, minimum=1)
        _int(self, "seed", p, minimum=0)


@dataclass(frozen=True, kw_only=True)
class Objective:
    """``memory``: least predicted loss within ``budget_bytes`` (derived from ``bits_per_weight`` or
    ``memory_reduction`` when those are given); ``loss``: fewest bytes within ``max_loss``.
    ``scope`` says what ``bits_per_weight`` and ``memory_reduction`` count: ``model`` (every stored
    weight byte over every parameter) or ``linear`` (the decoder's linear layers only)."""

    mode: str
    scope: str = "model"
    bits_per_weight: float | None = None
    memory_reduction: float | None = None
    max_loss: float | None = None
    budget_bytes: int | None = None
    _path: str = field(default="objective", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _enum(self, "mode", p, OBJECTIVE_MODES)
        _enum(self, "scope", p, BUDGET_SCOPES)
        _num(self, "bits_per_weight", p, exclusive_min=0, nullable=True)
        _num(self, "memory_reduction", p, exclusive_min=0, nullable=True)
        _num(self, "max_loss", p, minimum=0, nullable=True)
        _int(self, "budget_bytes", p, minimum=0, nullable=True)
        if self.mode == "memory" and self.budget_bytes is None:
            raise _fail(_join(p, "budget_bytes"), 'an integer when mode is "memory"', None,
                        f"record the byte budget the plan was solved for {_REGENERATE}")
        if self.mode == "loss" and self.max_loss is None:
            raise _fail(_join(p, "max_loss"), 'a number when mode is "loss"', None,
                        f"record the loss budget the plan was solved for {_REGENERATE}")


@dataclass(frozen=True, kw_only=True)
class CapabilitiesRef:
    """Which capability table the plan was made for: its name and `Capabilities.sha256()`."""

    name: str = "generic"
    sha256: str
    _path: str = field(default="capabilities", repr=False, compare=False)

    def __post_init__(self) -> None:
        _str(self, "name", self._path)
        _sha(self, "sha256", self._path)


@dataclass(frozen=True, kw_only=True)
class LossModel:
    """Maps the planner's predicted loss to the measured relative perplexity increase."""

    kind: str
    coefficients: dict[str, float] = field(default_factory=dict)
    _path: str = field(default="loss_model", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _str(self, "kind", p)
        if not isinstance(self.coefficients, Mapping):
            raise _fail(_join(p, "coefficients"), "an object of name -> number", self.coefficients)
        coeffs = {}
        for k, v in self.coefficients.items():
            if not isinstance(k, str):
                raise _fail(_join(p, "coefficients"), "string keys", k)
            if not _is_num(v):
                raise _fail(_join(_join(p, "coefficients"), k, mapping=True), "a finite number", v)
            coeffs[k] = float(v)
        object.__setattr__(self, "coefficients", coeffs)


@dataclass(frozen=True, kw_only=True)
class ModulePlan:
    """One module (one stored tensor) of the plan. ``shape`` is [N, K] = [out, in] features."""

    kind: str
    shape: tuple[int, int]
    bits: int
    group_size: int | None
    symmetric: bool
    scale_dtype: str = "float16"
    activation: str = "none"
    act_clip: float = 1.0
    tie_group: str | None = None
    bytes: int
    predicted_loss: float
    _path: str = field(default="module", repr=False, compare=False)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    def __post_init__(self) -> None:
        p = self._path
        _enum(self, "kind", p, MODULE_KINDS)
        shape = self.shape
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            raise _fail(_join(p, "shape"), "a list of 2 positive integers [N, K]", shape)
        for i, d in enumerate(shape):
            if not _is_int(d) or d < 1:
                raise _fail(_join(_join(p, "shape"), i), "a positive integer", d)
        object.__setattr__(self, "shape", (shape[0], shape[1]))
        _enum(self, "bits", p, SUPPORTED_BITS)
        _bool(self, "symmetric", p)
        _enum(self, "scale_dtype", p, SCALE_DTYPES)
        if self.scale_dtype == "qnn-lpbq" and not self.symmetric:
            raise _fail(_join(p, "symmetric"), "true for scale_dtype 'qnn-lpbq' (QNN's block "
                        "encoding has no zero points)", self.symmetric)
        _enum(self, "activation", p, ACTIVATIONS)
        _num(self, "act_clip", p, exclusive_min=0, maximum=1)
        if self.activation in ("int8-per-block-dynamic", "int8-per-token-asym-dynamic"):
            if self.bits == 16:
                raise _fail(_join(p, "activation"), "'none' or 'int8-per-token-dynamic' for a "
                            f"16-bit layer ({self.activation} quantizes the activations of "
                            "quantized layers only)",
                            self.activation, "set activation to 'none' for 16-bit layers")
            if self.act_clip != 1:
                raise _fail(_join(p, "act_clip"), f"1.0 with {self.activation} (no clip)",
                            self.act_clip)
        tie = self.tie_group
        if tie is not None and (not isinstance(tie, str) or not tie):
            raise _fail(_join(p, "tie_group"), "a non-empty string or null", self.tie_group)
        _int(self, "bytes", p, minimum=1)
        _num(self, "predicted_loss", p, minimum=0)
        n, k = self.shape
        g = self.group_size
        gp = _join(p, "group_size")
        if self.bits == 16:
            if g is not None:
                raise _fail(gp, "null when bits is 16 (float16 has no groups)", g,
                            "set group_size to null, or choose a bit-width of 2, 3, 4 or 8")
        else:
            if not _is_int(g):
                raise _fail(gp, f"an integer when bits is {self.bits}", g,
                            "set a positive multiple of 8 as group size (e.g. 128)")
            if g < 8 or g % 8:
                raise _fail(gp, "a positive multiple of 8", g,
                            "choose a group size that is a multiple of 8 (it need not divide the "
                            "in-features: the last group of a row may be shorter)")
            if k % 8:
                raise _fail(_join(_join(p, "shape"), 1),
                            f"a multiple of 8 when bits is {self.bits} (whole packed bytes per "
                            "row)", k, "keep this module in float16 (bits 16, group_size null)")
        if self.kind == "embedding" and self.activation != "none":
            raise _fail(_join(p, "activation"), '"none" for an embedding (a table lookup)',
                        self.activation, 'set activation to "none"')
        try:
            want = module_bytes(n, k, self.bits, g, self.symmetric)
        except ValueError as e:  # a layout the storage format does not allow
            raise _fail(gp, "a group size the storage format accepts", g, str(e)) from None
        if self.bytes != want:
            raise _fail(
                _join(p, "bytes"),
                f"{want} (stored size of shape [{n}, {k}] at {self.bits} bits, group "
                f"{g if g is not None else '-'}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'})",
                self.bytes,
                f"set bytes to {want} {_REGENERATE}",
            )


def module_bytes(n: int, k: int, bits: int, group_size: int | None, symmetric: bool) -> int:
    """Stored bytes of one module: :func:`apq_sdk.quant.packing.stored_bytes` (docs/formats.md)."""
    from apq_sdk.quant.packing import stored_bytes  # the single definition of the storage format

    return int(stored_bytes(n, k, bits, group_size, symmetric))


@dataclass(frozen=True, kw_only=True)
class Totals:
    bytes: int
    params: int
    bits_per_weight: float
    predicted_loss: float
    fp16_bytes: int
    linear_bytes: int
    linear_params: int
    linear_bits_per_weight: float
    fixed_params: int = 0
    fixed_bytes: int = 0
    model_params: int
    model_bytes: int
    model_bits_per_weight: float
    target_bytes: int
    target_bits_per_weight: float
    _path: str = field(default="totals", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        for n in ("bytes", "params", "fp16_bytes", "linear_bytes", "linear_params", "fixed_params",
                  "fixed_bytes", "model_params", "model_bytes", "target_bytes"):
            _int(self, n, p, minimum=0)
        for n in ("bits_per_weight", "predicted_loss", "linear_bits_per_weight",
                  "model_bits_per_weight", "target_bits_per_weight"):
            _num(self, n, p, minimum=0)

    @property
    def model_fp16_bytes(self) -> int:
        return 2 * self.model_params


def compute_totals(modules: Mapping[str, ModulePlan], fixed_params: int = 0,
                   fixed_bytes: int = 0, target_bytes: int | None = None) -> Totals:
    """The totals of a set of modules (plain sums; losses summed in sorted module-name order) and
    of the whole model, with `fixed_params` more parameters stored in `fixed_bytes`;
    `target_bytes` is the whole model as the plan's target stores it (default: as the core
    does)."""
    names = sorted(modules)
    total_b = sum(modules[n].bytes for n in names)
    params = sum(modules[n].params for n in names)
    loss = 0.0
    for n in names:
        loss += modules[n].predicted_loss
    lin = [modules[n] for n in names if modules[n].kind == "linear"]
    lin_b = sum(m.bytes for m in lin)
    lin_p = sum(m.params for m in lin)
    return Totals(
        bytes=total_b,
        params=params,
        bits_per_weight=8.0 * total_b / params if params else 0.0,
        predicted_loss=loss,
        fp16_bytes=2 * params,
        linear_bytes=lin_b,
        linear_params=lin_p,
        linear_bits_per_weight=8.0 * lin_b / lin_p if lin_p else 0.0,
        fixed_params=fixed_params,
        fixed_bytes=fixed_bytes,
        model_params=params + fixed_params,
        model_bytes=total_b + fixed_bytes,
        model_bits_per_weight=8.0 * (total_b + fixed_bytes) / (params + fixed_params)
        if params + fixed_params else 0.0,
        target_bytes=total_b + fixed_bytes if target_bytes is None else target_bytes,
        target_bits_per_weight=8.0 * (total_b + fixed_bytes if target_bytes is None
                                      else target_bytes) / (params + fixed_params)
        if params + fixed_params else 0.0,
    )


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_FLOAT_RTOL, abs_tol=1e-12)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A whole plan. Construct it with keyword arguments; it is checked on construction."""

    model: ModelInfo
    calibration: CalibrationInfo
    objective: Objective
    capabilities: CapabilitiesRef
    loss_model: LossModel
    modules: dict[str, ModulePlan]
    totals: Totals
    sdk_version: str = field(default_factory=current_sdk_version)
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.format != PLAN_FORMAT:
            raise _fail("format", json.dumps(PLAN_FORMAT), self.format,
                        "this is not an apq-sdk plan file; pass the plan.json written by "
                        "`apq-sdk plan`")
        _check_version(self.version)
        _str(self, "sdk_version", "")
        for name, typ in (("model", ModelInfo), ("calibration", CalibrationInfo),
                          ("objective", Objective), ("capabilities", CapabilitiesRef),
                          ("loss_model", LossModel), ("totals", Totals)):
            v = getattr(self, name)
            if not isinstance(v, typ):
                raise _fail(name, f"a {typ.__name__}", f"<{type(v).__name__}>")
        if not isinstance(self.modules, Mapping) or not self.modules:
            raise _fail("modules", "a non-empty object of module name -> module plan",
                        self.modules if not isinstance(self.modules, Mapping) else "{}")
        for name, m in self.modules.items():
            if not isinstance(name, str) or not name:
                raise _fail("modules", "non-empty module names", name)
            if not isinstance(m, ModulePlan):
                raise _fail(_join("modules", name, mapping=True), "a ModulePlan",
                            f"<{type(m).__name__}>")
        object.__setattr__(self, "modules", {k: self.modules[k] for k in sorted(self.modules)})
        self._check_semantics()

    def _check_semantics(self) -> None:
        # modules of one tie group share bits and group size
        first: dict[str, tuple[str, ModulePlan]] = {}
        for name, m in self.modules.items():
            if m.tie_group is None:
                continue
            if m.tie_group not in first:
                first[m.tie_group] = (name, m)
                continue
            ref_name, ref = first[m.tie_group]
            for attr in ("bits", "group_size"):
                if getattr(m, attr) != getattr(ref, attr):
                    path = _join(_join("modules", name, mapping=True), attr)
                    raise _fail(
                        path,
                        f"{_show(getattr(ref, attr))} like modules[{json.dumps(ref_name)}] "
                        f"(same tie_group {json.dumps(m.tie_group)})",
                        getattr(m, attr),
                        f"give every module of tie_group {json.dumps(m.tie_group)} the same bits "
                        f"and group_size {_REGENERATE}",
                    )
        # totals equal the sums
        t = self.totals
        want = compute_totals(self.modules, t.fixed_params, t.fixed_bytes, t.target_bytes)
        for attr in ("bytes", "params", "fp16_bytes", "linear_bytes", "linear_params",
                     "model_params", "model_bytes"):
            if getattr(t, attr) != getattr(want, attr):
                raise _fail(_join("totals", attr), f"{getattr(want, attr)} (the sum over modules)",
                            getattr(t, attr), f"set it to {getattr(want, attr)} {_REGENERATE}")
        for attr in ("bits_per_weight", "predicted_loss", "linear_bits_per_weight",
                     "model_bits_per_weight", "target_bits_per_weight"):
            if not _close(getattr(t, attr), getattr(want, attr)):
                raise _fail(_join("totals", attr), f"{getattr(want, attr)!r} (from the modules)",
                            getattr(t, attr), f"set it to {getattr(want, attr)!r} {_REGENERATE}")

    # ---- serialization --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        def plain(obj) -> dict:
            return {k: v for k, v in obj.__dict__.items() if not k.startswith("_")}

        modules = {}
        for name, m in self.modules.items():
            d = plain(m)
            d["shape"] = list(m.shape)
            modules[name] = d
        return {
            "format": self.format,
            "version": self.version,
            "sdk_version": self.sdk_version,
            "model": plain(self.model),
            "calibration": plain(self.calibration),
            "objective": plain(self.objective),
            "capabilities": plain(self.capabilities),
            "loss_model": {"kind": self.loss_model.kind,
                           "coefficients": dict(self.loss_model.coefficients)},
            "modules": modules,
            "totals": plain(self.totals),
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, 2-space indent, ASCII only (other characters as \\u escapes,
        so no invisible or reordering character is ever written raw), trailing newline."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=True,
                          allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, doc: Any) -> "Plan":
        """Build from parsed JSON: version check, then the schema, then the semantic checks."""
        if isinstance(doc, dict) and "version" in doc:
            _check_version(doc["version"])
            if doc["version"] == 1:
                _validate_schema(doc, 1)
                doc = _upgrade_v1(doc)
        _validate_schema(doc)
        modules = {
            name: ModulePlan(**m, _path=_join("modules", name, mapping=True))
            for name, m in doc["modules"].items()
        }
        return cls(
            format=doc["format"],
            version=doc["version"],
            sdk_version=doc["sdk_version"],
            model=ModelInfo(**doc["model"]),
            calibration=CalibrationInfo(**doc["calibration"]),
            objective=Objective(**doc["objective"]),
            capabilities=CapabilitiesRef(**doc["capabilities"]),
            loss_model=LossModel(**doc["loss_model"]),
            modules=modules,
            totals=Totals(**doc["totals"]),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        try:
            doc = json.loads(text)
        except RecursionError:
            raise PlanError("expected a JSON plan file, found JSON nested too deeply to be one; "
                            "fix: pass the plan.json written by `apq-sdk plan`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if isinstance(e, json.JSONDecodeError):
                why = f"line {e.lineno} column {e.colno}: {e.msg}"
            else:
                why = f"not UTF-8 text: {e.reason}"
            raise PlanError(
                f"expected a JSON plan file, found text that is not valid JSON ({why}); "
                f"fix: pass the plan.json written by `apq-sdk plan`"
            ) from None
        return cls.from_dict(doc)


def _upgrade_v1(doc: dict) -> dict:
    """A version 1 plan as version 2: its budget counted the decoder linears (with the head fixed)
    and it recorded nothing outside the plan, so the whole-model totals are the planned ones."""
    doc = json.loads(json.dumps(doc))
    doc["version"] = 2
    doc["model"]["tokenizer_sha256"] = None
    doc["objective"]["scope"] = "linear" if doc["objective"].get("bits_per_weight") else "model"
    t = doc["totals"]
    t.update(fixed_params=0, fixed_bytes=0, model_params=t["params"], model_bytes=t["bytes"],
             model_bits_per_weight=t["bits_per_weight"], target_bytes=t["bytes"],
             target_bits_per_weight=t["bits_per_weight"])
    return doc


def _check_version(v: Any) -> None:
    if not _is_int(v):
        raise _fail("version", f"the integer {PLAN_VERSION}", v)
    if v > PLAN_VERSION:
        raise PlanError(
            f"version: this plan has format version {v}, newer than the newest this apq-sdk "
            f"({current_sdk_version()}) reads ({PLAN_VERSION}); fix: upgrade apq-sdk "
            f"(pip install -U apq-sdk), or regenerate the plan with this apq-sdk",
            path="version",
        )
    if v < 1:
        raise _fail("version", f"an integer from 1 to {PLAN_VERSION}", v)


# --------------------------------------------------------------------------------------------------
# schema validation with readable messages


def _schema_error_path(err) -> str:
    path = ""
    parts = list(err.absolute_path)
    for i, part in enumerate(parts):
        # keys of free-form maps (module names, coefficient names) are always bracketed
        mapping = (i == 1 and parts[0] == "modules") or (
            i == 2 and parts[:2] == ["loss_model", "coefficients"]
        )
        path = _join(path, part, mapping=mapping)
    return path


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _describe(err) -> tuple[str, str]:
    """(path, message) for one jsonschema error."""
    path = _schema_error_path(err)
    v, kind, inst = err.validator_value, err.validator, err.instance
    if kind == "required":
        missing = [k for k in v if isinstance(inst, dict) and k not in inst]
        name = missing[0] if missing else "?"
        p = _join(path, name)
        return p, f"{p}: missing required field; fix: add {json.dumps(name)} {_REGENERATE}"
    if kind == "additionalProperties" and isinstance(inst, dict):
        allowed = set(err.schema.get("properties", {}))
        extra = sorted(k for k in inst if k not in allowed)
        name = extra[0] if extra else "?"
        p = _join(path, name)
        return p, (f"{p}: unexpected field (expected only {', '.join(sorted(allowed))}); "
                   f"fix: remove it {_REGENERATE}")
    found = f"{_type_name(inst)} {_show(inst)}" if kind == "type" else _show(inst)
    if kind == "enum":
        shown = ", ".join(str(a) if _is_int(a) else json.dumps(a) for a in v)
        exp, fix = f"one of {shown}", f"set it to one of {shown}"
    elif kind == "const":
        exp, fix = json.dumps(v), f"set it to {json.dumps(v)}"
    elif kind == "type":
        types = v if isinstance(v, list) else [v]
        exp = " or ".join(types)
        fix = f"give it a value of type {exp}"
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">",
              "exclusiveMaximum": "<"}[kind]
        exp, fix = f"a number {op} {v}", f"use a value {op} {v}"
    elif kind == "pattern":
        if v == _SHA256.pattern:
            exp = "a lowercase hex SHA-256 digest (64 characters)"
        else:
            exp = f"a string matching {v}"
        fix = "correct this field"
    elif kind in ("minItems", "maxItems"):
        exp, fix = f"an array with {'at least' if kind == 'minItems' else 'at most'} {v} items", \
            "correct the number of items"
    elif kind in ("minLength",):
        exp, fix = "a non-empty string", "give it a non-empty value"
    elif kind == "minProperties":
        exp = f"an object with at least {v} entr{'y' if v == 1 else 'ies'}"
        fix = "add the missing entries"
    else:
        exp, fix = f"a value satisfying {kind} = {_show(v)}", "correct this field"
    return path, f"{path or '(plan)'}: expected {exp}, found {found}; fix: {fix} {_REGENERATE}"


def _validate_schema(doc: Any, version: int = PLAN_VERSION) -> None:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(_schema(version))
    errors = list(validator.iter_errors(doc))
    if not errors:
        return
    described = sorted(_describe(e) for e in errors)
    path, msg = described[0]
    if len(described) > 1:
        msg += f" (and {len(described) - 1} more problem{'s' if len(described) > 2 else ''})"
    raise PlanError(msg, path=path)


# --------------------------------------------------------------------------------------------------
# files


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and fully check a plan file; PlanError names the file and the offending field."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise PlanError(f"{p}: plan file not found; fix: check the path, or create it with "
                        f"`apq-sdk plan`") from None
    except IsADirectoryError:
        raise PlanError(f"{p}: expected a plan file, found a directory; fix: pass the plan.json "
                        f"inside it") from None
    try:
        return Plan.from_json(raw)
    except PlanError as e:
        raise PlanError(f"{p}: {e}", path=e.path) from None


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan.to_json()`` atomically (temporary file in the same folder, then os.replace)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"save_plan: expected a Plan, found {type(plan).__name__}")
    p = Path(path)
    text = plan.to_json().encode("utf-8")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        from apq_sdk.fsutil import file_mode

        os.chmod(tmp, file_mode())  # mkstemp's 0600 would make the plan private to its writer
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def plan_sha256(plan: Plan) -> str:
    """SHA-256 (hex) of the canonical JSON text of the plan."""
    return hashlib.sha256(plan.to_json().encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# display


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.2f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def render_plan_table(plan: Plan):
    """A rich Table of the plan (one row per module, totals in the caption). Every string from
    the plan goes through rich.text.Text, so names are never read as rich markup."""
    from rich.table import Table
    from rich.text import Text

    t = plan.totals
    o = plan.objective
    if o.bits_per_weight is not None:
        budget = f"{o.bits_per_weight:g} bits/weight ({o.scope})"
    elif o.memory_reduction is not None:
        budget = f"{o.memory_reduction:.0%} smaller than fp16 ({o.scope})"
    elif o.max_loss is not None:
        budget = f"max loss {o.max_loss:g}"
    else:
        budget = f"{o.budget_bytes:,} bytes"
    table = Table(
        title=Text(f"{plan.model.name}: apq-plan v{plan.version} ({o.mode} objective, budget "
                   f"{budget}, capabilities {plan.capabilities.name})"),
        caption=Text(
            f"whole model: {t.model_params:,} params, {t.model_bytes:,} bytes "
            f"({_human_bytes(t.model_bytes)}) = {t.model_bits_per_weight:.3f} bits/weight, "
            f"{t.model_bytes / t.model_fp16_bytes if t.model_params else 0:.1%} of fp16 "
            f"({_human_bytes(t.model_fp16_bytes)}); as the target stores it {t.target_bytes:,} "
            f"bytes = {t.target_bits_per_weight:.3f} bits/weight; decoder linear layers "
            f"{t.linear_bits_per_weight:.3f} bits/weight; {len(plan.modules)} planned modules "
            f"{t.bits_per_weight:.3f} bits/weight, outside the plan {t.fixed_params:,} params "
            f"(float32); predicted loss {t.predicted_loss:.4g}"
        ),
    )
    table.add_column("module", no_wrap=True)
    table.add_column("kind")
    table.add_column("shape", justify="right")
    table.add_column("bits", justify="right")
    table.add_column("group", justify="right")
    table.add_column("sym")
    table.add_column("activation")
    table.add_column("bytes", justify="right")
    table.add_column("predicted loss", justify="right")
    for name, m in plan.modules.items():
        table.add_row(
            Text(name),
            m.kind,
            f"{m.shape[0]}x{m.shape[1]}",
            str(m.bits),
            "-" if m.group_size is None else str(m.group_size),
            "yes" if m.symmetric else "no",
            m.activation if m.act_clip == 1.0 else f"{m.activation} (clip {m.act_clip:g})",
            f"{m.bytes:,}",
            f"{m.predicted_loss:.4g}",
        )
    return table
