"""The embedding table outside the engine: `embeddings.bin`, looked up by the runtime.

TensorRT's Gather takes no quantized table (its ONNX parser runs Gather on FP32/FP16/BF16/INT32/
INT64/BOOL), and a DequantizeLinear of INT4 weights belongs in front of a GEMM. So the graph takes
`inputs_embeds` (targets/onnx_graph.GraphOptions(embeddings_input=True)) and the runtime looks the
rows up, as NVIDIA's TensorRT Edge-LLM does: a row costs one read of `hidden` values per token.

`embeddings.bin` holds exactly what the embedding of the torch reference reads, in the core's own
layout, so the lookup is the reference's arithmetic and the bytes are the checkpoint's:

* a tied, block-quantized head: its `qweight` rows ([V, K*bits/8] uint8, unsigned codes, LSB
  first, docs/formats.md) then its `scales` ([V, K/g] float16), symmetric (zero 2**(bits-1)):
  row[k] = float32(scale[k // g]) * (code[k] - 2**(bits-1));
* a tied float16 head, or a float16-planned table: [V, K] float16;
* otherwise the model's own table: [V, K] float32.

`describe` returns where each part lies (the package's onnx_io.json carries it for the C++
runtime); `lookup` is the Python runtime's version of the same (used by verify here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apq_sdk.checkpoint import CheckpointModule

from ..onnx_graph import LoweringError

EMBEDDINGS_FILE = "embeddings.bin"


def table_parts(spec, modules: dict[str, CheckpointModule], tensors: dict[str, np.ndarray]
                ) -> tuple[dict, list[np.ndarray]]:
    """(description, arrays in file order) of the table the reference's embedding reads."""
    name = spec.embedding_name
    head = modules.get("lm_head")
    v, k = spec.vocab_size, spec.hidden_size
    if spec.tie_word_embeddings and head is not None and head.kind == "packed":
        if not head.symmetric:
            raise LoweringError("lm_head: an asymmetric tied head cannot be looked up from "
                                "embeddings.bin (symmetric groups only); plan symmetric groups")
        desc = {"format": "blocks", "bits": head.bits, "group_size": head.group_size,
                "zero_point": 1 << (head.bits - 1), "source": "lm_head"}
        parts = {"codes": np.ascontiguousarray(head.arrays["qweight"], np.uint8),
                 "scales": np.ascontiguousarray(head.arrays["scales"], np.float16)}
    elif spec.tie_word_embeddings and head is not None and head.kind == "float16":
        desc = {"format": "float16", "source": "lm_head"}
        parts = {"table": np.ascontiguousarray(head.arrays["weight"], np.float16)}
    elif name in modules and modules[name].kind == "float16":
        desc = {"format": "float16", "source": name}
        parts = {"table": np.ascontiguousarray(modules[name].arrays["weight"], np.float16)}
    else:
        weight_name = f"{name}.weight"
        if weight_name not in tensors:
            raise LoweringError(f"the model has no tensor {weight_name!r}")
        desc = {"format": "float32", "source": weight_name}
        parts = {"table": np.ascontiguousarray(tensors[weight_name], np.float32)}
    offset = 0
    for key, array in parts.items():
        desc[key] = {"offset": offset, "bytes": int(array.nbytes), "shape": list(array.shape),
                     "dtype": str(array.dtype)}
        offset += array.nbytes
    desc.update(file=EMBEDDINGS_FILE, rows=v, cols=k, bytes=offset)
    return desc, list(parts.values())


def write_table(spec, modules, tensors, package_dir: Path) -> dict:
    """Write embeddings.bin; returns its description."""
    desc, arrays = table_parts(spec, modules, tensors)
    with open(Path(package_dir) / EMBEDDINGS_FILE, "wb") as f:
        for array in arrays:
            f.write(array.tobytes())
    return desc


def _part(data: bytes, desc: dict, key: str) -> np.ndarray:
    part = desc[key]
    end = part["offset"] + part["bytes"]
    if end > len(data):
        raise LoweringError(f"{EMBEDDINGS_FILE} is {len(data)} bytes, its {key} end at {end}: the "
                            f"file is truncated; build the package again")
    return np.frombuffer(data, dtype=part["dtype"], count=int(np.prod(part["shape"])),
                         offset=part["offset"]).reshape(part["shape"])


class EmbeddingTable:
    """embeddings.bin as the runtime reads it."""

    def __init__(self, package_dir: Path, desc: dict):
        path = Path(package_dir) / desc["file"]
        data = path.read_bytes()
        if len(data) != desc["bytes"]:
            raise LoweringError(f"{path} is {len(data)} bytes, onnx_io.json says {desc['bytes']}; "
                                f"build the package again")
        self.desc = desc
        self.format = desc["format"]
        if self.format == "blocks":
            self.codes, self.scales = _part(data, desc, "codes"), _part(data, desc, "scales")
        else:
            self.table = _part(data, desc, "table")

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 [S, hidden] rows of `ids` (the reference's embedding, bit for bit)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.desc["rows"]):
            raise ValueError(f"token ids must be in [0, {self.desc['rows']}), found "
                             f"[{ids.min()}, {ids.max()}]")
        if self.format != "blocks":
            return self.table[ids].astype(np.float32)
        from apq_sdk.quant.packing import dequantize

        return dequantize(self.codes[ids], self.scales[ids], None, self.desc["bits"],
                          self.desc["group_size"], self.desc["cols"])

    def as_module(self, name: str = "lm_head") -> CheckpointModule:
        """The stored copy in checkpoint layout (for the bit-exact check)."""
        v, k = self.desc["rows"], self.desc["cols"]
        if self.format == "blocks":
            return CheckpointModule(name=name, kind="packed", shape=(v, k), bits=self.desc["bits"],
                                    group_size=self.desc["group_size"],
                                    arrays={"qweight": np.array(self.codes),
                                            "scales": np.array(self.scales)})
        return CheckpointModule(name=name, kind="float16", shape=(v, k), bits=16,
                                arrays={"weight": np.array(self.table)})
