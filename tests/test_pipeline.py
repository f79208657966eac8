"""End to end on tiny models of every family: profile -> plan -> quantize -> save -> load -> eval."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from apq_sdk.calibration import load_calibration
from apq_sdk.evaluate import evaluate
from apq_sdk.model_io import load_model
from apq_sdk.planning import Budget, make_plan, uniform_plan
from apq_sdk.plan_file import load_plan
from apq_sdk.sensitivity import ProfileSettings, profile_model
from apq_sdk.quantizer import load_quantized, quantize_model, save_quantized
from apq_sdk.testing import TINY_MODELS, UNREGISTERED


def _profile(path, allow_unknown=False):
    model, tok, info = load_model(path, allow_unknown=allow_unknown)
    ids, calib = load_calibration(tok, num_samples=8, seq_len=48, seed=0)
    fit, _ = load_calibration(tok, num_samples=2, seq_len=48, seed=1)
    sens = profile_model(model, info, ids, calib, ProfileSettings(batch_size=4), fit_samples=fit)
    return model, tok, info, ids, sens


@pytest.mark.parametrize("family", TINY_MODELS + tuple(UNREGISTERED))
def test_end_to_end(family, tiny_model_factory, tmp_path):
    """Every family, RoPE and window variant, and causal LMs the registry does not describe
    (allow_unknown), through profile, plan, quantize, load_quantized, eval and generate."""
    path = tiny_model_factory(family)
    unknown = family in UNREGISTERED
    model, tok, info, ids, sens = _profile(path, unknown)
    tied = info.tie_word_embeddings
    assert {e["kind"] for e in sens.modules.values()} == \
        {"linear", "lm_head"} | (set() if tied else {"embedding"})
    assert sens.fixed["params"] > 0 and sens.fixed["bytes"] == 4 * sens.fixed["params"]
    linears = [e for e in sens.modules.values() if e["kind"] == "linear"]
    assert all(e["gain"] > 0 and e["errors"]["b2g64"] > e["errors"]["b8g64"] for e in linears)
    for layer in {e["layer"] for e in linears}:  # one depth factor per block, folded into gain
        block = [e for e in linears if e["layer"] == layer]
        assert len({e["depth"] for e in block}) == 1 and block[0]["depth"] > 0
        assert all(math.isclose(e["gain"], e["block_gain"] * e["depth"]) for e in block)
    assert all(set(e["act_error_block"]) == {"64", "128"} for e in linears)
    plan = make_plan(sens, Budget(bits_per_weight=4.0, scope="linear"), head_bits="8")
    assert plan.totals.linear_bits_per_weight <= 4.0
    # what the plan and the checkpoint count is every parameter of the model
    assert plan.totals.model_params == sum(p.numel() for p in model.parameters())
    qkv = [m for n, m in plan.modules.items() if n.endswith(("q_proj", "k_proj", "v_proj"))]
    assert len({(m.bits, m.group_size) for m in qkv if m.tie_group and ".0." in m.tie_group}) <= 1
    reference, _, _ = load_model(path, allow_unknown=unknown)
    quantize_model(model, info, plan, ids)
    out = save_quantized(model, tok, plan, tmp_path / "q")
    loaded = load_quantized(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids[:2]).logits, model(input_ids=ids[:2]).logits,
                                   rtol=0, atol=0)
    result = evaluate(loaded, ids[:2], reference=reference)
    assert 0 < result.kl_divergence < 1.0 and 0 < result.top1_agreement <= 1
    generated = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    assert load_plan(out / "plan.json") == plan


def test_budget_modes_and_infeasible_budget(tiny_llama):
    from apq_sdk.errors import UsageError

    *_, sens = _profile(tiny_llama)
    tight = make_plan(sens, Budget(bits_per_weight=4.0))
    loose = make_plan(sens, Budget(bits_per_weight=6.0))
    for plan, bpw in ((tight, 4.0), (loose, 6.0)):  # the whole model, norms and head included
        assert plan.totals.model_bits_per_weight <= bpw and plan.objective.scope == "model"
        assert plan.totals.model_bytes == plan.totals.bytes + plan.totals.fixed_bytes
    assert tight.totals.model_bytes < loose.totals.model_bytes
    assert tight.totals.predicted_loss > loose.totals.predicted_loss
    linear = make_plan(sens, Budget(bits_per_weight=3.0, scope="linear"), head_bits="8")
    assert linear.totals.linear_bits_per_weight <= 3.0 and linear.modules["lm_head"].bits == 8
    assert linear.totals.model_bits_per_weight > 3.0  # the head and norms come on top
    with pytest.raises(UsageError, match="head must be fixed"):
        make_plan(sens, Budget(bits_per_weight=3.0, scope="linear"), head_bits="auto")
    reduction = make_plan(sens, Budget(memory_reduction=0.6))
    assert reduction.totals.model_bytes <= 0.4 * reduction.totals.model_fp16_bytes
    by_loss = make_plan(sens, Budget(max_loss=0.01))
    assert by_loss.objective.mode == "loss"
    with pytest.raises(UsageError, match="smallest"):
        make_plan(sens, Budget(bits_per_weight=2.0))
    with pytest.raises(UsageError, match="bytes are fixed"):
        make_plan(sens, Budget(bits_per_weight=1.5), head_bits="16")


_RUN_ONCE = """
import sys
from tests.test_pipeline import _profile
from apq_sdk.planning import Budget, make_plan
from apq_sdk.quantizer import quantize_model, save_quantized
model, tok, info, ids, sens = _profile(sys.argv[1])
plan = make_plan(sens, Budget(bits_per_weight=4.0))
quantize_model(model, info, plan, ids)
save_quantized(model, tok, plan, sys.argv[2])
"""


def test_plan_and_artifacts_are_byte_identical_across_runs(tiny_llama, tmp_path):
    """Two separate processes (as two invocations of the tool would be), same inputs and seed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    digests = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        subprocess.run([sys.executable, "-c", _RUN_ONCE, str(tiny_llama), str(out)], check=True,
                       env=env, cwd=root, capture_output=True, timeout=600)
        digests.append({name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                        for name in ("plan.json", "model.safetensors", "config.json")})
    assert digests[0] == digests[1]
    # safetensors orders metadata keys by a per-process hash: more than one key is
    # nondeterministic half of the time, which two runs alone would catch only by luck
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run0" / "model.safetensors"), "np") as f:
        assert len(f.metadata()) == 1


