"""Reading a `.pte` back: its XNNPACK graphs, named data and constants, for the bit-exact check.

ExecuTorch 1.5 serializes an XNNPACK delegate as a header ("XH00") and a flatbuffer (`XNNGraph`,
backends/xnnpack/serialization/schema.fbs in the wheel) whose constant tensors name their bytes in
the program's named data (key: the SHA-256 of the bytes; a 4-bit weight's bfloat16 block scales
under "scale_" + the SHA-256 of theirs). The flatbuffer is decoded with the flatc and schema the
ExecuTorch wheel ships; constants outside any delegate (the embedding lookup tables) are the
program's constant buffers, and so are the operands of apq::lowbit_linear (the 2/3-bit layers'
codes and float16 scales, byte for byte the checkpoint's).

At build time `weights_index` finds where each planned module's weights went and records it in
program.json ("weights"); `read_weights` reads them back from the file through that index into the
checkpoint's layout, so a changed byte in model.pte shows up as a module that differs.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

XNN_MAGIC = b"XH00"


class PteFormatError(ValueError):
    """A .pte that does not hold what its index says."""


@dataclass(frozen=True)
class XnnWeight:
    """One constant tensor of an XNNPACK graph."""

    datatype: str  # "xnn_datatype_qbint4", "xnn_datatype_fp32", ...
    dims: tuple[int, ...]
    key: str  # its bytes in the named data
    group_size: int | None = None
    scale_key: str | None = None  # the bfloat16 block scales of a blockwise tensor


class Pte:
    """A deserialized .pte: program, named data, constant buffers and XNNPACK weights."""

    def __init__(self, data: bytes):
        from executorch.exir._serialize._program import deserialize_pte_binary

        self.file = deserialize_pte_binary(data)
        self.program = self.file.program
        named = self.file.named_data
        self._named = {} if named is None else {
            key: bytes(named.buffers[entry.buffer_index]) for key, entry in named.pte_data.items()}
        self.constants = [bytes(b.storage) for b in self.program.constant_buffer]
        self.weights: list[XnnWeight] = []
        for plan in self.program.execution_plan:
            for delegate in plan.delegates:
                if delegate.id != "XnnpackBackend":
                    continue
                payload = self.program.backend_delegate_data[delegate.processed.index].data
                self.weights += _graph_weights(xnn_graph(bytes(payload)))

    @classmethod
    def load(cls, path: Path) -> "Pte":
        return cls(Path(path).read_bytes())

    def named(self, key: str) -> bytes:
        try:
            return self._named[key]
        except KeyError:
            raise PteFormatError(f"the program has no named data {key!r}") from None

    def backends(self) -> list[str]:
        return sorted({d.id for p in self.program.execution_plan for d in p.delegates})


def xnn_graph(payload: bytes) -> dict:
    """An XNNPACK delegate's XNNGraph as a dict (flatc --json with the wheel's schema)."""
    from importlib.resources import files

    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    if payload[4:8] != XNN_MAGIC:
        raise PteFormatError(f"an XNNPACK payload starts with {payload[4:8]!r}, not {XNN_MAGIC!r}")
    offset, size = struct.unpack("<II", payload[10:18])
    schema = files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs")
    with tempfile.TemporaryDirectory(prefix="apq-xnn-") as work:
        binary = Path(work) / "graph.bin"
        binary.write_bytes(payload[offset:offset + size])
        _flatc_decompile(work, str(schema), str(binary), ["--raw-binary"])
        return json.loads((Path(work) / "graph.json").read_text())


def _graph_weights(graph: dict) -> list[XnnWeight]:
    constants = graph.get("constant_data", [])
    out = []
    for value in graph.get("xvalues", []):
        union = value["xvalue_union"]
        quantized = value["xvalue_union_type"] == "XNNQuantizedTensorValue"
        tensor = union["tensor_value"] if quantized else union
        index = tensor.get("constant_buffer_idx", 0)
        if not index or not constants[index].get("named_key"):
            continue
        group = scale_key = None
        if quantized and union.get("quant_params_type") == "PerChannelGroupQuant":
            params = union["quant_params"]
            group = int(params["group_size"])
            scale_index = params.get("scale_buffer_idx", -1)
            scale_key = constants[scale_index]["named_key"] if scale_index > 0 else None
        out.append(XnnWeight(tensor["datatype"], tuple(tensor["dims"]),
                             constants[index]["named_key"], group, scale_key))
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bf16_bytes(scales: np.ndarray) -> bytes:
    import torch

    s = torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).to(torch.bfloat16)
    return s.view(torch.int16).numpy().tobytes()


def _bf16_to_f16(data: bytes, shape) -> np.ndarray:
    bits = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape).astype(np.float16)


def weights_index(pte: Pte, checkpoint, kernel: set[str] = frozenset()) -> dict:
    """Where each planned module's weights are stored in the program: {module: entry}; `kernel`:
    the modules apq::lowbit_linear computes (program.kernel_modules). Raises PteFormatError for
    a module whose weights are not stored exactly as the core's."""
    from .program import nibbles_high_first

    by_key = {w.key: w for w in pte.weights}
    constants = {_sha(c): i for i, c in enumerate(pte.constants)}
    index = {}
    for name, module in checkpoint.modules.items():
        entry = checkpoint.plan.modules[name]
        n, k = module.shape
        if entry.kind == "embedding":
            where = constants.get(_sha(module.arrays["weight"].astype(np.float16).tobytes()))
            if where is None:
                raise PteFormatError(f"{name}: its float16 table is not a constant of the "
                                     f"program")
            index[name] = {"kind": "constant-float16", "shape": [n, k], "buffer": where}
            continue
        if name in kernel:
            codes = constants.get(_sha(module.arrays["qweight"].tobytes()))
            scales = constants.get(_sha(module.arrays["scales"].astype(np.float16).tobytes()))
            if codes is None or scales is None:
                raise PteFormatError(f"{name}: its {module.bits}-bit codes and float16 scales "
                                     f"(apq::lowbit_linear's operands) are not constants of the "
                                     f"program")
            index[name] = {"kind": "apq-lowbit", "shape": [n, k], "bits": module.bits,
                           "group_size": module.group_size, "codes_buffer": codes,
                           "scales_buffer": scales}
        elif module.kind == "packed":
            weight = by_key.get(_sha(module.arrays["qweight"].tobytes()))
            if weight is None or weight.datatype != "xnn_datatype_qbint4" \
                    or weight.dims != (n, k) or weight.group_size != module.group_size:
                raise PteFormatError(f"{name}: no XNNPACK 4-bit blockwise weight [{n}, {k}] "
                                     f"with groups of {module.group_size} holds its codes")
            if weight.scale_key is None or \
                    pte.named(weight.scale_key) != _bf16_bytes(module.arrays["scales"]):
                raise PteFormatError(f"{name}: XNNPACK's bfloat16 block scales differ from "
                                     f"the checkpoint's")
            index[name] = {"kind": "xnnpack-qbint4", "shape": [n, k],
                           "group_size": module.group_size, "codes": weight.key,
                           "scales": weight.scale_key}
        else:
            data = module.arrays["weight"].astype(np.float32).tobytes()
            weight = by_key.get(_sha(data))
            if weight is None or weight.datatype != "xnn_datatype_fp32" or weight.dims != (n, k):
                raise PteFormatError(f"{name}: no XNNPACK float32 weight [{n}, {k}] holds its "
                                     f"float16 values")
            index[name] = {"kind": "xnnpack-fp32", "shape": [n, k], "weight": weight.key}
        if name == "lm_head" and checkpoint.config.tie_word_embeddings:
            if name in kernel:  # apq::lowbit_embedding reads the head's own constants
                entry = index[name]
                if sum(1 for c in pte.constants if len(c) == module.arrays["qweight"].nbytes
                       and _sha(c) == _sha(module.arrays["qweight"].tobytes())) != 1:
                    raise PteFormatError("lm_head: the tied head's codes are not stored exactly "
                                         "once (its lookup must read the head's own)")
                entry["lookup"] = {"kind": "shared"}
            elif module.kind == "packed":
                codes = constants.get(_sha(nibbles_high_first(module.arrays["qweight"]).tobytes()))
                scales = constants.get(_sha(module.arrays["scales"].astype(np.float16).tobytes()))
                if codes is None or scales is None:
                    raise PteFormatError("lm_head: the embedding lookup's copy of the tied head "
                                         "(embedding_4bit codes and float16 scales) is not a "
                                         "constant of the program")
                index[name]["lookup"] = {"kind": "embedding_4bit", "codes_buffer": codes,
                                         "scales_buffer": scales}
            else:
                table = constants.get(_sha(module.arrays["weight"].astype(np.float16).tobytes()))
                if table is None:
                    raise PteFormatError("lm_head: the embedding lookup's float16 copy of the "
                                         "tied head is not a constant of the program")
                index[name]["lookup"] = {"kind": "constant-float16", "buffer": table}
    return index


