"""How ONNX Runtime runs the core's block-quantized weights: `com.microsoft.MatMulNBits` and
`GatherBlockQuantized`, whose initializers are the core's packed arrays, re-laid out but never
re-quantized:

* `B` [N, n_blocks, blob_size] uint8: row n of the core's `qweight` (a little-endian bit stream of K
  codes, docs/formats.md) cut into blocks of `block_size * bits / 8` bytes; the short last block of a
  ragged row is padded with zero bytes. For 2, 4 and 8 bits the bit order is MatMulNBits' own.
* `scales` [N, n_blocks] float32: the float16 scales widened (exact); MatMulNBits wants A's type.
* `zero_points` [N, ceil(n_blocks * bits / 8)] uint8: the core's `qzeros` bytes unchanged (same
  per-row LSB-first packing); absent for symmetric layers, whose zero point 2**(bits-1) is also
  MatMulNBits' default.

A fused group (q/k/v, gate/up) is one MatMulNBits whose initializers are the members' rows
concatenated. int8-per-block-dynamic activations are exactly MatMulNBits' accuracy_level 4
(CompInt8): A quantized per block of block_size with codes RNE(a * 127 / amax) and scale amax / 127.
A quantized head tied to the embedding is one `B` read by both the head's MatMulNBits and the
embedding's GatherBlockQuantized.

`read_back(model)` inverts the layout: the arrays each MatMulNBits holds, per module, in the
checkpoint's own layout, for the bit-exact check of every build.
"""

from __future__ import annotations

import numpy as np

from apq_sdk.checkpoint import CheckpointModule

from ..onnx_graph import (ACT_INT8, ACT_INT8_BLOCK, MS_DOMAIN, DecoderGraph, LinearLowering,
                          LoweringError, linear_doc, parse_linear_doc, read_float16_weights)

ACTIVATION_LOWERINGS = ("explicit", "accuracy-level-4")


