"""Wall time and peak memory of profile + plan + quantize on the demo model, as a user runs them.

Three `apq-sdk` processes in a row (profile, plan at 4.0 bits per weight, quantize), each timed
from start to exit with its own peak resident set size (wait4). By default the cache directory is
fresh, so the first process also converts the GGUF file into the model cache (what a first run on
a fresh machine pays); `--warm` runs the same commands again on the cache the first round filled.
Run it on an otherwise idle machine: the VM's timings vary by ~5 % between runs, and anything else
running makes them meaningless.

    python bench/bench_pipeline.py            # writes bench/results/pipeline.{json,md}
    python bench/bench_pipeline.py --warm     # also a second round with a warm model cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SECONDS = 600
TARGET_RSS_BYTES = 4 * 1024 ** 3


def timed(command: list[str], cwd: Path, env: dict) -> dict:
    """Run `command`; wall seconds and peak RSS of that process (Linux wait4, kilobytes)."""
    start = time.perf_counter()
    with open(cwd / f"{command[1]}.log", "w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}; see "
                         f"{cwd / (command[1] + '.log')}")
    return {"command": " ".join(command), "seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}


def one_round(work: Path, env: dict, bits: float) -> list[dict]:
    cli = shutil.which("apq-sdk") or "apq-sdk"
    return [
        timed([cli, "profile", "--model", "demo", "-o", "sens.json"], work, env),
        timed([cli, "plan", "-s", "sens.json", "--bits-per-weight", str(bits), "-o", "plan.json"],
              work, env),
        timed([cli, "quantize", "--model", "demo", "--plan", "plan.json", "-o", "quantized"],
              work, env),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits-per-weight", type=float, default=4.0)
    parser.add_argument("--warm", action="store_true",
                        help="run a second round on the model cache the first round filled")
    parser.add_argument("--out", default=str(RESULTS / "pipeline"))
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="apq-bench-pipeline-") as tmp:
        env = {**os.environ, "APQ_CACHE_DIR": str(Path(tmp) / "cache"), "APQ_NO_PROGRESS": "1",
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        for name in (["cold model cache", "warm model cache"] if args.warm else ["cold model cache"]):
            work = Path(tmp) / name.replace(" ", "-")
            work.mkdir()
            steps = one_round(work, env, args.bits_per_weight)
            rounds.append({"round": name, "steps": steps,
                           "total_seconds": sum(s["seconds"] for s in steps),
                           "peak_rss_bytes": max(s["peak_rss_bytes"] for s in steps)})
            print(json.dumps(rounds[-1]), flush=True)
    result = {"command": " ".join(["python bench/bench_pipeline.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
              "target_seconds": TARGET_SECONDS, "target_peak_rss_bytes": TARGET_RSS_BYTES,
              "rounds": rounds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Profile + plan + quantize of the demo model", "",
             f"Command: `{result['command']}` ({result['machine']}, "
             f"OMP_WAIT_POLICY={result['omp_wait_policy']}). Target: under "
             f"{TARGET_SECONDS} s in all, peak RSS under 4 GiB.", "",
             "| round | step | wall s | peak RSS |", "| --- | --- | ---: | ---: |"]
    for r in rounds:
        for step in r["steps"]:
            lines.append(f"| {r['round']} | `{step['command'].split('apq-sdk', 1)[-1].strip()}` | "
                         f"{step['seconds']:.1f} | {step['peak_rss_bytes'] / 1024 ** 3:.2f} GiB |")
        lines.append(f"| {r['round']} | **total** | **{r['total_seconds']:.1f}** | "
                     f"{r['peak_rss_bytes'] / 1024 ** 3:.2f} GiB |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
