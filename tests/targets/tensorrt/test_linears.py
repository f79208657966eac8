"""targets/tensorrt/linears.py: the plan's weights as standard DequantizeLinear (INT4 blocks,
opset 21) feeding MatMul, the pattern TensorRT's ONNX parser fuses into weight-only INT4 GEMMs.

The graph is built from the core's checkpoint for tiny models of several families (plain, q/k/v
bias, fused q/k/v and gate/up, q/k norms with sliding windows) and run in onnxruntime with its
DequantizeLinear + MatMul fusion held at float activations; logits equal the torch reference of
the plan to float precision, and every weight reads back equal to the checkpoint, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from apq_sdk.calibration import load_calibration  # noqa: E402
from apq_sdk.capabilities import Capabilities  # noqa: E402
from apq_sdk.checkpoint import CheckpointModule, load_quantized, read_checkpoint  # noqa: E402
from apq_sdk.model_io import load_model  # noqa: E402
from apq_sdk.planning import Budget, make_plan  # noqa: E402
from apq_sdk.quantizer import quantize_model, save_quantized  # noqa: E402
from apq_sdk.sensitivity import ProfileSettings, profile_model  # noqa: E402
from apq_sdk.targets.onnx_graph import LoweringError, build_decoder, save_model  # noqa: E402
from apq_sdk.targets.onnxruntime.target import OnnxDecoder  # noqa: E402
from apq_sdk.targets.tensorrt.linears import (DequantizeLinearLowering, check_module,  # noqa: E402
                                              pack_int4, read_weights)

# what TensorRT's Dequantize runs: symmetric INT4 blocks that divide the input width
TABLE = Capabilities(name="trt-test", weight_bits=(4, 16), group_sizes=(32, 64),
                     activation_modes=("none", "int8-per-token-dynamic"), symmetric_only=True,
                     whole_groups=True, head_bits=(16,))
ORT_DQ = {"session.qdq_matmulnbits_accuracy_level": "0"}
FAMILIES = ("llama", "qwen2", "phi3", "gemma3_text")


def _checkpoint(path, out, activation="none"):
    model, tok, info = load_model(path)
    ids, calib = load_calibration(tok, num_samples=8, seq_len=48, seed=0)
    fit, _ = load_calibration(tok, num_samples=2, seq_len=48, seed=1)
    settings = ProfileSettings.for_capabilities(TABLE, batch_size=4)
    sens = profile_model(model, info, ids, calib, settings, fit_samples=fit)
    plan = make_plan(sens, Budget(bits_per_weight=5.0, scope="linear"), caps=TABLE,
                     activation=activation, head_bits="16")
    assert TABLE.check_plan(plan) == []
    assert any(m.bits == 4 for m in plan.modules.values())
    quantize_model(model, info, plan, ids)
    return read_checkpoint(save_quantized(model, tok, plan, out)), ids


@pytest.mark.parametrize("family", FAMILIES)
def test_dq_graph_equals_the_reference_and_holds_the_checkpoints_weights(family, tiny_model_factory,
                                                                         tmp_path):
    ckpt, ids = _checkpoint(tiny_model_factory(family), tmp_path / "q")
    model = build_decoder(ckpt.config, ckpt.tensors, ckpt.modules, DequantizeLinearLowering())
    onnx.checker.check_model(model)
    save_model(model, tmp_path / "model.onnx")
    # structure: every 4-bit module is INT4 -> DequantizeLinear(axis 0, its block) -> MatMul
    inits = {t.name: t for t in model.graph.initializer}
    producers = {n.output[0]: n for n in model.graph.node}
    dq_matmuls = 0
    for node in model.graph.node:
        assert node.domain in ("", None), f"{node.op_type} from {node.domain}: not standard ONNX"
        if node.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = inits[node.input[0]]
        assert weight.data_type == onnx.TensorProto.INT4 and attrs["axis"] == 0
        k, n = weight.dims
        assert attrs["block_size"] in TABLE.group_sizes and k % attrs["block_size"] == 0
        assert list(inits[node.input[1]].dims) == [k // attrs["block_size"], n]
        assert len(node.input) == 2  # no zero point: symmetric
        consumers = [c for c in model.graph.node if node.output[0] in c.input]
        assert [c.op_type for c in consumers] == ["MatMul"]
        assert consumers[0].input[1] == node.output[0]
        dq_matmuls += 1
    assert dq_matmuls and not [n for n in producers.values() if n.op_type == "MatMulNBits"]
    # bit for bit: what the graph holds is the checkpoint
    read = read_weights(onnx.load(str(tmp_path / "model.onnx")), ckpt.plan)
    assert set(read) == set(ckpt.plan.modules)  # every planned module, the 16-bit head included
    for name, got in read.items():
        want = ckpt.modules[name]
        assert got.kind == want.kind and got.bits == want.bits, name
        for key, array in want.arrays.items():
            assert np.array_equal(got.arrays[key], array), (name, key)
    # numbers: onnxruntime (fusion at float activations) against the torch reference
    runner = OnnxDecoder(tmp_path / "model.onnx", config=ORT_DQ)
    reference = load_quantized(ckpt.path)
    row = ids[0].numpy()
    with torch.no_grad():
        want = reference(input_ids=ids[:1]).logits[0].numpy()
    scale = np.abs(want).max()
    assert np.abs(runner.full(row) - want).max() <= 2e-5 * scale
    logits, past = runner.step(row[:5], None)
    for t in range(5, 20):
        logits, past = runner.step(row[t:t + 1], past)
        assert np.abs(logits[0] - want[t]).max() <= 2e-5 * scale, t


def test_onnxruntime_needs_its_fusion_held_at_float_activations(tiny_model_factory, tmp_path):
    """Without the session option, onnxruntime turns DequantizeLinear + MatMul into MatMulNBits
    with int8 activations and the graph no longer computes the plan: verify must set it."""
    ckpt, ids = _checkpoint(tiny_model_factory("llama"), tmp_path / "q")
    save_model(build_decoder(ckpt.config, ckpt.tensors, ckpt.modules, DequantizeLinearLowering()),
               tmp_path / "model.onnx")
    row = ids[0].numpy()
    with torch.no_grad():
        want = load_quantized(ckpt.path)(input_ids=ids[:1]).logits[0].numpy()
    scale = np.abs(want).max()
    exact = np.abs(OnnxDecoder(tmp_path / "model.onnx", config=ORT_DQ).full(row) - want).max()
    fused = np.abs(OnnxDecoder(tmp_path / "model.onnx").full(row) - want).max()
    assert exact <= 2e-5 * scale < fused


def test_per_token_int8_activations_go_through_standard_ops(tiny_model_factory, tmp_path):
    ckpt, ids = _checkpoint(tiny_model_factory("qwen2"), tmp_path / "q",
                            activation="int8-per-token-dynamic")
    model = build_decoder(ckpt.config, ckpt.tensors, ckpt.modules, DequantizeLinearLowering())
    ops = {n.op_type for n in model.graph.node}
    assert {"ReduceMax", "Round", "Clip", "DequantizeLinear"} <= ops and "MatMulNBits" not in ops
    save_model(model, tmp_path / "model.onnx")
    row = ids[0].numpy()
    with torch.no_grad():
        want = load_quantized(ckpt.path)(input_ids=ids[:1]).logits[0].numpy()
    got = OnnxDecoder(tmp_path / "model.onnx", config=ORT_DQ).full(row)
    # int8 codes at rounding ties may flip between runtimes: compare as verify does, per token
    per_token = np.abs(got - want).max(-1) / np.abs(want).max()
    assert np.median(per_token) <= 1e-5


def _module(bits=4, group=32, k=64, zeros=False) -> CheckpointModule:
    from apq_sdk.quant.packing import pack_bits

    codes = np.random.default_rng(0).integers(0, 1 << bits, (8, k)).astype(np.uint8)
    arrays = {"qweight": pack_bits(codes, bits),
              "scales": np.ones((8, -(-k // group)), np.float16)}
    if zeros:
        arrays["qzeros"] = pack_bits(np.full((8, -(-k // group)), 3, np.uint8), bits, pad=True)
    return CheckpointModule(name="model.layers.0.mlp.up_proj", kind="packed", shape=(8, k),
                            arrays=arrays, bits=bits, group_size=group)


@pytest.mark.parametrize("module,message", [
    (_module(bits=3), "3-bit weights cannot be lowered to TensorRT's DequantizeLinear"),
    (_module(bits=8), "8-bit weights cannot be lowered"),
    (_module(zeros=True), "asymmetric groups .* symmetric only; plan with symmetric groups"),
    (_module(group=64, k=96), "groups of 64 do not divide its input width 96"),
])
def test_what_tensorrt_cannot_run_is_refused_with_the_module_and_the_fix(module, message):
    with pytest.raises(LoweringError, match=f"model.layers.0.mlp.up_proj: {message}"):
        check_module(module)


def test_int4_packing_is_onnxs_low_nibble_first():
    values = np.array([[-8, 7, 0], [-1, 3, 1]], np.int8)
    packed = pack_int4(values)
    assert packed == bytes([0x78, 0xF0, 0x13])  # pairs (-8, 7), (0, -1), (3, 1): low nibble first
    tensor = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, [2, 3], packed, raw=True)
    assert np.array_equal(onnx.numpy_helper.to_array(tensor), values)


def test_the_graph_follows_modelopts_int4_pattern(tiny_model_factory, tmp_path):
    """tests/data/modelopt-int4-pattern.json is what NVIDIA ModelOpt 0.47 writes for TensorRT's
    weight-only INT4 (bench/modelopt_int4_pattern.py, run in its own environment): every quantized
    MatMul of ours has the same chain, attributes, types and layout."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    reference = json.loads((root / "tests" / "data" / "modelopt-int4-pattern.json").read_text())
    spec = importlib.util.spec_from_file_location("modelopt_int4_pattern",
                                                  root / "bench" / "modelopt_int4_pattern.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def shape_free(entry):  # the layout rules, without the sizes of that particular model
        k, n = entry["weight"]["dims"]
        blocks, n_scale = entry["scale"]["dims"]
        block = entry["dq_attributes"]["block_size"]
        assert n_scale == n and blocks * block == k
        return {"chain": entry["ops_from_weight_to_matmul"], "input": entry["matmul_input"],
                "axis": entry["dq_attributes"]["axis"], "attrs": sorted(entry["dq_attributes"]),
                "weight": entry["weight"]["dtype"], "scale": entry["scale"]["dtype"],
                "zero_point": entry["zero_point"]}

    theirs = [shape_free(e) for e in reference["matmuls"]]
    assert theirs and all(t == theirs[0] for t in theirs)
    ckpt, _ = _checkpoint(tiny_model_factory("llama"), tmp_path / "q")
    model = build_decoder(ckpt.config, ckpt.tensors, ckpt.modules, DequantizeLinearLowering())
    ours = bench.pattern(model)
    assert ours and len(ours) == sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    for entry in ours:
        assert shape_free(entry) == theirs[0], entry
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"]
    assert opset >= reference["opsets"]["ai.onnx"]
