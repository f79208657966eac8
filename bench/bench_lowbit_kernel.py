"""apq::lowbit_linear's arithmetic alone (runtime_kernels/apq_lowbit_linear.hpp), one token.

Compiles a small harness against the header twice, for this CPU (-march=native: the AVX-512 VNNI
path where the CPU has it) and for AVX2+BMI2 (the path before it), and times the demo's kernel
shapes: the 3-bit MLP and attention layers and the tied 4-bit head, groups of 64. Activations
are Gaussian with two outlier channels. Each binary reports the fastest of 300 calls; the two
binaries alternate `--rounds` times and the table takes the fastest of those (this VM's speed
drifts over minutes). One thread.

    python bench/bench_lowbit_kernel.py
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(3, 576, 1536), (3, 1536, 576), (3, 576, 576), (2, 576, 1536), (4, 576, 1536),
          (4, 576, 49152)]  # bits, K, N
GROUP = 64

HARNESS = r"""
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "apq_lowbit_linear.hpp"
int main(int argc, char** argv) {
  const int bits = atoi(argv[1]);
  const long k = atol(argv[2]), n = atol(argv[3]), g = atol(argv[4]);
  const long row = (k * bits + 7) / 8, groups = (k + g - 1) / g;
  std::mt19937 rng(1);
  std::vector<unsigned char> packed(n * row);
  for (auto& b : packed) b = static_cast<unsigned char>(rng());
  std::vector<unsigned short> scales(n * groups, 0x2000);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(k), y(n);
  for (auto& v : x) v = normal(rng);
  x[3] = 40.0f;
  x[k / 2] = -25.0f;
  double best = 1e9;
  for (int r = 0; r < 300; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    apq_lowbit::lowbit_linear(x.data(), 1, k, packed.data(), scales.data(), n, bits, g, y.data());
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                              .count());
  }
  std::printf("%.9f %s\n", best, APQ_LOWBIT_SIMD);
  return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "lowbit-kernel"))
    args = parser.parse_args()
    from apq_sdk.runtime_kernels_build import kernel_source_dir

    cxx = shutil.which("g++")
    if cxx is None:
        raise SystemExit("bench_lowbit_kernel: needs g++ (apt-get install g++)")
    builds = {"native": ["-march=native"], "avx2": ["-mavx2", "-mbmi2", "-mf16c"]}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "harness.cpp"
        source.write_text(HARNESS)
        exes = {}
        for name, flags in builds.items():
            exes[name] = Path(tmp) / name
            subprocess.run([cxx, "-O3", "-std=c++17", "-ffp-contract=off", *flags,
                            f"-I{kernel_source_dir()}", str(source), "-o", str(exes[name])],
                           check=True)
        rows = []
        for bits, k, n in SHAPES:
            best, simd = {}, {}
            for _ in range(args.rounds):
                for name, exe in exes.items():
                    out = subprocess.run([str(exe), str(bits), str(k), str(n), str(GROUP)],
                                         check=True, capture_output=True, text=True).stdout
                    seconds, path = out.split()
                    best[name] = min(best.get(name, 1e9), float(seconds))
                    simd[name] = path
            rows.append({"bits": bits, "k": k, "n": n, "group": GROUP,
                         **{f"{b}_ms": best[b] * 1e3 for b in builds},
                         **{f"{b}_gmacs": k * n / best[b] / 1e9 for b in builds},
                         **{f"{b}_simd": simd[b] for b in builds}})
            print(f"{bits}-bit {k}x{n}: " + ", ".join(
                f"{b} ({simd[b]}) {best[b] * 1e3:.4f} ms" for b in builds), flush=True)
    result = {"command": " ".join(["python bench/bench_lowbit_kernel.py", *sys.argv[1:]]),
              "cpu": platform.processor() or platform.machine(), "rounds": args.rounds,
              "rows": rows}
    lines = ["# apq::lowbit_linear alone, one token, one thread", "",
             f"Command: `{result['command']}`", "",
             f"Fastest of 300 calls, then of {args.rounds} alternations of the two builds; "
             "groups of 64, Gaussian activations with two outlier channels.", "",
             "| bits | K x N | native path | ms | GMAC/s | AVX2 path | ms | GMAC/s | speed-up |",
             "| ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['k']} x {r['n']} | {r['native_simd']} | "
                     f"{r['native_ms']:.4f} | {r['native_gmacs']:.1f} | {r['avx2_simd']} | "
                     f"{r['avx2_ms']:.4f} | {r['avx2_gmacs']:.1f} | "
                     f"x{r['avx2_ms'] / r['native_ms']:.2f} |")
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
