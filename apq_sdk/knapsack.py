"""Exact mixed-precision bit allocation (multiple-choice knapsack).

Every quantization decision is a :class:`Unit` (one linear layer, or several layers that must
share their bit-width, merged by the caller) with a few :class:`Option` s: a storage size in bytes
and a predicted loss increase. Choosing exactly one option per unit, the planner solves one of two
problems *exactly*:

* :func:`minimize_loss`: the least total predicted loss whose total size fits ``max_bytes``;
* :func:`minimize_bytes`: the smallest total size whose total predicted loss is <= ``max_loss``.

Algorithm
---------
Dynamic programming over the units in the order given, keeping the exact Pareto frontier of
(total bytes, total loss) of the units seen so far, with back-pointers to recover the choices.
Each step combines the frontier with the unit's options (numpy, vectorized), sorts the candidates
by bytes then loss, and keeps the points whose loss is strictly below every point with fewer bytes.
Byte counts are real integers (around 1e8 per layer), so nothing is discretized over byte
values.

With a budget, three exact prunings keep the frontier small:

1. feasibility: a partial point is dropped when even the cheapest completion exceeds the budget
   (``bytes + minimal remaining bytes > max_bytes``, or the same for the loss);
2. bound: the linear-programming relaxation of the remaining units (greedy over the lower convex
   hulls of their options) is a lower bound on what the rest must add. A partial point whose bound
   exceeds the objective of a feasible solution found up front (the rounded-down LP solution) cannot
   lead to an optimum and is dropped. The comparison uses a small relative tolerance, so rounding in
   the bound never drops an optimal point;
3. dominance, which the Pareto frontier itself is.

Ties are broken deterministically: the objective is compared as (loss, bytes) for
:func:`minimize_loss` and (bytes, loss) for :func:`minimize_bytes`; among choice sequences with
exactly equal totals the lexicographically smallest sequence of option indices wins (unit order
as given, options in the order listed), so earlier-listed options are preferred. Totals are summed
in unit order, so :func:`brute_force` sums the same floats and agrees exactly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Sequence

import numpy as np

__all__ = [
    "Option",
    "Unit",
    "Assignment",
    "InfeasibleBudget",
    "minimize_loss",
    "minimize_bytes",
    "pareto_frontier",
    "brute_force",
]

# Relative slack on pruning by bound: a point is only dropped when its lower bound is worse than the
# incumbent by more than this (relative) amount, so floating-point rounding never drops an optimum.
_REL_TOL = 1e-9
# brute_force refuses instances with more combinations than this.
_BRUTE_FORCE_LIMIT = 2_000_000


@dataclass(frozen=True)
class Option:
    """One choice for a unit: ``bytes`` as stored (> 0) and predicted ``loss`` increase (>= 0)."""

    key: str
    bytes: int
    loss: float


@dataclass(frozen=True)
class Unit:
    """One decision; modules forced to share bits are merged into one Unit by the caller."""

    name: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))


@dataclass(frozen=True)
class Assignment:
    """The chosen option key of every unit (in unit order) with the totals of that choice."""

    choices: dict[str, str]
    total_bytes: int
    total_loss: float


class InfeasibleBudget(ValueError):
    """No assignment meets the budget.

    Attributes: ``requested`` (the budget asked for), ``min_bytes`` / ``max_bytes`` (smallest and
    largest achievable total sizes), ``min_loss`` (smallest achievable total predicted loss).
    """

    def __init__(
        self,
        message: str,
        *,
        requested: float | int | None = None,
        min_bytes: int | None = None,
        max_bytes: int | None = None,
        min_loss: float | None = None,
    ) -> None:
        super().__init__(message)
        self.requested = requested
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.min_loss = min_loss


# --------------------------------------------------------------------------------------------------
# validation and preparation


@dataclass
class _Prepared:
    units: list[Unit]
    ob: list[np.ndarray]  # per unit: option bytes (int64)
    ol: list[np.ndarray]  # per unit: option losses (float64)
    min_b: np.ndarray  # per unit: smallest option bytes
    max_b: np.ndarray
    min_l: np.ndarray  # per unit: smallest option loss
    suffix_min_b: np.ndarray = field(default=None)  # type: ignore[assignment]  # [n+1]
    suffix_max_b: np.ndarray = field(default=None)  # type: ignore[assignment]
    suffix_min_l: np.ndarray = field(default=None)  # type: ignore[assignment]


def _validate(units: Sequence[Unit]) -> _Prepared:
    if isinstance(units, (str, bytes)) or not isinstance(units, Sequence):
        try:
            units = list(units)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"units: expected a sequence of Unit, found {type(units).__name__}"
            ) from None
    units = list(units)
    if not units:
        raise ValueError("units: expected at least one Unit, found an empty sequence")
    seen: dict[str, int] = {}
    obs, ols = [], []
    for i, u in enumerate(units):
        if not isinstance(u, Unit):
            raise ValueError(f"units[{i}]: expected a Unit, found {type(u).__name__}")
        if not isinstance(u.name, str) or not u.name:
            raise ValueError(f"units[{i}].name: expected a non-empty string, found {u.name!r}")
        if u.name in seen:
            raise ValueError(
                f"unit {u.name!r}: duplicate unit name, expected unique names, "
                f"found it at positions {seen[u.name]} and {i}; merge the two into one Unit"
            )
        seen[u.name] = i
        if not u.options:
            raise ValueError(f"unit {u.name!r}: expected at least one Option, found none")
        keys: set[str] = set()
        b_list, l_list = [], []
        for j, o in enumerate(u.options):
            if not isinstance(o, Option):
                raise ValueError(
                    f"unit {u.name!r} options[{j}]: expected an Option, found {type(o).__name__}"
                )
            where = f"unit {u.name!r} option {o.key!r}"
            if not isinstance(o.key, str):
                raise ValueError(
                    f"unit {u.name!r} options[{j}].key: expected a string, found {o.key!r}"
                )
            if o.key in keys:
                raise ValueError(
                    f"{where}: duplicate option key, expected unique keys within a unit, "
                    f"found {o.key!r} twice"
                )
            keys.add(o.key)
            if isinstance(o.bytes, bool) or not isinstance(o.bytes, Integral):
                raise ValueError(
                    f"{where}: bytes: expected a positive integer, found {o.bytes!r} "
                    f"({type(o.bytes).__name__})"
                )
            if int(o.bytes) <= 0:
                raise ValueError(f"{where}: bytes: expected a positive integer, found {o.bytes}")
            if isinstance(o.loss, bool) or not isinstance(o.loss, Real):
                raise ValueError(
                    f"{where}: loss: expected a finite number >= 0, found {o.loss!r} "
                    f"({type(o.loss).__name__})"
                )
            lv = float(o.loss)
            if math.isnan(lv) or math.isinf(lv) or lv < 0:
                raise ValueError(f"{where}: loss: expected a finite number >= 0, found {lv!r}")
            b_list.append(int(o.bytes))
            l_list.append(lv)
        obs.append(np.asarray(b_list, dtype=np.int64))
        ols.append(np.asarray(l_list, dtype=np.float64))
    prep = _Prepared(
        units=units,
        ob=obs,
        ol=ols,
        min_b=np.array([b.min() for b in obs], dtype=np.int64),
        max_b=np.array([b.max() for b in obs], dtype=np.int64),
        min_l=np.array([l.min() for l in ols], dtype=np.float64),
    )
    n = len(units)
    prep.suffix_min_b = np.zeros(n + 1, dtype=np.int64)
    prep.suffix_max_b = np.zeros(n + 1, dtype=np.int64)
    prep.suffix_min_l = np.zeros(n + 1, dtype=np.float64)
    prep.suffix_min_b[:n] = np.cumsum(prep.min_b[::-1])[::-1]
    prep.suffix_max_b[:n] = np.cumsum(prep.max_b[::-1])[::-1]
    prep.suffix_min_l[:n] = np.cumsum(prep.min_l[::-1])[::-1]
    return prep


def _sequential_sum(values: Sequence[float]) -> float:
    """Sum in the given order, the way the DP and brute_force accumulate losses."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


