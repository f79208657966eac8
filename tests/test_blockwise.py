"""Block-by-block execution and Hessian accumulation against direct computations."""

from __future__ import annotations

import pytest
import torch

from apq_sdk.blockwise import HessianCollector, block_linears, capture_block_inputs, run_block
from apq_sdk.model_io import load_model
from apq_sdk.testing import FAMILIES


def test_blockwise_outputs_match_full_forward_and_hessians_are_exact(tiny_llama):
    model, _tok, info = load_model(tiny_llama)
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    batches = capture_block_inputs(model, info, ids, batch_size=2, device="cpu")
    assert len(batches) == 2
    layers = model.get_submodule(info.layers_path)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, []).append(a[0]))
             for n, m in block_linears(layers[0], f"{info.layers_path}.0").items()]
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    collector = HessianCollector(block_linears(layers[0], f"{info.layers_path}.0"))
    outputs = run_block(layers[0], batches)
    collector.remove()
    torch.testing.assert_close(torch.cat(outputs), full.hidden_states[1], rtol=1e-5, atol=1e-5)
    for name in block_linears(layers[0], f"{info.layers_path}.0"):
        x = torch.cat(inputs[name]).reshape(-1, inputs[name][0].shape[-1])
        direct = 2 * x.T @ x / x.shape[0]
        torch.testing.assert_close(collector.hessian(name), direct, rtol=1e-4, atol=1e-5)
    q, k = f"{info.layers_path}.0.self_attn.q_proj", f"{info.layers_path}.0.self_attn.k_proj"
    assert collector.hessian(q).data_ptr() != 0 and torch.equal(collector.hessian(q), collector.hessian(k))


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_stops_after_the_last_input_and_gives_the_same_hessians(tiny_model_factory, family):
    model, _tok, info = load_model(tiny_model_factory(family))
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(1))
    batches = capture_block_inputs(model, info, ids, batch_size=2, device="cpu")
    block = model.get_submodule(info.layers_path)[0]
    linears = block_linears(block, "b")
    full = HessianCollector(linears)
    run_block(block, batches)
    full.remove()
    calls = {name: 0 for name in linears}
    counters = [m.register_forward_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1))
                for n, m in linears.items()]
    early = HessianCollector(linears)
    early.collect(block, batches)
    early.remove()
    for handle in counters:
        handle.remove()
    last = max(calls, key=lambda n: -calls[n])  # the linear whose matmul was skipped
    assert calls[last] == 1 and sorted(calls.values())[1:] == [len(batches)] * (len(calls) - 1)
    for name in linears:
        assert torch.equal(early.hessian(name), full.hessian(name)), name


def test_half_precision_inputs_accumulate_close_to_a_float64_hessian():
    layer = torch.nn.Linear(48, 8)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 48, generator=g) * torch.linspace(0.1, 8, 48)).bfloat16()
               for _ in range(4)]
    collector = HessianCollector({"l": layer.bfloat16()})
    for x in batches:
        layer(x)
    collector.remove()
    x = torch.cat(batches).double()
    direct = 2 * x.T @ x / x.shape[0]
    got = collector.hessian("l")
    assert got.dtype == torch.float32
    assert float((got.double() - direct).norm() / direct.norm()) < 2e-3
