"""The core's packed weights as Core AI stores them, and back.

A packed module becomes `coreai::constexpr_blockwise_shift_scale(data, scale, zero_point,
input_dtype=...)`, which the converter stores as `coreai.blockwise_shift_scale` over sub-byte
constants:

* symmetric groups (no zero points in the checkpoint, zero point 2**(b-1)): the codes minus
  2**(b-1) as signed b-bit integers (si2 / si4 / si8), no zero point;
* asymmetric groups: the codes as unsigned b-bit integers (ui2 / ui4 / ui8) and the core's zero
  points as unsigned b-bit integers of the same type;
* the scales [N, K / group] float16, exactly the core's.

`input_dtype` is always given: without it the converter infers the width from the codes' range
(4-bit codes that happen to lie in [-2, 1] would be stored as 2-bit). Core AI has no 3-bit
integer type, and its 3-bit lookup tables do not convert (coreai-torch 0.4.3 packs 1/2/4/6/8-bit
indices only), so the Core AI targets' table has no 3-bit layers.

Reading back: the saved asset is MLIR bytecode; every `coreai.blockwise_shift_scale` of the
`prefill` function is read in program order with its constants' raw bytes (sub-byte values are a
little-endian bit stream) and matched to the module names the build recorded in the asset's
metadata (`apq.weights`), then turned back into the checkpoint's layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

#: Core AI integer types by (bits, signed)
INT_DTYPES = {(2, True): "int2", (4, True): "int4", (8, True): "int8",
              (2, False): "uint2", (4, False): "uint4", (8, False): "uint8"}
BITS = (2, 4, 8)


def register_ops() -> None:
    """torch.ops.coreai.* (plain `import coreai_torch` does not register them)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only validated with torch<=2.13.0; found 2.13.0+cpu"
        import coreai_torch._compression.custom_layers  # noqa: F401


class BlockwiseWeight(nn.Module):
    """`forward() -> float16 [N, K]`: a packed module's weight, expanded by the runtime."""

    def __init__(self, module):
        super().__init__()
        from apq_sdk.quant.packing import unpack_bits

        from ..onnx_graph import LoweringError

        n, k = module.shape
        bits, group = module.bits, module.group_size
        if bits not in BITS:
            raise LoweringError(f"{module.name}: {bits}-bit weights have no Core AI integer type "
                                f"(2, 4 and 8 bits convert); plan within the target's table")
        if k % group:
            raise LoweringError(f"{module.name}: groups of {group} do not divide its input width "
                                f"{k}; Core AI's blockwise op needs whole blocks")
        codes = unpack_bits(module.arrays["qweight"], bits, k).reshape(n, k)
        self.symmetric = module.symmetric
        if module.symmetric:
            data = torch.from_numpy((codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8))
            zero = None
        else:
            data = torch.from_numpy(codes.astype(np.uint8))
            zeros = unpack_bits(module.arrays["qzeros"], bits, k // group).reshape(n, k // group)
            zero = torch.from_numpy(zeros.astype(np.uint8))
        self.register_buffer("data", data)
        self.register_buffer("scale", torch.from_numpy(
            np.ascontiguousarray(module.arrays["scales"], dtype=np.float16)))
        self.register_buffer("zero_point", zero)
        self.input_dtype = getattr(torch, INT_DTYPES[bits, module.symmetric])

    def forward(self):
        return torch.ops.coreai.constexpr_blockwise_shift_scale(
            self.data, self.scale, self.zero_point, None, self.input_dtype, None)


class FloatWeight(nn.Module):
    """`forward() -> float16 [N, K]`: a 16-bit module's weight as stored."""

    def __init__(self, module):
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(
            np.ascontiguousarray(module.arrays["weight"], dtype=np.float16)))

    def forward(self):
        return self.weight


def module_weight(module) -> nn.Module:
    return BlockwiseWeight(module) if module.kind == "packed" else FloatWeight(module)


# -- reading the saved asset back -------------------------------------------------------------------

