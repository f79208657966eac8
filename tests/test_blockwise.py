"""Block-by-block execution and Hessian accumulation against direct computations."""

from __future__ import annotations

import torch

from apq_sdk.blockwise import HessianCollector, block_linears, capture_block_inputs, run_block
from apq_sdk.model_io import load_model


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