# --------------------------------------------------------------------------------------------------
# LP relaxation (lower convex hulls), used for bounds and an initial feasible solution


def _unit_hull(b: np.ndarray, l: np.ndarray) -> list[int]:
    """Indices of the lower-left convex hull of one unit's options, from fewest bytes to least loss.

    Starts at the fewest-bytes option (least loss among those, first listed among exact ties) and
    ends at the least-loss option (fewest bytes among those); every step adds bytes and strictly
    lowers the loss, with increasing (less negative) slopes.
    """
    order = sorted(range(len(b)), key=lambda j: (int(b[j]), float(l[j]), j))
    # keep only points that strictly lower the loss as bytes grow (the staircase)
    stair: list[int] = []
    for j in order:
        if not stair or (l[j] < l[stair[-1]] and b[j] > b[stair[-1]]):
            stair.append(j)
    hull: list[int] = []
    for j in stair:
        while len(hull) >= 2:
            a, c = hull[-2], hull[-1]
            # drop c if it lies on or above the segment a -> j
            cross = (float(b[c]) - float(b[a])) * (float(l[j]) - float(l[a])) - (
                float(l[c]) - float(l[a])
            ) * (float(b[j]) - float(b[a]))
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


@dataclass
class _LP:
    """Per-suffix piecewise-linear LP bounds plus the global greedy order of hull segments."""

    hulls: list[list[int]]
    seg_unit: np.ndarray  # segment -> unit, in greedy (slope) order
    seg_step: np.ndarray  # segment -> index within the unit hull (1-based target point)
    seg_db: np.ndarray
    seg_dl: np.ndarray
    # for each suffix r (0..n): breakpoints xp_r (bytes, increasing) and fp_r (loss, decreasing)
    xp: list[np.ndarray]
    fp: list[np.ndarray]
    scale: float  # magnitude of the losses involved (for tolerances)


