"""Check an ONNX graph against TensorRT's ONNX-parser support matrix, kept as data.

`onnx_support_matrix.json` beside this file is the operator table of onnx-tensorrt's
`docs/operators.md` at a named release (its source URL, commit and TensorRT version are in the
file), parsed by `parse_operators_md`. Regenerate it from a checkout of onnx-tensorrt with

    python -m apq_sdk.targets.tensorrt.support_matrix path/to/docs/operators.md \\
        --tensorrt 10.1 --source URL --commit SHA > targets/tensorrt/onnx_support_matrix.json

`check_model` walks every node: its operator must be listed as supported, the element type of its
data input (and of Cast's target) must be among the listed types, and every restriction the table
states for an operator the graph uses must be one this module knows how to check (`RULES`) and
hold; a restriction without a rule is a finding too, so a new operator cannot slip through
unchecked. The model's opset must lie in the documented range, except where the data file records
an exception with its evidence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

MATRIX_FILE = Path(__file__).with_name("onnx_support_matrix.json")

#: ONNX TensorProto element types -> the names the table uses
ONNX_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL",
                   10: "FP16", 11: "DOUBLE", 16: "BF16", 17: "FP8", 22: "INT4"}
#: operators whose type column describes another input than the first
DATA_INPUT = {"Where": 1}


@dataclass(frozen=True)
class Finding:
    node: str
    op_type: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.problem}"


def parse_operators_md(text: str) -> dict:
    """The operator table of onnx-tensorrt's docs/operators.md as data."""
    header = re.search(r"TensorRT\s+([0-9.]+)\s+supports operators in the inclusive range of "
                       r"opset\s+(\d+)\s+to opset\s+(\d+)", text)
    if header is None:
        raise ValueError("no 'TensorRT X supports operators in the inclusive range of opset A to "
                         "opset B' line: not an onnx-tensorrt operators.md")
    operators: dict[str, dict] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N") and not cells[1].startswith("Y "):
            continue
        name = cells[0]
        types = [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else []
        restriction = cells[3] if len(cells) > 3 else ""
        operators[name] = {"supported": cells[1].startswith("Y"),
                           "experimental": "EXPERIMENTAL" in cells[1],
                           "types": types, "restrictions": restriction}
    return {"documented_tensorrt": header.group(1),
            "opset": [int(header.group(2)), int(header.group(3))],
            "operators": dict(sorted(operators.items()))}


def load_matrix(path: Path = MATRIX_FILE) -> dict:
    return json.loads(Path(path).read_text())


# -- restrictions this module checks, by the table's wording --------------------------------------

def _constant(name: str, ctx) -> bool:
    return name in ctx["initializers"] or name in ctx["constants"]


#: where an operator's `axes` input is (Reduce*, Squeeze, Unsqueeze: 1)
AXES_INPUT = {"Slice": 3, "Pad": 3}


def _axes_constant(node, ctx) -> str | None:
    index = AXES_INPUT.get(node.op_type, 1)
    if len(node.input) > index and node.input[index] and not _constant(node.input[index], ctx):
        return f"axes input {node.input[index]!r} is computed at run time"
    return None


def _zero_point_zero(node, ctx) -> str | None:
    if len(node.input) > 2 and node.input[2]:
        from onnx import numpy_helper

        init = ctx["initializers"].get(node.input[2])
        if init is None or numpy_helper.to_array(init).any():
            return "x_zero_point is not a zero initializer"
    return None


def _constant_attributes(node, ctx) -> str | None:
    bad = [a.name for a in node.attribute
           if a.name in ("sparse_value", "value_string", "value_strings")]
    return f"attributes {bad} are unsupported" if bad else None


def _cumsum_axis(node, ctx) -> str | None:
    if not _constant(node.input[1], ctx):
        return f"axis input {node.input[1]!r} is computed at run time"
    return None


RULES = {
    "`axes` must be an initializer": _axes_constant,
    "`axes` must be a constant tensor": _axes_constant,
    "`x_zero_point` must be zero": _zero_point_zero,
    "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported.":
        _constant_attributes,
    "`axis` must be an initializer": _cumsum_axis,
}


def _value_types(model) -> dict[str, int]:
    import onnx

    # inference on a copy without the large initializers' bytes: the same types (shape-carrying
    # initializers are small and kept), and no protobuf 2 GiB limit for big models
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(model.graph.node)
    for field in ("input", "output", "value_info"):
        getattr(light.graph, field).extend(getattr(model.graph, field))
    for init in model.graph.initializer:
        small = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
        if init.ByteSize() <= 4096:  # shape and axes constants: inference reads their values
            small.CopyFrom(init)
        light.graph.initializer.append(small)
    try:
        graph = onnx.shape_inference.infer_shapes(light, strict_mode=False).graph
    except onnx.shape_inference.InferenceError:  # e.g. an undeclared custom domain (a finding)
        graph = light.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def check_model(model, matrix: dict | None = None) -> list[Finding]:
    """Every node (and the opset) that the matrix does not support; empty when all is supported."""
    from onnx import helper

    matrix = load_matrix() if matrix is None else matrix
    operators = matrix["operators"]
    findings: list[Finding] = []
    lo, hi = matrix["opset"]
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            findings.append(Finding("model", "opset_import",
                                    f"domain {opset.domain!r}: TensorRT's parser runs the "
                                    f"default ONNX domain only (no plugins declared)"))
        elif not lo <= opset.version <= hi and \
                str(opset.version) not in matrix.get("opset_exceptions", {}):
            findings.append(Finding("model", "opset_import",
                                    f"opset {opset.version} outside the documented {lo}-{hi}"))
    ctx = {"initializers": {t.name: t for t in model.graph.initializer},
           "constants": {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}}
    types = _value_types(model)
    for node in model.graph.node:
        name = node.name or node.output[0]
        entry = operators.get(node.op_type)
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding(name, node.op_type, f"custom domain {node.domain!r}"))
            continue
        if entry is None or not entry["supported"]:
            findings.append(Finding(name, node.op_type, "not supported by TensorRT's parser"))
            continue
        index = DATA_INPUT.get(node.op_type, 0)
        checked = [node.input[index]] if len(node.input) > index and node.input[index] else []
        for value in checked:
            found = ONNX_TYPE_NAMES.get(types.get(value, 0))
            if found is None:
                findings.append(Finding(name, node.op_type, f"type of {value!r} unknown"))
            elif found not in entry["types"]:
                findings.append(Finding(name, node.op_type,
                                        f"{found} input; supported: {', '.join(entry['types'])}"))
        if node.op_type == "Cast":
            to = helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
            if ONNX_TYPE_NAMES.get(to) not in entry["types"]:
                findings.append(Finding(name, node.op_type,
                                        f"cast to {ONNX_TYPE_NAMES.get(to, to)}; supported: "
                                        f"{', '.join(entry['types'])}"))
        restriction = entry["restrictions"].strip()
        if restriction:
            rule = RULES.get(restriction)
            if rule is None:
                findings.append(Finding(name, node.op_type,
                                        f"restriction not checked by apq-sdk: {restriction}"))
            else:
                problem = rule(node, ctx)
                if problem:
                    findings.append(Finding(name, node.op_type, f"{problem} ({restriction})"))
    return findings


def summary(model, matrix: dict | None = None) -> dict:
    """What the check covered, for the package's records."""
    matrix = load_matrix() if matrix is None else matrix
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"matrix": {k: matrix[k] for k in ("tensorrt", "source", "commit")},
            "opset": [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")],
            "nodes": sum(counts.values()), "operators": dict(sorted(counts.items()))}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("operators_md", type=Path)
    parser.add_argument("--tensorrt", required=True, help="the release the file belongs to")
    parser.add_argument("--source", required=True, help="URL of the file at that release")
    parser.add_argument("--commit", required=True)
    args = parser.parse_args(argv)
    data = parse_operators_md(args.operators_md.read_text())
    data.update(tensorrt=args.tensorrt, source=args.source, commit=args.commit)
    print(json.dumps(data, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
