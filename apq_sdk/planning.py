"""Stage 2: from a sensitivity map and a budget to a plan file.

Each linear layer becomes a decision unit whose options are the profiled candidates (bits, group
size) plus float16; layers a runtime fuses (q/k/v, gate/up) are merged into one unit so they share
bits and group size. The output head (tied to the embedding or not) has its own options: fixed by
`head_bits`, or left to the optimizer with `head_bits="auto"` (the default). An untied input
embedding is a table lookup kept at float16; norms and biases stay float32 outside the plan.

Budgets (one of):
* `bits_per_weight` with scope "model" (the default): every stored weight byte of the whole model
  (planned modules, head, embedding, norms, biases) <= X/8 * every parameter: bits per weight as
  llama.cpp reports it, so the budget is what the package weighs;
* `bits_per_weight` with scope "linear": bytes of the decoder linears <= X/8 * their parameters,
  with the head fixed by `head_bits` (the figure GPTQ and most papers compare);
* `memory_reduction`: the whole model <= (1 - R) * its float16 bytes;
* `max_loss`: relative perplexity increase, turned into a KL budget by the profiled loss model.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import knapsack
from .capabilities import GENERIC, Capabilities
from .errors import UsageError
from .families import FUSED_GROUP_OF_ROLE
from .loss_model import kl_for_relative_ppl
from .plan_file import (CalibrationInfo, CapabilitiesRef, LossModel, ModelInfo, ModulePlan,
                        Objective, Plan, compute_totals)
from .sensitivity import SensitivityMap, candidate_key, parse_candidate_key
from .quant.modules import ACT_INT8, ACT_INT8_BLOCK, ACT_NONE, QUANTIZED_LAYERS_ONLY
from .quant.packing import stored_bytes

class BudgetTooSmall(UsageError):
    """A memory budget below the least the target can store the model in. `least_bits_per_weight`:
    the whole model's least bits per weight (every unit at its smallest option), or None for a
    linear-only budget."""

    def __init__(self, message: str, least_bits_per_weight: float | None):
        super().__init__(message)
        self.least_bits_per_weight = least_bits_per_weight


@dataclass(frozen=True)
class Budget:
    bits_per_weight: float | None = None
    memory_reduction: float | None = None
    max_loss: float | None = None  # relative perplexity increase, 0.005 = +0.5 %
    scope: str = "model"  # what bits_per_weight counts: "model" or "linear"

    def __post_init__(self):
        if self.scope not in ("model", "linear"):
            raise UsageError(f"budget scope: expected 'model' or 'linear', found {self.scope!r}")
        if self.scope == "linear" and self.bits_per_weight is None:
            raise UsageError("a linear-only budget is a bits-per-weight budget: pass "
                             "--linear-bits-per-weight X")
        given = [v for v in (self.bits_per_weight, self.memory_reduction, self.max_loss) if v is not None]
        if len(given) != 1:
            raise UsageError("give exactly one budget: --bits-per-weight X, --memory-reduction R "
                             f"or --max-loss L (found {len(given)})")
        if self.bits_per_weight is not None and not 1.0 < self.bits_per_weight <= 16.0:
            raise UsageError(f"--bits-per-weight: expected a number in (1, 16], found {self.bits_per_weight}")
        if self.memory_reduction is not None and not 0.0 < self.memory_reduction < 1.0:
            raise UsageError(f"--memory-reduction: expected a fraction in (0, 1), found {self.memory_reduction}")
        if self.max_loss is not None and not 0.0 < self.max_loss < 10.0:
            raise UsageError(f"--max-loss: expected a relative increase like 0.005 (or '0.5%'), "
                             f"found {self.max_loss}")


def parse_relative(text: str) -> float:
    """'0.5%' -> 0.005, '0.005' -> 0.005."""
    text = text.strip()
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"expected a number or a percentage like '0.5%', found {text!r}") from None


def _module_options(entry: dict, caps: Capabilities, activation: str, alpha: float,
                    symmetric: bool, as_target: bool = True) -> list[tuple[str, int, float]]:
    """(candidate key, bytes, predicted KL) for one module, filtered by the capability table:
    decoder linears by its weight bits, the head by its head bits. Bytes as the target stores
    them, or (`as_target=False`) as the core's checkpoint does."""
    n, k = entry["shape"]
    linear = entry["kind"] == "linear"
    tied = bool(entry.get("tied"))
    allowed_bits = caps.weight_bits if linear else caps.head_bits
    act_loss = alpha * entry["gain"] * entry.get("act_error", 0.0) \
        if activation == ACT_INT8 and linear else 0.0
    block_errors = entry.get("act_error_block", {})
    options = []
    for key, err in sorted(entry["errors"].items()):
        bits, group = parse_candidate_key(key)
        if bits not in allowed_bits or not caps.runs_group(k, group):
            continue
        loss = alpha * entry["gain"] * err if linear else err
        if activation == ACT_INT8_BLOCK and linear:
            # per-block int8 activations: their error depends on the block (= group) size
            loss += alpha * entry["gain"] * block_errors.get(str(group), 0.0)
        size = caps.stored_bytes(n, k, bits, group, symmetric, tied_lookup=tied) if as_target \
            else stored_bytes(n, k, bits, group, symmetric)
        options.append((key, size, loss + act_loss))
    if 16 in allowed_bits:  # 16-bit layers keep float activations (float16, or wider on targets
        #                     that store float32: Capabilities.float_weight_bytes)
        size = caps.stored_bytes(n, k, 16, None, symmetric, tied_lookup=tied) if as_target \
            else n * k * 2
        options.append(("fp16", size, act_loss))
    return options


