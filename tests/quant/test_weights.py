"""Group quantization, GPTQ, the torch reference modules and their agreement with the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apq_sdk.quant import packing
from apq_sdk.quant.modules import ACT_INT8, QuantLinear, quantize_activations_per_token
from apq_sdk.quant import weights as weights_module
from apq_sdk.quant.weights import (WEIGHT_FORMATS, GptqTask, QuantizedWeight, expand_groups,
                                   gptq_quantize, gptq_quantize_many, output_error, quantize_rtn,
                                   weight_format)


def _correlated_inputs(n_tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    scale = torch.exp(torch.randn(k, generator=g))  # uneven channel magnitudes, like real activations
    return (torch.randn(n_tokens, k, generator=g) @ mix) * scale


def test_formats_registered_by_bits():
    assert sorted(WEIGHT_FORMATS) == [2, 3, 4, 8]
    assert weight_format(3).maxq() == 7 and weight_format(4).symmetric_zero() == 8
    with pytest.raises(ValueError, match="expected one of"):
        weight_format(5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_codes_in_range_and_pack_round_trip(bits, group, symmetric):
    w = torch.randn(24, 192, generator=torch.Generator().manual_seed(bits * group))
    q = quantize_rtn(w, bits, group, symmetric)
    assert int(q.codes.max()) <= (1 << bits) - 1
    assert q.scales.dtype == torch.float16 and q.scales.shape == (24, -(-192 // group))
    packed = q.to_packed()
    again = QuantizedWeight.from_packed(packed, bits, group, (24, 192))
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scales, q.scales)
    assert (again.zeros is None) == symmetric
    np.testing.assert_array_equal(
        packing.dequantize(packed["qweight"], packed["scales"], packed.get("qzeros"), bits, group, 192),
        q.dequantize().numpy())
    stored = sum(a.nbytes for a in packed.values())
    assert stored == packing.stored_bytes(24, 192, bits, group, symmetric)


def test_rtn_error_shrinks_with_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    errors = [float(((quantize_rtn(w, b, 64).dequantize() - w) ** 2).mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]


def test_rtn_reproduces_a_representable_grid_exactly():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (8, 64), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, 15  # every group spans the full range
    scale = torch.tensor(0.03125)
    w = (codes - 8) * scale
    q = quantize_rtn(w, 4, 64)
    torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(bits):
    x = _correlated_inputs(2048, 128)
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(bits))
    rtn = quantize_rtn(w, bits, 64).dequantize() - w
    gptq = gptq_quantize(w, hessian, bits, 64).dequantize() - w
    assert float(output_error(gptq, hessian).sum()) < 0.9 * float(output_error(rtn, hessian).sum())


def _plain_gptq_codes(w, hessian, scales, zeros, bits, group, damp=0.01):
    """Textbook GPTQ in float64: one column at a time, act-order, no lazy block updates."""
    k = w.shape[1]
    w = w.double().clone()
    h = hessian.double().clone()
    perm = torch.argsort(torch.diag(h.float()), descending=True, stable=True)
    h = h[perm][:, perm] + torch.eye(k, dtype=torch.float64) * damp * torch.diag(h).mean()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = expand_groups(scales.double(), group, k)[:, perm]
    z = expand_groups(zeros.double(), group, k)[:, perm]
    w = w[:, perm]
    codes = torch.zeros_like(w)
    for i in range(k):
        codes[:, i] = torch.clamp(torch.round(w[:, i] / s[:, i]) + z[:, i], 0, (1 << bits) - 1)
        err = (w[:, i] - (codes[:, i] - z[:, i]) * s[:, i]) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return codes[:, torch.argsort(perm)]


@pytest.mark.parametrize("bits,group,k", [(2, 64, 192), (3, 128, 192), (4, 64, 200), (8, 128, 200)])
def test_gptq_sweep_matches_textbook_gptq(bits, group, k):
    x = _correlated_inputs(1024, k, seed=bits)
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(16, k, generator=torch.Generator().manual_seed(group))
    q = gptq_quantize(w, hessian, bits, group)
    reference = _plain_gptq_codes(w, hessian, q.scales.float(), q.zeros.float(), bits, group)
    # float32 lazy block updates vs float64: a code may flip where a value sits on a rounding edge
    assert float((q.codes.double() != reference).double().mean()) < 0.01


def test_shared_sweep_equals_one_sweep_per_task(monkeypatch):
    x = _correlated_inputs(1024, 128, seed=9)
    hessian = 2 * x.T @ x / x.shape[0]
    g = torch.Generator().manual_seed(10)
    tasks = [GptqTask(torch.randn(rows, 128, generator=g), bits, group)
             for rows, bits, group in [(24, 4, 64), (8, 2, 128), (16, 8, 32), (24, 3, 64)]]
    alone = [gptq_quantize(t.weight, hessian, t.bits, t.group_size) for t in tasks]
    for max_elements in (1 << 25, 10 * 128):  # one sweep, and sweeps of 10 rows (tasks split)
        monkeypatch.setattr(weights_module, "MAX_SWEEP_ELEMENTS", max_elements)
        shared = gptq_quantize_many(tasks, hessian)
        for a, b, t in zip(alone, shared, tasks):
            assert (b.bits, b.group_size, b.shape) == (t.bits, t.group_size, tuple(t.weight.shape))
            assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
            assert float((a.codes != b.codes).float().mean()) < 0.005


def test_sweep_rounding_is_round_half_to_even_after_clamping():
    """The sweep rounds with x + 1.5 * 2**23 - 1.5 * 2**23; after the clamp to the code range it
    must equal torch.round everywhere, halves, negatives and huge values included."""
    halves = torch.arange(-600, 600, dtype=torch.float32) / 2
    wide = torch.tensor([3e6, -3e6, 2.0 ** 22 + 0.5, -(2.0 ** 22) - 0.5, 1e7 + 1, -1e7 - 1, 1e30,
                         -1e30, 0.4999999, -0.4999999, 255.5, 254.5])
    x = torch.cat([halves, wide, torch.randn(10000) * 300])
    for low, high in [(-8.0, 7.0), (0.0, 255.0), (-255.0, 0.0)]:
        fast = x.clone().add_(weights_module.ROUND_MAGIC).sub_(weights_module.ROUND_MAGIC)
        assert torch.equal(fast.clamp(low, high), torch.round(x).clamp(low, high))


def test_shared_sweep_refuses_mismatched_inputs():
    hessian = torch.eye(64)
    with pytest.raises(ValueError, match="expected 64 input columns"):
        gptq_quantize_many([GptqTask(torch.randn(4, 64), 4, 32), GptqTask(torch.randn(4, 32), 4, 32)],
                           hessian)


def test_output_error_matches_direct_computation():
    x = _correlated_inputs(512, 64)
    hessian = 2 * x.T @ x / x.shape[0]
    delta = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 0.01
    direct = ((x @ delta.T) ** 2).sum(-1).mean()
    torch.testing.assert_close(output_error(delta, hessian).sum(), direct, rtol=1e-4, atol=0)


def test_ragged_last_group():
    w = torch.randn(16, 576, generator=torch.Generator().manual_seed(4))
    q = quantize_rtn(w, 4, 128)
    assert q.scales.shape == (16, 5)
    assert float(((q.dequantize() - w) ** 2).mean()) < 0.01


@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_per_token_scaling_matches_numpy_reference_bit_for_bit(clip):
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(5)) * 3
    x[3] = 0  # an all-zero token gets scale 1
    xq, scale = quantize_activations_per_token(x, clip)
    ref_q, ref_scale = packing.quantize_activations_per_token(x.numpy(), clip)
    np.testing.assert_array_equal(xq.numpy().astype(np.int8), ref_q)
    np.testing.assert_array_equal(scale.view(-1).numpy().view(np.uint32), ref_scale.view(np.uint32))
    amax = x.abs().amax(-1)
    expected = torch.where(amax == 0, torch.ones_like(amax), amax * clip / 127)
    torch.testing.assert_close(scale.view(-1), expected)


def test_quant_linear_int8_matches_kernel_reference():
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(6))
    q = quantize_rtn(w, 4, 64)
    layer = QuantLinear(q, None, ACT_INT8, 0.9)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(7))
    packed = q.to_packed()
    ref = packing.matmul_int8_dynamic(x.numpy(), packed["qweight"], packed["scales"],
                                      packed["qzeros"], 4, 64, clip=0.9)
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,k", [(32, 96), (64, 200)])
def test_per_block_activation_codes_match_a_direct_computation(block, k):
    from apq_sdk.quant.modules import quantize_activations_per_block

    x = torch.randn(5, k, generator=torch.Generator().manual_seed(k)) * 4
    x[1, block:2 * block] = 0  # an all-zero block: codes 0, scale 0
    codes, scale = quantize_activations_per_block(x, block)
    assert codes.shape == x.shape and scale.shape == (5, -(-k // block))
    xs = x.numpy()
    for t in range(5):
        for b, start in enumerate(range(0, k, block)):
            part = xs[t, start:start + block]
            amax = np.float32(np.abs(part).max())
            inv = np.float32(127.0) / amax if amax else np.float32(0.0)
            np.testing.assert_array_equal(codes[t, start:start + block].numpy(),
                                          np.rint(part * inv).astype(np.float32))
            assert scale[t, b].item() == np.float32(amax / np.float32(127.0))
    assert float(codes.abs().max()) == 127.0 and float(codes[1, block:2 * block].abs().sum()) == 0


def test_sixteen_bit_layers_refuse_per_block_activations():
    from apq_sdk.quant.modules import Float16Linear

    with pytest.raises(ValueError, match="keeps float activations"):
        Float16Linear(torch.randn(4, 32), None, "int8-per-block-dynamic")


def test_bfloat16_scale_grid_is_exact_in_float16():
    """Scales on bfloat16's grid (XNNPACK's 4-bit kernels keep bfloat16 scales) are stored as
    float16 by the checkpoint and converted back to bfloat16 by the target: both exact."""
    from apq_sdk.quant.weights import quantize_rtn, round_scales

    torch.manual_seed(0)
    raw = torch.cat([torch.rand(4096) * 10.0 ** torch.randint(-6, 4, (4096,)).float(),
                     torch.tensor([0.0, 1e-9, 70000.0])])
    grid = round_scales(raw, "bfloat16")
    assert torch.equal(grid.to(torch.bfloat16).float(), grid)
    assert torch.equal(grid.half().float(), grid)
    assert grid.min() >= torch.finfo(torch.float16).tiny and grid.max() <= 65280
    with pytest.raises(ValueError, match="scale_dtype: expected 'float16', 'bfloat16' or "
                                         "'qnn-lpbq'"):
        round_scales(raw, "float8")
    weight = torch.randn(48, 128)
    q = quantize_rtn(weight, 4, 32, symmetric=True, scale_dtype="bfloat16")
    s = q.scales.float()
    assert torch.equal(s.to(torch.bfloat16).float(), s)
    # codes were chosen for the rounded scales: the error is that of a round-to-nearest
    assert (q.dequantize() - weight).abs().max() <= s.max() * 8.5


def test_asymmetric_per_token_activations_are_torchaos_formula_bit_for_bit():
    """int8-per-token-asym-dynamic is what XNNPACK's dynamically quantized linears compute and
    what torchao writes for them (int8_asym_per_token): the reference matches torchao exactly,
    ties, all-positive, all-negative and all-zero rows included."""
    from apq_sdk.quant.modules import fake_quantize_activations_asym

    intx = pytest.importorskip(
        "torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor")
    torch.manual_seed(0)
    x = torch.randn(6, 5, 96) * torch.logspace(-3, 2, 5).view(1, 5, 1)
    x[0, 0] = 0.0
    x[0, 1] = x[0, 1].abs()
    x[0, 2] = -x[0, 2].abs()
    x[1, 0, :4] = torch.tensor([255.0, -0.5, 0.5, 1.5])  # halves of the step: ties
    ours = fake_quantize_activations_asym(x)
    theirs = intx._apply_int8_act_asym_per_token_quant_dequant(x)
    assert torch.equal(ours, theirs)
    assert (ours - x).abs().max() <= (x.amax(-1) - x.amin(-1)).max() / 255


def _qnn_block_encoding(scales: torch.Tensor) -> torch.Tensor:
    """What ExecuTorch's QNN builder stores for per-block scales [N, G] (node_visitor's
    make_qnn_per_block_config, ExecuTorch 1.5.1): a row scale = largest / 16 and multiples
    round(scale / row scale) clamped to 1..16; returned as the scales QNN runs with."""
    row = scales.amax(-1) / 16
    return row[:, None] * torch.clamp(torch.round(scales / row[:, None]), 1, 16)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("group", [32, 64])
def test_qnn_grid_survives_qnns_block_encoding_exactly(method, group):
    """scale_dtype qnn-lpbq: codes stay in -7..7 (QNN's int4 weights) and QNN's re-encoding of
    the block scales gives back the stored float16 scales exactly, dead rows and groups included;
    plain float16 scales do not survive it."""
    from apq_sdk.quant.weights import gptq_quantize, quantize_rtn

    torch.manual_seed(0)
    weight = torch.randn(48, 256) * torch.rand(48, 1) * 0.1
    weight[3, :group] = 0
    weight[5] = 0
    if method == "gptq":
        x = torch.randn(1024, 256)
        q = gptq_quantize(weight, x.T @ x, 4, group, True, scale_dtype="qnn-lpbq")
    else:
        q = quantize_rtn(weight, 4, group, True, scale_dtype="qnn-lpbq")
    assert q.codes.min() >= 1 and q.codes.max() <= 15  # zero point 8: -7..7
    scales = q.scales.float()
    assert torch.equal(_qnn_block_encoding(scales), scales)
    plain = quantize_rtn(weight, 4, group, True)
    assert not torch.equal(_qnn_block_encoding(plain.scales.float()), plain.scales.float())
    # what the grid costs: a bounded error (GPTQ moves codes by up to a few steps)
    assert (q.dequantize() - weight).abs().max() <= scales.max() * 8.5
    if method == "rtn":  # within 30 % of the squared error of free float16 scales
        assert (q.dequantize() - weight).square().mean() <= \
            1.3 * (plain.dequantize() - weight).square().mean()


def test_qnn_grid_refuses_asymmetric_groups():
    from apq_sdk.quant.weights import quantize_rtn

    with pytest.raises(ValueError, match="expected symmetric groups"):
        quantize_rtn(torch.randn(8, 64), 4, 32, False, scale_dtype="qnn-lpbq")
