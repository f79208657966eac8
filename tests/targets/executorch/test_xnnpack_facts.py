"""What XNNPACK runs, pinned against the installed ExecuTorch: the android capability table's
claims, each measured on one linear layer lowered and run the way the target does it.

If an ExecuTorch upgrade changes one of these facts, a test here fails and says which claim of
targets/executorch/target.py (ANDROID_CAPABILITIES) to revisit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="pip install 'apq-sdk[executorch]' torch==2.13.0")
pytest.importorskip("torchao", reason="pip install 'apq-sdk[executorch]' torch==2.13.0")

from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (  # noqa: E402
    IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

from apq_sdk.quant.modules import fake_quantize_activations_asym  # noqa: E402
from apq_sdk.targets.executorch.target import ANDROID_CAPABILITIES  # noqa: E402

N, K = 64, 192
DTYPES = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}


def _layer(bits: int, group: int | None, dynamic: bool, scales=None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (N, K), dtype=torch.int8, generator=gen)
    g = group or K
    if scales is None:
        scales = (torch.rand(N, K // g, generator=gen) * 0.01 + 0.001).half().float()
    act = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if dynamic else None
    weight = IntxUnpackedToInt8Tensor(codes, scales, torch.zeros(N, K // g, dtype=torch.int8),
                                      DTYPES[bits], (1, g), torch.float32, act)
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear.eval(), codes.float() * scales.repeat_interleave(g, dim=1)


def _lower(layer, x):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(torch.export.export(layer, (x,)),
                                       partitioner=[XnnpackPartitioner()])
    outside = [str(n.target) for n in edge.exported_program().graph.nodes
               if n.op == "call_function" and "getitem" not in str(n.target)
               and "executorch_call_delegate" not in str(n.target)]
    return edge, outside


def _run(edge, x):
    from apq_sdk.targets.executorch.program import LoadedMethod

    # LoadedMethod keeps the program and its bytes alive while the method runs (a temporary
    # freed under it made XNNPACK's init fail now and then with NotSupported, 0x10, or segfault)
    return LoadedMethod(edge.to_executorch().buffer).execute([x])[0]


def _x():
    return torch.randn(1, 5, K, generator=torch.Generator().manual_seed(1)) * 3


def test_4bit_groups_with_dynamic_activations_are_delegated_and_exact():
    """The table's one quantized format: 4-bit groups, int8 per-token asymmetric activations,
    bfloat16-grid scales. The delegate equals the reference formula (float summation order)."""
    assert ANDROID_CAPABILITIES.weight_bits == (4, 16)
    assert ANDROID_CAPABILITIES.quantized_activation == "int8-per-token-asym-dynamic"
    x = _x()
    scales = (torch.rand(N, K // 64) * 0.01 + 0.001).to(torch.bfloat16).float()
    layer, weight = _layer(4, 64, True, scales)
    edge, outside = _lower(layer, x)
    assert outside == []
    got = _run(edge, x)
    want = fake_quantize_activations_asym(x) @ weight.T
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_the_tables_group_sizes_are_delegated_and_exact(group):
    """Every group size the table lists (each divides the layer's width, as whole_groups
    demands) lowers into the delegate and computes the reference."""
    assert group in ANDROID_CAPABILITIES.group_sizes and ANDROID_CAPABILITIES.whole_groups
    k = 512
    gen = torch.Generator().manual_seed(group)
    codes = torch.randint(-8, 8, (N, k), dtype=torch.int8, generator=gen)
    scales = (torch.rand(N, k // group, generator=gen) * 0.01 + 0.001).to(torch.bfloat16).float()
    weight = IntxUnpackedToInt8Tensor(
        codes, scales, torch.zeros(N, k // group, dtype=torch.int8), torch.int4, (1, group),
        torch.float32, IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)
    layer = torch.nn.Linear(k, N, bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    x = torch.randn(1, 5, k, generator=gen) * 3
    edge, outside = _lower(layer.eval(), x)
    assert outside == []
    want = fake_quantize_activations_asym(x) @ (codes.float() * scales.repeat_interleave(
        group, dim=1)).T
    assert (_run(edge, x) - want).abs().max() <= 1e-5 * want.abs().max()


def test_asymmetric_groups_are_not_what_the_delegate_computes():
    """Why the table is symmetric only: int4 groups with zero points other than 0 do not come
    out as the affine formula says (or do not lower)."""
    assert ANDROID_CAPABILITIES.symmetric_only
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=gen)
    zeros = torch.randint(-3, 4, (N, K // 64), dtype=torch.int8, generator=gen)
    scales = (torch.rand(N, K // 64, generator=gen) * 0.01 + 0.001).to(torch.bfloat16).float()
    weight = IntxUnpackedToInt8Tensor(
        codes, scales, zeros, torch.int4, (1, 64), torch.float32,
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)
    layer = torch.nn.Linear(K, N, bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    x = _x()
    want = fake_quantize_activations_asym(x) @ ((codes.float() - zeros.float().repeat_interleave(
        64, dim=1)) * scales.repeat_interleave(64, dim=1)).T
    try:
        edge, outside = _lower(layer.eval(), x)
        got = _run(edge, x)
    except Exception:
        return  # refused at lowering
    assert outside or (got - want).abs().max() > 1e-3 * want.abs().max()


def test_float16_scales_off_the_bfloat16_grid_are_rounded_by_xnnpack():
    """Why the table plans scale_dtype bfloat16: XNNPACK stores 4-bit scales as bfloat16."""
    assert ANDROID_CAPABILITIES.scale_dtype == "bfloat16"
    x = _x()
    layer, weight = _layer(4, 64, True)  # float16-grid scales
    got = _run(_lower(layer, x)[0], x)
    want = fake_quantize_activations_asym(x) @ weight.T
    assert (got - want).abs().max() > 1e-4 * want.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_group_widths_fail_at_lowering(bits):
    """Why 2-, 3- and 8-bit groups are refused by the table."""
    assert bits not in ANDROID_CAPABILITIES.weight_bits
    layer, _ = _layer(bits, 64, True)
    with pytest.raises(Exception, match="Only 4b group quantization is supported"):
        _lower(layer, _x())


def test_weight_only_int4_is_taken_but_computed_wrongly():
    """Why quantized layers must take dynamic activations: XNNPACK takes weight-only int4 groups
    and returns something else than the layer."""
    x = _x()
    scales = (torch.rand(N, K // 64) * 0.01 + 0.001).to(torch.bfloat16).float()
    layer, weight = _layer(4, 64, False, scales)
    edge, outside = _lower(layer, x)
    got = _run(edge, x)
    want = x @ weight.T
    assert (got - want).abs().max() > 10 * want.abs().max()
    assert "none" not in ANDROID_CAPABILITIES.activation_modes


def test_float16_weights_are_not_delegated():
    """Why 16-bit layers are float32 in the program (float_weight_bytes 4)."""
    assert ANDROID_CAPABILITIES.float_weight_bytes == 4

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(N, K).half())

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w.float())

    _, outside = _lower(Half().eval(), _x())
    assert any("mm" in op or "linear" in op for op in outside), outside


def test_per_token_activation_quantization_matches_xnnpacks_qd8():
    """The reference's activation formula (torchao's) against XNNPACK's own conversion, through
    an 8-bit per-channel layer (float32 scales: nothing else rounds)."""
    x = _x()
    layer, weight = _layer(8, None, True)
    edge, outside = _lower(layer, x)
    assert outside == []
    got = _run(edge, x)
    want = fake_quantize_activations_asym(x) @ weight.T
    assert np.allclose(got.numpy(), want.numpy(), rtol=0, atol=2e-6 * float(want.abs().max()))
