"""The exact mixed-precision planner: DP against brute force, ties, budgets, validation, speed."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from apq_sdk.knapsack import (
    Assignment,
    InfeasibleBudget,
    Option,
    Unit,
    brute_force,
    minimize_bytes,
    minimize_loss,
    pareto_frontier,
)


def random_units(rng: np.random.Generator, *, n: int, k_max: int, ties: bool = False) -> list[Unit]:
    units = []
    for i in range(n):
        k = int(rng.integers(1, k_max + 1))
        if ties:  # tiny integer ranges: many equal bytes, losses and totals
            b = rng.integers(1, 4, size=k)
            l = rng.integers(0, 3, size=k).astype(float)
        else:
            b = rng.integers(1_000, 100_000_000, size=k)
            l = rng.lognormal(0.0, 2.0, size=k)
        units.append(
            Unit(f"u{i}", tuple(Option(f"o{j}", int(b[j]), float(l[j])) for j in range(k)))
        )
    return units


def budgets(rng, units):
    lo = sum(min(o.bytes for o in u.options) for u in units)
    hi = sum(max(o.bytes for o in u.options) for u in units)
    return sorted({lo, hi, *(int(x) for x in rng.integers(lo, hi + 1, size=3))})


def all_totals(units):
    for combo in itertools.product(*(u.options for u in units)):
        tl = 0.0
        for o in combo:
            tl += o.loss
        yield sum(o.bytes for o in combo), tl


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_minimize_loss_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    units = random_units(rng, n=int(rng.integers(1, 7)), k_max=4, ties=ties)
    for max_bytes in budgets(rng, units):
        got = minimize_loss(units, max_bytes)
        want = brute_force(units, max_bytes=max_bytes)
        assert got == want, (max_bytes, got, want)
        assert got.total_bytes <= max_bytes


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_minimize_bytes_matches_brute_force(seed, ties):
    rng = np.random.default_rng(1000 + seed)
    units = random_units(rng, n=int(rng.integers(1, 7)), k_max=4, ties=ties)
    losses = sorted({tl for _, tl in all_totals(units)})
    # exact achievable totals (boundary cases) and values in between
    picks = [losses[0], losses[-1], *(losses[int(i)] for i in rng.integers(0, len(losses), size=3))]
    picks += [x * 1.0001 for x in picks[:3]]
    for max_loss in picks:
        got = minimize_bytes(units, max_loss)
        want = brute_force(units, max_loss=max_loss)
        assert got == want, (max_loss, got, want)
        assert got.total_loss <= max_loss


def test_assignment_totals_and_choices_are_consistent():
    rng = np.random.default_rng(7)
    units = random_units(rng, n=6, k_max=5)
    a = minimize_loss(units, budgets(rng, units)[2])
    assert list(a.choices) == [u.name for u in units]
    opts = [next(o for o in u.options if o.key == a.choices[u.name]) for u in units]
    assert a.total_bytes == sum(o.bytes for o in opts)
    assert a.total_loss == pytest.approx(sum(o.loss for o in opts), rel=1e-12)
    assert isinstance(a.total_bytes, int) and isinstance(a.total_loss, float)


def test_ties_prefer_the_first_listed_option():
    # every option has the same bytes and loss: the first listed must win, in both modes
    units = [
        Unit(f"u{i}", (Option("b", 10, 1.0), Option("a", 10, 1.0), Option("c", 10, 1.0)))
        for i in range(4)
    ]
    for a in (minimize_loss(units, 40), minimize_bytes(units, 4.0)):
        assert a.choices == {f"u{i}": "b" for i in range(4)}
    # equal totals from different sequences: the lexicographically smallest index sequence wins
    units = [
        Unit("x", (Option("x_big", 20, 0.0), Option("x_small", 10, 1.0))),
        Unit("y", (Option("y_big", 20, 0.0), Option("y_small", 10, 1.0))),
    ]
    # budget 30: (x_big, y_small) and (x_small, y_big) both give 30 bytes and loss 1.0
    a = minimize_loss(units, 30)
    assert a.choices == {"x": "x_big", "y": "y_small"}
    assert a == brute_force(units, max_bytes=30)
    b = minimize_bytes(units, 1.0)
    assert b.choices == {"x": "x_big", "y": "y_small"}


def test_secondary_objective():
    # equal loss: fewer bytes wins in minimize_loss; equal bytes: less loss wins in minimize_bytes
    units = [Unit("u", (Option("fat", 100, 0.5), Option("slim", 50, 0.5), Option("bad", 50, 0.9)))]
    assert minimize_loss(units, 1000).choices == {"u": "slim"}
    assert minimize_bytes(units, 1.0).choices == {"u": "slim"}


def test_determinism():
    rng = np.random.default_rng(3)
    units = random_units(rng, n=60, k_max=5, ties=True)
    b = budgets(rng, units)[2]
    first = minimize_loss(units, b)
    again = minimize_loss([Unit(u.name, tuple(u.options)) for u in units], b)
    assert first == again
    assert minimize_bytes(units, first.total_loss) == minimize_bytes(units, first.total_loss)


def test_infeasible_memory_budget_message():
    units = [
        Unit("layer0", (Option("2", 1_000, 5.0), Option("16", 8_000, 0.0))),
        Unit("layer1", (Option("2", 2_000, 4.0), Option("16", 16_000, 0.0))),
    ]
    with pytest.raises(InfeasibleBudget) as ei:
        minimize_loss(units, 2_999)
    e = ei.value
    assert isinstance(e, ValueError)
    assert (e.min_bytes, e.max_bytes, e.requested) == (3_000, 24_000, 2_999)
    msg = str(e)
    assert "2,999" in msg and "3,000" in msg and "24,000" in msg
    assert "at least 3,000 bytes" in msg
    # exactly the minimum is feasible
    assert minimize_loss(units, 3_000).choices == {"layer0": "2", "layer1": "2"}
    with pytest.raises(InfeasibleBudget):
        pareto_frontier(units, max_bytes=10)
    with pytest.raises(InfeasibleBudget):
        brute_force(units, max_bytes=10)


def test_infeasible_loss_budget_message():
    units = [
        Unit("a", (Option("2", 1, 5.0), Option("8", 4, 0.25))),
        Unit("b", (Option("2", 1, 4.0), Option("8", 4, 0.5))),
    ]
    with pytest.raises(InfeasibleBudget) as ei:
        minimize_bytes(units, 0.7)
    e = ei.value
    assert e.min_loss == 0.75
    assert e.requested == 0.7
    assert "0.7" in str(e) and "0.75" in str(e) and "max_loss" in str(e)
    with pytest.raises(InfeasibleBudget):
        minimize_bytes(units, -1.0)
    assert minimize_bytes(units, 0.75).choices == {"a": "8", "b": "8"}


@pytest.mark.parametrize("seed", range(8))
def test_pareto_frontier_against_enumeration(seed):
    rng = np.random.default_rng(500 + seed)
    units = random_units(rng, n=int(rng.integers(1, 6)), k_max=4, ties=seed % 2 == 1)
    B, L = pareto_frontier(units)
    assert B.dtype == np.int64 and L.dtype == np.float64
    pts = list(all_totals(units))
    want = []
    for b, l in sorted(pts):
        if not want or l < want[-1][1]:
            if want and want[-1][0] == b:
                continue
            want.append((b, l))
    assert list(zip(B.tolist(), L.tolist())) == want
    assert np.all(np.diff(B) > 0) and np.all(np.diff(L) < 0)
    # every frontier point is what minimize_loss returns at that budget
    for b, l in want:
        a = minimize_loss(units, b)
        assert (a.total_bytes, a.total_loss) == (b, l)


@pytest.mark.parametrize("seed", range(4))
def test_budget_pruning_is_exact_on_larger_instances(seed):
    # too large for brute force: compare the pruned solvers with the unpruned frontier
    rng = np.random.default_rng(900 + seed)
    units = random_units(rng, n=40, k_max=5, ties=seed % 2 == 1)
    B, L = pareto_frontier(units)
    for max_bytes in budgets(rng, units):
        j = int(np.searchsorted(B, max_bytes, side="right")) - 1
        a = minimize_loss(units, max_bytes)
        assert (a.total_bytes, a.total_loss) == (int(B[j]), float(L[j]))
    for j in rng.integers(0, len(B), size=4):
        a = minimize_bytes(units, float(L[j]))
        assert (a.total_bytes, a.total_loss) == (int(B[j]), float(L[j]))


@pytest.mark.parametrize(
    "units, fragments",
    [
        ([], ["units", "at least one Unit", "empty"]),
        ([Unit("a", (Option("x", 1, 0.0),)), Unit("a", (Option("x", 1, 0.0),))],
         ["'a'", "duplicate unit name", "positions 0 and 1"]),
        ([Unit("a", (Option("x", 1, 0.0), Option("x", 2, 0.0)))],
         ["unit 'a'", "option 'x'", "duplicate option key"]),
        ([Unit("a", ())], ["unit 'a'", "at least one Option", "found none"]),
        ([Unit("a", (Option("x", 1, -0.5),))], ["unit 'a' option 'x'", "loss", ">= 0", "-0.5"]),
        ([Unit("a", (Option("x", 1, math.nan),))], ["unit 'a' option 'x'", "loss", "nan"]),
        ([Unit("a", (Option("x", 0, 1.0),))],
         ["unit 'a' option 'x'", "bytes", "positive", "found 0"]),
        ([Unit("a", (Option("x", 1.5, 1.0),))], ["unit 'a' option 'x'", "bytes", "1.5"]),
    ],
)
def test_input_validation(units, fragments):
    with pytest.raises(ValueError) as ei:
        minimize_loss(units, 10)
    assert not isinstance(ei.value, InfeasibleBudget)
    for f in fragments:
        assert f in str(ei.value)


def test_budget_argument_validation():
    units = [Unit("a", (Option("x", 1, 0.0),))]
    with pytest.raises(ValueError, match="max_bytes: expected an integer"):
        minimize_loss(units, 10.5)
    with pytest.raises(ValueError, match="max_loss: expected a number"):
        minimize_bytes(units, math.nan)
    with pytest.raises(ValueError, match="exactly one"):
        brute_force(units)


def _llama_like_units(seed: int, *, distinct: bool) -> list[Unit]:
    """32 layers x 7 matrices x bits {2,3,4,8,16}, group 128, asymmetric storage sizes."""
    shapes = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
              "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
    rng = np.random.default_rng(seed)
    units = []
    for layer in range(32):
        for name, (n, k) in shapes.items():
            scale = rng.lognormal(0.0, 1.0)
            opts = []
            for b in (2, 3, 4, 8, 16):
                g = k // 128
                if b == 16:
                    size = n * k * 2
                else:
                    size = n * k * b // 8 + n * g * 2 + n * math.ceil(g * b / 8)
                if distinct:
                    size = int(size * rng.uniform(0.9, 1.1))
                opts.append(Option(str(b), size, float(scale * 4.0 ** -b)))
            units.append(Unit(f"model.layers.{layer}.{name}", tuple(opts)))
    return units


@pytest.mark.parametrize("distinct", [False, True])
def test_llama_sized_problem_is_solved(distinct):
    # how fast: bench/bench_planner.py (timings do not belong in unit tests)
    units = _llama_like_units(0, distinct=distinct)
    fp16 = sum(u.options[-1].bytes for u in units)
    budget = fp16 * 3 // 16  # 3 bits per weight
    a = minimize_loss(units, budget)
    assert a.total_bytes <= budget
    # minimize_bytes at the optimum's loss cannot find a smaller plan
    b = minimize_bytes(units, a.total_loss)
    assert (b.total_bytes, b.total_loss) == (a.total_bytes, a.total_loss)
    assert isinstance(a, Assignment)
