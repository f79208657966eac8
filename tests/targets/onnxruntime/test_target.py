"""The onnxruntime (arm64-linux) target on tiny models: bit-exact MatMulNBits lowering, verify, rebuilds."""

from __future__ import annotations

import dataclasses
import hashlib
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from apq_sdk.calibration import builtin_text, load_calibration  # noqa: E402
from apq_sdk.families import decoder_spec  # noqa: E402
from apq_sdk.model_io import load_model  # noqa: E402
from apq_sdk.testing import TINY_MODELS  # noqa: E402
from apq_sdk.checkpoint import CheckpointModule, read_checkpoint  # noqa: E402
from apq_sdk.plan_file import Plan, compute_totals, load_plan  # noqa: E402
from apq_sdk.planning import Budget, make_plan, uniform_plan  # noqa: E402
from apq_sdk.sensitivity import ProfileSettings, profile_model  # noqa: E402
from apq_sdk.quant.packing import stored_bytes  # noqa: E402
from apq_sdk.quantizer import quantize_model, save_quantized  # noqa: E402
from apq_sdk.targets.base import BuildContext, get_target  # noqa: E402
from apq_sdk.targets.onnx_graph import (GraphOptions, build_decoder,  # noqa: E402
                                        float_weights_from_model, save_model)
from apq_sdk.targets.onnxruntime.linears import (MatMulNBitsLowering, nbits_initializers,  # noqa: E402
                                                 nbits_nodes)
from apq_sdk.targets.onnxruntime.target import OnnxDecoder, OnnxRuntimeTarget  # noqa: E402

INT8 = "int8-per-token-dynamic"
BLOCK = "int8-per-block-dynamic"
CAP = OnnxRuntimeTarget.capabilities
CASES = [("llama", INT8), ("llama", "none"), ("llama", BLOCK), ("mistral", INT8),
         ("mistral", "none"), ("mistral", BLOCK)]
_PROFILES: dict = {}
_QUANTIZED: dict = {}
_PACKAGES: dict = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ort-target")


@pytest.fixture(scope="module")
def text_file(work):
    path = work / "eval.txt"
    path.write_text(builtin_text()[:60_000])
    return path


def _profile(tiny_model_factory, family, symmetric=False):
    if (family, symmetric) not in _PROFILES:
        path = tiny_model_factory(family)
        model, tok, info = load_model(path)
        ids, calib = load_calibration(tok, num_samples=8, seq_len=48, seed=0)
        fit, _ = load_calibration(tok, num_samples=2, seq_len=48, seed=1)
        settings = ProfileSettings(batch_size=4, group_sizes=(32, 128), symmetric=symmetric)
        sens = profile_model(model, info, ids, calib, settings, fit_samples=fit)
        _PROFILES[family, symmetric] = (path, ids, sens)
    return _PROFILES[family, symmetric]


def _with(plan: Plan, changes: dict[str, dict]) -> Plan:
    """The plan with some modules changed (bytes and totals recomputed)."""
    modules = dict(plan.modules)
    for name, change in changes.items():
        old = modules[name]
        n, k = old.shape
        size = stored_bytes(n, k, change.get("bits", old.bits), change.get("group_size", old.group_size),
                            old.symmetric)
        modules[name] = dataclasses.replace(old, bytes=size, **change)
    return dataclasses.replace(plan, modules=modules, totals=compute_totals(modules))


def _quantized(tiny_model_factory, work, family, activation, head_bits="8", symmetric=False):
    key = (family, activation, head_bits, symmetric)
    if key not in _QUANTIZED:
        path, ids, sens = _profile(tiny_model_factory, family, symmetric)
        plan = make_plan(sens, Budget(bits_per_weight=4.0, scope="linear"), caps=CAP, activation=activation,
                         head_bits=head_bits, symmetric=symmetric)
        # every weight format the target takes, a ragged last block and a calibrated clip
        changes = {"model.layers.0.mlp.down_proj": dict(
                       bits=16, group_size=None, **({"activation": "none"} if activation == BLOCK else {})),
                   "model.layers.0.self_attn.o_proj": dict(bits=8, group_size=32),
                   "model.layers.1.mlp.down_proj": dict(bits=2, group_size=32),
                   "model.layers.1.self_attn.o_proj": dict(bits=4, group_size=128)}
        if activation == INT8:
            changes["model.layers.1.self_attn.o_proj"]["act_clip"] = 0.8
        plan = _with(plan, changes)
        assert not OnnxRuntimeTarget.check_plan(plan)
        model, tok, info = load_model(path)
        quantize_model(model, info, plan, ids)
        _QUANTIZED[key] = save_quantized(model, tok, plan, work / ("q-" + "-".join(map(str, key))))
    return _QUANTIZED[key]


