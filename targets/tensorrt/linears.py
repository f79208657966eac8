"""How TensorRT's ONNX parser takes the core's block-quantized weights: standard
`DequantizeLinear` (opset 21) feeding a `MatMul`, the pattern it fuses into a weight-only INT4
GEMM (the pattern NVIDIA's ModelOpt `modelopt.onnx.quantization` int4 export writes).

One packed linear (or fused group) becomes

    W [K, N] INT4 initializer --DequantizeLinear(axis=0, block_size=g)--> [K, N] float32
    scales [K/g, N] float32 --'                                              |
    x [..., K] ------------------------------------------------------- MatMul --> (+ bias)

with the core's arrays re-laid out, never re-quantized:

* `W`: the core's `qweight` codes c (unsigned, LSB-first, docs/formats.md) of a symmetric layer,
  whose zero point is 2**(b-1), as the signed codes c - 8 in [-8, 7], transposed to [K, N] (a
  fused group's members side by side along N) and packed two per byte, the first element of each
  pair in the low nibble (ONNX's INT4 layout);
* `scales`: the float16 scales widened to float32 (exact) and transposed to [K/g, N].

What TensorRT requires and this lowering therefore refuses (the capability table plans within it):
zero points other than 0 (TensorRT's Dequantize is symmetric only), a group that does not divide
the input width (a block scale's shape is the weight's divided by the block), and bit-widths other
than 4 (INT4 is weight-only in TensorRT; 2/3-bit layers need a plugin, 8-bit per-group blocks
depend on the TensorRT version). A quantized head tied to the embedding is refused too (plan it
at 16 bits) until the embedding lookup of INT4 codes is settled for TensorRT.

onnxruntime runs the same graph for verification, but only with the session option
`session.qdq_matmulnbits_accuracy_level` = 0: by default it fuses DequantizeLinear + MatMul into
an int8-activation MatMulNBits and computes something else (docs/adding-a-target.md).

`read_weights(model, plan)` inverts the layout for the bit-exact check of every build.
"""

from __future__ import annotations

import numpy as np

from apq_sdk.checkpoint import CheckpointModule

from ..onnx_graph import (DecoderGraph, LinearLowering, LoweringError, parse_linear_doc,
                          read_float16_weights)

BITS = 4
ZERO = 1 << (BITS - 1)  # the core's zero point of a symmetric 4-bit group


def _codes(module: CheckpointModule) -> np.ndarray:
    """The module's signed INT4 codes [N, K] (int8 values in [-8, 7])."""
    from apq_sdk.quant.packing import unpack_bits

    n, k = module.shape
    return unpack_bits(module.arrays["qweight"], BITS, k).astype(np.int8) - ZERO


def check_module(module: CheckpointModule) -> None:
    n, k = module.shape
    if module.bits != BITS:
        raise LoweringError(f"{module.name}: {module.bits}-bit weights cannot be lowered to "
                            f"TensorRT's DequantizeLinear (INT4 blocks only); plan within the "
                            f"target's capabilities")
    if not module.symmetric:
        raise LoweringError(f"{module.name}: asymmetric groups (zero points) cannot be lowered to "
                            f"TensorRT, whose Dequantize is symmetric only; plan with symmetric "
                            f"groups")
    if k % module.group_size:
        raise LoweringError(f"{module.name}: groups of {module.group_size} do not divide its input "
                            f"width {k}; TensorRT's blocks must (plan with whole groups)")
    if not (np.asarray(module.arrays["scales"], np.float32) > 0).all():
        raise LoweringError(f"{module.name}: a scale is not positive; TensorRT's Dequantize "
                            f"needs positive scales (the checkpoint is damaged: quantize again)")


def pack_int4(values: np.ndarray) -> bytes:
    """Signed INT4 values (any shape, row-major) -> ONNX's packed bytes (low nibble first)."""
    flat = np.asarray(values, dtype=np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    low = flat[0::2].astype(np.uint8) & 0x0F
    high = flat[1::2].astype(np.uint8) & 0x0F
    return (low | (high << 4)).astype(np.uint8).tobytes()


def dq_arrays(members: list[CheckpointModule]) -> tuple[np.ndarray, np.ndarray]:
    """(signed codes [K, N] int8, scales [K/g, N] float32) of a module or a fused group."""
    for m in members:
        check_module(m)
    codes = np.concatenate([_codes(m) for m in members]).T
    scales = np.concatenate([np.asarray(m.arrays["scales"], np.float16) for m in members])
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales.astype(np.float32).T)


class DequantizeLinearLowering(LinearLowering):
    """Standard ONNX Q/DQ weights for TensorRT (weight-only INT4 blocks)."""

    name = "tensorrt"

    def packed_linear(self, graph: DecoderGraph, a: str, members: list[CheckpointModule],
                      name: str, bias: str | None, output, doc: str) -> str:
        from onnx import TensorProto, helper

        g = graph.g
        codes, scales = dq_arrays(members)
        w_name = f"{name}.weight_int4"
        if w_name in g.initializers:
            raise LoweringError(f"initializer {w_name} defined twice")
        g.initializers[w_name] = helper.make_tensor(w_name, TensorProto.INT4, list(codes.shape),
                                                    pack_int4(codes), raw=True)
        w = g.op("DequantizeLinear", [w_name, g.init(f"{name}.weight_scale", scales)], name,
                 axis=0, block_size=members[0].group_size)
        if bias is None:
            return g.op("MatMul", [a, w], name, outputs=output, doc=doc)
        return g.op("Add", [g.op("MatMul", [a, w], name, doc=doc), bias], name, outputs=output)


def read_weights(model, plan) -> dict[str, CheckpointModule]:
    """Every DequantizeLinear-lowered module as the ONNX model holds it, in the checkpoint's
    layout (qweight of unsigned LSB-first codes, float16 scales), fused groups split by columns.
    Raises LoweringError when the graph holds a module the plan lacks or a scale that is not a
    float16 value."""
    from onnx import helper, numpy_helper

    from apq_sdk.quant.packing import pack_bits

    shapes = {name: entry.shape for name, entry in plan.modules.items()}
    inits = {t.name: t for t in model.graph.initializer}
    producers = {node.output[0]: node for node in model.graph.node}
    out: dict[str, CheckpointModule] = {}
    for node in model.graph.node:
        modules, _ = parse_linear_doc(node.doc_string)
        if not modules or node.op_type != "MatMul":
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int16)  # [K, N]
        scales = numpy_helper.to_array(inits[dq.input[1]])  # [K/g, N]
        if not np.array_equal(scales.astype(np.float16).astype(np.float32), scales):
            raise LoweringError(f"{node.name}: a scale is not a float16 value (re-quantized?)")
        start = 0
        for name in modules:
            if name not in shapes:
                raise LoweringError(f"{node.name} holds {name!r}, which the plan does not have")
            n, k = shapes[name]
            cols = slice(start, start + n)
            start += n
            unsigned = (codes[:, cols].T + ZERO).astype(np.uint8)
            out[name] = CheckpointModule(
                name=name, kind="packed", shape=(n, k), bits=BITS,
                group_size=int(attrs["block_size"]),
                arrays={"qweight": pack_bits(np.ascontiguousarray(unsigned), BITS),
                        "scales": np.ascontiguousarray(scales[:, cols].T.astype(np.float16))})
    out.update(read_float16_weights(model, shapes))
    return out
