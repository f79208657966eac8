"""The plan file: canonical JSON, errors naming the field, atomic save, the table."""

from __future__ import annotations

import copy
import io
import json
import os

import pytest

from apq_sdk.plan_file import (
    PLAN_VERSION,
    CalibrationInfo,
    CapabilitiesRef,
    LossModel,
    ModelInfo,
    ModulePlan,
    Objective,
    Plan,
    PlanError,
    compute_totals,
    load_plan,
    plan_sha256,
    render_plan_table,
    save_plan,
    schema_path,
)
from apq_sdk.quant.packing import stored_bytes

UP = "model.layers.0.mlp.up_proj"
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4


def _module(kind, shape, bits, group, sym=False, act="int8-per-token-dynamic", clip=1.0,
            tie=None, loss=0.0):
    n, k = shape
    return ModulePlan(
        kind=kind, shape=shape, bits=bits, group_size=group, symmetric=sym, activation=act,
        act_clip=clip, tie_group=tie, predicted_loss=loss,
        bytes=stored_bytes(n, k, bits, group, sym),
    )


def make_plan() -> Plan:
    hidden, inter, vocab = 64, 128, 256
    modules = {
        "model.embed_tokens": _module("embedding", (vocab, hidden), 8, 32, act="none",
                                      tie="embed", loss=0.01),
        "lm_head": _module("lm_head", (vocab, hidden), 8, 32, tie="embed", loss=0.02),
        "model.layers.0.self_attn.q_proj": _module("linear", (hidden, hidden), 4, 32, loss=0.125),
        "model.layers.0.self_attn.k_proj": _module("linear", (32, hidden), 3, 32, sym=True,
                                                   loss=0.25),
        "model.layers.0.self_attn.v_proj": _module("linear", (32, hidden), 16, None, act="none"),
        "model.layers.0.self_attn.o_proj": _module("linear", (hidden, hidden), 2, 64, clip=0.875,
                                                   loss=1.5),
        "model.layers.0.mlp.gate_proj": _module("linear", (inter, hidden), 4, 32, loss=0.3),
        UP: _module("linear", (inter, hidden), 4, 32, loss=0.1),
        "model.layers.0.mlp.down_proj": _module("linear", (hidden, inter), 8, 128, loss=0.01),
    }
    return Plan(
        sdk_version="0.1.0",
        model=ModelInfo(
            name="tiny-llama", architecture="LlamaForCausalLM", model_type="llama",
            source="/models/tiny", config_sha256=SHA_A, weights_sha256=SHA_B, num_layers=1,
            hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=vocab, tie_word_embeddings=True,
        ),
        calibration=CalibrationInfo(source="builtin:wikitext-mini", kind="builtin", sha256=SHA_B,
                                    num_samples=8, seq_len=128, seed=0),
        objective=Objective(mode="memory", bits_per_weight=4.5, budget_bytes=10**6),
        capabilities=CapabilitiesRef(name="generic", sha256=SHA_A),
        loss_model=LossModel(kind="linear", coefficients={"slope": 1.25, "intercept": 0.0}),
        modules=modules,
        totals=compute_totals(modules),
    )


def plan_doc() -> dict:
    return json.loads(make_plan().to_json())


def retotal(doc: dict) -> dict:
    """Recompute totals after editing modules, so only the intended problem remains."""
    mods = doc["modules"].values()
    params = sum(m["shape"][0] * m["shape"][1] for m in mods)
    nbytes = sum(m["bytes"] for m in mods)
    lin = [m for m in mods if m["kind"] == "linear"]
    lp = sum(m["shape"][0] * m["shape"][1] for m in lin)
    lb = sum(m["bytes"] for m in lin)
    doc["totals"].update(
        bytes=nbytes, params=params, fp16_bytes=2 * params, bits_per_weight=8 * nbytes / params,
        predicted_loss=sum(m["predicted_loss"] for m in mods), linear_bytes=lb,
        linear_params=lp, linear_bits_per_weight=8 * lb / lp,
    )
    t = doc["totals"]
    t.update(model_params=params + t["fixed_params"], model_bytes=nbytes + t["fixed_bytes"])
    t["model_bits_per_weight"] = 8 * t["model_bytes"] / t["model_params"]
    t["target_bits_per_weight"] = 8 * t["target_bytes"] / t["model_params"]
    return doc


def write(tmp_path, doc) -> str:
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(p)


# ---- round trip --------------------------------------------------------------------------------


def test_round_trip_is_byte_identical(tmp_path):
    plan = make_plan()
    text = plan.to_json()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    assert path.read_text() == text
    assert load_plan(path) == plan
    assert make_plan().to_json() == text  # equal plans, equal bytes
    assert plan_sha256(plan) == plan_sha256(load_plan(path))
    assert len(plan_sha256(plan)) == 64


