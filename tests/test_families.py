"""The model-family registry (apq_sdk/families.py) against transformers, for every tiny model.

The registry is the one description of a family that the core and every target read: the
names of its projections and norms, its RoPE tables per layer, windows, soft-caps and scales.
These tests check it against the models transformers builds; tests/targets/ check the graphs
built from it against transformers' own forward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apq_sdk.blockwise import capture_block_inputs, run_block
from apq_sdk.errors import ModelLoadError
from apq_sdk.families import FAMILIES, UnsupportedModelError, decoder_spec, get_family
from apq_sdk.model_io import load_model
from apq_sdk.testing import TINY_MODELS, UNREGISTERED, VARIANTS, _config

ALL_TINY = TINY_MODELS + tuple(UNREGISTERED)


def _spec(name):
    return decoder_spec(_config(name))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_registry_names_every_parameter_of_the_model(name, tiny_model_factory):
    model, _, _ = load_model(tiny_model_factory(name))
    spec = decoder_spec(model.config)
    family = get_family(spec.family)
    described = {spec.embedding_name, spec.final_norm_name}
    for layer in range(spec.num_layers):
        described |= set(family.linear_names(layer).values()) | set(family.norm_names(layer).values())
    if not spec.tie_word_embeddings:
        described.add("lm_head")
    owners = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    assert owners == described, (owners - described, described - owners)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_rope_tables_are_transformers_own(name, tiny_model_factory):
    """Each layer's table is the one transformers' rotary module computes for its layer type."""
    model, _, _ = load_model(tiny_model_factory(name))
    spec = decoder_spec(model.config)
    rotary = model.model.rotary_emb
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * spec.num_layers
    for layer, table_name in enumerate(spec.layer_rope):
        if table_name is None:
            continue
        per_type = len(spec.rope_tables) > 1
        prefix = f"{types[layer]}_" if per_type else ""
        table = spec.rope_tables[table_name]
        want = getattr(rotary, f"{prefix}inv_freq").float().numpy()
        np.testing.assert_array_equal(table.inv_freq, want)
        assert table.scaling == pytest.approx(float(getattr(rotary, f"{prefix}attention_scaling", 1.0)))


# what each family and variant changes, as the spec must say it
DETAILS = {
    "qwen3": dict(qk_norm=True, head_dim=24, attn_scale=24 ** -0.5),
    "gemma2": dict(sandwich_norms=True, norm_offset=True, embed_scale=8.0, attn_softcap=5.0,
                   final_softcap=3.0, sliding_windows=[8, None], attn_scale=24 ** -0.5,
                   qk_norm=False),
    "gemma3_text": dict(sandwich_norms=True, norm_offset=True, embed_scale=8.0, qk_norm=True,
                        sliding_windows=[8, None], attn_scale=16 ** -0.5, attn_softcap=None,
                        final_softcap=None,
                        layer_rope=["sliding_attention", "full_attention"]),
    "smollm3": dict(layer_rope=["default", None]),
    "mistral-window": dict(sliding_windows=[8, 8]),
    "phi3-longrope": dict(stored_fused=True, max_context=128),
    "llama": dict(qk_norm=False, sandwich_norms=False, attn_softcap=None, sliding_windows=[None, None]),
}


@pytest.mark.parametrize("name", sorted(DETAILS))
def test_the_spec_says_what_changes_the_numbers(name):
    spec = _spec(name)
    for field, want in DETAILS[name].items():
        assert getattr(spec, field) == want, field


def test_rope_variants():
    gemma3 = _spec("gemma3_text")
    local, full = gemma3.rope_tables["sliding_attention"], gemma3.rope_tables["full_attention"]
    d = gemma3.head_dim
    # own bases (10k local, 1M global) and linear scaling (factor 8) of the global table only
    np.testing.assert_allclose(local.inv_freq, 10_000.0 ** (-np.arange(0, d, 2) / d), rtol=1e-6)
    np.testing.assert_allclose(full.inv_freq, 1_000_000.0 ** (-np.arange(0, d, 2) / d) / 8, rtol=1e-6)
    llama3 = _spec("llama3-rope").rope_tables["default"]
    plain = 500_000.0 ** (-np.arange(0, 16, 2) / 16)
    assert not np.allclose(llama3.inv_freq, plain)  # llama3 scaling rescales the low frequencies
    np.testing.assert_allclose(llama3.inv_freq[0], plain[0], rtol=1e-6)  # but not the highest
    phi = _spec("phi3-longrope").rope_tables["default"]
    assert phi.rotary_dim == 12 and phi.rotary_dim < _spec("phi3-longrope").head_dim  # partial
    assert phi.scaling > 1.0  # longrope's attention factor


def test_dynamic_rope_is_refused():
    config = _config("llama")
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match="'dynamic'.*static RoPE variants only"):
        decoder_spec(config)


def test_every_family_has_a_tiny_model_and_a_registry_entry():
    assert set(FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
                             "gemma3_text", "smollm3"}
    for name, (family, _) in VARIANTS.items():
        assert family in FAMILIES, name
    assert not set(UNREGISTERED) & set(FAMILIES)


@pytest.mark.parametrize("name", ALL_TINY)
def test_blocks_run_one_by_one_give_transformers_hidden_states(name, tiny_model_factory):
    """Each block gets its own mask and rotary tables (sliding-window and global layers, per-type
    RoPE bases, layers without RoPE): the block-by-block path that profile and quantize take equals
    the model's forward at every layer, on sequences longer than the windows."""
    model, _, info = load_model(tiny_model_factory(name), allow_unknown=name in UNREGISTERED)
    ids = torch.randint(3, 380, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
    batches = capture_block_inputs(model, info, ids, batch_size=2, device="cpu")
    for index, block in enumerate(model.get_submodule(info.layers_path)):
        outputs = run_block(block, batches)
        batches = [b.advanced(o) for b, o in zip(batches, outputs)]
        if index < info.num_layers - 1:  # the last hidden state is after the final norm
            torch.testing.assert_close(torch.cat(outputs), want[index + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(UNREGISTERED))
def test_an_unregistered_family_needs_the_flag_and_names_it(name, tiny_model_factory):
    with pytest.raises(ModelLoadError) as info:
        load_model(tiny_model_factory(name))
    message = str(info.value)
    assert f"model_type={name!r}" in message and "--allow-unknown-arch" in message
    assert "gemma3_text" in message  # the registered families are listed
    _, _, described = load_model(tiny_model_factory(name), allow_unknown=True)
    assert described.model_type == name
    assert {li.role for li in described.linears} == {"q", "k", "v", "o", "gate", "up", "down"}


def test_window_variants_are_longer_than_their_windows():
    """The variants exist to exercise windows: keep the test sequences past them."""
    for name in TINY_MODELS:
        windows = [w for w in _spec(name).sliding_windows if w is not None]
        assert all(w < 24 for w in windows), name  # verify decodes from half of 48 tokens


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "gemma3_text", "gemma2"])
def test_per_head_salience_follows_the_head_layout(name, tiny_model_factory):
    from apq_sdk.calibration import load_calibration
    from apq_sdk.sensitivity import ProfileSettings, profile_model

    model, tok, info = load_model(tiny_model_factory(name))
    ids, calib = load_calibration(tok, num_samples=4, seq_len=32, seed=0)
    sens = profile_model(model, info, ids, calib, ProfileSettings(batch_size=4, group_sizes=(32,),
                                                                  depth_samples=0))
    assert sorted(sens.heads, key=int) == [str(i) for i in range(info.num_layers)]
    for layer, heads in sens.heads.items():
        assert len(heads["q"]) == len(heads["o"]) == info.num_attention_heads, layer
        assert len(heads["k"]) == len(heads["v"]) == info.num_key_value_heads, layer
        assert len(heads["kv_group"]) == info.num_key_value_heads
        assert math.isclose(sum(heads["kv_group"]), 1.0, rel_tol=1e-9)
        assert all(v >= 0 for role in ("q", "k", "v", "o") for v in heads[role])


