"""The qualcomm target. Without Qualcomm's QNN SDK the build stops before any work, saying what
is missing and where it comes from. What runs without it: a plan on QNN's grid, quantized by the
core, and ExecuTorch's QNN quantizer graph over it (targets/executorch/qnn.py), which holds the
checkpoint's codes and scales bit for bit and runs QNN's static 16-bit activations in torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from apq_sdk.targets.base import get_target


def test_without_the_sdk_the_build_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    env = {k: v for k, v in __import__("os").environ.items() if k != "QNN_SDK_ROOT"}
    env["APQ_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "apq_sdk.cli", "build", "--target", "qualcomm",
                             "-m", str(tmp_path / "no-such-model"), "-o", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "QNN_SDK_ROOT" in result.stderr and "softwarecenter.qualcomm.com" in result.stderr
    assert "libQnnHtp.so" in result.stderr
    # nothing was loaded (the model path does not exist) and nothing was written
    assert "no-such-model" not in result.stderr
    assert not out.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))


def test_with_the_sdk_the_build_still_stops_before_any_work(tmp_path):
    """With an SDK in place (here a stand-in holding the library the check looks for), the
    build stops before loading anything, because the lowering is not implemented, and says what
    runs instead."""
    sdk = tmp_path / "qnn-sdk"
    lib = sdk / get_target("qualcomm").tools[-1].requires
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    env = {**__import__("os").environ, "QNN_SDK_ROOT": str(sdk),
           "APQ_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "apq_sdk.cli", "build", "--target", "qualcomm",
                             "-m", str(tmp_path / "no-such-model"), "-o", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "QNN lowering is not implemented" in result.stderr
    assert "apq-sdk plan --target qualcomm" in result.stderr
    assert "no-such-model" not in result.stderr and not out.exists()


def test_the_sdk_is_found_by_its_library(tmp_path, monkeypatch):
    tool = next(t for t in get_target("qualcomm").tools if t.kind == "sdk")
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    assert not tool.present()
    lib = tmp_path / tool.requires
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    assert tool.present()
    monkeypatch.setenv("QNN_SDK_ROOT", "")
    assert not tool.present()


def test_its_table_says_what_the_npu_runs():
    caps = get_target("qualcomm").capabilities
    assert caps.symmetric_only and caps.whole_groups
    assert caps.weight_bits == (4,) and caps.head_bits == (4,) and caps.scale_dtype == "qnn-lpbq"
    assert "static 16-bit activations" in caps.notes
    assert get_target("qualcomm").maven_artifact == "org.pytorch:executorch-android-qnn"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama planned for qualcomm and quantized by the core (no SDK needed for either)."""
    pytest.importorskip("executorch", reason="pip install 'apq-sdk[executorch]' torch==2.13.0")
    import apq_sdk
    from apq_sdk.calibration import builtin_text
    from apq_sdk.checkpoint import read_checkpoint
    from apq_sdk.testing import make_tiny_model

    tmp = tmp_path_factory.mktemp("qualcomm")
    calib = tmp / "calib.txt"
    calib.write_text(builtin_text()[:60_000])
    model = make_tiny_model(tmp / "tiny-llama", "llama")
    sens = apq_sdk.profile(str(model), calib=str(calib), samples=8, seq_len=48,
                           target="qualcomm")
    plan = apq_sdk.plan(sens, bits_per_weight=5.4, target="qualcomm")
    apq_sdk.quantize(str(model), plan, str(tmp / "q"), calib=str(calib), samples=8, seq_len=48)
    return read_checkpoint(tmp / "q")


@pytest.fixture(scope="module")
def graph(checkpoint):
    from apq_sdk.targets.executorch import qnn

    torch.manual_seed(0)
    windows = torch.randint(0, checkpoint.spec.vocab_size, (4, 32))
    return qnn.quantize_graph(checkpoint, windows), windows


def test_the_plan_is_on_qnns_grid(checkpoint):
    """Every planned layer is 4-bit, symmetric, on QNN's block grid: codes -7..7 (stored 1..15
    around the zero point 8) and block scales that QNN's own re-encoding gives back exactly."""
    from apq_sdk.quant.packing import unpack_bits

    packed = [(n, m) for n, m in checkpoint.modules.items() if m.kind == "packed"]
    assert packed and all(checkpoint.plan.modules[n].scale_dtype == "qnn-lpbq" for n, _ in packed)
    for name, module in packed:
        codes = unpack_bits(module.arrays["qweight"], 4, module.shape[1])
        assert codes.min() >= 1 and codes.max() <= 15, name
        scales = torch.from_numpy(module.arrays["scales"].astype("float32"))
        row = scales.amax(-1, keepdim=True) / 16
        assert torch.equal(row * torch.clamp(torch.round(scales / row), 1, 16), scales), name