def _build_lp(prep: _Prepared) -> _LP:
    n = len(prep.units)
    hulls = [_unit_hull(b, l) for b, l in zip(prep.ob, prep.ol)]
    su, ss, sdb, sdl = [], [], [], []
    start_b = np.empty(n, dtype=np.int64)
    start_l = np.empty(n, dtype=np.float64)
    for i, h in enumerate(hulls):
        b, l = prep.ob[i], prep.ol[i]
        start_b[i] = b[h[0]]
        start_l[i] = l[h[0]]
        for s in range(1, len(h)):
            su.append(i)
            ss.append(s)
            sdb.append(int(b[h[s]] - b[h[s - 1]]))
            sdl.append(float(l[h[s]] - l[h[s - 1]]))
    seg_unit = np.asarray(su, dtype=np.int64)
    seg_step = np.asarray(ss, dtype=np.int64)
    seg_db = np.asarray(sdb, dtype=np.int64)
    seg_dl = np.asarray(sdl, dtype=np.float64)
    if len(seg_unit):
        slope = seg_dl / seg_db.astype(np.float64)
        # most loss removed per byte first; within a unit slopes increase so its order is kept
        order = np.lexsort((seg_step, seg_unit, slope))
        seg_unit, seg_step, seg_db, seg_dl = (
            seg_unit[order],
            seg_step[order],
            seg_db[order],
            seg_dl[order],
        )
    suffix_start_b = np.zeros(n + 1, dtype=np.int64)
    suffix_start_l = np.zeros(n + 1, dtype=np.float64)
    suffix_start_b[:n] = np.cumsum(start_b[::-1])[::-1]
    suffix_start_l[:n] = np.cumsum(start_l[::-1])[::-1]
    xp, fp = [], []
    for r in range(n + 1):
        m = seg_unit >= r
        xb = np.concatenate(([0], np.cumsum(seg_db[m]))) + suffix_start_b[r]
        fl = np.concatenate(([0.0], np.cumsum(seg_dl[m]))) + suffix_start_l[r]
        xp.append(xb.astype(np.float64))
        fp.append(fl)
    scale = float(suffix_start_l[0]) + float(np.abs(seg_dl).sum()) if len(seg_dl) else float(
        suffix_start_l[0]
    )
    return _LP(hulls, seg_unit, seg_step, seg_db, seg_dl, xp, fp, scale)


def _lp_min_loss(lp: _LP, r: int, budget: np.ndarray) -> np.ndarray:
    """LP lower bound on the loss units r.. must add given ``budget`` remaining bytes."""
    xp, fp = lp.xp[r], lp.fp[r]
    out = np.interp(budget.astype(np.float64), xp, fp)
    out[budget < xp[0]] = np.inf
    return out


