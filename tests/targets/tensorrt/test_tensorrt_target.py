"""targets/tensorrt/target.py: the jetson-orin and cuda-x86_64 targets, their capability table,
the embedding table outside the engine, the support-matrix check and build_engine.sh.

The package's engine cannot be built here (no NVIDIA GPU, no TensorRT): build_engine.sh is run
for real with stand-ins for nvidia-smi and trtexec on PATH, which record what the script asked
for, so its refusals, its engine key, its optimization profiles and its atomic write are tested.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from apq_sdk.builder import BuildRequest, build  # noqa: E402
from apq_sdk.calibration import builtin_text  # noqa: E402
from apq_sdk.checkpoint import load_quantized, read_checkpoint  # noqa: E402
from apq_sdk.errors import UsageError  # noqa: E402
from apq_sdk.package import reference_dir  # noqa: E402
from apq_sdk.plan_file import compute_totals, load_plan  # noqa: E402
from apq_sdk.quant.packing import stored_bytes  # noqa: E402
from apq_sdk.targets.base import get_target, load_builtin_targets  # noqa: E402
from apq_sdk.targets.onnx_graph import LoweringError  # noqa: E402
from apq_sdk.targets.tensorrt import support_matrix  # noqa: E402
from apq_sdk.targets.tensorrt.embeddings import EMBEDDINGS_FILE, EmbeddingTable  # noqa: E402
from apq_sdk.targets.tensorrt.target import (CudaX86Target, JetsonOrinTarget,  # noqa: E402
                                             engine_profiles)

pytestmark = pytest.mark.usefixtures("module_cache")
SMALL = dict(samples=8, seq_len=48, verify_windows=1)
_BUILDS: dict = {}


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(builtin_text()[:60_000])
    return path


def _package(target, family, tiny_model_factory, tmp_path_factory, calib, **budget):
    key = (target, family, tuple(sorted(budget.items())))
    if key not in _BUILDS:
        out = tmp_path_factory.mktemp(f"trt-{target}-{family}")
        budget = budget or dict(memory_reduction=0.5)
        _BUILDS[key] = build(BuildRequest(target=target, model=str(tiny_model_factory(family)),
                                          output=out, calib=str(calib), **budget, **SMALL),
                             log=lambda _: None)
    return _BUILDS[key]


def _checkpoint(package: Path):
    return read_checkpoint(reference_dir(package))


# -- the targets and their table -------------------------------------------------------------------

def test_both_presets_are_registered_with_one_table():
    targets = load_builtin_targets()
    orin, cuda = targets["jetson-orin"], targets["cuda-x86_64"]
    assert orin is JetsonOrinTarget and cuda is CudaX86Target
    assert cuda.preset_of == "jetson-orin" and orin.preset_of is None
    a, b = orin.capabilities.to_dict(), cuda.capabilities.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"name"}
    caps = orin.capabilities
    assert caps.weight_bits == (4, 16) and caps.head_bits == (4, 16)
    assert caps.symmetric_only and caps.whole_groups and caps.tied_lookup == "copy"
    assert orin.gpu_arch == "sm_87"


@pytest.mark.parametrize("change,field", [
    (dict(bits=2), "bits"), (dict(bits=3), "bits"), (dict(bits=8), "bits"),
    (dict(symmetric=False), "symmetric"), (dict(group_size=256), "group_size"),
    (dict(activation="int8-per-block-dynamic"), "activation")])
def test_what_tensorrt_cannot_run_is_refused_by_the_table(change, field, tiny_model_factory,
                                                          tmp_path_factory, calib):
    package = _package("jetson-orin", "llama", tiny_model_factory, tmp_path_factory, calib)
    plan = load_plan(package / "plan.json")
    victim = "model.layers.0.mlp.down_proj"
    old = plan.modules[victim]
    values = {"bits": 4, "group_size": 64, "symmetric": True, **change}
    changed = dataclasses.replace(old, **values, bytes=stored_bytes(
        *old.shape, values["bits"], values["group_size"], values["symmetric"]))
    modules = {**plan.modules, victim: changed}
    found = JetsonOrinTarget.check_plan(dataclasses.replace(plan, modules=modules,
                                                            totals=compute_totals(modules)))
    assert [(v.module, v.field) for v in found] == [(victim, field)]


def test_a_group_must_divide_the_input_width():
    caps = JetsonOrinTarget.capabilities
    assert caps.runs_group(576, 64) and caps.runs_group(1536, 128)
    assert not caps.runs_group(576, 128)  # 576 = 4.5 x 128: TensorRT's blocks must tile K


def test_build_all_skips_the_preset(monkeypatch):
    from click.testing import CliRunner

    from apq_sdk import builder, cli

    built = []
    monkeypatch.setattr(builder, "build", lambda req, log: built.append(req.target))
    result = CliRunner().invoke(cli.main, ["build", "--target", "all", "--model", "x"])
    assert result.exit_code == 0, result.output
    assert "cuda-x86_64" not in built and "jetson-orin" in built
    assert "skipping cuda-x86_64: a device preset of jetson-orin" in result.output


# -- the package -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])  # tied 4-bit head; untied; scaled
def test_the_embedding_rows_are_the_references(family, tiny_model_factory, tmp_path_factory, calib):
    package = _package("jetson-orin", family, tiny_model_factory, tmp_path_factory, calib)
    ckpt = _checkpoint(package)
    io = json.loads((package / "onnx_io.json").read_text())
    table = EmbeddingTable(package, io["embeddings"])
    reference = load_quantized(ckpt.path, checkpoint=ckpt)
    ids = np.arange(0, ckpt.spec.vocab_size, 7)
    with torch.no_grad():
        want = reference.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    got = table.lookup(ids)
    if ckpt.spec.embed_scale is not None:  # Gemma: the graph scales the rows it is fed
        got = got * np.float32(ckpt.spec.embed_scale)
    assert got.dtype == np.float32 and np.array_equal(got, want)  # bit for bit
    if ckpt.spec.tie_word_embeddings and ckpt.modules["lm_head"].kind == "packed":
        assert io["embeddings"]["format"] == "blocks"
        assert table.codes.tobytes() == ckpt.modules["lm_head"].arrays["qweight"].tobytes()
    inputs = {i.name for i in onnx.load(str(package / "model.onnx")).graph.input}
    assert "inputs_embeds" in inputs and "input_ids" not in inputs


def test_a_flipped_embedding_row_fails_verify(tiny_model_factory, tmp_path_factory, calib,
                                              tmp_path):
    package = _package("jetson-orin", "llama", tiny_model_factory, tmp_path_factory, calib)
    ckpt = _checkpoint(package)
    assert ckpt.modules["lm_head"].kind == "packed"  # a tied 4-bit head: stored twice
    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    data = bytearray((broken / EMBEDDINGS_FILE).read_bytes())
    data[5] ^= 0x11
    (broken / EMBEDDINGS_FILE).write_bytes(bytes(data))
    result = JetsonOrinTarget().verify(broken, checkpoint=ckpt, text_path=calib, windows=1,
                                       seq_len=48, timing_runs=1, prefill_tokens=8,
                                       decode_tokens=2)
    assert not result.passed
    assert any("embeddings.bin" in f for f in result.failures), result.failures


def test_manifest_says_what_was_and_was_not_validated(tiny_model_factory, tmp_path_factory, calib):
    package = _package("jetson-orin", "llama", tiny_model_factory, tmp_path_factory, calib)
    manifest = json.loads((package / "manifest.json").read_text())
    validation = manifest["validation"]
    assert any("support matrix" in v for v in validation["validated_here"])
    assert any("engine" in v for v in validation["not_validated_here"])
    io = json.loads((package / "onnx_io.json").read_text())
    check = io["tensorrt"]["support_matrix_check"]
    assert check["findings"] == 0 and check["matrix"]["tensorrt"] == "10.1"
    assert check["operators"]["DequantizeLinear"] >= 1
    names = {f["path"] for f in manifest["files"]}
    assert {"model.onnx", "embeddings.bin", "build_engine.sh", "onnx_io.json",
            "include/apq_model.h"} <= names


def test_default_budget_falls_back_to_the_least_the_target_stores(tiny_model_factory,
                                                                   tmp_path_factory, calib):
    logs = []
    out = tmp_path_factory.mktemp("default-budget")
    package = build(BuildRequest(target="jetson-orin", model=str(tiny_model_factory("qwen2")),
                                 output=out, calib=str(calib), verify=False, **SMALL),
                    log=logs.append)
    plan = load_plan(package / "plan.json")
    least = next(line for line in logs if "cannot store this model in the default" in line)
    assert "Pass a budget to choose" in least
    assert plan.objective.bits_per_weight > 4.0
    assert plan.totals.target_bits_per_weight <= plan.objective.bits_per_weight + 1e-9
    with pytest.raises(UsageError, match="stores this model in at least"):  # asked for: refused
        build(BuildRequest(target="jetson-orin", model=str(tiny_model_factory("qwen2")),
                           output=tmp_path_factory.mktemp("explicit"), calib=str(calib),
                           bits_per_weight=4.0, verify=False, **SMALL), log=lambda _: None)


# -- the support matrix ----------------------------------------------------------------------------

def _tiny_graph(nodes, inputs, outputs, initializers=(), opset=21):
    from onnx import helper

    graph = helper.make_graph(nodes, "t", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, elem, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def test_the_matrix_names_its_source_and_version():
    matrix = support_matrix.load_matrix()
    assert matrix["tensorrt"] == "10.1"
    assert matrix["commit"] == "96e781103cfc4adf4a6bb557e94bac8e693f6f4c"
    assert matrix["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/10.1-GA/")
    assert matrix["operators"]["DequantizeLinear"]["types"] == ["INT8", "FP8", "INT4"]
    assert matrix["operators"]["Unique"]["supported"] is False
    assert "21" in matrix["opset_exceptions"]


def test_parse_operators_md():
    text = ("TensorRT 9.9 supports operators in the inclusive range of opset 9 to opset 19.\n"
            "| Operator | Supported | Supported Types | Restrictions |\n|---|---|---|---|\n"
            "| Abs | Y | FP32, FP16 |\n| Foo | N |\n"
            "| Bar | Y [EXPERIMENTAL] | INT32 | `k` must be an initializer |\n")
    data = support_matrix.parse_operators_md(text)
    assert data["opset"] == [9, 19] and data["documented_tensorrt"] == "9.9"
    assert data["operators"]["Abs"] == {"supported": True, "experimental": False,
                                        "types": ["FP32", "FP16"], "restrictions": ""}
    assert data["operators"]["Foo"]["supported"] is False
    assert data["operators"]["Bar"]["experimental"]
    with pytest.raises(ValueError, match="not an onnx-tensorrt operators.md"):
        support_matrix.parse_operators_md("| Abs | Y | FP32 |")


def _planted():
    """Graphs with one thing TensorRT's parser refuses each, and the finding's words."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    x = _vi("x", T.FLOAT, [2, 4])
    y = _vi("y", T.FLOAT, None)
    yield "unsupported operator", _tiny_graph(
        [helper.make_node("Unique", ["x"], ["y"], name="uq")], [x], [y]), "not supported"
    yield "type", _tiny_graph(
        [helper.make_node("MatMul", ["i", "j"], ["y"], name="mm")],
        [_vi("i", T.INT32, [2, 2]), _vi("j", T.INT32, [2, 2])], [_vi("y", T.INT32, None)]), \
        "INT32 input"
    yield "runtime axes", _tiny_graph(
        [helper.make_node("ReduceMax", ["x", "axes"], ["y"], name="rm")],
        [x, _vi("axes", T.INT64, [1])], [y]), "computed at run time"
    zp = numpy_helper.from_array(np.array([3], np.int8), "zp")
    sc = numpy_helper.from_array(np.array([0.5], np.float32), "sc")
    yield "zero point", _tiny_graph(
        [helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["y"], name="dq")],
        [_vi("q", T.INT8, [4])], [y], [sc, zp]), "x_zero_point"
    yield "custom domain", _tiny_graph(
        [helper.make_node("MatMulNBits", ["x", "x"], ["y"], name="nb", domain="com.microsoft")],
        [x], [y]), "custom domain"
    yield "opset", _tiny_graph([helper.make_node("Abs", ["x"], ["y"], name="abs")], [x], [y],
                               opset=22), "outside the documented 9-20"
    yield "unchecked restriction", _tiny_graph(
        [helper.make_node("TopK", ["x", "k"], ["y", "idx"], name="topk")],
        [x], [y, _vi("idx", T.INT64, None)],
        [numpy_helper.from_array(np.array([1], np.int64), "k")]), "restriction not checked"


