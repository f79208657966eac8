"""apq_sdk.capabilities: one table per target, obeyed by profile (candidates), plan and check."""

from __future__ import annotations

from dataclasses import replace

import pytest

from apq_sdk.calibration import load_calibration
from apq_sdk.capabilities import GENERIC, Capabilities
from apq_sdk.errors import UsageError
from apq_sdk.model_io import load_model
from apq_sdk.planning import Budget, make_plan
from apq_sdk.sensitivity import ProfileSettings, parse_candidate_key, profile_model

# what XNNPACK- or QNN-like group kernels look like: symmetric only, one group size, no 3 bits
SYM32 = Capabilities(name="sym32-test", weight_bits=(2, 4, 8, 16), group_sizes=(32,),
                     symmetric_only=True, head_bits=(8, 16))
_PROFILES: dict = {}


def _profile(tiny_llama, caps):
    settings = ProfileSettings.for_capabilities(caps, batch_size=4)
    key = (settings.symmetric, tuple(settings.group_sizes), tuple(settings.bits),
           tuple(settings.head_bits))
    if key not in _PROFILES:
        model, tok, info = load_model(tiny_llama)
        ids, calib = load_calibration(tok, num_samples=8, seq_len=48, seed=0)
        fit, _ = load_calibration(tok, num_samples=2, seq_len=48, seed=1)
        _PROFILES[key] = profile_model(model, info, ids, calib, settings, fit_samples=fit)
    return _PROFILES[key]


def test_table_checks_its_fields_with_expected_and_found():
    with pytest.raises(ValueError, match=r"weight_bits: expected values from \(2, 3, 4, 8, 16\), found 5"):
        Capabilities(name="x", weight_bits=(4, 5))
    with pytest.raises(ValueError, match="group_sizes: expected multiples of 8, found 12"):
        Capabilities(name="x", group_sizes=(12,))
    with pytest.raises(ValueError, match="default_activation: expected one of"):
        Capabilities(name="x", activation_modes=("none",), default_activation="int8-per-token-dynamic")
    with pytest.raises(ValueError, match="fused: expected values from"):
        Capabilities(name="x", fused=("qk",))


def test_hash_covers_everything_that_runs_and_nothing_else():
    base = Capabilities(name="t")
    assert replace(base, head_bits=(8, 16)).sha256() != base.sha256()
    assert replace(base, max_context=4096).sha256() != base.sha256()
    assert replace(base, symmetric_only=True).sha256() != base.sha256()
    assert replace(base, families=("llama",)).sha256() != base.sha256()
    assert replace(base, notes="prose").sha256() == base.sha256()


def test_profile_candidates_follow_the_table():
    assert GENERIC.profile_group_sizes() == (64, 128)
    assert SYM32.profile_group_sizes() == (32,)
    assert Capabilities(name="x", group_sizes=(128, 256)).profile_group_sizes() == (128,)
    settings = ProfileSettings.for_capabilities(SYM32)
    assert settings.group_sizes == (32,) and settings.symmetric is True
    # bits: the table's, always with 3 (the gains' reference) and 4 (the loss-model fit)
    assert ProfileSettings.for_capabilities(GENERIC).bits == (2, 3, 4, 8)
    assert ProfileSettings.for_capabilities(GENERIC).head_bits == (4, 8)
    four = Capabilities(name="four", weight_bits=(4, 16), head_bits=(4, 16))
    assert ProfileSettings.for_capabilities(four).bits == (3, 4)
    assert ProfileSettings.for_capabilities(four).head_bits == (4,)
    eight = Capabilities(name="eight", weight_bits=(8, 16), head_bits=(16,))
    assert ProfileSettings.for_capabilities(eight).bits == (3, 4, 8)
    assert ProfileSettings.for_capabilities(eight).head_bits == (4,)  # one, for the profile's shape


def test_symmetric_group32_no_3bit_target_gets_a_plan_it_accepts(tiny_llama):
    sens = _profile(tiny_llama, SYM32)
    assert {parse_candidate_key(k)[1] for k in sens.modules["lm_head"]["errors"]} == {32}
    for budget, head in ((Budget(bits_per_weight=3.0, scope="linear"), "8"),
                         (Budget(bits_per_weight=5.0), "auto"), (Budget(memory_reduction=0.6), "auto")):
        plan = make_plan(sens, budget, caps=SYM32, activation="none", head_bits=head)
        assert SYM32.check_plan(plan) == [], budget
        assert plan.capabilities.name == "sym32-test"
        assert plan.capabilities.sha256 == SYM32.sha256()
        quantized = [m for m in plan.modules.values() if m.bits != 16]
        assert quantized and all(m.symmetric and m.group_size == 32 for m in quantized)
        assert all(m.bits != 3 for m in plan.modules.values())