def _unit_name(name: str, entry: dict, caps: Capabilities) -> str:
    group = FUSED_GROUP_OF_ROLE.get(entry["role"])
    if group is not None and group in caps.fused:
        return f"{name.rsplit('.', 1)[0]}.{group}"
    return name


def build_units(sens: SensitivityMap, caps: Capabilities, activation: str, symmetric: bool,
                head_bits: str, as_target: bool = True
                ) -> tuple[list[knapsack.Unit], dict[str, list[str]], dict]:
    """Planner units, their member modules, and per-module option tables."""
    alpha = sens.loss_model["alpha"]
    members: dict[str, list[str]] = {}
    tables: dict[str, dict[str, tuple[int, float]]] = {}
    for name, entry in sens.modules.items():
        if entry["kind"] == "embedding" or entry["kind"] != "linear" and head_bits != "auto":
            continue
        options = _module_options(entry, caps, activation, alpha, symmetric, as_target)
        if not options:
            bits = caps.weight_bits if entry["kind"] == "linear" else caps.head_bits
            profiled = sorted({parse_candidate_key(k)[1] for k in entry["errors"]})
            whole = (f", dividing its input width {entry['shape'][1]}"
                     if caps.whole_groups else "")
            raise UsageError(f"{name}: no profiled candidate fits the capability table "
                             f"{caps.name!r} (bits {bits}, groups {caps.group_sizes}{whole}; the "
                             f"sensitivity map has groups {profiled}); profile for this table "
                             f"(apq-sdk profile --target {caps.name}, or --group-sizes)")
        tables[name] = {key: (b, loss) for key, b, loss in options}
        unit = _unit_name(name, entry, caps) if entry["kind"] == "linear" else name
        members.setdefault(unit, []).append(name)
    units = []
    for unit, names in members.items():
        shared = sorted(set.intersection(*(set(tables[n]) for n in names)))
        options = tuple(knapsack.Option(key, sum(tables[n][key][0] for n in names),
                                        sum(tables[n][key][1] for n in names)) for key in shared)
        units.append(knapsack.Unit(unit, options))
    return units, members, tables


