"""The macos and ios targets (targets/coreai): the Core AI asset holds the core's codes, scales
and zero points as the plan says (2, 4 and 8 bits, symmetric and asymmetric, 16-bit layers in
float16), read back bit for bit from the saved bytecode; the bundle is what Apple's
CoreAILanguageModel reads; what Core AI cannot hold is refused by the table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coreai_torch", reason="pip install 'apq-sdk[coreml]' torch==2.13.0")

from apq_sdk.builder import BuildRequest, build  # noqa: E402
from apq_sdk.calibration import builtin_text  # noqa: E402
from apq_sdk.checkpoint import read_checkpoint  # noqa: E402
from apq_sdk.errors import ApqError  # noqa: E402
from apq_sdk.package import reference_dir  # noqa: E402
from apq_sdk.plan_file import compute_totals, load_plan, save_plan  # noqa: E402
from apq_sdk.quant.packing import stored_bytes  # noqa: E402
from apq_sdk.targets.coreai.target import APPLE_CAPABILITIES, CoreAITarget  # noqa: E402
from apq_sdk.targets.coreai.weights import stored_weights  # noqa: E402
from apq_sdk.testing import make_tiny_model  # noqa: E402
from apq_sdk.verification import compare_weights  # noqa: E402

#: layer 0's modules re-planned to every width and symmetry the table holds
MIXED = {"model.layers.0.self_attn.q_proj": (2, 32, False),
         "model.layers.0.self_attn.k_proj": (4, 64, True),
         "model.layers.0.self_attn.v_proj": (8, 32, False),
         "model.layers.0.self_attn.o_proj": (16, None, True),
         "model.layers.0.mlp.gate_proj": (4, 64, False),
         "model.layers.0.mlp.up_proj": (2, 64, True),
         "model.layers.0.mlp.down_proj": (8, 128, True)}


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(builtin_text()[:60_000])
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def package(model, calib, tmp_path_factory) -> Path:
    """A build whose plan has every bit-width and symmetry of the table in layer 0."""
    first = build(BuildRequest(target="macos", model=str(model), calib=str(calib), verify=False,
                               output=tmp_path_factory.mktemp("first"), memory_reduction=0.5,
                               samples=8, seq_len=48), log=lambda _: None)
    plan = load_plan(first / "plan.json")
    modules = dict(plan.modules)
    for name, (bits, group, symmetric) in MIXED.items():
        old = modules[name]
        modules[name] = dataclasses.replace(
            old, bits=bits, group_size=group, symmetric=symmetric,
            bytes=stored_bytes(*old.shape, bits, group, symmetric))
    mixed = dataclasses.replace(plan, modules=modules, totals=compute_totals(modules))
    path = save_plan(mixed, tmp_path_factory.mktemp("plan") / "mixed.json")
    return build(BuildRequest(target="macos", model=str(model), calib=str(calib), plan_path=path,
                              output=tmp_path_factory.mktemp("pkg"), samples=8, seq_len=48,
                              verify_windows=1), log=lambda _: None)


def test_every_width_and_symmetry_is_stored_as_planned_and_read_back_bit_for_bit(package):
    checkpoint = read_checkpoint(reference_dir(package))
    order = json.loads((package / "program.json").read_text())["weights"]["order"]
    records = dict(zip(order, stored_weights(package / "CoreAI" / "model.aimodel")))
    for name, (bits, group, symmetric) in MIXED.items():
        if bits == 16:
            assert name not in records, f"{name} is 16-bit: no blockwise op"
            continue
        record = records[name]
        assert record["data_type"] == ("si" if symmetric else "ui") + str(bits), name
        assert record["scale_type"] == "f16"
        n, k = checkpoint.modules[name].shape
        assert record["scale"].shape == (n, k // group)
        if symmetric:
            assert not np.any(record["zero_point"]), name
        else:
            assert record["zero_point_type"] == record["data_type"]
    read = CoreAITarget().read_weights(package, checkpoint.plan)
    assert set(read) == set(checkpoint.plan.modules)
    result = compare_weights(checkpoint, read)
    assert result["mismatched"] == 0, result["examples"]
    verify = json.loads((package / "verify.json").read_text())
    assert verify["passed"], verify["failures"]


def test_the_bundle_is_what_coreai_language_model_reads(package):
    """apple/coreai-models' CoreAILanguageModel: metadata.json format 0.2 naming the asset,
    tokenizer/ with tokenizer.json and a tokenizer_config.json with a tokenizer_class
    (swift-transformers' strict loading), and functions of two int32 inputs, float16 logits and
    the two cache states."""
    from coreai.authoring import AIModelAsset

    bundle = package / "CoreAI"
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["metadata_version"] == "0.2" and meta["kind"] == "llm"
    assert (bundle / meta["assets"]["main"]).is_dir()
    language = meta["language"]
    program = json.loads((package / "program.json").read_text())
    assert language["vocab_size"] == program["vocab_size"] > 0
    assert language["max_context_length"] == program["max_context"] > 0
    assert language["function_map"]["main"] == ["prefill"]
    assert json.loads((bundle / "tokenizer" / "tokenizer_config.json").read_text())[
        "tokenizer_class"]
    assert (bundle / "tokenizer" / "tokenizer.json").is_file()
    summary = AIModelAsset.load(bundle / meta["assets"]["main"])
    text = str(summary.program)
    for function in ("prefill", "decode"):
        assert f"@{function}(" in text
    assert "keyCache" in text and "valueCache" in text
    assert 'coreai.name = "input_ids"' in text and 'coreai.name = "position_ids"' in text
    assert "xf16> {coreai.name = \"logits\"}" in text


def test_the_asset_runs_prefill_and_decode_through_one_state(package):
    runner = CoreAITarget().runner(package)
    ids = np.array([5, 17, 3, 99, 42, 7], dtype=np.int64)
    full = runner.full(ids)
    logits, state = runner.step(ids[:4], None)
    for i in range(4, len(ids)):
        step, state = runner.step(ids[i:i + 1], state)
        np.testing.assert_allclose(step[0], full[i], atol=2e-3 * np.abs(full).max())
    runner.close()


@pytest.mark.parametrize("bits", [3])
def test_widths_core_ai_has_no_type_for_are_refused(bits, package):
    plan = load_plan(package / "plan.json")
    name = "model.layers.1.mlp.up_proj"
    old = plan.modules[name]
    entry = dataclasses.replace(old, bits=bits, group_size=64, symmetric=False,
                                bytes=stored_bytes(*old.shape, bits, 64, False))
    modules = {**plan.modules, name: entry}
    bad = dataclasses.replace(plan, modules=modules, totals=compute_totals(modules))
    violations = APPLE_CAPABILITIES.check_plan(bad)
    assert [(v.module, v.field) for v in violations] == [(name, "bits")]


def test_blocks_that_do_not_divide_the_width_are_refused(package):
    plan = load_plan(package / "plan.json")
    name = "model.layers.1.mlp.down_proj"  # input width 128
    old = plan.modules[name]
    entry = dataclasses.replace(old, bits=4, group_size=256, symmetric=True,
                                bytes=stored_bytes(*old.shape, 4, 256, True))
    modules = {**plan.modules, name: entry}
    bad = dataclasses.replace(plan, modules=modules, totals=compute_totals(modules))
    violations = APPLE_CAPABILITIES.check_plan(bad)
    assert [(v.module, v.field) for v in violations] == [(name, "group_size")]


def test_int8_activations_are_refused_with_the_fix(model, calib, tmp_path):
    with pytest.raises(ApqError) as info:
        build(BuildRequest(target="macos", model=str(model), calib=str(calib),
                           activations="int8-per-token-dynamic", output=tmp_path,
                           memory_reduction=0.5, samples=8, seq_len=48), log=lambda _: None)
    assert "activation" in str(info.value)


def test_a_weight_differing_from_the_checkpoint_fails_the_build(model, calib, tmp_path,
                                                                 monkeypatch):
    """The build reads every blockwise op back from the saved asset: a converter that changed one
    scale would be caught before the package is written."""
    from apq_sdk.targets.coreai import weights

    original = weights.stored_weights

    def tampered(path, function="prefill"):
        records = original(path, function)
        records[3]["scale"] = records[3]["scale"] * np.float16(2)
        return records

    monkeypatch.setattr(weights, "stored_weights", tampered)
    with pytest.raises(ApqError) as info:
        build(BuildRequest(target="macos", model=str(model), calib=str(calib), verify=False,
                           output=tmp_path, memory_reduction=0.5, samples=8, seq_len=48),
              log=lambda _: None)
    assert "scales differ" in str(info.value)
    assert not any(tmp_path.iterdir()) or not list(tmp_path.glob("*-macos"))


def test_the_coreml_package_holds_every_layer_as_planned(package):
    """Core ML (.mlpackage): 4- and 8-bit layers are blockwise ops of the core's codes (signed
    when symmetric, unsigned with zero points otherwise), 2-bit layers tables of the core's grid;
    read back from the saved package."""
    from apq_sdk.targets.coreai.coreml import check_mlpackage, stored_ops

    coreml = json.loads((package / "program.json").read_text())["coreml"]
    ops = stored_ops(package / coreml["file"])
    for name, (bits, group, symmetric) in MIXED.items():
        if bits == 16:
            assert name not in coreml["weights"]
            continue
        op = ops[coreml["weights"][name]["op"]]
        if bits in (4, 8):
            assert op["type"] == "constexpr_blockwise_shift_scale", name
            assert op["dtype"] == ("int" if symmetric else "uint") + str(bits), (name, op["dtype"])
            assert (op["offset"] is None) == symmetric, name
        else:
            assert op["type"] == "constexpr_lut_to_dense", name
            assert op["dtype"] == f"uint{bits}"
            assert op["lut"].shape[-2:] == (1 << bits, 1)
    checkpoint = read_checkpoint(reference_dir(package))
    check_mlpackage(package / coreml["file"], checkpoint, coreml["weights"])


def test_a_coreml_weight_changed_on_disk_is_caught(package, tmp_path):
    """The read-back can fail: flip one layer's codes where weight.bin stores them (4-bit
    unsigned codes are the core's packed bytes, least significant bits first)."""
    import shutil

    from apq_sdk.targets.coreai.coreml import check_mlpackage

    checkpoint = read_checkpoint(reference_dir(package))
    coreml = json.loads((package / "program.json").read_text())["coreml"]
    copy = tmp_path / "model.mlpackage"
    shutil.copytree(package / coreml["file"], copy)
    name = "model.layers.0.mlp.gate_proj"  # 4-bit asymmetric: uint4 codes
    needle = checkpoint.modules[name].arrays["qweight"][0].tobytes()[:24]
    weights = copy / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weights.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at:at + len(needle)] = bytes(b ^ 0x11 for b in needle)
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        check_mlpackage(copy, checkpoint, coreml["weights"])