def test_module_order_does_not_change_the_file():
    plan = make_plan()
    reordered = Plan(**{**plan.__dict__, "modules": dict(reversed(list(plan.modules.items())))})
    assert reordered.to_json() == plan.to_json()


def test_sha_changes_with_content():
    plan = make_plan()
    doc = plan_doc()
    doc["calibration"]["seed"] = 1
    assert plan_sha256(Plan.from_dict(doc)) != plan_sha256(plan)


def test_plan_matches_schema_and_schema_is_valid():
    from jsonschema import Draft202012Validator

    schema = json.loads(schema_path().read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    Draft202012Validator(schema).validate(plan_doc())
    assert plan_doc()["version"] == PLAN_VERSION == 2
    assert plan_doc()["format"] == "apq-plan"


def test_totals_are_sums():
    t = make_plan().totals
    mods = make_plan().modules.values()
    assert t.bytes == sum(m.bytes for m in mods)
    assert t.fp16_bytes == 2 * t.params
    assert t.bits_per_weight == pytest.approx(8 * t.bytes / t.params)
    assert t.linear_params == sum(m.params for m in mods if m.kind == "linear")


# ---- errors name the field ---------------------------------------------------------------------


def _del(d, *keys):
    for k in keys[:-1]:
        d = d[k]
    del d[keys[-1]]


CORRUPTIONS = {
    # name: (edit, [fragments the message must contain])
    "missing field": (
        lambda d: _del(d, "modules", UP, "bits"),
        [f'modules["{UP}"].bits', "missing required field", 'add "bits"'],
    ),
    "missing top-level section": (
        lambda d: _del(d, "totals"), ["totals: missing required field"],
    ),
    "wrong type": (
        lambda d: d["model"].update(num_layers="1"),
        ["model.num_layers: expected integer, found string '1'", "fix:"],
    ),
    "bad bits": (
        lambda d: d["modules"][UP].update(bits=5),
        [f'modules["{UP}"].bits: expected one of 2, 3, 4, 8, 16, found 5', "fix: set it to one of"],
    ),
    "float bits": (
        lambda d: d["modules"][UP].update(bits=4.0),
        [f'modules["{UP}"].bits: expected one of 2, 3, 4, 8, 16, found 4.0'],
    ),
    "bad activation": (
        lambda d: d["modules"][UP].update(activation="int4"),
        [f'modules["{UP}"].activation: expected one of "int8-per-token-dynamic", '
         f'"int8-per-block-dynamic", "int8-per-token-asym-dynamic", "none"'],
    ),
    "per-block activations on a 16-bit layer": (
        lambda d: d["modules"][UP].update(activation="int8-per-block-dynamic", bits=16,
                                          group_size=None),
        [f'modules["{UP}"].activation: expected \'none\' or \'int8-per-token-dynamic\' for a '
         f'16-bit layer'],
    ),
    "asymmetric per-token activations on a 16-bit layer": (
        lambda d: d["modules"][UP].update(activation="int8-per-token-asym-dynamic", bits=16,
                                          group_size=None),
        [f'modules["{UP}"].activation: expected \'none\' or \'int8-per-token-dynamic\' for a '
         f'16-bit layer (int8-per-token-asym-dynamic quantizes'],
    ),
    "bad scale grid": (
        lambda d: d["modules"][UP].update(scale_dtype="float8"),
        [f'modules["{UP}"].scale_dtype: expected one of "float16", "bfloat16", "qnn-lpbq"'],
    ),
    "qnn grid on an asymmetric layer": (
        lambda d: d["modules"][UP].update(scale_dtype="qnn-lpbq", symmetric=False),
        [f'modules["{UP}"].symmetric: expected true for scale_dtype \'qnn-lpbq\''],
    ),
    "bad sha": (
        lambda d: d["model"].update(config_sha256="ABC"),
        ["model.config_sha256: expected a lowercase hex SHA-256", "found 'ABC'"],
    ),
    "unexpected field": (
        lambda d: d["totals"].update(extra=1), ["totals.extra: unexpected field", "remove it"],
    ),
    "act_clip out of range": (
        lambda d: d["modules"][UP].update(act_clip=1.5),
        [f'modules["{UP}"].act_clip: expected a number <= 1, found 1.5'],
    ),
    "wrong format": (
        lambda d: d.update(format="gguf"), ['format: expected "apq-plan", found \'gguf\''],
    ),
    "calibration kind": (
        lambda d: d["calibration"].update(kind="web"),
        ['calibration.kind: expected one of "file", "data-dir", "builtin", found \'web\''],
    ),
    "version too new": (
        lambda d: d.update(version=3, future_section={}),
        ["version", "newer", "upgrade apq-sdk"],
    ),
    "version not an integer": (
        lambda d: d.update(version="1"), ["version: expected the integer 2, found '1'"],
    ),
    "bytes inconsistent with shape/bits/group": (
        lambda d: retotal(d) if d["modules"][UP].update(bytes=d["modules"][UP]["bytes"] + 1) is None
        else None,
        [f'modules["{UP}"].bytes: expected {stored_bytes(128, 64, 4, 32, False)}',
         f"found {stored_bytes(128, 64, 4, 32, False) + 1}", "4 bits, group 32"],
    ),
    "group_size set for 16 bits": (
        lambda d: d["modules"]["model.layers.0.self_attn.v_proj"].update(group_size=32),
        ['modules["model.layers.0.self_attn.v_proj"].group_size: expected null when bits is 16'],
    ),
    "group_size null for 4 bits": (
        lambda d: d["modules"][UP].update(group_size=None),
        [f'modules["{UP}"].group_size: expected an integer when bits is 4, found null'],
    ),
    "group not a multiple of 8": (
        lambda d: d["modules"][UP].update(group_size=12),
        [f'modules["{UP}"].group_size: expected a positive multiple of 8, found 12',
         "need not divide the in-features"],
    ),
    "group not positive": (
        lambda d: d["modules"][UP].update(group_size=0),
        [f'modules["{UP}"].group_size: expected a number >= 8, found 0'],
    ),
    "K not a multiple of 8": (
        lambda d: d["modules"][UP].update(shape=[128, 60]),
        [f'modules["{UP}"].shape[1]: expected a multiple of 8 when bits is 4', "found 60",
         "bits 16"],
    ),
    "ragged group with bytes of the divisible layout": (
        lambda d: d["modules"][UP].update(group_size=24),  # G = ceil(64 / 24) = 3, not 2
        [f'modules["{UP}"].bytes: expected {stored_bytes(128, 64, 4, 24, False)}',
         f"found {stored_bytes(128, 64, 4, 32, False)}", "4 bits, group 24"],
    ),
    "totals bytes": (
        lambda d: d["totals"].update(bytes=d["totals"]["bytes"] + 8),
        ["totals.bytes: expected", "(the sum over modules)"],
    ),
    "totals predicted loss": (
        lambda d: d["totals"].update(predicted_loss=d["totals"]["predicted_loss"] * 2),
        ["totals.predicted_loss: expected", "(from the modules)"],
    ),
    "totals bits per weight": (
        lambda d: d["totals"].update(bits_per_weight=d["totals"]["bits_per_weight"] + 0.01),
        ["totals.bits_per_weight: expected"],
    ),
    "tie group mismatch": (
        lambda d: retotal(d) if d["modules"]["lm_head"].update(
            bits=4, bytes=stored_bytes(256, 64, 4, 32, False)) is None else None,
        ['modules["model.embed_tokens"].bits', 'modules["lm_head"]', 'tie_group "embed"',
         "found 8"],
    ),
    "memory objective without budget": (
        lambda d: d["objective"].update(budget_bytes=None),
        ["objective.budget_bytes: expected an integer when mode is \"memory\""],
    ),
    "embedding with int8 activations": (
        lambda d: d["modules"]["model.embed_tokens"].update(activation="int8-per-token-dynamic"),
        ['modules["model.embed_tokens"].activation: expected "none" for an embedding'],
    ),
    "empty modules": (
        lambda d: d.update(modules={}), ["modules: expected an object with at least 1 entry"],
    ),
    "coefficient not a number": (
        lambda d: d["loss_model"]["coefficients"].update(slope="x"),
        ['loss_model.coefficients["slope"]: expected number'],
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_names_the_field(tmp_path, name):
    edit, fragments = CORRUPTIONS[name]
    doc = plan_doc()
    edit(doc)
    path = write(tmp_path, doc)
    with pytest.raises(PlanError) as ei:
        load_plan(path)
    msg = str(ei.value)
    assert msg.startswith(path + ": ")
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert "fix:" in msg or "upgrade" in msg
    # the same error without a file
    with pytest.raises(PlanError):
        Plan.from_json(json.dumps(doc))


@pytest.mark.parametrize("k, group", [(64, 48), (576, 128), (200, 64), (40, 64)])
def test_group_size_need_not_divide_k(tmp_path, k, group):
    """A ragged last group (hidden size 576 with g = 128, ...) is a valid plan; G = ceil(K / g)."""
    doc = plan_doc()
    n_groups = -(-k // group)
    want = 128 * k * 4 // 8 + 128 * n_groups * 2 + 128 * ((n_groups * 4 + 7) // 8)
    doc["modules"][UP].update(shape=[128, k], group_size=group, bytes=want)
    retotal(doc)
    plan = load_plan(write(tmp_path, doc))
    assert plan.modules[UP].group_size == group and plan.modules[UP].bytes == want
    assert Plan.from_json(plan.to_json()) == plan
    from jsonschema import Draft202012Validator

    Draft202012Validator(json.loads(schema_path().read_text())).validate(doc)


def test_ragged_module_bytes_hand_computed():
    m = _module("linear", (576, 576), 4, 128)
    assert m.bytes == 576 * 288 + 576 * 5 * 2 + 576 * 3 == 173_376


def test_error_path_attribute():
    doc = plan_doc()
    doc["modules"][UP]["bits"] = 5
    with pytest.raises(PlanError) as ei:
        Plan.from_dict(doc)
    assert ei.value.path == f'modules["{UP}"].bits'


def test_direct_construction_is_checked():
    with pytest.raises(PlanError, match="bits: expected one of 2, 3, 4, 8, 16, found 5"):
        ModulePlan(kind="linear", shape=(8, 32), bits=5, group_size=32, symmetric=True,
                   bytes=100, predicted_loss=0.0)
    with pytest.raises(PlanError, match="calibration.seed: expected an integer >= 0, found -1"):
        CalibrationInfo(source="x", kind="file", sha256=SHA_A, num_samples=1, seq_len=8, seed=-1)
    plan = make_plan()
    with pytest.raises(PlanError, match="totals.bytes"):
        Plan(**{**plan.__dict__, "totals": compute_totals({
            k: v for k, v in plan.modules.items() if k != UP})})


def test_not_json(tmp_path):
    path = write(tmp_path, "{ this is not json")
    with pytest.raises(PlanError) as ei:
        load_plan(path)
    msg = str(ei.value)
    assert path in msg and "not valid JSON" in msg and "line 1 column 3" in msg
    path = write(tmp_path, "\x00\xff binary")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "bin.json")


def test_json_but_not_an_object(tmp_path):
    with pytest.raises(PlanError, match=r"\(plan\): expected object, found array"):
        load_plan(write(tmp_path, "[1, 2]"))


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="plan file not found"):
        load_plan(tmp_path / "nope.json")


# ---- saving ------------------------------------------------------------------------------------


def test_save_is_atomic(tmp_path, monkeypatch):
    plan = make_plan()
    target = tmp_path / "plan.json"
    target.write_text("old contents")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_plan(plan, target)
    assert target.read_text() == "old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temp file left
    monkeypatch.undo()
    save_plan(plan, target)
    assert target.read_text() == plan.to_json()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


# ---- display -----------------------------------------------------------------------------------


def test_render_plan_table():
    from rich.console import Console
    from rich.table import Table

    plan = make_plan()
    table = render_plan_table(plan)
    assert isinstance(table, Table)
    assert [c.header for c in table.columns] == [
        "module", "kind", "shape", "bits", "group", "sym", "activation", "bytes", "predicted loss"]
    console = Console(file=io.StringIO(), width=220, color_system=None)
    console.print(table)
    out = console.file.getvalue()
    assert UP in out and "128x64" in out and "int8-per-token-dynamic" in out
    assert f"{plan.totals.bytes:,}" in out
    assert f"{plan.totals.bits_per_weight:.3f} bits/weight" in out
    assert "clip 0.875" in out
    assert len(table.rows) == len(plan.modules)


def test_copy_equality():
    plan = make_plan()
    assert copy.deepcopy(plan) == plan


def test_version_1_plans_are_read_and_upgraded(tmp_path):
    doc = plan_doc()
    doc["version"] = 1
    del doc["objective"]["scope"]
    del doc["model"]["tokenizer_sha256"]
    for key in ("fixed_params", "fixed_bytes", "model_params", "model_bytes",
                "model_bits_per_weight", "target_bytes", "target_bits_per_weight"):
        del doc["totals"][key]
    plan = load_plan(write(tmp_path, doc))
    assert plan.version == PLAN_VERSION == 2
    assert plan.objective.scope == ("linear" if doc["objective"]["bits_per_weight"] else "model")
    t = plan.totals
    assert (t.fixed_params, t.model_params, t.model_bytes) == (0, t.params, t.bytes)
    doc["objective"]["scope"] = "model"  # a v2 field in a v1 file is refused by the v1 schema
    with pytest.raises(PlanError, match="objective.scope: unexpected field"):
        load_plan(write(tmp_path, doc))


def test_whole_model_totals_count_what_is_outside_the_plan(tmp_path):
    doc = plan_doc()
    doc["totals"].update(fixed_params=1000, fixed_bytes=4000)
    retotal(doc)
    plan = load_plan(write(tmp_path, doc))
    t = plan.totals
    assert t.model_params == t.params + 1000 and t.model_bytes == t.bytes + 4000
    assert t.model_bits_per_weight == pytest.approx(8 * t.model_bytes / t.model_params)
    doc["totals"]["model_bytes"] += 1
    with pytest.raises(PlanError, match=r"totals.model_bytes: expected \d+ \(the sum over modules\)"):
        load_plan(write(tmp_path, doc))
