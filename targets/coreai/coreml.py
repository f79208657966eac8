"""The Core ML artifact (coremltools 9, ML Program `.mlpackage`, iOS 18 / macOS 15) of the same
decoder, with the core's codes injected exactly.

Conversion: `torch.jit.trace` of the decoder (targets/coreai/decoder.py) with every weight
dense float16, `ct.convert` with the two cache buffers as `ct.StateType` and flexible lengths of
`input_ids` and `position_ids` (the cache offset is their difference, as in the Core AI asset).
Then a MIL graph pass replaces each planned layer's weight constant, found by its exact float16
values, with a compression op built from the checkpoint's own arrays:

* 4- and 8-bit layers: `constexpr_blockwise_shift_scale` (symmetric: signed codes, no offset;
  asymmetric: unsigned codes and the b-bit zero points as offsets), float16 scales per block;
* 2- and 3-bit layers (Core ML's blockwise op takes 4 and 8 bits only): `constexpr_lut_to_dense`
  over the b-bit codes with one float16 table per block, `lut[j] = scale * (j - zero)`: the same
  values the core's grid stands for, at 2**b float16 entries per block (more bytes than the
  plan counts: the package reports the bits stored per op).

coremltools' own `linear_quantize_weights` would re-quantize from float with its own scales (and
skip a layer whose width a block does not divide with only a log line), so it is not used: the
pass replaces every planned layer or the build fails naming the ones it could not find, and the
saved package is read back (milproto) and compared with the checkpoint, code for code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ..base import PrefixCacheRunner
from .decoder import INPUT_NAMES, KEY_CACHE, OUTPUT_NAMES, VALUE_CACHE, Decoder

MODEL_FILE = "model.mlpackage"
BLOCKWISE_BITS = (4, 8)  # what constexpr_blockwise_shift_scale takes; others become tables


class DenseWeight(nn.Module):
    """A module's weight as float16 (the core's dequantization): what the trace embeds and the
    pass finds by value."""

    def __init__(self, module):
        super().__init__()
        weight = module.dequantize() if module.kind == "packed" else module.arrays["weight"]
        self.register_buffer("weight", torch.from_numpy(
            np.ascontiguousarray(weight, dtype=np.float16)))

    def forward(self):
        return self.weight


def digest(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float16).tobytes()).hexdigest()


def op_name(module: str) -> str:
    return "apq_" + "".join(c if c.isalnum() else "_" for c in module)


def grid_table(module) -> np.ndarray:
    """[N, K/G, 2**b, 1] float16: every block's b-bit grid, scale * (j - zero)."""
    from apq_sdk.quant.packing import unpack_bits

    n, k = module.shape
    groups = k // module.group_size
    scales = np.asarray(module.arrays["scales"], dtype=np.float32).reshape(n, groups)
    if module.symmetric:
        zeros = np.full((n, groups), 1 << (module.bits - 1), dtype=np.float32)
    else:
        zeros = unpack_bits(module.arrays["qzeros"], module.bits, groups).reshape(n, groups)
    j = np.arange(1 << module.bits, dtype=np.float32)
    table = scales[..., None] * (j[None, None, :] - zeros.astype(np.float32)[..., None])
    return table.astype(np.float16)[..., None]


def _codes(module) -> np.ndarray:
    from apq_sdk.quant.packing import unpack_bits

    n, k = module.shape
    return unpack_bits(module.arrays["qweight"], module.bits, k).reshape(n, k)