def test_auto_head_bits_choose_among_the_tables_head_bits(tiny_llama):
    sens = _profile(tiny_llama, SYM32)
    head_16_only = replace(SYM32, name="head16", head_bits=(16,))
    plan = make_plan(sens, Budget(bits_per_weight=9.0), caps=head_16_only, head_bits="auto")
    assert plan.modules["lm_head"].bits == 16
    # generous budget: the head may take 8 bits although no linear of the table does 8
    linears_4 = replace(SYM32, name="lin4", weight_bits=(4, 16), head_bits=(8,))
    plan = make_plan(sens, Budget(bits_per_weight=6.0), caps=linears_4, head_bits="auto")
    assert plan.modules["lm_head"].bits == 8 and linears_4.check_plan(plan) == []


def test_plan_refuses_what_the_table_or_the_profile_cannot_give(tiny_llama):
    asym = _profile(tiny_llama, GENERIC)
    with pytest.raises(UsageError, match="needs symmetric groups but the sensitivity map was "
                                         "profiled with asymmetric ones.*--symmetric"):
        make_plan(asym, Budget(bits_per_weight=4.0), caps=SYM32)
    with pytest.raises(UsageError, match="runs symmetric groups only"):
        make_plan(asym, Budget(bits_per_weight=4.0), caps=SYM32, symmetric=False)
    with pytest.raises(UsageError, match=r"--head-bits 4: 'sym32-test' runs head bits \(8, 16\)"):
        make_plan(_profile(tiny_llama, SYM32), Budget(bits_per_weight=4.0), caps=SYM32,
                  head_bits="4")
    only_256 = Capabilities(name="g256", group_sizes=(256,))
    with pytest.raises(UsageError, match=r"no profiled candidate fits the capability table 'g256'.*"
                                         r"groups \[64, 128\].*--target g256"):
        make_plan(asym, Budget(bits_per_weight=4.0), caps=only_256)


def test_check_names_every_module_that_does_not_fit(tiny_llama):
    plan = make_plan(_profile(tiny_llama, GENERIC), Budget(bits_per_weight=3.0))
    violations = SYM32.check_plan(plan)
    fields = {v.field for v in violations}
    assert "symmetric" in fields and "group_size" in fields
    assert all(v.module in plan.modules for v in violations)
    assert any("not in (32,)" in str(v) for v in violations)


def test_whole_groups_tables_plan_only_groups_that_divide_each_layer(tmp_path):
    """XNNPACK's and TensorRT's blocked kernels (and coreai-opt) need a group size that divides
    the layer's input width; ExecuTorch's own 8da4w recipe silently leaves such layers in float
    (SmolLM2's width 576 at groups of 128). Here the MLP's down projection is 96 wide: groups of
    64 leave a short last group there, so a whole-groups table plans it at 32 (or 16 bits) and
    refuses a plan that does not, naming the groups that divide it."""
    from apq_sdk.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "m", "llama", overrides={"intermediate_size": 96})
    model, tok, info = load_model(path)
    ids, calib = load_calibration(tok, num_samples=8, seq_len=48, seed=0)
    fit, _ = load_calibration(tok, num_samples=2, seq_len=48, seed=1)
    settings = ProfileSettings(group_sizes=(32, 64), batch_size=4)
    sens = profile_model(model, info, ids, calib, settings, fit_samples=fit)
    ragged = Capabilities(name="ragged-ok", weight_bits=(2, 4, 8, 16), group_sizes=(32, 64))
    whole = replace(ragged, name="whole-test", whole_groups=True)
    assert whole.sha256() != ragged.sha256()
    assert whole.runs_group(96, 32) and not whole.runs_group(96, 64) and ragged.runs_group(96, 64)
    used = set()
    for budget in (Budget(bits_per_weight=3.0, scope="linear"), Budget(bits_per_weight=4.5),
                   Budget(memory_reduction=0.6)):
        head = "8" if budget.scope == "linear" else "auto"
        plan = make_plan(sens, budget, caps=whole, head_bits=head)
        assert whole.check_plan(plan) == [], budget
        for name, m in plan.modules.items():
            if m.bits != 16:
                assert m.shape[1] % m.group_size == 0, (name, m.shape, m.group_size)
                used.add((m.shape[1], m.group_size))
        loose = make_plan(sens, budget, caps=ragged, head_bits=head)
        for v in whole.check_plan(loose):
            assert v.field == "group_size" and v.found == 64 and v.allowed == (32,), v
    assert (96, 32) in used and (64, 64) in used  # not everything fell back to the smallest group
    # the ragged table does use groups of 64 on the 96-wide layers at some budget: the check bites
    loose = make_plan(sens, Budget(bits_per_weight=2.6, scope="linear"), caps=ragged, head_bits="8")
    assert any(v.module.endswith("down_proj") for v in whole.check_plan(loose))