def test_verify_reads_the_coreml_package_back_and_says_where_prediction_was_skipped(package):
    """Both artifacts: verify.json holds the Core ML package's weight check (every planned layer
    and 16-bit layer read back), and, off macOS, the skipped prediction with its reason."""
    import sys

    verify = json.loads((package / "verify.json").read_text())
    checks = {c["name"]: c for c in verify["checks"]}
    name = "Core ML package (CoreML/model.mlpackage): weights equal the checkpoint (modules " \
           "differing)"
    assert checks[name]["passed"] and checks[name]["measured"] == 0
    if sys.platform != "darwin":
        assert any("prediction needs macOS" in s for s in verify["skipped"])
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["target"]["options"] == {"artifacts": "coreai,coreml"}
    assert manifest["validation"]["artifacts"] == ["coreai", "coreml"]


def test_coreml_weights_read_back_cover_every_module_including_16_bit(package):
    checkpoint = read_checkpoint(reference_dir(package))
    read = CoreAITarget().read_coreml_weights(package, checkpoint.plan)
    assert set(read) == set(checkpoint.modules)
    result = compare_weights(checkpoint, read)
    assert result["mismatched"] == 0, result["examples"]


def test_a_coreml_table_that_is_not_the_grid_is_caught(package, monkeypatch):
    """A 2-bit table whose entries are not scale * (j - zero) of one scale and zero is refused,
    even though the scale and zero recovered from it equal the checkpoint's."""
    from apq_sdk.targets.coreai import coreml

    checkpoint = read_checkpoint(reference_dir(package))
    index = json.loads((package / "program.json").read_text())["coreml"]
    name = "model.layers.0.self_attn.q_proj"  # 2-bit asymmetric: a table
    original = coreml.stored_ops

    def tampered(path, float16=False):
        ops = original(path, float16)
        op = ops[index["weights"][name]["op"]]
        lut = np.array(op["lut"], dtype=np.float16)
        zero = int(np.argmax(lut[0, 0, :, 0] == 0))
        far = 0 if zero >= 2 else 3  # neither the zero nor an entry next to it
        lut[0, 0, far, 0] += np.float16(0.5)
        op["lut"] = lut
        return ops

    monkeypatch.setattr(coreml, "stored_ops", tampered)
    with pytest.raises(ValueError, match=f"{name}: its tables are not the grid"):
        coreml.read_weights(package / index["file"], checkpoint.plan, index["weights"])