def test_q_k_norms_divide_out_a_heads_scale():
    """Behind a per-head norm, an error that only rescales a head costs nothing; without one
    it costs its full size."""
    from apq_sdk.model_io import ModelInfo
    from apq_sdk.sensitivity import _per_head_errors

    class Norm(torch.nn.Module):  # RMSNorm over a head's dimensions, as Qwen3's q_norm
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    heads, d, k = 4, 8, 32
    info = ModelInfo(name="t", source="t", architecture="t", model_type="qwen3", num_layers=1,
                     hidden_size=k, num_attention_heads=heads, num_key_value_heads=2,
                     head_dim=d, vocab_size=10, tie_word_embeddings=True, config_sha256="",
                     weights_sha256="", layers_path="model.layers")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(heads * d, k, generator=g)
    rows = torch.randn(200, k, generator=g)
    hessian = 2 * rows.T @ rows / rows.shape[0]
    delta = torch.zeros_like(weight)
    delta[:d] = 0.1 * weight[:d]  # head 0 only rescaled
    delta[d:2 * d] = 0.1 * torch.randn(d, k, generator=g) * weight[d:2 * d].std()  # head 1: noise
    plain = _per_head_errors(delta, hessian, "q", info, weight, rows, {})["q"]
    normed = _per_head_errors(delta, hessian, "q", info, weight, rows, {"q": Norm(d)})["q"]
    assert plain[0] > 0.1 * plain[1] and plain[2] == plain[3] == 0.0
    assert normed[0] < 1e-9 * plain[0]  # the norm divides the scale out
    assert normed[1] > 1e-3 * plain[1]  # noise gets through it
    # fused q/k/v rows (Phi-3) split into their heads
    fused = torch.cat([delta, torch.randn(4 * d, k, generator=g) * 0.01])
    fused_weight = torch.cat([weight, torch.randn(4 * d, k, generator=g)])
    split = _per_head_errors(fused, hessian, "qkv", info, fused_weight, rows, {})
    assert [len(split[r]) for r in ("q", "k", "v")] == [heads, 2, 2]
    np.testing.assert_allclose(split["q"], plain, rtol=1e-5)


def test_the_families_bench_runs_and_reports_what_it_measured(tmp_path, monkeypatch, capsys):
    """bench/bench_families.py on one windowed family and one unregistered model."""
    import json
    import runpy
    import sys
    from pathlib import Path

    pytest.importorskip("onnxruntime")
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_families.py"
    out = tmp_path / "families"
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [str(bench), "--only", "mistral-window", "granite",
                                      "--out", str(out)])
    runpy.run_path(str(bench), run_name="__main__")
    rows = {r["model"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    window = rows["mistral-window"]
    assert window["passed"] and window["weights_differing"] == 0
    assert window["float_full"] < 1e-5 and window["float_decode"] < 1e-5
    assert window["float_unwindowed"] > 1e-3  # the window does something
    assert window["kv_prefill"] > 8  # the package's decode check runs past the 8-token window
    assert "does not lower 'granite'" in rows["granite"]["refusal"]
    assert rows["granite"]["kl_core"] >= 0
    assert "| mistral-window |" in out.with_suffix(".md").read_text()