def read_weights(pte: Pte, index: dict, plan) -> dict:
    """Every indexed module's weights as stored in the program, in checkpoint layout
    (apq_sdk.checkpoint.CheckpointModule); a tied head's lookup copy must hold the same."""
    from apq_sdk.checkpoint import CheckpointModule

    from .program import nibbles_high_first

    out = {}
    for name, where in index.items():
        entry = plan.modules.get(name)
        if entry is None:
            raise PteFormatError(f"program.json indexes {name!r}, which the plan does not have")
        n, k = where["shape"]
        if where["kind"] == "xnnpack-qbint4":
            group = where["group_size"]
            codes = np.frombuffer(pte.named(where["codes"]), dtype=np.uint8).reshape(n, k // 2)
            scales = _bf16_to_f16(pte.named(where["scales"]), (n, k // group))
            module = CheckpointModule(name, "packed", (n, k), {"qweight": codes.copy(),
                                                               "scales": scales},
                                      bits=4, group_size=group)
        elif where["kind"] == "apq-lowbit":
            bits, group = where["bits"], where["group_size"]
            codes = np.frombuffer(pte.constants[where["codes_buffer"]], dtype=np.uint8)
            scales = np.frombuffer(pte.constants[where["scales_buffer"]], dtype=np.float16)
            row = -(-k * bits // 8)
            if codes.size != n * row or scales.size != n * -(-k // group):
                raise PteFormatError(f"{name}: apq::lowbit_linear's constants hold "
                                     f"{codes.size} code bytes and {scales.size} scales, "
                                     f"expected {n * row} and {n * -(-k // group)}")
            module = CheckpointModule(name, "packed", (n, k), {
                "qweight": codes.reshape(n, row).copy(),
                "scales": scales.reshape(n, -(-k // group)).copy()},
                bits=bits, group_size=group)
        elif where["kind"] == "xnnpack-fp32":
            weight = np.frombuffer(pte.named(where["weight"]), dtype=np.float32).reshape(n, k)
            module = CheckpointModule(name, "float16", (n, k), {"weight": weight.astype(np.float16)})
        elif where["kind"] == "constant-float16":
            weight = np.frombuffer(pte.constants[where["buffer"]], dtype=np.float16)
            module = CheckpointModule(name, "float16", (n, k), {"weight": weight.reshape(n, k)})
        else:
            raise PteFormatError(f"{name}: unknown weight kind {where['kind']!r} in program.json")
        lookup = where.get("lookup")
        if lookup is not None and not _lookup_matches(pte, lookup, module, nibbles_high_first):
            raise PteFormatError(f"{name}: the embedding lookup's copy of the tied head differs "
                                 f"from the head's weights in the delegate")
        out[name] = module
    return out


def _lookup_matches(pte: Pte, lookup: dict, module, nibbles_high_first) -> bool:
    if lookup["kind"] == "shared":  # the lookup reads the head's operands, read back above
        return True
    if lookup["kind"] == "embedding_4bit":
        codes = pte.constants[lookup["codes_buffer"]]
        scales = pte.constants[lookup["scales_buffer"]]
        return codes == nibbles_high_first(module.arrays["qweight"]).tobytes() and \
            scales == module.arrays["scales"].astype(np.float16).tobytes()
    return pte.constants[lookup["buffer"]] == module.arrays["weight"].astype(np.float16).tobytes()