def _lp_min_bytes(lp: _LP, r: int, allowance: np.ndarray) -> np.ndarray:
    """LP lower bound on the bytes units r.. must add so their loss stays within ``allowance``."""
    xp, fp = lp.xp[r], lp.fp[r]
    out = np.interp(allowance, fp[::-1], xp[::-1])
    out[allowance < fp[-1]] = np.inf
    return out


def _greedy_choice(prep: _Prepared, lp: _LP, *, max_bytes=None, max_loss=None) -> list[int] | None:
    """A feasible assignment from the LP greedy order (option indices), or None if none found."""
    n = len(prep.units)
    pos = [0] * n  # position along each unit's hull
    cur_b = int(sum(int(prep.ob[i][lp.hulls[i][0]]) for i in range(n)))
    cur_l = float(sum(float(prep.ol[i][lp.hulls[i][0]]) for i in range(n)))
    if max_bytes is not None:
        if cur_b > max_bytes:
            return None
        blocked = [False] * n
        for u, s, db in zip(lp.seg_unit.tolist(), lp.seg_step.tolist(), lp.seg_db.tolist()):
            if blocked[u] or pos[u] != s - 1:
                continue
            if cur_b + db <= max_bytes:
                pos[u] = s
                cur_b += db
            else:
                blocked[u] = True
    else:
        for u, s, db, dl in zip(
            lp.seg_unit.tolist(), lp.seg_step.tolist(), lp.seg_db.tolist(), lp.seg_dl.tolist()
        ):
            if cur_l <= max_loss:
                break
            pos[u] = s
            cur_l += dl
    choice = [lp.hulls[i][pos[i]] for i in range(n)]
    if max_loss is not None:
        total = _sequential_sum(prep.ol[i][c] for i, c in enumerate(choice))
        if total > max_loss:
            return None
    return choice


# --------------------------------------------------------------------------------------------------
# the dynamic program


def _run_dp(
    prep: _Prepared,
    *,
    max_bytes: int | None = None,
    max_loss: float | None = None,
    lp: _LP | None = None,
    bound: float | None = None,
):
    """Frontier DP. Returns (bytes, loss, stages) where stages holds (parent, option) per unit.

    ``bound`` is the objective value of a known feasible solution (loss when ``max_bytes`` is given,
    bytes when ``max_loss`` is given); points whose LP bound is worse are dropped.
    """
    n = len(prep.units)
    B = np.zeros(1, dtype=np.int64)
    L = np.zeros(1, dtype=np.float64)
    R = np.zeros(1, dtype=np.int64)  # lexicographic rank of each point's choice sequence
    stages: list[tuple[np.ndarray, np.ndarray]] = []
    if bound is not None and lp is not None:
        if max_bytes is not None:
            tol = _REL_TOL * (abs(bound) + lp.scale) + 1e-300
        else:
            tol = _REL_TOL * abs(bound) + 1.0
    if max_loss is not None:
        # slack for losses summed in another order (suffix sums, LP breakpoints)
        scale = lp.scale if lp is not None else 0.0
        tol_l = _REL_TOL * (abs(max_loss) + float(prep.suffix_min_l[0]) + scale)
    for i in range(n):
        ob, ol = prep.ob[i], prep.ol[i]
        k = len(ob)
        F = len(B)
        cb = (B[:, None] + ob[None, :]).ravel()
        cl = (L[:, None] + ol[None, :]).ravel()
        cp = np.repeat(np.arange(F, dtype=np.int64), k)
        co = np.tile(np.arange(k, dtype=np.int64), F)
        keep = None
        if max_bytes is not None:
            keep = cb + prep.suffix_min_b[i + 1] <= max_bytes
            if bound is not None and lp is not None:
                lb = cl + _lp_min_loss(lp, i + 1, max_bytes - cb)
                keep &= lb <= bound + tol
        elif max_loss is not None:
            keep = cl + prep.suffix_min_l[i + 1] <= max_loss + tol_l
            if bound is not None and lp is not None:
                lb = cb + _lp_min_bytes(lp, i + 1, (max_loss + tol_l) - cl)
                keep &= lb <= bound + tol
        if keep is not None and not keep.all():
            cb, cl, cp, co = cb[keep], cl[keep], cp[keep], co[keep]
        if len(cb) == 0:
            return B[:0], L[:0], stages, None
        crank = R[cp] * k + co
        order = np.lexsort((crank, cl, cb))
        cl_s = cl[order]
        runmin = np.minimum.accumulate(cl_s)
        sel = np.empty(len(order), dtype=bool)
        sel[0] = True
        sel[1:] = cl_s[1:] < runmin[:-1]
        idx = order[sel]
        B, L = cb[idx], cl[idx]
        cr = crank[idx]
        R = np.empty(len(idx), dtype=np.int64)
        R[np.argsort(cr, kind="stable")] = np.arange(len(idx), dtype=np.int64)
        stages.append((cp[idx], co[idx].astype(np.int32)))
    return B, L, stages, True