@pytest.mark.parametrize("what,model,words", list(_planted()), ids=[p[0] for p in _planted()])
def test_a_planted_unsupported_node_is_found(what, model, words):
    findings = support_matrix.check_model(model)
    assert findings and any(words in str(f) for f in findings), [str(f) for f in findings]


def test_a_planted_node_stops_the_build(monkeypatch, tiny_model_factory, tmp_path_factory, calib):
    from apq_sdk.targets.tensorrt import linears

    original = linears.DequantizeLinearLowering.packed_linear

    def planted(self, graph, a, members, name, bias, output, doc):
        y = original(self, graph, a, members, name, bias, output, doc)
        if "down_proj" in name and "layers.0" in name:
            graph.g.op("Unique", [a], name)  # a node TensorRT's parser does not take
        return y

    monkeypatch.setattr(linears.DequantizeLinearLowering, "packed_linear", planted)
    out = tmp_path_factory.mktemp("planted")
    with pytest.raises(LoweringError, match="Unique.*not supported") as info:
        build(BuildRequest(target="jetson-orin", model=str(tiny_model_factory("llama")),
                           output=out, calib=str(calib), memory_reduction=0.5, verify=False,
                           **SMALL), log=lambda _: None)
    assert "onnx_support_matrix.json" in str(info.value)
    assert not any(out.iterdir())  # nothing half-written


