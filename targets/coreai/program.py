"""torch.export of the decoder's two entry points and their conversion into one Core AI asset.

`prefill` takes 2..max_context-1 new tokens after any past, `decode` one; both see the past only
through `position_ids` (its length is past + new tokens), and both mutate the same two cache
buffers, which the converter turns into the shared state `keyCache` / `valueCache`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from .decoder import INPUT_NAMES, KEY_CACHE, OUTPUT_NAMES, VALUE_CACHE, Decoder
from .weights import module_weight, register_ops


def build_decoder(checkpoint, max_context: int, weights=module_weight) -> Decoder:
    register_ops()
    return Decoder(checkpoint, weights, max_context).eval()


def export_entry_points(checkpoint, max_context: int, weights=module_weight):
    """({"prefill": ExportedProgram, "decode": ExportedProgram}, module names of the blockwise
    ops in graph order). `checkpoint`: anything with the QuantizedCheckpoint's spec, modules
    and tensors; `weights`: a module's weight as a torch module (weights.module_weight)."""
    import coreai_torch

    decoder = build_decoder(checkpoint, max_context, weights)
    total = torch.export.Dim("total", min=2, max=max_context - 1)
    new = torch.export.Dim("new", min=2, max=max_context - 1)
    examples = {
        "prefill": ((torch.zeros((1, 3), dtype=torch.int32),
                     torch.arange(5, dtype=torch.int32)[None]),
                    {"input_ids": {1: new}, "position_ids": {1: total}}),
        "decode": ((torch.zeros((1, 1), dtype=torch.int32),
                    torch.arange(5, dtype=torch.int32)[None]),
                   {"input_ids": None, "position_ids": {1: total}}),
    }
    programs = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (args, dynamic) in examples.items():
            exported = torch.export.export(decoder, args, dynamic_shapes=dynamic, strict=False)
            programs[name] = exported.run_decompositions(coreai_torch.get_decomp_table())
            decoder.reset()
    return programs, blockwise_order(programs["prefill"])


def blockwise_order(program) -> list[str]:
    """The planned module of every blockwise op, in graph order (from its data buffer's name,
    `layer_weights.<module with __ for .>.data`)."""
    buffers = program.graph_signature.inputs_to_buffers
    order = []
    for node in program.graph.nodes:
        if node.op == "call_function" and "constexpr_blockwise_shift_scale" in str(node.target):
            source = buffers.get(node.args[0].name, "")
            parts = source.split(".")
            if len(parts) != 3 or parts[0] != "layer_weights":
                raise ValueError(f"a blockwise op reads {source!r}, not a planned weight")
            name = parts[1].replace("__", ".")
            if name not in order:  # a tied head's lookup reads the head's op (one in the asset)
                order.append(name)
    return order


def save_asset(programs: dict, order: list[str], path: Path, metadata: dict) -> None:
    """Convert the entry points into one asset and save it at `path`, with the module names of
    its blockwise ops and `metadata` in the asset's metadata."""
    import coreai_torch
    from coreai.runtime import AIModelAssetMetadata

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, program in programs.items():
            converter.add_exported_program(program, input_names=list(INPUT_NAMES),
                                           output_names=list(OUTPUT_NAMES),
                                           state_names=[KEY_CACHE, VALUE_CACHE],
                                           entrypoint_name=name)
        ai_program = converter.to_coreai()
    meta = AIModelAssetMetadata()
    meta.set_custom("apq.weights", json.dumps(order))
    for key, value in sorted(metadata.items()):
        meta.set_custom(key, str(value))
    ai_program.save_asset(Path(path), metadata=meta)
    _fix_creation_date(Path(path))


def convert(programs: dict, order: list[str], path: Path, checkpoint, metadata: dict) -> dict:
    """Convert and save the asset at `path`; read every weight back and compare it with the
    checkpoint (ValueError naming the module otherwise). Returns the weights index written to
    program.json."""
    from .weights import checkpoint_arrays, float16_digest, float_constants, stored_weights

    save_asset(programs, order, path, metadata)
    records = stored_weights(path)
    if len(records) != len(order):
        raise ValueError(f"the asset holds {len(records)} blockwise ops for {len(order)} "
                         f"planned quantized modules (the converter merged or dropped some)")
    for name, record in zip(order, records):
        module = checkpoint.modules[name]
        try:
            arrays = checkpoint_arrays(record, module.bits, module.group_size, module.symmetric)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        for key, value in module.arrays.items():
            if key not in arrays or arrays[key].tobytes() != value.tobytes():
                raise ValueError(f"{name}: its {key} differ from the checkpoint's")
    floats = {n: float16_digest(m.arrays["weight"]) for n, m in checkpoint.modules.items()
              if m.kind != "packed"}
    found = float_constants(path, floats, None)
    missing = sorted(set(floats) - set(found))
    if missing:
        raise ValueError(f"16-bit modules without their float16 weight in the asset: "
                         f"{', '.join(missing[:6])}")
    return {"order": order, "float16": floats,
            "asset_sha256": hashlib.sha256(b"".join(
                p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file())).hexdigest()}


def _fix_creation_date(asset: Path) -> None:
    """The asset's metadata.json carries the time it was saved; a rebuild of the same inputs must
    write the same bytes, so it is set from SOURCE_DATE_EPOCH (reproducible-builds.org), or the
    epoch, and the keys are written sorted."""
    import os
    import time

    path = asset / "metadata.json"
    data = json.loads(path.read_text())
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    data["creationDate"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