def _lower(quantized: Path, out: Path, **options) -> Path:
    OnnxRuntimeTarget().lower(BuildContext(package_dir=out, checkpoint=read_checkpoint(quantized),
                                           model_name="tiny", package_name="tiny", options=options))
    return out


def _package(tiny_model_factory, work, family, activation, **kwargs):
    key = (family, activation, tuple(sorted(kwargs.items())))
    if key not in _PACKAGES:
        q = _quantized(tiny_model_factory, work, family, activation, **kwargs)
        _PACKAGES[key] = (q, _lower(q, work / ("pkg-" + q.name)))
    return _PACKAGES[key]


def _verify(package, quantized, text, **kwargs):
    return OnnxRuntimeTarget().verify(package, checkpoint=read_checkpoint(quantized), text_path=text,
                                      windows=1, seq_len=96, timing_runs=1, prefill_tokens=32,
                                      decode_tokens=4, **kwargs).to_dict()


# --------------------------------------------------------------------------------------------------


def test_capabilities_and_registry(tiny_model_factory):
    assert get_target("arm64-linux") is OnnxRuntimeTarget
    caps = OnnxRuntimeTarget.capabilities
    assert caps.weight_bits == (2, 4, 8, 16) and 3 not in caps.weight_bits
    assert "3-bit" in caps.notes
    assert caps.group_sizes == (32, 64, 128, 256)
    assert set(caps.activation_modes) == {INT8, BLOCK, "none"} and caps.head_bits == (4, 8, 16)
    assert caps.default_activation == BLOCK
    assert {t.name for t in OnnxRuntimeTarget.tools} == {"onnx", "onnxruntime"}
    _, _, sens = _profile(tiny_model_factory, "llama")
    three_bit = uniform_plan(sens, 3, 128)
    refused = {v.module for v in OnnxRuntimeTarget.check_plan(three_bit)
               if v.field == "bits" and v.found == 3}
    assert refused == {n for n, m in three_bit.modules.items() if m.kind == "linear"}
    planned = make_plan(sens, Budget(bits_per_weight=3.0, scope="linear"), caps=CAP, head_bits="8")
    assert not OnnxRuntimeTarget.check_plan(planned)