def test_the_qnn_graph_holds_the_checkpoints_weights_and_tracks_its_reference(checkpoint, graph):
    """QnnQuantizer's 16a4w_block graph: every planned linear quantized to the checkpoint's codes
    with its scales (check_weights ran in quantize_graph), uint16 activations everywhere, and
    its logits within 1 % of the weight-only reference on the calibrated windows."""
    import apq_sdk

    converted, windows = graph
    assert set(converted.linears) == {n for n, m in checkpoint.plan.modules.items()
                                      if m.kind != "embedding"}
    ranges = {(a[-2], a[-1]) for node in converted.module.graph.nodes
              if node.op == "call_function" and "dequantize_per_tensor" in str(node.target)
              for a in [[x for x in node.args if isinstance(x, int)]]}
    assert (0, 65535) in ranges and not {r for r in ranges if r[1] - r[0] < 65535 and r[0] >= 0}
    reference = apq_sdk.load(checkpoint.path)
    with torch.no_grad():
        for i in range(windows.shape[0]):
            want = reference(windows[i:i + 1]).logits
            got = converted.module(windows[i:i + 1])
            assert (got - want).abs().mean() < 0.01 * want.abs().mean()


def test_a_changed_code_in_the_graph_is_caught(checkpoint, graph):
    from apq_sdk.targets.executorch import qnn
    from apq_sdk.targets.onnx_graph import LoweringError

    converted, _ = graph
    name, node_name = next(iter(converted.linears.items()))
    nodes = {node.name: node for node in converted.module.graph.nodes}
    codes_node = nodes[node_name].args[1].args[0]
    codes = getattr(converted.module, codes_node.target)
    saved = codes.clone()
    try:
        codes.view(-1)[0] = 7 if codes.view(-1)[0] != 7 else -7
        with pytest.raises(LoweringError, match=f"{name}: the graph's int4 codes"):
            qnn.check_weights(converted, checkpoint)
    finally:
        codes.copy_(saved)


def test_a_plan_off_qnns_grid_is_refused(checkpoint, tmp_path):
    """A checkpoint quantized for another table (free float16 scales) cannot be lowered exactly:
    the graph refuses it, naming the layer and the fix."""
    import dataclasses

    from apq_sdk.checkpoint import read_checkpoint
    from apq_sdk.targets.executorch import qnn
    from apq_sdk.targets.onnx_graph import LoweringError

    name = next(n for n, m in checkpoint.plan.modules.items() if m.kind == "linear")
    modules = dict(checkpoint.plan.modules)
    modules[name] = dataclasses.replace(modules[name], scale_dtype="float16")
    other = dataclasses.replace(read_checkpoint(checkpoint.path),
                                plan=dataclasses.replace(checkpoint.plan, modules=modules))
    with pytest.raises(LoweringError, match=f"{name}: 4-bit, scale grid float16.*qualcomm"):
        qnn.float_model(other)


def _qnn_builder_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """What ExecuTorch's own QNN builder stores for a linear's float block scales [N, G]
    (NodeVisitor.make_qnn_per_block_config, run on a stand-in node): row scale x multiplier."""
    from types import SimpleNamespace

    from executorch.backends.qualcomm.builders.node_visitor import NodeVisitor
    from executorch.backends.qualcomm.utils.constants import (
        QCOM_BLOCK_SCALE_OFFSET, QCOM_BLOCK_SCALES, QCOM_DTYPE, QCOM_QUANT_MAX, QCOM_QUANT_MIN,
        QCOM_SCALE)
    from executorch.exir.dialects._ops import ops as exir_ops

    n, groups = scales.shape
    linear = SimpleNamespace(target=exir_ops.edge.aten.linear.default, args=())
    visitor = SimpleNamespace(get_first_user=lambda node: linear)
    node = SimpleNamespace(meta={"val": torch.empty(n, groups * 8)})
    _, config = NodeVisitor.make_qnn_per_block_config(
        visitor, node, {QCOM_DTYPE: torch.int8, QCOM_QUANT_MIN: -7, QCOM_QUANT_MAX: 7,
                        QCOM_SCALE: scales})
    row = torch.tensor([float(r[0]) for r in config[QCOM_BLOCK_SCALE_OFFSET]])
    multiples = torch.from_numpy(config[QCOM_BLOCK_SCALES].astype("float32")).view(n, groups)
    return row[:, None] * multiples


def test_qnns_own_builder_stores_the_checkpoints_block_scales_exactly(checkpoint, graph):
    """ExecuTorch's QNN builder re-encodes block scales (a float per row, a 4-bit multiple per
    block). Run on the checkpoint's scales it gives back every one exactly; run on QNN's own
    PTQ scales (min/max per block) it changes them, which `encode_blocks` simulates, and is a
    no-op on the checkpoint's graph."""
    from apq_sdk.targets.executorch import qnn

    for name, module in checkpoint.modules.items():
        if module.kind != "packed":
            continue
        scales = torch.from_numpy(module.arrays["scales"].astype("float32"))
        assert torch.equal(_qnn_builder_block_scales(scales), scales), name
        assert torch.equal(qnn.block_encoding(scales), scales), name
    torch.manual_seed(1)
    free = torch.rand(16, 8) * 0.01 + 1e-4
    assert torch.equal(_qnn_builder_block_scales(free), qnn.block_encoding(free))
    assert not torch.equal(qnn.block_encoding(free), free)
    converted, _ = graph
    qnn.encode_blocks(converted)
    qnn.check_weights(converted, checkpoint)
