"""Mutated files thrown at every loader (hypothesis): plans, manifests, sensitivity maps, GGUF
and safetensors headers. Each loader either accepts the input or raises ApqError: never another
exception and never a hang (hypothesis' deadline of 2 s per input). Memory stays bounded by
construction: the GGUF reader walks an mmap of the file and checks every count against the bytes
the file has before reading it (a claim of 2**40 items costs nothing), and safetensors checks
its header against the file size (tests/test_reliability.py has the 2**62-tensor header)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from apq_sdk.errors import ApqError  # noqa: E402

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _paths(doc):
    """Every (container, key) in a JSON document, to mutate one of them."""
    out = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.append((doc, key))
            out.extend(_paths(value))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            out.append((doc, index))
            out.extend(_paths(value))
    return out


def _mutate(doc, data):
    doc = json.loads(json.dumps(doc))
    places = _paths(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        container, key = places[data.draw(st.integers(0, len(places) - 1))]
        action = data.draw(st.sampled_from(["replace", "delete", "nest"]))
        if action == "delete" and isinstance(container, dict):
            container.pop(key, None)
        elif action == "nest":
            container[key] = [[[[container[key]]]]] if key in container or isinstance(container, list) \
                else None
        else:
            container[key] = data.draw(JSON_VALUES)
        places = _paths(doc)
        if not places:
            break
    return doc


def _loads_or_apq_error(load, path: Path) -> None:
    try:
        load(path)
    except ApqError:
        pass


# -- JSON files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_doc():
    from tests.test_plan_file import plan_doc as make

    return make()


@given(data=st.data())
@FUZZ
def test_mutated_plans(plan_doc, data, tmp_path):
    from apq_sdk.api import _plan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_mutate(plan_doc, data), allow_nan=True))
    _loads_or_apq_error(_plan, path)


@pytest.fixture(scope="module")
def sensitivity_doc(tiny_model_factory):
    from apq_sdk.calibration import load_calibration
    from apq_sdk.model_io import load_model
    from apq_sdk.sensitivity import ProfileSettings, profile_model

    model, tok, info = load_model(tiny_model_factory("llama"))
    ids, calib = load_calibration(tok, num_samples=2, seq_len=32, seed=0)
    fit, _ = load_calibration(tok, num_samples=1, seq_len=32, seed=1)
    return profile_model(model, info, ids, calib, ProfileSettings(batch_size=2),
                         fit_samples=fit).to_dict()


@given(data=st.data())
@FUZZ
def test_mutated_sensitivity_maps_then_planned(sensitivity_doc, data, tmp_path):
    """A map that loads must also plan (or be refused with ApqError): the planner never sees
    fields of the wrong type."""
    from apq_sdk import api

    path = tmp_path / "sens.json"
    path.write_text(json.dumps(_mutate(sensitivity_doc, data), allow_nan=True))

    def load_and_plan(p):
        api.plan(p, bits_per_weight=6.0)

    _loads_or_apq_error(load_and_plan, path)


@pytest.fixture(scope="module")
def manifest_doc():
    return {"format": "apq-package", "version": 1, "sdk_version": "0.1.0",
            "target": {"name": "arm64-linux", "capabilities": {}},
            "model": {"name": "m", "spec": "demo"}, "reference": {"quantized_cache_key": "ab" * 32},
            "files": [{"path": "model.onnx", "sha256": "0" * 64, "bytes": 3},
                      {"path": "sub/file.txt", "sha256": "1" * 64, "bytes": 0}],
            "size": {}, "measured_at_build": None}


@given(data=st.data())
@FUZZ
def test_mutated_manifests(manifest_doc, data, tmp_path):
    from apq_sdk.package import check_manifest

    package = tmp_path / "pkg"
    package.mkdir(exist_ok=True)
    (package / "model.onnx").write_bytes(b"abc")
    (package / "manifest.json").write_text(json.dumps(_mutate(manifest_doc, data), allow_nan=True))
    _loads_or_apq_error(check_manifest, package)


# -- binary headers -----------------------------------------------------------------------------------


def _gguf(kv: list[tuple[str, int, bytes]], tensors: list[tuple[str, list[int], int, int]],
          data: bytes = b"") -> bytes:
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, kind, value in kv:
        out += string(key) + struct.pack("<I", kind) + value
    for name, dims, kind, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


GOOD_GGUF = _gguf([("general.architecture", 8, struct.pack("<Q", 5) + b"llama"),
                   ("general.alignment", 4, struct.pack("<I", 32)),
                   ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + struct.pack("<Q", 1)
                    + b"a" + struct.pack("<Q", 1) + b"b")],
                  [("w", [4, 2], 0, 0), ("b", [8], 0, 32)], b"\0" * 64)


@given(data=st.data())
@FUZZ
def test_mutated_gguf_headers(data, tmp_path):
    from apq_sdk.gguf_check import read_gguf_header

    raw = bytearray(GOOD_GGUF)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, 200))
        if at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw))
    _loads_or_apq_error(read_gguf_header, path)


def test_the_fuzzed_gguf_is_valid(tmp_path):
    from apq_sdk.gguf_check import read_gguf_header

    path = tmp_path / "m.gguf"
    path.write_bytes(GOOD_GGUF)
    header = read_gguf_header(path)
    assert header.architecture == "llama" and len(header.tensors) == 2


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_model_factory, tmp_path_factory):
    from apq_sdk.calibration import load_calibration
    from apq_sdk.model_io import load_model
    from apq_sdk.planning import Budget, make_plan
    from apq_sdk.quantizer import quantize_model, save_quantized
    from apq_sdk.sensitivity import ProfileSettings, profile_model

    model, tok, info = load_model(tiny_model_factory("llama"))
    ids, calib = load_calibration(tok, num_samples=2, seq_len=32, seed=0)
    fit, _ = load_calibration(tok, num_samples=1, seq_len=32, seed=1)
    sens = profile_model(model, info, ids, calib, ProfileSettings(batch_size=2), fit_samples=fit)
    plan = make_plan(sens, Budget(bits_per_weight=6.0))
    quantize_model(model, info, plan, ids, method="rtn")
    return save_quantized(model, tok, plan, tmp_path_factory.mktemp("ckpt") / "q")


@given(data=st.data())
@FUZZ
def test_mutated_safetensors_headers(checkpoint_dir, data, tmp_path):
    """Bytes of the safetensors header (its length and JSON) changed or cut: read_checkpoint
    refuses the file with ApqError."""
    import shutil

    from apq_sdk.checkpoint import read_checkpoint

    copy = tmp_path / "q"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(checkpoint_dir, copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, 8 + header_len - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    (copy / "model.safetensors").write_bytes(bytes(raw))
    _loads_or_apq_error(read_checkpoint, copy)


def test_huge_counts_in_a_gguf_cost_nothing(tmp_path):
    """Arrays and strings that claim more than the file holds are refused before any read."""
    from apq_sdk.gguf_check import GGUFHeaderError, read_gguf_header

    for kv in ([("tokens", 9, struct.pack("<IQ", 8, 2 ** 40))],
               [("tokens", 9, struct.pack("<IQ", 0, 2 ** 60))],
               [("name", 8, struct.pack("<Q", 2 ** 50))]):
        path = tmp_path / "big.gguf"
        path.write_bytes(_gguf(kv, []))
        with pytest.raises(GGUFHeaderError):
            read_gguf_header(path)