def _zeros(module) -> np.ndarray:
    from apq_sdk.quant.packing import unpack_bits

    n, k = module.shape
    return unpack_bits(module.arrays["qzeros"], module.bits, k // module.group_size).reshape(
        n, k // module.group_size)


def _compression_op(mb, types, module, name: str, before_op):
    bits = module.bits
    if bits in BLOCKWISE_BITS:
        scale = np.ascontiguousarray(module.arrays["scales"], dtype=np.float16)
        codes = _codes(module)
        if module.symmetric:
            signed = (codes.astype(np.int16) - (1 << (bits - 1)))
            data = signed.astype(types.np_int4_dtype if bits == 4 else np.int8)
            return mb.constexpr_blockwise_shift_scale(data=data, scale=scale, before_op=before_op,
                                                      name=name)
        unsigned = types.np_uint4_dtype if bits == 4 else np.uint8
        return mb.constexpr_blockwise_shift_scale(
            data=codes.astype(unsigned), scale=scale, offset=_zeros(module).astype(unsigned),
            before_op=before_op, name=name)
    indices = _codes(module).astype(getattr(types, f"np_uint{bits}_dtype"))
    return mb.constexpr_lut_to_dense(indices=indices, lut=grid_table(module),
                                     before_op=before_op, name=name)


def inject_pass(modules: dict):
    """A MIL graph pass replacing each packed module's weight constant (matched by its float16
    values) with its compression op; `.found` lists the modules it replaced."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    by_digest = {digest(DenseWeight(m).weight.numpy()): name for name, m in modules.items()
                 if m.kind == "packed"}

    class InjectCheckpointWeights(AbstractGraphPass):
        def __init__(self):
            super().__init__()
            self.found: dict[str, str] = {}

        def apply(self, prog):
            for function in prog.functions.values():
                self._block(function)

        @block_context_manager
        def _block(self, block):
            for op in list(block.operations):
                if op.op_type != "const" or op.outputs[0].val is None:
                    continue
                value = op.outputs[0].val
                if not isinstance(value, np.ndarray) or value.ndim != 2 or \
                        value.dtype not in (np.float16, np.float32):
                    continue
                name = by_digest.get(digest(value))
                if name is None:
                    continue
                new = _compression_op(mb, types, modules[name], op_name(name), op)
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0],
                                                   new_var=new, no_check_var_types=True)
                block.remove_ops([op])
                self.found[name] = op_name(name)

    return InjectCheckpointWeights()


@contextlib.contextmanager
def _quiet_progress():
    """coremltools draws a tqdm bar per conversion stage into stderr (carriage returns that
    swamp a build log); during the conversion its two bars are plain iteration."""
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.mil.passes import pass_pipeline

    saved = ops._tqdm, pass_pipeline.tqdm
    ops._tqdm = pass_pipeline.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        ops._tqdm, pass_pipeline.tqdm = saved


def build_mlpackage(checkpoint, max_context: int, path: Path) -> dict:
    """Convert, inject, save at `path`, read back and compare (ValueError naming the module).
    Returns the weights index (module -> op, kind, bits stored)."""
    import coremltools as ct
    from coremltools.models.utils import _apply_graph_pass

    decoder = Decoder(checkpoint, DenseWeight, max_context).eval()
    spec = checkpoint.spec
    state = (spec.num_layers, 1, spec.num_kv_heads, max_context, spec.head_dim)
    example = (torch.zeros((1, 3), dtype=torch.int32), torch.arange(5, dtype=torch.int32)[None])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(decoder, example, check_trace=False)
    q = ct.RangeDim(lower_bound=1, upper_bound=max_context - 1, default=3)
    total = ct.RangeDim(lower_bound=1, upper_bound=max_context - 1, default=5)
    quiet = [logging.getLogger(n) for n in ("coremltools", "")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _quiet_progress():
            warnings.simplefilter("ignore")
            model = ct.convert(
                traced,
                inputs=[ct.TensorType(INPUT_NAMES[0], shape=ct.Shape((1, q)), dtype=np.int32),
                        ct.TensorType(INPUT_NAMES[1], shape=ct.Shape((1, total)),
                                      dtype=np.int32)],
                outputs=[ct.TensorType(OUTPUT_NAMES[0], dtype=np.float16)],
                states=[ct.StateType(wrapped_type=ct.TensorType(shape=state, dtype=np.float16),
                                     name=n) for n in (KEY_CACHE, VALUE_CACHE)],
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16, skip_model_load=True)
            packed = {n: m for n, m in checkpoint.modules.items() if m.kind == "packed"}
            graph_pass = inject_pass(packed)
            model = _apply_graph_pass(model, graph_pass, spec_version=ct.target.iOS18,
                                      skip_model_load=True)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    missing = sorted(set(packed) - set(graph_pass.found))
    if missing:
        raise ValueError(f"{len(missing)} planned layers were not found as weight constants of "
                         f"the converted model (they would stay float16): "
                         f"{', '.join(missing[:6])}")
    model.save(str(path))
    make_deterministic(Path(path))
    index = {name: {"op": op_name(name), "bits": m.bits,
                    "kind": "blockwise" if m.bits in BLOCKWISE_BITS else "lut"}
             for name, m in sorted(packed.items())}
    check_mlpackage(path, checkpoint, index)
    return index


def make_deterministic(path: Path) -> None:
    """A saved .mlpackage, byte for byte the same on every build of the same inputs: the
    specification serialized with protobuf's deterministic map order, and Manifest.json's random
    item identifiers replaced by UUIDs derived from each item's path."""
    import json
    import uuid

    from coremltools.proto import Model_pb2

    spec_path = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_path = path / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "apq-sdk:" + entry["path"])).upper()
               for old, entry in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: entry
                                   for old, entry in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def _program(path: Path):
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto_load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return milproto_load.load(spec, specification_version=spec.specificationVersion,
                                  file_weights_dir=str(Path(path) / "Data" / "com.apple.CoreML"
                                                       / "weights"))


