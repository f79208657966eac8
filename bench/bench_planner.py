"""How fast is the exact planner on a Llama-3-8B-sized problem? Timing of apq_sdk.knapsack.

32 layers x 7 matrices (q 4096x4096, k/v 1024x4096, o 4096x4096, gate/up 14336x4096,
down 4096x14336) = 224 units, each with bits {2, 3, 4, 8, 16}, group 128, asymmetric storage sizes
from apq_sdk.quant.packing.stored_bytes. Losses are lognormal per unit times 4**-bits. Three
cases: "shared" (units of one matrix type have identical byte counts, as in a real model),
"distinct" (every byte count perturbed by a random factor in [0.9, 1.1], so all are different) and
"noisy" (distinct bytes, and each loss also multiplied by its own lognormal(0, 0.5) factor, kept
decreasing in bits, so the losses no longer follow one curve per unit). For several
memory budgets it times minimize_loss, then minimize_bytes at the loss found (which must return the
same totals), and the unbudgeted pareto_frontier once per case.

    python bench/bench_planner.py --seeds 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apq_sdk.knapsack import (  # noqa: E402
    Option,
    Unit,
    minimize_bytes,
    minimize_loss,
    pareto_frontier,
)
from apq_sdk.quant.packing import stored_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
BITS = (2, 3, 4, 8, 16)
GROUP = 128


def make_units(seed: int, case: str, layers: int = 32) -> list[Unit]:
    distinct = case in ("distinct", "noisy")
    rng = np.random.default_rng(seed)
    units = []
    for layer in range(layers):
        for name, (n, k) in SHAPES.items():
            scale = rng.lognormal(0.0, 1.0)
            losses = [scale * 4.0**-b for b in BITS]
            if case == "noisy":
                losses = sorted((x * rng.lognormal(0.0, 0.5) for x in losses), reverse=True)
            options = []
            for b, loss in zip(BITS, losses):
                size = stored_bytes(n, k, b, GROUP, False)
                if distinct:
                    size = int(size * rng.uniform(0.9, 1.1))
                options.append(Option(str(b), size, float(loss)))
            units.append(Unit(f"model.layers.{layer}.{name}", tuple(options)))
    return units


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--bits-per-weight", type=float, nargs="+", default=[2.5, 3.0, 4.25, 6.0])
    parser.add_argument("--out", default=str(RESULTS / "planner"))
    args = parser.parse_args()
    argv = [os.path.relpath(__file__)] + sys.argv[1:]
    command = "python " + " ".join(shlex.quote(a) for a in argv)

    rows, frontier_rows = [], []
    for case in ("shared", "distinct", "noisy"):
        for seed in range(args.seeds):
            units = make_units(seed, case)
            fp16 = sum(u.options[-1].bytes for u in units)
            for bpw in args.bits_per_weight:
                budget = int(fp16 * bpw / 16)
                t_loss, a = timed(lambda: minimize_loss(units, budget), args.repeats)
                t_bytes, b = timed(lambda: minimize_bytes(units, a.total_loss), args.repeats)
                if (b.total_bytes, b.total_loss) != (a.total_bytes, a.total_loss):
                    raise SystemExit(f"inconsistent optimum for {case} seed {seed} bpw {bpw}")
                rows.append({
                    "case": case, "seed": seed, "units": len(units), "target_bits_per_weight": bpw,
                    "budget_bytes": budget, "total_bytes": a.total_bytes,
                    "achieved_bits_per_weight": 16 * a.total_bytes / fp16,
                    "total_loss": a.total_loss,
                    "minimize_loss_s": round(t_loss, 4), "minimize_bytes_s": round(t_bytes, 4),
                })
                print(json.dumps(rows[-1]), flush=True)
            if seed == 0:
                t_front, (fb, _) = timed(lambda: pareto_frontier(units), 1)
                frontier_rows.append({"case": case, "seed": seed, "points": int(len(fb)),
                                      "pareto_frontier_s": round(t_front, 4)})
                print(json.dumps(frontier_rows[-1]), flush=True)

    worst = max(max(r["minimize_loss_s"], r["minimize_bytes_s"]) for r in rows)
    result = {
        "command": command,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "repeats": args.repeats,
        "worst_solve_s": worst,
        "requirement_s": 2.0,
        "solves": rows,
        "frontiers": frontier_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    md = [
        "# Planner timing (exact multiple-choice knapsack)",
        "",
        f"Command: `{command}`  ",
        f"Python {result['python']}, numpy {result['numpy']}, {result['machine']}; "
        f"best of {args.repeats} runs.",
        "",
        "224 units (32 layers x 7 matrices of a Llama-3-8B-sized model), options bits "
        "{2, 3, 4, 8, 16}, group 128. *shared*: byte counts identical per matrix type; *distinct*: "
        "every byte count perturbed, all different; *noisy*: distinct byte counts and losses with "
        "per-option noise.",
        "",
        f"Worst solve: **{worst:.3f} s** (requirement: < 2 s).",
        "",
        "| case | seed | target bpw | achieved bpw | total bytes | minimize_loss (s) "
        "| minimize_bytes (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        md.append(
            f"| {r['case']} | {r['seed']} | {r['target_bits_per_weight']} | "
            f"{r['achieved_bits_per_weight']:.4f} | {r['total_bytes']:,} | "
            f"{r['minimize_loss_s']:.4f} | {r['minimize_bytes_s']:.4f} |"
        )
    md += ["", "| case | full Pareto frontier points | pareto_frontier (s) |",
           "| --- | ---: | ---: |"]
    for r in frontier_rows:
        md.append(f"| {r['case']} | {r['points']:,} | {r['pareto_frontier_s']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"worst solve {worst:.3f} s; wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