# -- build_engine.sh -------------------------------------------------------------------------------

FAKE_TRTEXEC = """#!/usr/bin/env bash
if [ "$1" = "--help" ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT_VERSION}]"; exit 0; fi
printf '%s\\n' "$@" > "$FAKE_LOG"
[ "${FAKE_FAIL:-0}" = 1 ] && { echo "parse error" >&2; exit 3; }
for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done
"""


def _script_env(tmp_path, version="100300", fail=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA GeForce RTX 4090'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_TRT_VERSION": version,
            "FAKE_LOG": str(tmp_path / "args.txt"), "FAKE_FAIL": "1" if fail else "0"}


def test_build_engine_refuses_off_a_jetson(tiny_model_factory, tmp_path_factory, calib, tmp_path):
    package = _package("jetson-orin", "llama", tiny_model_factory, tmp_path_factory, calib)
    if Path("/proc/device-tree/model").is_file() and \
            "Orin" in Path("/proc/device-tree/model").read_text(errors="replace"):
        pytest.skip("this machine is a Jetson Orin")
    result = subprocess.run(["bash", str(package / "build_engine.sh")], capture_output=True,
                            text=True, env=_script_env(tmp_path))
    assert result.returncode == 1
    assert "must be built on a Jetson Orin" in result.stderr and "--target cuda-x86_64" in result.stderr
    assert not (tmp_path / "args.txt").exists()