def _check_request(sens: SensitivityMap, caps: Capabilities, activation: str, symmetric: bool,
                   head_bits: str, head_group: int) -> None:
    if activation not in caps.activation_modes:
        raise UsageError(f"activation {activation!r} is not supported by {caps.name!r}; "
                         f"choose one of {caps.activation_modes}")
    if symmetric is False and caps.symmetric_only:
        raise UsageError(f"{caps.name!r} runs symmetric groups only (no zero points); plan with "
                         f"symmetric groups")
    profiled_symmetric = bool(sens.settings.get("symmetric", False))
    if symmetric != profiled_symmetric:
        want = "symmetric" if symmetric else "asymmetric"
        have = "symmetric" if profiled_symmetric else "asymmetric"
        flag = "--symmetric" if symmetric else "--asymmetric"
        raise UsageError(f"the plan needs {want} groups but the sensitivity map was profiled with "
                         f"{have} ones, whose errors differ; profile again with {flag} (apq-sdk "
                         f"build does this for the target)")
    if head_bits != "auto":
        if int(head_bits) not in caps.head_bits:
            raise UsageError(f"--head-bits {head_bits}: {caps.name!r} runs head bits "
                             f"{caps.head_bits}; choose one of them or 'auto'")
        head_k = sens.modules["lm_head"]["shape"][1] if "lm_head" in sens.modules else None
        if int(head_bits) != 16 and (head_group not in caps.group_sizes or head_k is not None
                                     and not caps.runs_group(head_k, head_group)):
            raise UsageError(f"head group size {head_group} is not in {caps.name!r}'s group sizes "
                             f"{caps.group_sizes}"
                             + (f" dividing the head's input width {head_k}"
                                if caps.whole_groups else ""))
    profiled_groups = sorted(sens.settings.get("group_sizes", []))
    quantized_bits = [b for b in caps.weight_bits if b != 16]
    if quantized_bits and not set(profiled_groups) & set(caps.group_sizes):
        raise UsageError(f"no profiled candidate fits the capability table {caps.name!r}: it runs "
                         f"groups {caps.group_sizes}, the sensitivity map has groups "
                         f"{profiled_groups}; profile for this table (apq-sdk profile --target "
                         f"{caps.name}, or --group-sizes)")
    if not sens.loss_model:
        raise UsageError("the sensitivity map has no loss model (profiled without fit samples); "
                         "profile again with apq-sdk profile")


def head_group_for(sens: SensitivityMap, caps: Capabilities) -> int:
    """Group size of a fixed-bit head: the smallest profiled group size the table runs."""
    head = sens.modules["lm_head"]
    profiled = sorted({parse_candidate_key(k)[1] for k in head["errors"]})
    runnable = [g for g in profiled if caps.runs_group(head["shape"][1], g)]
    if runnable:
        return runnable[0]
    fitting = [g for g in sorted(caps.group_sizes) if caps.runs_group(head["shape"][1], g)]
    return fitting[0] if fitting else min(caps.group_sizes)