# what XNNPACK runs (the android table): int4 only with dynamic int8 activations, bfloat16 scales,
# float32 weights for 16-bit layers
XNN_LIKE = Capabilities(name="xnn-like", weight_bits=(4, 16), group_sizes=(32,), symmetric_only=True,
                        whole_groups=True, head_bits=(4, 16),
                        activation_modes=("int8-per-token-asym-dynamic",),
                        default_activation="int8-per-token-asym-dynamic",
                        quantized_activation="int8-per-token-asym-dynamic",
                        scale_dtype="bfloat16", float_weight_bytes=4, tied_lookup="copy")


def test_fields_added_later_leave_older_tables_hashes_alone():
    """scale_dtype, quantized_activation and float_weight_bytes came after tables were
    published: a table that leaves them at their defaults hashes as it did before them."""
    import hashlib
    import json

    base = Capabilities(name="t", head_bits=(8, 16))
    data = base.to_dict()
    for key in ("notes", "scale_dtype", "quantized_activation", "float_weight_bytes"):
        data.pop(key)
    assert base.sha256() == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    for change in (dict(scale_dtype="bfloat16"), dict(float_weight_bytes=4),
                   dict(activation_modes=("none", "int8-per-token-asym-dynamic"),
                        quantized_activation="int8-per-token-asym-dynamic")):
        assert replace(base, **change).sha256() != base.sha256(), change
    with pytest.raises(ValueError, match="scale_dtype: expected one of .*found 'float8'"):
        Capabilities(name="x", scale_dtype="float8")
    with pytest.raises(ValueError, match="float_weight_bytes: expected 2 .* or 4 .*, found 3"):
        Capabilities(name="x", float_weight_bytes=3)
    with pytest.raises(ValueError, match="quantized_activation: expected one of activation_modes"):
        Capabilities(name="x", quantized_activation="int8-per-token-asym-dynamic")


def test_a_table_whose_low_bit_layers_need_dynamic_activations(tiny_llama):
    """The planner gives every quantized layer (the head included) the table's activation mode
    and bfloat16-grid scales, and 16-bit layers float activations; 16-bit layers weigh float32."""
    sens = _profile(tiny_llama, XNN_LIKE)
    plan = make_plan(sens, Budget(bits_per_weight=8.0), caps=XNN_LIKE,
                     activation="int8-per-token-asym-dynamic")
    assert XNN_LIKE.check_plan(plan) == []
    quantized = [m for m in plan.modules.values() if m.bits != 16]
    floats = [m for m in plan.modules.values() if m.bits == 16 and m.kind != "embedding"]
    assert quantized and floats, "the budget should leave some layers at 16 bits"
    assert all(m.activation == "int8-per-token-asym-dynamic" and m.scale_dtype == "bfloat16"
               for m in quantized)
    assert all(m.activation == "none" and m.scale_dtype == "float16" for m in floats)
    assert XNN_LIKE.stored_bytes(64, 96, 16, None, True) == 64 * 96 * 4
    # a plan made for another table: weight-only int4 and float16-grid scales are refused
    other = make_plan(sens, Budget(bits_per_weight=8.0), caps=replace(
        XNN_LIKE, name="weight-only", activation_modes=("none",), default_activation="none",
        quantized_activation=None, scale_dtype="float16"), activation="none")
    found = {(v.field, str(v.found)) for v in XNN_LIKE.check_plan(other)}
    assert ("activation", "none") in found and ("scale_dtype", "float16") in found


@pytest.mark.parametrize("bits_per_weight", [6.0, 10.0, 16.0])
def test_a_budget_bounds_what_the_target_stores_float_heads_included(tiny_llama, bits_per_weight):
    """A tied 16-bit head on a table that stores float32 GEMM weights and a float16 lookup copy
    weighs both: the plan stays within the budget whatever the head gets."""
    sens = _profile(tiny_llama, XNN_LIKE)
    plan = make_plan(sens, Budget(bits_per_weight=bits_per_weight), caps=XNN_LIKE,
                     activation="int8-per-token-asym-dynamic")
    t = plan.totals
    assert t.target_bytes <= bits_per_weight * t.model_params / 8