@pytest.mark.parametrize("family,activation", CASES)
def test_matmulnbits_hold_the_core_arrays_bit_for_bit(family, activation, tiny_model_factory, work):
    from safetensors.numpy import load_file

    quantized, package = _package(tiny_model_factory, work, family, activation)
    plan = load_plan(quantized / "plan.json")
    stored = load_file(str(quantized / "model.safetensors"))
    model = onnx.load(str(package / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    # I/O contract
    layers = plan.model.num_layers
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert [o.name for o in model.graph.output] == ["logits"] + [
        f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    past = model.graph.input[3].type.tensor_type
    assert past.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value or d.dim_param for d in past.shape.dim] == [
        1, plan.model.num_key_value_heads, "past_sequence_length", plan.model.head_dim]

    nodes = nbits_nodes(model)
    covered = [m for node in nodes for m in node["modules"]]
    assert len(covered) == len(set(covered))
    quantized_modules = {n for n, m in plan.modules.items() if m.bits != 16}
    assert set(covered) == quantized_modules and "lm_head" in covered
    for node in nodes:
        entries = [plan.modules[m] for m in node["modules"]]
        first = entries[0]
        k = first.shape[1]
        assert node["attrs"]["K"] == k and node["attrs"]["N"] == sum(e.shape[0] for e in entries)
        assert node["attrs"]["bits"] == first.bits and node["attrs"]["block_size"] == first.group_size
        assert node["attrs"]["accuracy_level"] == (4 if first.activation == BLOCK else 0)
        blocks = -(-k // first.group_size)
        row_bytes = k * first.bits // 8
        b = node["B"].reshape(node["B"].shape[0], -1)
        assert node["B"].shape[1:] == (blocks, first.group_size * first.bits // 8)
        start = 0
        for name, entry in zip(node["modules"], entries):
            rows = slice(start, start + entry.shape[0])
            start += entry.shape[0]
            assert np.array_equal(b[rows, :row_bytes], stored[f"{name}.qweight"])
            assert not b[rows, row_bytes:].any()  # padding of the short last block
            scales = node["scales"][rows]
            assert scales.dtype == np.float32
            assert np.array_equal(scales.astype(np.float16).view(np.uint16),
                                  stored[f"{name}.scales"].view(np.uint16))
            assert np.array_equal(scales, stored[f"{name}.scales"].astype(np.float32))
            assert np.array_equal(node["zero_points"][rows], stored[f"{name}.qzeros"])
    # 16-bit layers keep their float16 bytes
    for name, entry in plan.modules.items():
        if entry.bits == 16 and name != "lm_head":
            assert np.array_equal(inits[f"{name}.weight"].view(np.uint16),
                                  stored[f"{name}.weight"].view(np.uint16))
    ops = [n.op_type for n in model.graph.node]
    # int8 activations are explicit ops: one Round per distinct (input, clip) of an int8 layer
    assert ("Round" in ops) == (activation == INT8)
    if plan.model.tie_word_embeddings:
        gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        assert gather.input[0] == "lm_head.B"  # the embedding reads the quantized head's codes
    else:
        assert "GatherBlockQuantized" not in ops
        assert np.array_equal(inits["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])


@pytest.mark.parametrize("family,activation", CASES)
def test_verify_passes(family, activation, tiny_model_factory, work, text_file):
    quantized, package = _package(tiny_model_factory, work, family, activation)
    float_model, _, _ = load_model(tiny_model_factory(family))
    result = _verify(package, quantized, text_file, float_model=float_model)
    assert result["passed"], result["failures"]
    assert not result["skipped"]
    checks = {c["name"] for c in result["checks"]}
    if activation != "none":  # exact per layer, and as accurate as the reference end to end
        assert {"linears on recorded inputs (nodes off the reference)",
                "accuracy: KL(unquantized || package)", "accuracy: perplexity"} <= checks
        assert result["linears"]["worst_median"] < 1e-5
    assert result["int8_activations"] == (activation != "none")
    # int8 rounding flips between the runtimes (the head too, per-block) move these a little
    kl_bound = 1e-4 if activation == BLOCK else 1e-5
    assert result["logits"]["kl_mean"] < kl_bound and result["logits"]["top1_agreement"] >= 0.98
    assert result["kv_cache"]["decode_steps"] > 0 and result["kv_cache"]["kl_mean"] < kl_bound / 10
    if activation == "none":
        assert result["logits"]["relative"] < 1e-5 and result["kv_cache"]["relative"] < 1e-5
    if activation == BLOCK:  # the exact check: same graph at accuracy_level 0, float reference
        assert result["float_twin"]["relative"] < 1e-4 and result["float_twin"]["kl_mean"] < 1e-9
    else:
        assert result["float_twin"] is None
    ppl = result["perplexity"]
    assert ppl["relative_diff"] < 1e-3 and ppl["windows"] == 1
    timings = result["timings"]
    assert timings["prefill_ms_median"] > 0 and timings["decode_tokens_per_s_median"] > 0
    again = _verify(package, quantized, text_file, float_model=float_model)
    assert {k: v for k, v in again.items() if k != "timings"} == \
        {k: v for k, v in result.items() if k != "timings"}


@pytest.mark.parametrize("activation", [INT8, BLOCK])
def test_corrupted_initializer_fails_verify(activation, tiny_model_factory, work, text_file):
    quantized, package = _package(tiny_model_factory, work, "llama", activation)
    import shutil

    broken = work / f"broken-{activation}"
    shutil.copytree(package, broken, dirs_exist_ok=True)
    model = onnx.load(str(package / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == "model.layers.1.self_attn.o_proj.B":
            codes = numpy_helper.to_array(init) ^ np.uint8(0x11)  # flip one bit of every code
            init.CopyFrom(numpy_helper.from_array(codes, init.name))
    (broken / "model.onnx").write_bytes(model.SerializeToString())
    result = _verify(broken, quantized, text_file)
    assert not result["passed"]
    failures = result["failures"]
    assert any(f.startswith("weights differ") and "model.layers.1.self_attn.o_proj" in f
               for f in failures), failures
    assert any(f.startswith("1 of") and "model.layers.1.self_attn.o_proj" in f
               for f in failures), failures  # the linears-on-recorded-inputs check
    if activation == BLOCK:
        assert any(f.startswith("float-activation twin") for f in failures)


def test_rebuild_is_byte_identical(tiny_model_factory, work):
    quantized, package = _package(tiny_model_factory, work, "llama", INT8)

    def digests(path):
        return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(path.rglob("*")) if p.is_file()}

    again = _lower(quantized, work / "rebuild")
    assert digests(again) == digests(package)
    files = set(digests(again))
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "onnx_io.json", "README.md",
            "include/apq_model.h", "CMakeLists.txt", "src/apq_model.cpp"} <= files
    assert any(f.startswith("tokenizer/") for f in files) and "model.onnx.data" not in files
    external = [_lower(quantized, work / f"external{i}", external_data=True) for i in range(2)]
    assert digests(external[0]) == digests(external[1])
    assert (external[0] / "model.onnx.data").is_file()
    ids = np.arange(20, 60, dtype=np.int64)
    assert np.array_equal(OnnxDecoder(external[0] / "model.onnx").full(ids),
                          OnnxDecoder(package / "model.onnx").full(ids))


@pytest.mark.parametrize("head_bits,symmetric", [("4", True), ("16", False)])
def test_tied_head_variants(head_bits, symmetric, tiny_model_factory, work, text_file):
    quantized, package = _package(tiny_model_factory, work, "llama", "none", head_bits=head_bits,
                                  symmetric=symmetric)
    model = onnx.load(str(package / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    nodes = nbits_nodes(model)
    if symmetric:
        assert all(n["zero_points"] is None for n in nodes)
    if head_bits == "16":
        assert "GatherBlockQuantized" not in ops and "lm_head" not in [m for n in nodes for m in n["modules"]]
        inits = {t.name for t in model.graph.initializer}
        assert "lm_head.weight" in inits and "model.embed_tokens.weight" not in inits
    else:
        assert "GatherBlockQuantized" in ops
    result = _verify(package, quantized, text_file)
    assert result["passed"], result["failures"]
    assert result["logits"]["relative"] < 1e-5


def test_accuracy_level_4_is_not_the_reference(tiny_model_factory, work):
    """The measurement behind the explicit activation ops (see the target's docstring)."""
    from apq_sdk.quantizer import load_quantized

    quantized, package = _package(tiny_model_factory, work, "llama", INT8)
    level4 = _lower(quantized, work / "level4", activation_lowering="accuracy-level-4")
    graph = onnx.load(str(level4 / "model.onnx"))
    levels = {m: n["attrs"]["accuracy_level"] for n in nbits_nodes(graph) for m in n["modules"]}
    assert levels.pop("lm_head") == 0 and set(levels.values()) == {4}

    def rounds(model):  # the 16-bit int8 layer keeps its explicit ops in both
        return sum(n.op_type == "Round" for n in model.graph.node)

    assert rounds(graph) < rounds(onnx.load(str(package / "model.onnx")))
    ids = np.random.default_rng(1).integers(0, 384, 96).astype(np.int64)
    with torch.no_grad():
        ref = load_quantized(quantized)(input_ids=torch.from_numpy(ids[None])).logits[0].numpy()
    explicit = np.abs(OnnxDecoder(package / "model.onnx").full(ids) - ref).max(-1)
    kernel = np.abs(OnnxDecoder(level4 / "model.onnx").full(ids) - ref).max(-1)
    assert np.median(explicit) < 1e-5
    assert np.median(kernel) > 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block,k", [(32, 200), (64, 576), (128, 320)])
def test_accuracy_level_4_is_the_per_block_reference(bits, block, k):
    """One MatMulNBits at accuracy_level 4 against QuantLinear in int8-per-block-dynamic mode."""
    from onnx import TensorProto, helper

    import onnxruntime as ort

    from apq_sdk.quant.modules import QuantLinear
    from apq_sdk.quant.weights import quantize_rtn

    g = torch.Generator().manual_seed(bits * k)
    weight = torch.randn(24, k, generator=g)
    q = quantize_rtn(weight, bits, block)
    layer = QuantLinear(q, None, BLOCK)
    x = torch.randn(7, k, generator=g) * torch.exp(torch.randn(k, generator=g))  # uneven channels
    x[2, :block] = 0  # an all-zero block
    arrays = nbits_initializers(CheckpointModule("w", "packed", (24, k), q.to_packed(), bits, block,
                                                 activation=BLOCK))
    inits = [numpy_helper.from_array(arrays[n], n) for n in ("B", "scales", "zero_points")]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"],
                            domain="com.microsoft", K=k, N=24, bits=bits, block_size=block,
                            accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [7, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [7, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"A": x.numpy()})[0]
    with torch.no_grad():
        want = layer(x).numpy()
        float_acts = torch.nn.functional.linear(x, layer.weight).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-5 * scale  # summation order only
    assert np.abs(float_acts - want).max() > 1e-4 * scale  # the mode is not float activations


@pytest.mark.parametrize("name", TINY_MODELS)
def test_fp32_export_matches_transformers_forward(name, tiny_model_factory, work):
    """The shared graph of every family and RoPE/window variant, in float32, against
    transformers' own forward: full sequence and token-by-token decode from before the sliding
    window to well past it."""
    path = tiny_model_factory(name)
    model, _, _ = load_model(path)
    config, tensors, modules = float_weights_from_model(model)
    save_model(build_decoder(config, tensors, modules, MatMulNBitsLowering()), work / f"fp32-{name}.onnx")
    runner = OnnxDecoder(work / f"fp32-{name}.onnx")
    ids = np.random.default_rng(0).integers(3, 380, 64).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids[None])).logits[0].numpy()
    scale = np.abs(ref).max()
    full = runner.full(ids)
    assert np.abs(full - ref).max() <= 1e-5 * scale
    logits, past = runner.step(ids[:4], None)  # windows are 8 tokens: decode crosses them
    for t in range(4, 64):
        logits, past = runner.step(ids[t:t + 1], past)
        assert np.abs(logits[0] - ref[t]).max() <= 1e-5 * scale, t
    spec = decoder_spec(config)
    assert past[0].shape == (1, spec.num_kv_heads, 64, spec.head_dim)
    if any(w is not None for w in spec.sliding_windows):  # the window is not a no-op here
        save_model(build_decoder(config, tensors, modules, MatMulNBitsLowering(),
                                 options=GraphOptions(sliding_windows=False)),
                   work / f"fp32-{name}-nowindow.onnx")
        far = OnnxDecoder(work / f"fp32-{name}-nowindow.onnx").full(ids)
        assert np.abs(far - ref)[20:].max() > 1e-3 * scale


def test_bench_runs_on_a_tiny_model(tiny_model_factory, work, text_file, monkeypatch, capsys):
    import json

    quantized, _ = _package(tiny_model_factory, work, "llama", INT8)
    out = work / "bench" / "onnxruntime"
    bench = Path(__file__).resolve().parents[3] / "bench" / "bench_onnxruntime.py"
    monkeypatch.setattr(sys, "argv", [str(bench), "--model", str(tiny_model_factory("llama")),
                                      "--quantized", str(quantized), "--text", str(text_file),
                                      "--windows", "1", "--runs", "1", "--decode-tokens", "4",
                                      "--verify-windows", "1", "--out", str(out)])
    runpy.run_path(str(bench), run_name="__main__")
    result = json.loads(out.with_suffix(".json").read_text())
    fp32, quant = result["rows"]
    assert fp32["model"] == "fp32-onnx" and quant["model"] == "apq-matmulnbits"
    assert quant["model_file_bytes"] < fp32["model_file_bytes"]
    assert result["verify"]["passed"]
    assert "| apq-matmulnbits |" in out.with_suffix(".md").read_text()