def make_plan(sens: SensitivityMap, budget: Budget, *, caps: Capabilities = GENERIC,
              activation: str = ACT_NONE, symmetric: bool | None = None, head_bits: str = "auto",
              head_group: int | None = None) -> Plan:
    """The plan of least predicted loss within `budget` (or fewest bytes within a loss budget),
    choosing only what `caps` runs. `symmetric` defaults to the table's (symmetric-only tables
    plan symmetric groups); `head_bits` fixes the output head or, with "auto", lets the
    optimizer choose it among the table's head bits."""
    symmetric = caps.symmetric if symmetric is None else bool(symmetric)
    head_bits = str(head_bits)
    head_group = head_group_for(sens, caps) if head_group is None else head_group
    _check_request(sens, caps, activation, symmetric, head_bits, head_group)
    if budget.scope == "linear" and head_bits == "auto":
        raise UsageError("--linear-bits-per-weight budgets the decoder linears only, so the head "
                         "must be fixed: pass --head-bits 4, 8 or 16 (or use --bits-per-weight, "
                         "which budgets the whole model and lets the planner choose the head)")
    # a whole-model budget bounds what the package weighs (the target's storage); the linear-only
    # figure is the core's, as GPTQ and llama.cpp report it
    as_target = budget.scope == "model"
    units, members, tables = build_units(sens, caps, activation, symmetric, head_bits, as_target)
    linear_params = sum(n * k for e in sens.modules.values() if e["kind"] == "linear"
                        for n, k in [e["shape"]])
    all_params = sum(e["shape"][0] * e["shape"][1] for e in sens.modules.values())
    model_params = all_params + sens.fixed["params"]
    # bytes that are not the solver's to choose: tensors outside the plan, a fixed head, the
    # untied embedding's float16 table
    fixed = sens.fixed["bytes"] + sum(e["shape"][0] * e["shape"][1] * 2
                                      for e in sens.modules.values() if e["kind"] == "embedding")
    if head_bits != "auto":
        fixed += _fixed_head_bytes(sens, caps, head_bits, head_group, symmetric)
    least = None if budget.scope == "linear" else \
        8 * (fixed + sum(min(o.bytes for o in u.options) for u in units)) / model_params
    if budget.bits_per_weight is not None and budget.scope == "linear":
        max_bytes = int(budget.bits_per_weight * linear_params / 8)
    elif budget.bits_per_weight is not None:
        max_bytes = _left_for_the_plan(int(budget.bits_per_weight * model_params / 8), fixed,
                                       f"--bits-per-weight {budget.bits_per_weight:g}", least)
    elif budget.memory_reduction is not None:
        max_bytes = _left_for_the_plan(int((1 - budget.memory_reduction) * 2 * model_params), fixed,
                                       f"--memory-reduction {budget.memory_reduction:g}", least)
    else:
        max_bytes = None
    try:
        if max_bytes is not None:
            assignment = knapsack.minimize_loss(units, max_bytes)
        else:
            kl_budget = kl_for_relative_ppl(budget.max_loss, sens.loss_model)
            assignment = knapsack.minimize_bytes(units, kl_budget)
    except knapsack.InfeasibleBudget as exc:
        if max_bytes is not None and least is not None:
            raise BudgetTooSmall(f"{exc} ({caps.name!r} stores this model in at least "
                                 f"{least:.3f} bits per weight of the whole model)", least) from exc
        raise UsageError(str(exc)) from exc
    modules: dict[str, ModulePlan] = {}
    target = _target_bytes(sens, caps, members, assignment, symmetric, fixed)
    for unit, names in members.items():
        key = assignment.choices[unit]
        bits, group = parse_candidate_key(key)
        for name in names:
            modules[name] = _module_plan(sens.modules[name], bits, group, symmetric, activation,
                                         tables[name][key][1],
                                         unit if len(names) > 1 else None, caps.scale_dtype)
    if head_bits != "auto":
        bits = int(head_bits)
        group = None if bits == 16 else head_group
        entry = sens.modules["lm_head"]
        key = candidate_key(bits, group)
        loss = entry["errors"].get(key, 0.0) if bits != 16 else 0.0
        modules["lm_head"] = _module_plan(entry, bits, group, symmetric, activation, loss, None,
                                          caps.scale_dtype)
    for name, entry in sens.modules.items():
        if entry["kind"] == "embedding":
            modules[name] = _module_plan(entry, 16, None, symmetric, ACT_NONE, 0.0, None)
    objective = Objective(
        mode="memory" if max_bytes is not None else "loss", scope=budget.scope,
        bits_per_weight=budget.bits_per_weight, memory_reduction=budget.memory_reduction,
        max_loss=budget.max_loss, budget_bytes=max_bytes)
    loss_model = LossModel(kind=sens.loss_model["kind"], coefficients={
        "alpha": sens.loss_model["alpha"], "kappa": sens.loss_model["kappa"]})
    return Plan(model=ModelInfo(**sens.model),
                calibration=CalibrationInfo(**sens.calibration),
                objective=objective,
                capabilities=CapabilitiesRef(name=caps.name, sha256=caps.sha256()),
                loss_model=loss_model, modules=dict(sorted(modules.items())),
                totals=compute_totals(modules, sens.fixed["params"], sens.fixed["bytes"], target))