def _backtrack(stages, end: int) -> list[int]:
    choice = [0] * len(stages)
    p = end
    for i in range(len(stages) - 1, -1, -1):
        parent, opt = stages[i]
        choice[i] = int(opt[p])
        p = int(parent[p])
    return choice


def _assignment(prep: _Prepared, choice: list[int]) -> Assignment:
    total_b = int(sum(int(prep.ob[i][c]) for i, c in enumerate(choice)))
    total_l = _sequential_sum(prep.ol[i][c] for i, c in enumerate(choice))
    return Assignment(
        choices={u.name: u.options[c].key for u, c in zip(prep.units, choice)},
        total_bytes=total_b,
        total_loss=total_l,
    )


def _check_max_bytes(max_bytes) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, Integral):
        raise ValueError(
            f"max_bytes: expected an integer number of bytes, found {max_bytes!r} "
            f"({type(max_bytes).__name__})"
        )
    return int(max_bytes)


def _check_max_loss(max_loss) -> float:
    if isinstance(max_loss, bool) or not isinstance(max_loss, Real) or math.isnan(float(max_loss)):
        raise ValueError(f"max_loss: expected a number, found {max_loss!r}")
    return float(max_loss)


def _infeasible_bytes(prep: _Prepared, max_bytes: int) -> InfeasibleBudget:
    lo, hi = int(prep.suffix_min_b[0]), int(prep.suffix_max_b[0])
    return InfeasibleBudget(
        f"memory budget of {max_bytes:,} bytes is below the smallest achievable size: "
        f"achievable sizes range from {lo:,} to {hi:,} bytes over {len(prep.units)} units. "
        f"Raise the budget to at least {lo:,} bytes (a higher bits-per-weight or a smaller memory "
        f"reduction), or offer lower bit-widths for the units.",
        requested=max_bytes,
        min_bytes=lo,
        max_bytes=hi,
        min_loss=_sequential_sum(prep.min_l),
    )


def _infeasible_loss(prep: _Prepared, max_loss: float) -> InfeasibleBudget:
    lo, hi = int(prep.suffix_min_b[0]), int(prep.suffix_max_b[0])
    min_loss = _sequential_sum(prep.min_l)
    return InfeasibleBudget(
        f"loss budget of {max_loss!r} is below the smallest achievable predicted loss "
        f"{min_loss!r} (achievable sizes range from {lo:,} to {hi:,} bytes). "
        f"Raise max_loss to at least {min_loss!r}, or offer higher bit-widths for the units.",
        requested=max_loss,
        min_bytes=lo,
        max_bytes=hi,
        min_loss=min_loss,
    )


# --------------------------------------------------------------------------------------------------
# public API


def minimize_loss(units: Sequence[Unit], max_bytes: int) -> Assignment:
    """The assignment with the least total predicted loss whose total bytes are <= ``max_bytes``.

    Exact. Among equal losses the fewest bytes win, then the lexicographically smallest choice
    sequence. Raises :class:`InfeasibleBudget` when even the smallest options exceed the budget.
    """
    prep = _validate(units)
    max_bytes = _check_max_bytes(max_bytes)
    if max_bytes < prep.suffix_min_b[0]:
        raise _infeasible_bytes(prep, max_bytes)
    lp = _build_lp(prep)
    greedy = _greedy_choice(prep, lp, max_bytes=max_bytes)
    bound = None
    if greedy is not None:
        bound = _sequential_sum(prep.ol[i][c] for i, c in enumerate(greedy))
    B, L, stages, ok = _run_dp(prep, max_bytes=max_bytes, lp=lp, bound=bound)
    if ok is None or len(B) == 0:  # cannot happen when the budget check passed; kept as a guard
        raise _infeasible_bytes(prep, max_bytes)
    return _assignment(prep, _backtrack(stages, len(B) - 1))