def num_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def nbits_b(qweight: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """Core qweight [N, K*b/8] -> MatMulNBits B [N, n_blocks, block_size*b/8], last block zero-padded."""
    n, row_bytes = qweight.shape
    if row_bytes * 8 != k * bits:
        raise LoweringError(f"qweight has {row_bytes} bytes per row, expected {k * bits // 8} for "
                            f"K={k} at {bits} bits")
    blocks = num_blocks(k, block_size)
    blob = block_size * bits // 8
    out = np.zeros((n, blocks * blob), dtype=np.uint8)
    out[:, :row_bytes] = qweight
    return out.reshape(n, blocks, blob)


def nbits_initializers(module: CheckpointModule) -> dict[str, np.ndarray]:
    """The MatMulNBits initializers of one quantized module (B, scales, optional zero_points)."""
    if module.bits not in (2, 4, 8):
        raise LoweringError(f"{module.name}: {module.bits}-bit weights cannot be lowered to "
                            f"MatMulNBits (2, 4 and 8 bits only); plan with the arm64-linux "
                            f"capabilities")
    n, k = module.shape
    arrays = module.arrays
    out = {"B": nbits_b(arrays["qweight"], module.bits, module.group_size, k),
           "scales": np.ascontiguousarray(arrays["scales"], dtype=np.float16).astype(np.float32)}
    if "qzeros" in arrays:
        out["zero_points"] = np.ascontiguousarray(arrays["qzeros"], dtype=np.uint8)
    return out


def unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[R, bytes] LSB-first bit streams -> [R, count] codes (uint8)."""
    from apq_sdk.quant.packing import unpack_bits

    return np.ascontiguousarray(unpack_bits(packed, bits, count), dtype=np.uint8)


class MatMulNBitsLowering(LinearLowering):
    """ONNX Runtime's contrib ops. `activation_lowering="accuracy-level-4"` runs
    int8-per-token-dynamic layers through accuracy_level 4 instead of the explicit ops: a
    different function, built for the measurement in the target's docstring only."""

    name = "onnxruntime"

    def __init__(self, activation_lowering: str = "explicit"):
        if activation_lowering not in ACTIVATION_LOWERINGS:
            raise LoweringError(f"activation_lowering: expected one of {ACTIVATION_LOWERINGS}, "
                                f"found {activation_lowering!r}")
        self.activation_lowering = activation_lowering

    def quantizes_activations(self, module: CheckpointModule) -> bool:
        return module.kind == "packed" and (
            module.activation == ACT_INT8_BLOCK
            or module.activation == ACT_INT8 and self.activation_lowering == "accuracy-level-4")

    def packed_linear(self, graph: DecoderGraph, a: str, members: list[CheckpointModule],
                      name: str, bias: str | None, output, doc: str) -> str:
        g = graph.g
        first = members[0]
        parts = [nbits_initializers(m) for m in members]
        b = g.init(f"{name}.B", np.concatenate([p["B"] for p in parts]))
        sc = g.init(f"{name}.scales", np.concatenate([p["scales"] for p in parts]))
        zp = g.init(f"{name}.zero_points", np.concatenate([p["zero_points"] for p in parts])) \
            if "zero_points" in parts[0] else ""
        inputs = [a, b, sc, zp]
        if bias is not None:
            inputs += ["", bias]
        while inputs[-1] == "":
            inputs.pop()
        return g.op("MatMulNBits", inputs, name, outputs=output, domain=MS_DOMAIN,
                    doc=doc,
                    K=first.shape[1], N=sum(m.shape[0] for m in members), bits=first.bits,
                    block_size=first.group_size,
                    accuracy_level=4 if self.quantizes_activations(first) else 0)

    def tied_embedding(self, graph: DecoderGraph, head: CheckpointModule) -> str:
        # GatherBlockQuantized on the head's own B (shared initializer), with its scales and zero
        # points as [V, n_blocks, 1]
        g = graph.g
        s = graph.spec.embedding_name
        v, k = head.shape
        blocks = num_blocks(k, head.group_size)
        graph.shared["lm_head.B"] = g.init("lm_head.B", nbits_initializers(head)["B"])
        inputs = [graph.shared["lm_head.B"], "input_ids",
                  g.init(f"{s}.scales",
                         head.arrays["scales"].astype(np.float16).astype(np.float32)
                         .reshape(v, blocks, 1))]
        if "qzeros" in head.arrays:
            zeros = unpack_rows(head.arrays["qzeros"], head.bits, blocks)
            inputs.append(g.init(f"{s}.zero_points", zeros.reshape(v, blocks, 1)))
        x = g.op("GatherBlockQuantized", inputs, s, domain=MS_DOMAIN, bits=head.bits,
                 block_size=head.group_size, gather_axis=0, quantize_axis=2)
        x = g.op("Reshape", [x, g.const([0, 0, -1], np.int64)], s)
        if blocks * head.group_size != k:
            x = g.op("Slice", [x, g.const([0], np.int64), g.const([k], np.int64),
                               g.const([2], np.int64)], s)
        return x

    def tied_head(self, graph: DecoderGraph, x: str, head: CheckpointModule,
                  output: str = "logits") -> str:
        g = graph.g
        parts = nbits_initializers(head)
        inputs = [x, graph.shared["lm_head.B"], g.init("lm_head.scales", parts["scales"]),
                  g.init("lm_head.zero_points", parts["zero_points"]) if "zero_points" in parts else ""]
        while inputs[-1] == "":
            inputs.pop()
        return g.op("MatMulNBits", inputs, "lm_head", outputs=[output], domain=MS_DOMAIN,
                    doc=linear_doc([head], x), K=head.shape[1], N=head.shape[0],
                    bits=head.bits, block_size=head.group_size,
                    accuracy_level=4 if head.activation == ACT_INT8_BLOCK else 0)


def nbits_nodes(model) -> list[dict]:
    """Every MatMulNBits node: its modules, attributes and initializer arrays (for checks)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def array(name):
        if not name:
            return None
        return numpy_helper.to_array(inits[name]) if name in inits else None

    found = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        modules, _ = parse_linear_doc(node.doc_string)
        inputs = list(node.input) + [""] * (6 - len(node.input))
        found.append({"node": node.name, "modules": modules, "attrs": attrs,
                      "input": inputs[0], "B": array(inputs[1]), "scales": array(inputs[2]),
                      "zero_points": array(inputs[3]), "bias": array(inputs[5]),
                      "initializer_names": [n for n in inputs[1:] if n]})
    return found


def read_weights(model, plan) -> dict[str, CheckpointModule]:
    """Every planned module's weights as the ONNX model holds them, in the checkpoint's layout:
    MatMulNBits initializers cut back into qweight / scales (float16) / qzeros per module, float16
    initializers (fused groups split by rows) as weight. Raises LoweringError when the graph holds
    something the plan does not describe (a module it lacks, non-zero block padding)."""
    shapes = {name: entry.shape for name, entry in plan.modules.items()}
    out: dict[str, CheckpointModule] = {}
    for node in nbits_nodes(model):
        bits, block = node["attrs"]["bits"], node["attrs"]["block_size"]
        b = node["B"].reshape(node["B"].shape[0], -1)
        start = 0
        for name in node["modules"]:
            if name not in shapes:
                raise LoweringError(f"MatMulNBits {node['node']} holds {name!r}, which the plan "
                                    f"does not have")
            n, k = shapes[name]
            rows = slice(start, start + n)
            start += n
            row_bytes = k * bits // 8
            if b[rows, row_bytes:].any():
                raise LoweringError(f"{name}: the padding of its last MatMulNBits block is not zero")
            arrays = {"qweight": np.ascontiguousarray(b[rows, :row_bytes]),
                      "scales": node["scales"][rows].astype(np.float16)}
            if node["zero_points"] is not None:
                arrays["qzeros"] = np.ascontiguousarray(node["zero_points"][rows])
            out[name] = CheckpointModule(name=name, kind="packed", shape=(n, k), arrays=arrays,
                                         bits=bits, group_size=block)
    out.update(read_float16_weights(model, shapes))
    return out
