"""The command line: the pipeline through `apq-sdk`, exit codes and error messages."""

from __future__ import annotations

import json

from click.testing import CliRunner

from apq_sdk.cli import main


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_pipeline_on_tiny_model(tiny_llama, tmp_path):
    sens = tmp_path / "s.json"
    result = _run(["profile", "-m", str(tiny_llama), "-n", "8", "-L", "48", "-o", str(sens)])
    assert result.exit_code == 0, result.output
    assert sens.with_suffix(".png").stat().st_size > 1000
    plan = tmp_path / "p.json"
    result = _run(["plan", "-s", str(sens), "--bits-per-weight", "4", "-o", str(plan)])
    assert result.exit_code == 0, result.output
    result = _run(["plan", "show", str(plan)])
    assert result.exit_code == 0 and "q_proj" in result.output
    out = tmp_path / "q"
    result = _run(["quantize", "-m", str(tiny_llama), "--plan", str(plan), "-n", "8", "-L", "48",
                   "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = tmp_path / "t.txt"
    text.write_text("a small evaluation text about quantization and language models. " * 80)
    result = _run(["eval", "-q", str(out), "-m", str(tiny_llama), "--text", str(text),
                   "--window-len", "64", "-o", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["perplexity"] > 1 and 0 <= data["top1_agreement"] <= 1


def test_usage_error_exit_2(tmp_path):
    sens = tmp_path / "s.json"
    sens.write_text("{}")
    result = _run(["plan", "-s", str(sens), "--bits-per-weight", "4", "--max-loss", "1%"])
    assert result.exit_code == 2 and "exactly one budget" in result.output


def test_failure_exit_1_for_missing_model(tmp_path):
    result = _run(["profile", "-m", str(tmp_path / "missing"), "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 1 and "not found" in result.output
    assert not (tmp_path / "s.json").exists()


def test_corrupt_plan_names_the_field(tmp_path):
    plan = tmp_path / "p.json"
    plan.write_text('{"format": "apq-plan", "version": 1}')
    result = _run(["plan", "show", str(plan)])
    assert result.exit_code == 1
    assert f"{plan}: sdk_version: missing required field" in result.output
    assert "fix: add \"sdk_version\"" in result.output and "(and 7 more problems)" in result.output


def test_unfused_plan_lets_qkv_differ(tiny_llama, tmp_path):
    sens = tmp_path / "s.json"
    assert _run(["profile", "-m", str(tiny_llama), "-n", "8", "-L", "48", "-o", str(sens)]).exit_code == 0
    fused, unfused = tmp_path / "f.json", tmp_path / "u.json"
    for flag, out in (("--share-fused", fused), ("--no-share-fused", unfused)):
        result = _run(["plan", "-s", str(sens), "--bits-per-weight", "3.5", flag, "-o", str(out)])
        assert result.exit_code == 0, result.output
    f = json.loads(fused.read_text())["modules"]
    u = json.loads(unfused.read_text())["modules"]
    assert f["model.layers.0.self_attn.q_proj"]["tie_group"] == "model.layers.0.self_attn.qkv"
    assert all(m["tie_group"] is None for m in u.values())
    # the unconstrained optimum can only be at least as good as the constrained one
    assert json.loads(unfused.read_text())["totals"]["predicted_loss"] <= \
        json.loads(fused.read_text())["totals"]["predicted_loss"] + 1e-12


def test_target_options_are_name_value_pairs_checked_before_any_work(tiny_llama, tmp_path):
    """--target-option NAME=VALUE: malformed, repeated, or not the target's own option: exit 2
    with what was expected, and nothing written."""
    cases = [(["-X", "artifacts"], "expected NAME=VALUE"),
             (["-X", "a=1", "-X", "a=2"], "given twice"),
             (["-X", "threads=4"], "target 'arm64-linux' has no build option 'threads'; its "
                                   "options: it has none")]
    for extra, message in cases:
        result = _run(["build", "-t", "arm64-linux", "-m", str(tiny_llama), "-o",
                       str(tmp_path / "out"), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    result = _run(["build", "-t", "all", "-X", "artifacts=coreml", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "name it with --target" in result.output
    assert not (tmp_path / "out").exists()
