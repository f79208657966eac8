"""What NVIDIA's ModelOpt writes for TensorRT's weight-only INT4: the reference pattern that
targets/tensorrt/linears.py must follow (tests/targets/tensorrt/test_linears.py compares).

ModelOpt (`nvidia-modelopt[onnx]`) pulls onnxruntime-gpu and cupy, so it lives in its own
environment, never in apq-sdk's:

    python -m venv /tmp/mo-venv
    /tmp/mo-venv/bin/pip install "torch==2.13.0"
    /tmp/mo-venv/bin/pip install "nvidia-modelopt[onnx]==0.47.0" "torch==2.13.0"
    /tmp/mo-venv/bin/python bench/modelopt_int4_pattern.py      # writes the JSON below

It quantizes a small float32 ONNX model (x -> MatMul(W1 [64, 32]) -> Relu -> MatMul(W2 [32, 16]))
with ModelOpt's INT4 RTN in its DequantizeLinear-only mode (`rtn_dq`, what TensorRT runs as a
weight-only GEMM) at blocks of 32, and records, per quantized MatMul, the ops between the weight
and the MatMul, the DequantizeLinear attributes, the data types and shapes of its inputs (as
[K, N] of the float weight), whether it has a zero point, and the model's opsets.
"""

from __future__ import annotations

import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "modelopt-int4-pattern.json"
BLOCK = 32


def float_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])],
                              [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def pattern(model: onnx.ModelProto) -> list[dict]:
    """Per MatMul fed by a DequantizeLinear of an initializer: the chain and its attributes."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        chain, tensor = [], node.input[1]
        while tensor in producers and tensor not in inits:
            chain.append(producers[tensor])
            tensor = producers[tensor].input[0]
        dq = next((n for n in chain if n.op_type == "DequantizeLinear"), None)
        if dq is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        zero = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        found.append({
            "matmul_input": 1,
            "ops_from_weight_to_matmul": [n.op_type for n in reversed(chain)],
            "dq_attributes": {k: attrs[k] for k in sorted(attrs)},
            "weight": {"dtype": TensorProto.DataType.Name(weight.data_type),
                       "dims": list(weight.dims)},
            "scale": {"dtype": TensorProto.DataType.Name(scale.data_type),
                      "dims": list(scale.dims)},
            "zero_point": None if zero is None else {
                "dtype": TensorProto.DataType.Name(zero.data_type),
                "all_zero": bool(not numpy_helper.to_array(zero).any())},
        })
    return found


def main() -> None:
    from modelopt.onnx.quantization.int4 import quantize

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.onnx"
        onnx.save(float_model(), path)
        quantized = quantize(str(path), calibration_method="rtn_dq", block_size=BLOCK,
                             use_external_data_format=False, nodes_to_exclude=[],
                             calibration_eps=["cpu"], log_level="WARNING")
    result = {
        "source": f"nvidia-modelopt {version('nvidia-modelopt')}, "
                  f"modelopt.onnx.quantization.int4.quantize(calibration_method='rtn_dq', "
                  f"block_size={BLOCK}) on a float32 MLP (bench/modelopt_int4_pattern.py)",
        "command": "/tmp/mo-venv/bin/python bench/modelopt_int4_pattern.py",
        "opsets": {(o.domain or "ai.onnx"): o.version for o in quantized.opset_import},
        "float_weight_dims": {"W1": [64, 32], "W2": [32, 16]},
        "matmuls": pattern(quantized),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(OUT.read_text())
    if not result["matmuls"]:
        sys.exit("ModelOpt quantized no MatMul")


if __name__ == "__main__":
    main()