@pytest.mark.skipif(__import__("sys").platform != "darwin",
                    reason="Core ML prediction needs macOS (coremltools runs Core ML models only "
                           "there); on Linux the package's weights are read back instead")
def test_coreml_prediction_matches_the_core_ai_asset(package):
    from apq_sdk.targets.coreai.coreml import CoreMLRunner

    index = json.loads((package / "program.json").read_text())["coreml"]
    ids = np.array([5, 17, 3, 99, 42, 7], dtype=np.int64)
    coreml, asset = CoreMLRunner(package / index["file"]), CoreAITarget().runner(package)
    want = asset.full(ids)
    np.testing.assert_allclose(coreml.full(ids), want, atol=1e-2 * np.abs(want).max())
    logits, state = coreml.step(ids[:4], None)
    step, _ = coreml.step(ids[4:5], state)
    np.testing.assert_allclose(step[0], want[4], atol=1e-2 * np.abs(want).max())


def test_a_coreml_only_package_verifies_its_weights_and_says_what_it_could_not_run(
        model, calib, tmp_path):
    import sys

    package = build(BuildRequest(target="ios", model=str(model), calib=str(calib),
                                 output=tmp_path, memory_reduction=0.5, samples=8, seq_len=48,
                                 verify_windows=1, target_options={"artifacts": "coreml"}),
                    log=lambda _: None)
    assert not (package / "CoreAI" / "model.aimodel").exists()
    assert not (package / "CoreAI" / "metadata.json").exists()
    assert (package / "CoreAI" / "tokenizer" / "tokenizer.json").is_file()
    assert (package / "CoreML" / "model.mlpackage").is_dir()
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["target"]["options"] == {"artifacts": "coreml"}
    assert manifest["validation"]["artifacts"] == ["coreml"]
    verify = json.loads((package / "verify.json").read_text())
    assert verify["passed"] and verify["checks"], verify
    if sys.platform != "darwin":
        assert [c["name"] for c in verify["checks"]] == [
            "Core ML package (CoreML/model.mlpackage): weights equal the checkpoint (modules "
            "differing)"]
        assert any("prediction needs macOS" in s for s in verify["skipped"])
    swift = (package / "swift/Sources/ApqModel/ApqModel.swift").read_text()
    assert "includesCoreAI = false" in swift and "includesCoreML = true" in swift


@pytest.mark.parametrize("option, message", [
    ({"artifacts": "onnx"}, "expected one of coreai,coreml, coreai, coreml"),
    ({"soc": "SM8650"}, "has no build option 'soc'"),
])
def test_an_unknown_target_option_is_refused_before_any_work(option, message, model, calib,
                                                             tmp_path):
    from apq_sdk.errors import UsageError

    with pytest.raises(UsageError, match=message):
        build(BuildRequest(target="macos", model=str(model), calib=str(calib), output=tmp_path,
                           target_options=option), log=lambda _: None)
    assert not any(tmp_path.iterdir())