def minimize_bytes(units: Sequence[Unit], max_loss: float) -> Assignment:
    """The assignment with the fewest total bytes whose total predicted loss is <= ``max_loss``.

    Exact. Among equal sizes the least loss wins, then the lexicographically smallest choice
    sequence. Raises :class:`InfeasibleBudget` when even the best options exceed ``max_loss``.
    """
    prep = _validate(units)
    max_loss = _check_max_loss(max_loss)
    if _sequential_sum(prep.min_l) > max_loss:
        raise _infeasible_loss(prep, max_loss)
    lp = _build_lp(prep)
    greedy = _greedy_choice(prep, lp, max_loss=max_loss)
    bound = None
    if greedy is not None:
        bound = float(sum(int(prep.ob[i][c]) for i, c in enumerate(greedy)))
    B, L, stages, ok = _run_dp(prep, max_loss=max_loss, lp=lp, bound=bound)
    feasible = np.nonzero(L <= max_loss)[0] if ok is not None else np.zeros(0, dtype=np.int64)
    if len(feasible) == 0:  # cannot happen when the min-loss check passed; kept as a guard
        raise _infeasible_loss(prep, max_loss)
    return _assignment(prep, _backtrack(stages, int(feasible[0])))


def pareto_frontier(units: Sequence[Unit], *, max_bytes: int | None = None):
    """The full non-dominated (total bytes, total loss) frontier, sorted by increasing bytes.

    Returns ``(bytes, loss)`` as int64 and float64 arrays; loss strictly decreases along it. Every
    point is achieved by some assignment and no assignment is better in both. ``max_bytes``
    (optional) restricts the frontier to totals within that size. Without a budget the frontier of
    a large model can hold many points (224 units x 5 options: ~7k points in ~0.4 s when units of a
    matrix type share byte counts, ~64k points in ~4 s when all byte counts differ); use it for
    plots and studies, :func:`minimize_loss` for planning.
    """
    prep = _validate(units)
    if max_bytes is not None:
        max_bytes = _check_max_bytes(max_bytes)
        if max_bytes < prep.suffix_min_b[0]:
            raise _infeasible_bytes(prep, max_bytes)
    B, L, _, _ = _run_dp(prep, max_bytes=max_bytes)
    return B.copy(), L.copy()


def brute_force(
    units: Sequence[Unit], *, max_bytes: int | None = None, max_loss: float | None = None
) -> Assignment:
    """Exhaustive search, for tests only. Same objective and tie-breaking as the DP solvers.

    Give exactly one of ``max_bytes`` (then loss is minimized) or ``max_loss`` (then bytes are).
    """
    if (max_bytes is None) == (max_loss is None):
        raise ValueError("brute_force: expected exactly one of max_bytes or max_loss")
    prep = _validate(units)
    count = math.prod(len(b) for b in prep.ob)
    if count > _BRUTE_FORCE_LIMIT:
        raise ValueError(
            f"brute_force: expected at most {_BRUTE_FORCE_LIMIT:,} combinations, found {count:,}"
        )
    obs = [b.tolist() for b in prep.ob]
    ols = [l.tolist() for l in prep.ol]
    best = None
    best_key = None
    for combo in itertools.product(*(range(len(b)) for b in obs)):
        tb = 0
        tl = 0.0
        for i, c in enumerate(combo):
            tb += obs[i][c]
            tl += ols[i][c]
        if max_bytes is not None:
            if tb > max_bytes:
                continue
            key = (tl, tb)
        else:
            if tl > max_loss:
                continue
            key = (tb, tl)
        # strict: the first found (lexicographically smallest) wins ties
        if best_key is None or key < best_key:
            best_key, best = key, combo
    if best is None:
        if max_bytes is not None:
            raise _infeasible_bytes(prep, _check_max_bytes(max_bytes))
        raise _infeasible_loss(prep, _check_max_loss(max_loss))
    return _assignment(prep, list(best))