def stored_ops(path: Path, float16: bool = False) -> dict:
    """{op name: {"type", inputs' values}} of every compression op in the saved package; with
    `float16`, also every 2-D float16 constant (type "const", "value")."""
    from coremltools.converters.mil.mil.types import builtin_to_string

    out = {}
    for function in _program(path).functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_blockwise_shift_scale":
                out[op.name] = {"type": op.op_type, "data": op.data.val, "scale": op.scale.val,
                                "offset": None if op.offset is None else op.offset.val,
                                "dtype": builtin_to_string(op.data.dtype)}
            elif op.op_type == "constexpr_lut_to_dense":
                out[op.name] = {"type": op.op_type, "indices": op.indices.val,
                                "lut": op.lut.val, "dtype": builtin_to_string(op.indices.dtype)}
            elif float16 and op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) \
                    and op.outputs[0].val.dtype == np.float16 and op.outputs[0].val.ndim == 2:
                out[op.name] = {"type": "const", "value": op.outputs[0].val}
    return out


def _record(op: dict, bits: int, symmetric: bool) -> dict:
    """A compression op as the record weights.checkpoint_arrays reads (the Core AI asset's
    layout): signed codes without offsets, or unsigned codes with b-bit zero points. A table's
    block grid `scale * (j - zero)` gives back its zero (the entry that is 0) and its float16
    scale (the entry after it, or minus the one before) exactly."""
    if op["type"] == "constexpr_blockwise_shift_scale":
        data = np.asarray(op["data"])
        signed = op["dtype"].startswith("int")
        zero = np.zeros(np.shape(op["scale"]), np.int16) if op["offset"] is None \
            else np.asarray(op["offset"]).astype(np.int16)
        return {"data": data, "data_type": ("si" if signed else "ui") + str(bits),
                "scale": np.asarray(op["scale"], dtype=np.float16), "scale_type": "f16",
                "zero_point": zero, "minval": 0}
    lut = np.asarray(op["lut"], dtype=np.float16)[..., 0]  # [N, K/G, 2**b]
    if lut.shape[-1] != 1 << bits:
        raise ValueError(f"a table of {lut.shape[-1]} entries, planned {bits} bits")
    is_zero = lut == 0
    if not np.all(is_zero.sum(-1) >= 1):
        raise ValueError("a table without a zero entry is not the core's grid")
    zero = np.argmax(is_zero, axis=-1)
    top = (1 << bits) - 1
    after = np.take_along_axis(lut, np.minimum(zero + 1, top)[..., None], -1)[..., 0]
    before = np.take_along_axis(lut, np.maximum(zero - 1, 0)[..., None], -1)[..., 0]
    scale = np.where(zero < top, after, -before).astype(np.float16)
    indices = np.asarray(op["indices"]).astype(np.int16)
    half = 1 << (bits - 1) if symmetric else 0  # a symmetric grid's zero is the middle code
    return {"data": indices - half, "data_type": ("si" if symmetric else "ui") + str(bits),
            "scale": scale, "scale_type": "f16", "zero_point": zero - half, "minval": 0,
            "grid": lut}