def _constant(op) -> tuple[np.ndarray, str]:
    """A coreai.constant's logical values and element type (si4, ui2, f16, ...)."""
    from coreai._compiler import ir
    from coreai._compiler._mlir_libs._coreaiIR._bindings import compiler

    tensor = ir.RankedTensorType(op.result.type)
    etype, shape = str(tensor.element_type), list(tensor.shape)
    attr = op.attributes["value"]
    if ir.DenseElementsAttr.isinstance(attr) and ir.DenseElementsAttr(attr).is_splat:
        value = ir.DenseElementsAttr(attr).get_splat_value()
        return np.full(shape, getattr(value, "value", value)), etype
    width = tensor.element_type.width
    count = math.prod(shape)
    raw = np.zeros(math.ceil(count * width / 8), np.uint8)
    compiler.copy_constant_value_to_array(constant_op=op, destination=raw)
    if etype in ("f16", "f32"):
        return raw.view(np.float16 if etype == "f16" else np.float32).reshape(shape), etype
    signed = etype.startswith("si")
    if width == 8:
        return raw.view(np.int8 if signed else np.uint8).reshape(shape), etype
    bits = np.unpackbits(raw, bitorder="little")[: count * width].reshape(count, width)
    values = (bits.astype(np.int32) << np.arange(width)).sum(1)
    if signed:
        values = np.where(values >= 1 << (width - 1), values - (1 << width), values)
    return values.astype(np.int8 if signed else np.uint8).reshape(shape), etype


def stored_weights(asset_path, function: str = "prefill") -> list[dict]:
    """Every blockwise op of `function`, in program order: data, scale and zero point values
    with their Core AI element types."""
    from coreai._compiler import ir
    from coreai.authoring import AIModelAsset

    module = AIModelAsset.load(asset_path).program._module._mlir_module
    graphs = {ir.StringAttr(op.attributes["sym_name"]).value: op
              for op in module.body.operations if op.operation.name == "coreai.graph"}
    if function not in graphs:
        raise ValueError(f"the asset has no function {function!r} (it has {sorted(graphs)})")
    out = []
    for op in graphs[function].regions[0].blocks[0].operations:
        if op.operation.name != "coreai.blockwise_shift_scale":
            continue
        record = {}
        for key, operand in zip(("data", "scale", "zero_point", "minval"), op.operands):
            owner = operand.owner.operation
            if owner.name != "coreai.constant":
                raise ValueError(f"a blockwise op's {key} is not a constant")
            record[key], record[key + "_type"] = _constant(owner)
        out.append(record)
    return out


def checkpoint_arrays(record: dict, bits: int, group: int, symmetric: bool) -> dict:
    """One stored blockwise op in the checkpoint's layout (qweight / scales / qzeros)."""
    from apq_sdk.quant.packing import pack_bits

    data = np.asarray(record["data"])
    n, k = data.shape
    etype = record["data_type"]
    if etype != ("si" if symmetric else "ui") + str(bits):
        raise ValueError(f"stored as {etype}, planned {bits}-bit "
                         f"{'symmetric' if symmetric else 'asymmetric'}")
    codes = data.astype(np.int16) + (1 << (bits - 1)) if symmetric else data.astype(np.int16)
    arrays = {"qweight": pack_bits(codes.astype(np.uint8).reshape(n, k), bits),
              "scales": np.asarray(record["scale"], dtype=np.float16)}
    if record["scale_type"] != "f16" or arrays["scales"].shape != (n, k // group):
        raise ValueError(f"scales stored as {record['scale_type']} "
                         f"{list(np.shape(record['scale']))}, planned f16 [{n}, {k // group}]")
    zero = np.asarray(record["zero_point"])
    if symmetric:
        if np.any(zero != 0):
            raise ValueError("a symmetric module stores non-zero offsets")
    else:
        arrays["qzeros"] = pack_bits(zero.astype(np.uint8).reshape(n, k // group), bits,
                                     pad=True)
    if np.any(np.asarray(record["minval"]) != 0):
        raise ValueError("the op stores a minimum-value offset the plan does not have")
    return arrays


def float16_digest(weight) -> str:
    """sha256 of a 16-bit module's float16 bytes (how its constant is found in the asset)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(weight, dtype=np.float16).tobytes()).hexdigest()


def float_constants(asset_path, digests: dict, plan) -> dict:
    """The 16-bit modules whose float16 weight the asset holds as a constant, found by their
    digests: {name: CheckpointModule}."""
    from coreai._compiler import ir
    from coreai.authoring import AIModelAsset

    from apq_sdk.checkpoint import CheckpointModule

    by_digest = {d: n for n, d in digests.items()}
    module = AIModelAsset.load(asset_path).program._module._mlir_module
    found = {}
    for graph in module.body.operations:
        if graph.operation.name != "coreai.graph":
            continue
        for op in graph.regions[0].blocks[0].operations:
            if op.operation.name != "coreai.constant":
                continue
            tensor = ir.RankedTensorType(op.result.type)
            if str(tensor.element_type) != "f16" or len(tensor.shape) != 2:
                continue
            values, _ = _constant(op.operation)
            name = by_digest.get(float16_digest(values))
            if name is not None and name not in found:
                found[name] = CheckpointModule(name=name, kind="float16",
                                               shape=tuple(values.shape),
                                               arrays={"weight": values.astype(np.float16)})
    return found