def test_build_engine_on_a_desktop_gpu(tiny_model_factory, tmp_path_factory, calib, tmp_path):
    built = _package("cuda-x86_64", "llama", tiny_model_factory, tmp_path_factory, calib)
    package = tmp_path / "pkg"
    shutil.copytree(built, package)
    script = str(package / "build_engine.sh")
    env = _script_env(tmp_path)
    result = subprocess.run([script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    engines = sorted((package / "engines").glob("*.engine"))
    assert len(engines) == 1 and engines[0].read_text() == "engine\n"
    plan_sha = json.loads((package / "manifest.json").read_text())["plan"]["sha256"]
    # the key src/apq_model.cpp computes too: GPU name (bytes but [A-Za-z0-9] as _), version, plan
    assert engines[0].name == f"NVIDIA_GeForce_RTX_4090-trt100300-{plan_sha[:16]}.engine"
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert f"--onnx={package}/model.onnx" in args and "--fp16" in args
    io = json.loads((package / "onnx_io.json").read_text())
    profiles = engine_profiles({**io, "num_kv_heads": io["num_key_value_heads"]})
    # trtexec (TensorRT 10.3, samples/common/sampleOptions.cpp) takes each profile as --profile=N
    # followed directly by its three shape lists
    at = args.index("--profile=0")
    assert args[at:at + 8] == [
        "--profile=0", f"--minShapes={profiles['decode_min']}",
        f"--optShapes={profiles['decode_opt']}", f"--maxShapes={profiles['decode_max']}",
        "--profile=1", f"--minShapes={profiles['prefill_min']}",
        f"--optShapes={profiles['prefill_opt']}", f"--maxShapes={profiles['prefill_max']}"]
    assert f"inputs_embeds:1x{io['max_context']}x{io['hidden_size']}" in profiles["prefill_max"]
    # the same device, TensorRT and plan: up to date; another TensorRT: another key
    again = subprocess.run([script], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "engine up to date" in again.stdout
    other = subprocess.run([script], capture_output=True, text=True,
                           env=_script_env(tmp_path, version="100500"))
    assert other.returncode == 0
    assert len(list((package / "engines").glob("*.engine"))) == 2
    # a failing trtexec leaves no engine behind; an old TensorRT and no trtexec are refused
    failed = subprocess.run([script, "--force"], capture_output=True, text=True,
                            env=_script_env(tmp_path, version="100600", fail=True))
    assert failed.returncode != 0
    assert len(list((package / "engines").glob("*.engine"))) == 2
    assert not list((package / "engines").glob("*.partial.*"))
    old = subprocess.run([script], capture_output=True, text=True,
                         env=_script_env(tmp_path, version="100003"))
    assert old.returncode == 1 and "older than 10.1" in old.stderr
    (tmp_path / "bin" / "trtexec").unlink()
    missing = subprocess.run([script], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "trtexec not found" in missing.stderr


def test_a_tied_16_bit_head_and_an_int8_per_token_plan(tiny_model_factory, tmp_path_factory, calib):
    """The other rows of the table: a float16 head tied to the embedding (stored twice: the
    graph's head and embeddings.bin) and per-token dynamic activations as explicit float ops."""
    out = tmp_path_factory.mktemp("variants")
    package = build(BuildRequest(target="jetson-orin", model=str(tiny_model_factory("qwen3")),
                                 output=out, calib=str(calib), memory_reduction=0.2,
                                 head_bits="16", activations="int8-per-token-dynamic", **SMALL),
                    log=lambda _: None)
    result = json.loads((package / "verify.json").read_text())
    assert result["passed"], result["failures"]
    plan = load_plan(package / "plan.json")
    assert plan.modules["lm_head"].bits == 16
    assert {m.activation for m in plan.modules.values() if m.kind == "linear" and m.bits == 4} \
        == {"int8-per-token-dynamic"}
    io = json.loads((package / "onnx_io.json").read_text())
    assert io["embeddings"]["format"] == "float16"
    ops = io["tensorrt"]["support_matrix_check"]["operators"]
    assert ops.get("Round") and ops.get("ReduceMax")  # the explicit per-token ops


def test_unknown_target_names_list_the_new_ones():
    with pytest.raises(KeyError) as info:
        get_target("jetson")
    assert "jetson-orin" in str(info.value) and "cuda-x86_64" in str(info.value)


def test_refusals_reach_the_user_before_work(tiny_model_factory, tmp_path):
    with pytest.raises(UsageError, match="runs head bits"):
        build(BuildRequest(target="jetson-orin", model=str(tiny_model_factory("llama")),
                           output=tmp_path, head_bits="8", **SMALL), log=lambda _: None)
    with pytest.raises(UsageError, match="int8-per-block-dynamic"):
        build(BuildRequest(target="jetson-orin", model=str(tiny_model_factory("llama")),
                           output=tmp_path, activations="int8-per-block-dynamic", **SMALL),
              log=lambda _: None)
    assert not any(tmp_path.iterdir())