def read_weights(path: Path, plan, index: dict, float16_digests: dict | None = None) -> dict:
    """The saved package's weights in the checkpoint's layout: {module: CheckpointModule} for
    every planned layer of `index` (module -> op) and, with `float16_digests` ({module: sha256
    of its float16 weight}), every 16-bit layer found among the constants. ValueError naming
    the module whose op is missing or not as planned."""
    from apq_sdk.checkpoint import CheckpointModule

    from .weights import checkpoint_arrays

    ops = stored_ops(path, float16=bool(float16_digests))
    read = {}
    for name, entry in index.items():
        planned = plan.modules[name]
        if entry["op"] not in ops:
            raise ValueError(f"{name}: no compression op {entry['op']} in {Path(path).name}")
        try:
            record = _record(ops[entry["op"]], planned.bits, planned.symmetric)
            arrays = checkpoint_arrays(record, planned.bits, planned.group_size,
                                       planned.symmetric)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        module = CheckpointModule(name=name, kind="packed", shape=tuple(planned.shape),
                                  arrays=arrays, bits=planned.bits,
                                  group_size=planned.group_size)
        if "grid" in record and record["grid"].tobytes() != grid_table(module)[..., 0].tobytes():
            raise ValueError(f"{name}: its tables are not the grid of their own scale and zero")
        read[name] = module
    by_digest = {d: n for n, d in (float16_digests or {}).items()}
    for op in ops.values():
        name = by_digest.get(digest(op["value"])) if op["type"] == "const" else None
        if name is not None and name not in read:
            read[name] = CheckpointModule(name=name, kind="float16", shape=op["value"].shape,
                                          arrays={"weight": op["value"].astype(np.float16)})
    return read


def check_mlpackage(path: Path, checkpoint, index: dict) -> None:
    """Every planned layer's op in the saved package holds the checkpoint's codes, scales and
    zero points (or its grid, for a table) exactly; ValueError naming the first that does not."""
    from apq_sdk.verification import compare_weights

    read = read_weights(path, checkpoint.plan, index)
    planned = SimpleNamespace(modules={n: m for n, m in checkpoint.modules.items() if n in index})
    result = compare_weights(planned, read)
    if result["mismatched"]:
        raise ValueError("; ".join(result["examples"]))


class CoreMLRunner(PrefixCacheRunner):
    """model.mlpackage in Core ML (macOS only: coremltools predicts through the OS's framework),
    a verify Runner with the KV cache in the model's state."""

    def __init__(self, path: Path):
        import coremltools as ct

        self.path = Path(path)
        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
        self.state = self.model.make_state()
        self.runtime = f"Core ML (coremltools {ct.__version__}, CPU only)"
        self.live = ()

    def _run(self, ids: np.ndarray, past: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        positions = np.arange(past + ids.shape[1], dtype=np.int32)[None]
        out = self.model.predict({INPUT_NAMES[0]: ids, INPUT_NAMES[1]: positions},
                                 state=self.state)
        return np.asarray(out[OUTPUT_NAMES[0]])[0].astype(np.float32)

    def _reset_cache(self) -> None:
        self.state = self.model.make_state()

    def close(self) -> None:
        self.model = self.state = None