def test_mixed_plan_beats_uniform_rtn_on_tiny(tiny_llama):
    model, tok, info, ids, sens = _profile(tiny_llama)
    uniform = uniform_plan(sens, 3, 64)
    mixed = make_plan(sens, Budget(bits_per_weight=uniform.totals.linear_bits_per_weight,
                                   scope="linear"), activation="none", head_bits="16")
    assert mixed.totals.linear_bytes <= uniform.totals.linear_bytes
    reference, _, _ = load_model(tiny_llama)
    rtn_model, _, _ = load_model(tiny_llama)
    quantize_model(rtn_model, info, uniform, ids, method="rtn")
    quantize_model(model, info, mixed, ids)
    kl_mixed = evaluate(model, ids, reference=reference).kl_divergence
    kl_rtn = evaluate(rtn_model, ids, reference=reference).kl_divergence
    assert kl_mixed < kl_rtn


def test_failed_save_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from apq_sdk import plan_file as plan_file_mod

    model, tok, info, ids, sens = _profile(tiny_llama)
    plan = make_plan(sens, Budget(bits_per_weight=4.0))
    quantize_model(model, info, plan, ids, method="rtn")

    def broken_save_plan(plan, path):
        raise OSError("disk full")

    monkeypatch.setattr(plan_file_mod, "save_plan", broken_save_plan)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tok, plan, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_plan_for_other_weights_is_refused(tiny_model_factory):
    from apq_sdk.errors import ApqError

    *_, sens = _profile(tiny_model_factory("llama"))
    plan = make_plan(sens, Budget(bits_per_weight=4.0))
    model, tok, info = load_model(tiny_model_factory("qwen2"))
    ids, _ = load_calibration(tok, num_samples=2, seq_len=16, seed=0)
    with pytest.raises(ApqError, match="plan was made for"):
        quantize_model(model, info, plan, ids)


def test_incomplete_quantized_file_is_refused(tiny_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    from apq_sdk.errors import ModelLoadError

    model, tok, info, ids, sens = _profile(tiny_llama)
    plan = make_plan(sens, Budget(bits_per_weight=4.0))
    quantize_model(model, info, plan, ids, method="rtn")
    out = save_quantized(model, tok, plan, tmp_path / "q")
    tensors = load_file(str(out / "model.safetensors"))
    dropped = next(k for k in tensors if k.endswith("norm.weight"))
    del tensors[dropped]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "apq-quantized/plan-v1"})
    with pytest.raises(ModelLoadError, match="lacks 1 tensors the model needs"):
        load_quantized(out)
