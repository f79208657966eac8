"""Which MatMulNBits configurations are fast in this onnxruntime, at decode (one token, M=1)?

One-node graphs, random codes and scales, timed against a float32 MatMul of the same shape on one
intra-op thread: every bit-width the arm64-linux target lowers (2, 4, 8), block sizes 32/64/128,
with and without zero points, at accuracy_level 0 (float activations: activation mode `none`) and
4 (int8 activations per block: `int8-per-block-dynamic`). Shapes are the demo model's
(SmolLM2-135M: q/k/v-sized 576 -> 1536, down_proj 1536 -> 576, head 576 -> 49152).

    python bench/bench_ort_kernels.py            # writes bench/results/onnxruntime-kernels.{json,md}
    python bench/bench_ort_kernels.py --quick    # fewer repetitions, fewer shapes

The result decides the target's default activation mode: a configuration whose kernel falls back to
dequantizing the whole weight on every call is tens of times slower than float32 at decode.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(576, 1536), (1536, 576), (576, 49152)]


def nbits_model(k: int, n: int, bits: int, block: int, accuracy: int, zero_points: bool, rng):
    from onnx import TensorProto, helper, numpy_helper

    blocks = -(-k // block)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8),
                                                  dtype=np.uint8), "B"),
             numpy_helper.from_array((rng.random((n, blocks), dtype=np.float32) * 0.01), "S")]
    inputs = ["A", "B", "S"]
    if zero_points:
        inits.append(numpy_helper.from_array(
            rng.integers(0, 256, (n, -(-blocks * bits // 8)), dtype=np.uint8), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def float_model(k: int, n: int, rng):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def median_us(model, k: int, repeats: int, rng) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    a = rng.standard_normal((1, k), dtype=np.float32)
    for _ in range(10):
        session.run(None, {"A": a})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"A": a})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "onnxruntime-kernels"))
    args = parser.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    for k, n in shapes:
        repeats = 30 if args.quick else (60 if n > 10000 else 200)
        fp32 = median_us(float_model(k, n, rng), k, repeats, rng)
        for bits in (2, 4, 8):
            for block in (32, 64, 128):
                for accuracy in (0, 4):
                    for zero_points in (True, False):
                        us = median_us(nbits_model(k, n, bits, block, accuracy, zero_points, rng),
                                       k, repeats, rng)
                        rows.append({"K": k, "N": n, "bits": bits, "block_size": block,
                                     "accuracy_level": accuracy, "zero_points": zero_points,
                                     "median_us": us, "float32_matmul_us": fp32,
                                     "speedup_vs_float32": fp32 / us})
                        print(f"K={k} N={n} b{bits} g{block} acc{accuracy} zp{int(zero_points)}: "
                              f"{us:.0f} us (float32 {fp32:.0f} us)", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_ort_kernels.py" + (" --quick" if args.quick else "")
    meta = {"command": command, "onnxruntime": ort.__version__, "machine": platform.machine(),
            "threads": 1}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# MatMulNBits kernels at decode (M=1), onnxruntime {ort.__version__}, "
             f"{platform.machine()}, 1 thread", "", f"Command: `{command}`", "",
             "Median of single calls; speed-up > 1 is faster than a float32 MatMul of the same "
             "shape. Mean over block sizes 32/64/128 and with/without zero points "
             "(per-configuration rows in the JSON).", "",
             "| K x N | bits | accuracy_level 0 (float activations) | accuracy_level 4 (int8 per block) |",
             "| --- | ---: | ---: | ---: |"]
    for k, n in shapes:
        for bits in (2, 4, 8):
            cells = []
            for accuracy in (0, 4):
                sel = [r for r in rows if (r["K"], r["N"], r["bits"], r["accuracy_level"]) ==
                       (k, n, bits, accuracy)]
                us = float(np.mean([r["median_us"] for r in sel]))
                speed = float(np.mean([r["speedup_vs_float32"] for r in sel]))
                cells.append(f"{us:.0f} us (x{speed:.2f})")
            lines.append(f"| {k} x {n} | {bits} | {cells[0]} | {cells[1]} |")
    lines += ["", "Float32 MatMul: " + ", ".join(
        f"{k} x {n} {next(r['float32_matmul_us'] for r in rows if (r['K'], r['N']) == (k, n)):.0f} us"
        for k, n in shapes) + ".", "", "Timings vary with machine load; ratios are what to read."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