def _target_bytes(sens, caps, members, assignment, symmetric, fixed) -> int:
    """The whole model as the target stores it (`fixed`: what the solver did not choose)."""
    total = fixed
    for unit, names in members.items():
        bits, group = parse_candidate_key(assignment.choices[unit])
        for name in names:
            n, k = sens.modules[name]["shape"]
            total += caps.stored_bytes(n, k, bits, group, symmetric,
                                       tied_lookup=bool(sens.modules[name].get("tied")))
    return total


def _left_for_the_plan(total: int, fixed: int, what: str, least: float | None) -> int:
    if total <= fixed:
        raise BudgetTooSmall(f"{what} allows {total:,} bytes for the whole model, but {fixed:,} "
                             f"bytes are fixed (norms, biases, the float16 embedding table, a "
                             f"fixed head); raise the budget (the least is {least:.3f} bits per "
                             f"weight)", least)
    return total - fixed


def _fixed_head_bytes(sens, caps: Capabilities, head_bits: str, head_group: int,
                      symmetric: bool) -> int:
    entry = sens.modules["lm_head"]
    n, k = entry["shape"]
    bits = int(head_bits)
    return caps.stored_bytes(n, k, bits, head_group if bits != 16 else None, symmetric,
                             tied_lookup=bool(entry.get("tied")))


def _activation_of(kind: str, activation: str, bits: int) -> str:
    """Per-block and asymmetric per-token int8 apply to every block-quantized matmul, the head
    included (int8 kernels read its weight too); 16-bit layers keep float activations. Other
    modes: linears only."""
    if activation in QUANTIZED_LAYERS_ONLY:
        return activation if bits != 16 else ACT_NONE
    return activation if kind == "linear" else ACT_NONE


def _module_plan(entry: dict, bits: int, group: int | None, symmetric: bool, activation: str,
                 loss: float, tie_group: str | None, scale_dtype: str = "float16") -> ModulePlan:
    n, k = entry["shape"]
    kind = entry["kind"] if entry["kind"] in ("linear", "embedding") else "lm_head"
    return ModulePlan(kind=kind, shape=(n, k), bits=bits, group_size=group, symmetric=symmetric,
                      scale_dtype=scale_dtype if bits != 16 else "float16",
                      activation=_activation_of(kind, activation, bits),
                      act_clip=float(entry.get("act_clip", 1.0)) if activation == ACT_INT8 else 1.0,
                      tie_group=tie_group, bytes=stored_bytes(n, k, bits, group, symmetric),
                      predicted_loss=float(loss))


def uniform_plan(sens: SensitivityMap, bits: int, group: int, *, activation: str = ACT_NONE,
                 symmetric: bool = False, head_bits: int = 16, head_group: int = 64) -> Plan:
    """Every decoder linear at one (bits, group): the single-bit-width baselines."""
    alpha = sens.loss_model["alpha"]
    modules = {}
    key = candidate_key(bits, group)
    for name, entry in sens.modules.items():
        if entry["kind"] == "linear":
            loss = alpha * entry["gain"] * entry["errors"].get(key, 0.0)
            modules[name] = _module_plan(entry, bits, group, symmetric, activation, loss, None)
    hg = None if head_bits == 16 else head_group
    modules["lm_head"] = _module_plan(sens.modules["lm_head"], head_bits, hg, symmetric, ACT_NONE,
                                      0.0, None)
    for name, entry in sens.modules.items():
        if entry["kind"] == "embedding":
            modules[name] = _module_plan(entry, 16, None, symmetric, ACT_NONE, 0.0, None)
    return Plan(model=ModelInfo(**sens.model), calibration=CalibrationInfo(**sens.calibration),
                objective=Objective(mode="memory", scope="linear", bits_per_weight=None,
                                    budget_bytes=sum(m.bytes for m in modules.values())),
                capabilities=CapabilitiesRef(name=f"uniform-b{bits}g{group}",
                                              sha256=GENERIC.sha256()),
                loss_model=LossModel(kind=sens.loss_model["kind"], coefficients={
                    "alpha": alpha, "kappa": sens.loss_model["kappa"]}),
                modules=dict(sorted(modules.items())),
                totals=compute_totals(modules, sens.fixed["params"], sens.fixed["bytes"]))
