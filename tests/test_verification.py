"""apq_sdk.verification: verify passes whenever a package computes what its plan says, and fails
when it does not: six faults planted in arm64-linux packages with int8 activations (the exact
check of every linear on recorded inputs catches each, naming the layer), and clean packages of
every family, calibration text, seed and int8 mode pass."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from apq_sdk.builder import BuildRequest, build
from apq_sdk.calibration import builtin_text
from apq_sdk.checkpoint import CheckpointModule, read_checkpoint
from apq_sdk.package import reference_dir
from apq_sdk.model_io import load_model
from apq_sdk.quant.weights import quantize_rtn
from apq_sdk.targets.base import get_target
from apq_sdk.targets.onnxruntime.linears import nbits_initializers
from apq_sdk.testing import FAMILIES
from apq_sdk.verification import LINEAR_TOLERANCE, VerifyResult

BLOCK = "int8-per-block-dynamic"
TOKEN = "int8-per-token-dynamic"
VICTIM = "model.layers.1.self_attn.o_proj"
OTHER = "model.layers.0.self_attn.o_proj"
LINEARS_CHECK = "linears on recorded inputs (nodes off the reference)"
_BUILT: dict = {}


pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    text = builtin_text()
    paths = []
    for i, part in enumerate((text[:60_000], text[60_000:120_000])):
        path = root / f"calib{i}.txt"
        path.write_text(part)
        paths.append(path)
    return paths


def _build(tiny_model_factory, tmp_path_factory, family, activation, calib, seed=0,
           uniform=False):
    """(model dir, package, checkpoint dir) of an arm64-linux build: planned at 4.5 bits per
    weight of the decoder linears, or (uniform) every linear at 4 bits in groups of 64, so the
    layers share one layout and can be swapped."""

    from apq_sdk import api
    from apq_sdk.plan_file import save_plan
    from apq_sdk.planning import uniform_plan

    key = (family, activation, str(calib), seed, uniform)
    if key not in _BUILT:
        model = tiny_model_factory(family)
        out = tmp_path_factory.mktemp("pkg")
        common = dict(target="arm64-linux", model=str(model), output=out, calib=str(calib),
                      seed=seed, samples=8, seq_len=48, verify_windows=1)
        if uniform:
            sens = api.profile(model, calib=calib, samples=8, seq_len=48, seed=seed,
                               target="arm64-linux")
            plan = save_plan(uniform_plan(sens, 4, 64, activation=activation, head_bits=8),
                             out / "uniform-plan.json")
            request = BuildRequest(plan_path=plan, **common)
        else:
            request = BuildRequest(linear_bits_per_weight=4.5, head_bits="8",
                                   activations=activation, **common)
        package = build(request, log=lambda _: None)
        _BUILT[key] = (model, package, reference_dir(package))
    return _BUILT[key]


def _verify(package, checkpoint, model_dir) -> VerifyResult:
    float_model, _, _ = load_model(model_dir)
    return get_target("arm64-linux")().verify(package, checkpoint=checkpoint, text_path=None,
                                              windows=1, seq_len=96, timing_runs=1,
                                              prefill_tokens=16, decode_tokens=2,
                                              float_model=float_model)


# -- the faults, each an edit of model.onnx ----------------------------------------------------------


def _node(model, module):
    return next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                and n.doc_string.startswith(f"apq:modules={module};"))


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _set(model, name, array):
    _init(model, name).CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def _attr(node, name, value):
    next(a for a in node.attribute if a.name == name).i = value


def wrong_scale(model, ckpt):
    node = _node(model, VICTIM)
    _set(model, node.input[2], numpy_helper.to_array(_init(model, node.input[2])) * np.float32(1.05))


def wrong_zero_point(model, ckpt):
    node = _node(model, VICTIM)
    _set(model, node.input[3], numpy_helper.to_array(_init(model, node.input[3])) ^ np.uint8(0x11))


def _relower(model, ckpt, bits, group):
    """The victim quantized again from its weight at other bits or group: what a lowering that
    re-quantizes (instead of carrying the core's codes) would ship."""
    module = ckpt.modules[VICTIM]
    q = quantize_rtn(torch.from_numpy(module.dequantize()), bits, group)
    arrays = nbits_initializers(CheckpointModule(VICTIM, "packed", module.shape, q.to_packed(), bits,
                                                 group))
    node = _node(model, VICTIM)
    for i, key in ((1, "B"), (2, "scales"), (3, "zero_points")):
        _set(model, node.input[i], arrays[key])
    _attr(node, "bits", bits)
    _attr(node, "block_size", group)


def wrong_bit_width(model, ckpt):
    _relower(model, ckpt, 2, ckpt.modules[VICTIM].group_size)


def wrong_group_size(model, ckpt):
    _relower(model, ckpt, ckpt.modules[VICTIM].bits, 2 * ckpt.modules[VICTIM].group_size)


def swapped_layer(model, ckpt):
    a, b = _node(model, VICTIM), _node(model, OTHER)
    for i in (1, 2, 3):
        first, second = _init(model, a.input[i]), _init(model, b.input[i])
        first.raw_data, second.raw_data = second.raw_data, first.raw_data


def missing_activation_quantization(model, ckpt):
    node = _node(model, VICTIM)
    if any(a.name == "accuracy_level" and a.i == 4 for a in node.attribute):
        _attr(node, "accuracy_level", 0)  # int8-per-block: float activations instead
    else:  # int8-per-token: the explicit quantize ops bypassed
        source = node.doc_string.split(";input=")[1]
        node.input[0] = source


FAULTS = [wrong_scale, wrong_zero_point, wrong_bit_width, wrong_group_size, swapped_layer,
          missing_activation_quantization]


@pytest.mark.parametrize("activation", [BLOCK, TOKEN])
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_a_planted_fault_fails_verify_and_the_exact_check_names_the_layer(
        fault, activation, tiny_model_factory, tmp_path_factory, texts, tmp_path):
    model_dir, package, ckpt_dir = _build(tiny_model_factory, tmp_path_factory, "llama", activation,
                                          texts[0], uniform=True)
    checkpoint = read_checkpoint(ckpt_dir)
    assert checkpoint.plan.modules[VICTIM].activation == activation
    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    graph = onnx.load(str(package / "model.onnx"))
    fault(graph, checkpoint)
    (broken / "model.onnx").write_bytes(graph.SerializeToString())
    result = _verify(broken, checkpoint, model_dir)
    assert not result.passed
    linears = next(c for c in result.checks if c.name == LINEARS_CHECK)
    assert not linears.passed and VICTIM in linears.detail, result.table()
    assert result.linears["worst_median"] > 10 * LINEAR_TOLERANCE
    if fault is not missing_activation_quantization:  # the weights themselves differ too
        weights = next(c for c in result.checks if c.name.startswith("weights"))
        assert not weights.passed and VICTIM in weights.detail


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation,text,seed", [(BLOCK, 0, 0), (BLOCK, 1, 1), (TOKEN, 1, 0)])
def test_clean_packages_pass_for_every_family_text_and_seed(family, activation, text, seed,
                                                            tiny_model_factory, tmp_path_factory,
                                                            texts):
    # the build itself verifies (with the unquantized model): it raises when verification fails
    model_dir, package, ckpt_dir = _build(tiny_model_factory, tmp_path_factory, family, activation,
                                          texts[text], seed)
    import json

    result = json.loads((package / "verify.json").read_text())
    assert result["passed"] and not result["skipped"], result["failures"]
    names = {c["name"] for c in result["checks"]}
    assert {LINEARS_CHECK, "accuracy: KL(unquantized || package)", "accuracy: perplexity"} <= names
    assert result["linears"]["worst_median"] < LINEAR_TOLERANCE / 4  # a wide margin


def test_failures_print_a_table_and_keep_the_package(tiny_model_factory, tmp_path, texts,
                                                     monkeypatch):
    """A failed verification names each check with its measurement and bound, keeps the package
    under a .failed name with its report, and names --no-verify."""
    from apq_sdk import verification
    from apq_sdk.errors import ApqError

    monkeypatch.setattr(verification, "LINEAR_TOLERANCE", 0.0)  # no package can meet this
    with pytest.raises(ApqError) as info:
        build(BuildRequest(target="arm64-linux", model=str(tiny_model_factory("llama")),
                           output=tmp_path, calib=str(texts[0]), samples=8, seq_len=48,
                           verify_windows=1), log=lambda _: None)
    message = str(info.value)
    assert "check" in message and "measured" in message and "bound" in message
    assert "FAIL" in message and "--no-verify" in message
    failed = tmp_path / "model-arm64-linux.failed"  # tiny models live in .../model
    assert (failed / "verify.json").is_file() and (failed / "model.onnx").is_file()
    assert str(failed) in message
    assert not (tmp_path / "model-arm64-linux").exists()
