"""Faulty and hostile inputs (issue 10): each either works or stops with one clear message and a
non-zero exit, before any long work starts where it can, and nothing of the user's is lost.

Data corrupted or lost: a model missing a tensor, caches that mix two models up, an output
directory of the user's replaced. Errors that hid the cause: file-system problems, lowering
errors, plans and budgets that do not fit, NaN weights, broken files of every kind, tracebacks.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from apq_sdk.cli import main
from apq_sdk.errors import ApqError, ModelLoadError, UsageError
from apq_sdk.model_io import load_model

SMALL = ["-n", "4", "-L", "32"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    from apq_sdk.calibration import builtin_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(builtin_text()[:30_000])
    return path


def run(args, **kw):
    result = CliRunner().invoke(main, [str(a) for a in args], **kw)
    assert "Traceback" not in result.output, result.output
    return result


def _copy(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


def _edit_weights(model: Path, edit) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


# -- 1. a model missing a weight tensor --------------------------------------------------------------


def test_missing_unexpected_and_misshapen_tensors_are_named(tiny_llama, tmp_path):
    missing = _copy(tiny_llama, tmp_path / "missing")
    _edit_weights(missing, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"1 tensor missing: model\.layers\.1\.mlp\.down_proj"
                                             r"\.weight.*initialised at random"):
        load_model(missing)
    extra = _copy(tiny_llama, tmp_path / "extra")
    _edit_weights(extra, lambda t: t.update({"model.layers.9.extra.weight": t["model.norm.weight"]}))
    with pytest.raises(ModelLoadError, match=r"1 tensor unexpected: model\.layers\.9\.extra\.weight"):
        load_model(extra)
    result = run(["build", "--target", "arm64-linux", "-m", missing, "-o", tmp_path / "out", *SMALL])
    assert result.exit_code == 1 and "down_proj.weight" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- 2. caches that mix models up --------------------------------------------------------------------


def test_a_model_with_another_tokenizer_gets_its_own_tokenizer_name_and_source(tiny_llama, tmp_path,
                                                                               calib):
    a = _copy(tiny_llama, tmp_path / "tiny-llama")
    b = _copy(tiny_llama, tmp_path / "tiny-llama-tok")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # the same vocabulary size, other merges: trained on other text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["zebra quantum xylophone " * 400 + calib.read_text()[-20000:]],
                            trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(b)
    assert (a / "tokenizer.json").read_bytes() != (b / "tokenizer.json").read_bytes()
    for model, out in ((a, tmp_path / "pa"), (b, tmp_path / "pb")):
        result = run(["build", "--target", "arm64-linux", "-m", model, "-o", out, "--calib", calib,
                      *SMALL, "--verify-windows", "1"])
        assert result.exit_code == 0, result.output
    pkg_b = tmp_path / "pb" / "tiny-llama-tok-arm64-linux"
    b_vocab = json.loads((b / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((pkg_b / "tokenizer.json").read_text())["model"]["vocab"] == b_vocab
    for doc in (json.loads((pkg_b / "plan.json").read_text())["model"],
                json.loads((pkg_b / "manifest.json").read_text())["model"]):
        assert doc["name"] == "tiny-llama-tok" and doc["source"] == str(b)


# -- 3. an output directory of the user's ------------------------------------------------------------


def _plan(tiny_llama, tmp_path, calib) -> Path:
    sens, plan = tmp_path / "s.json", tmp_path / "p.json"
    assert run(["profile", "-m", tiny_llama, *SMALL, "--calib", calib, "-o", sens]).exit_code == 0
    assert run(["plan", "-s", sens, "--bits-per-weight", "6", "-o", plan]).exit_code == 0
    return plan


def test_quantize_never_deletes_a_users_files(tiny_llama, tmp_path, calib):
    plan = _plan(tiny_llama, tmp_path, calib)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    args = ["quantize", "-m", tiny_llama, "--plan", plan, "--calib", calib, *SMALL, "-o", mine]
    result = run(args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (mine / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(args[:-1] + [empty]).exit_code == 0  # an empty directory is fine
    assert run(args[:-1] + [empty]).exit_code == 0  # and so is an earlier checkpoint
    assert run(args + ["--overwrite"]).exit_code == 0  # the user asked for it
    assert not (mine / "thesis.tex").exists()


# -- 4. file-system problems, found before the work ----------------------------------------------------


def test_output_problems_are_found_before_any_work(tiny_llama, tmp_path, calib):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    cache = Path(os.environ["APQ_CACHE_DIR"])
    cases = [(["-o", afile / "out"], "is a file"), (["-o", afile], "is a file"),
             (["-o", "."], "would replace the directory you are working in"),
             (["-o", ".."], "would replace the directory you are working in")]
    for extra, message in cases:
        result = run(["quantize", "-m", tiny_llama, "--plan", tmp_path / "none.json", "--calib",
                      calib, *SMALL, *extra])
        assert result.exit_code in (1, 2)
    plan = _plan(tiny_llama, tmp_path, calib)
    for extra, message in cases:
        started = time.time()
        result = run(["quantize", "-m", tiny_llama, "--plan", plan, "--calib", calib, *SMALL,
                      *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert time.time() - started < 5  # refused before loading and quantizing
    profiles = set((cache / "profiles").iterdir())
    result = run(["build", "--target", "arm64-linux", "-m", tiny_llama, "-o", afile, *SMALL])
    assert result.exit_code == 2 and "a-file' is a file" in result.output
    result = run(["build", "--target", "arm64-linux", "-m", tiny_llama, "-o", afile / "x", *SMALL])
    assert result.exit_code == 2 and "is a file, not a directory" in result.output
    assert set((cache / "profiles").iterdir()) == profiles  # nothing more was profiled


def test_an_unwritable_cache_is_one_line_with_the_fix(tiny_llama, tmp_path, monkeypatch):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    monkeypatch.setenv("APQ_CACHE_DIR", str(afile / "cache"))
    result = run(["build", "--target", "arm64-linux", "-m", tiny_llama, "-o", tmp_path / "o",
                  *SMALL])
    assert result.exit_code == 1 and "set APQ_CACHE_DIR to a writable directory" in result.output


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_llama, tmp_path, calib, monkeypatch):
    import safetensors.numpy

    plan = _plan(tiny_llama, tmp_path, calib)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", args[1])

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    result = run(["quantize", "-m", tiny_llama, "--plan", plan, "--calib", calib, *SMALL,
                  "-o", tmp_path / "q"])
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "free some space" in result.output
    assert not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]


def test_a_read_only_output_is_refused_up_front(tiny_llama, tmp_path, calib, monkeypatch):
    import tempfile

    plan = _plan(tiny_llama, tmp_path, calib)
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # noqa: A002  (tempfile's own name)
        if dir is not None and Path(dir) == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = run(["quantize", "-m", tiny_llama, "--plan", plan, "--calib", calib, *SMALL,
                  "-o", tmp_path / "q"])
    assert result.exit_code == 1 and "Read-only file system" in result.output


# -- 5. lowering errors, and fixes that exist ----------------------------------------------------------


def test_a_lowering_error_is_one_line_without_temporary_paths(tiny_llama, tmp_path, calib):
    model = _copy(tiny_llama, tmp_path / "nfkc")
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFKC"}  # the C++ runner reproduces none but NFC
    (model / "tokenizer.json").write_text(json.dumps(spec))
    result = run(["build", "--target", "arm64-linux", "-m", model, "-o", tmp_path / "out",
                  "--calib", calib, *SMALL])
    assert result.exit_code == 1 and "normalizer 'NFKC' is not supported" in result.output
    assert ".building-" not in result.output and "native_glue" not in result.output
    assert not any((tmp_path / "out").iterdir())


def _cli_options() -> set[str]:
    import click

    found = set()

    def walk(command):
        for param in command.params:
            found.update(o for o in param.opts + param.secondary_opts if o.startswith("--"))
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                walk(sub)

    walk(main)
    return found


def test_every_option_an_error_suggests_exists():
    """Every `--option` named in the SDK's messages is a real option of the CLI."""
    root = Path(__file__).resolve().parents[1]
    options = _cli_options()
    named = {}
    for path in [*sorted((root / "apq_sdk").rglob("*.py")), *sorted((root / "targets").rglob("*.py"))]:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", path.read_text()):
            named.setdefault(flag, path.relative_to(root).as_posix())
    # other programs' options, in install hints and help text
    allowed = {"--no-deps", "--disable-pip-version-check", "--help", "--install",
               "--fp16",  # trtexec's, in the TensorRT target's notes
               # the maintainers' tool that regenerates TensorRT's support matrix
               "--tensorrt", "--source", "--commit",
               "--json", "--raw-binary"}  # flatc's, reading an XNNPACK graph back (.pte)
    unknown = {f: where for f, where in named.items() if f not in options | allowed}
    assert not unknown, unknown
    assert "--allow-unknown-arch" in named and "--allow-unknown-arch" in options


# -- 6. plans and budgets that do not fit -------------------------------------------------------------


def test_a_plan_naming_another_models_module_is_refused(tiny_llama, tmp_path, calib):
    import dataclasses

    from apq_sdk.plan_file import compute_totals, load_plan, save_plan

    base = load_plan(_plan(tiny_llama, tmp_path, calib))
    modules = {**base.modules, "model.layers.7.mlp.up_proj": base.modules["model.layers.0.mlp.up_proj"]}
    bad = dataclasses.replace(base, modules=modules, totals=compute_totals(
        modules, base.totals.fixed_params, base.totals.fixed_bytes))
    save_plan(bad, tmp_path / "bad.json")
    result = run(["quantize", "-m", tiny_llama, "--plan", tmp_path / "bad.json", "--calib", calib,
                  *SMALL, "-o", tmp_path / "q"])
    assert result.exit_code == 1
    assert "plan names a module this model does not have: 'model.layers.7.mlp.up_proj'" in result.output
    assert not (tmp_path / "q").exists()


def test_a_budget_beside_a_plan_is_an_error(tiny_llama, tmp_path, calib):
    plan = _plan(tiny_llama, tmp_path, calib)
    result = run(["build", "--target", "arm64-linux", "-m", tiny_llama, "--plan", plan,
                  "--bits-per-weight", "3", "-o", tmp_path / "o", *SMALL])
    assert result.exit_code == 2 and "--plan carries its own budget" in result.output


def test_budgets_and_lengths_are_checked_before_the_model_loads(tiny_llama, tmp_path,
                                                                monkeypatch):
    from apq_sdk import model_io

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(model_io, "load_model", no_load)
    for extra, message in ((["--bits-per-weight", "40"], "expected a number in (1, 16]"),
                           (["--bits-per-weight", "4", "--max-loss", "1%"], "give one budget"),
                           (["--linear-bits-per-weight", "4"], "head must be fixed"),
                           (["--head-bits", "4", "--activations", "none", "--memory-reduction",
                             "1.5"], "expected a fraction in (0, 1)")):
        result = run(["build", "--target", "arm64-linux", "-m", tiny_llama, "-o", tmp_path / "o",
                      *SMALL, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    monkeypatch.undo()
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache2"))
    result = run(["build", "--target", "arm64-linux", "-m", tiny_llama, "-o", tmp_path / "o",
                  "-n", "4", "-L", "4096"])
    assert result.exit_code == 2 and "longer than the model's context of 256" in result.output


# -- 7. NaN weights ------------------------------------------------------------------------------------


def test_nan_weights_are_named_at_load(tiny_llama, tmp_path):
    import numpy as np

    model = _copy(tiny_llama, tmp_path / "nan")

    def poison(t):
        t["model.layers.0.self_attn.k_proj.weight"][3, 5] = np.nan

    _edit_weights(model, poison)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has 1 "
                                             r"NaN or infinite values"):
        load_model(model)


# -- 8. messages and broken files that used to print tracebacks ----------------------------------------


def test_plan_show_survives_nesting_and_markup(tiny_llama, tmp_path, calib):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    result = run(["plan", "show", nested])
    assert result.exit_code == 1 and "nested too deeply" in result.output
    plan = _plan(tiny_llama, tmp_path, calib)
    doc = json.loads(plan.read_text())
    doc["model"]["name"] = "evil [/] [bold]name[/bold] [link=x]"
    (tmp_path / "markup.json").write_text(json.dumps(doc))
    result = run(["plan", "show", tmp_path / "markup.json"])
    assert result.exit_code == 0 and "evil [/] [bold]name[/bold]" in result.output


def test_a_malformed_manifest_is_one_line(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    for text, message in (("{not json", "not valid JSON"),
                          (json.dumps({"format": "apq-package", "version": 1, "target": {"name": "arm64-linux"},
                                       "reference": {"quantized_cache_key": "../../etc"},
                                       "files": []}), "quantized_cache_key, a hex digest"),
                          (json.dumps({"format": "apq-package", "version": 1,
                                       "target": {"name": "arm64-linux"},
                                       "reference": {"quantized_cache_key": "ab" * 16},
                                       "files": [{"path": "../secret", "sha256": "0" * 64,
                                                  "bytes": 1}]}), "inside the package")):
        (package / "manifest.json").write_text(text)
        result = run(["verify", package])
        assert result.exit_code == 1 and message in result.output, result.output


def test_long_failure_messages_are_not_cut():
    from apq_sdk.verification import Check, VerifyResult

    result = VerifyResult(target="t", runtime="r", text="x", int8_activations=True, model_bytes=1)
    result.checks = [Check(f"check number {i} with a long name", 0.5, 0.1, False, "x" * 300)
                     for i in range(8)]
    table = result.table()
    assert table.count("FAIL") == 8 and "check number 7" in table


# -- 9. broken files of every kind --------------------------------------------------------------------


def _demo_gguf():
    from apq_sdk.model_io import demo_model_path

    try:
        return demo_model_path()
    except ModelLoadError:
        pytest.skip("the demo model package is not installed")


def test_a_truncated_gguf_is_named_as_truncated(tmp_path):
    gguf = _demo_gguf()
    cut = tmp_path / "cut.gguf"
    with open(gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(gguf.stat().st_size // 2))
    result = run(["profile", "-m", cut, "-o", tmp_path / "s.json"])
    assert result.exit_code == 1 and "truncated" in result.output and "cut.gguf" in result.output
    head = tmp_path / "head.gguf"
    with open(gguf, "rb") as src, open(head, "wb") as dst:
        dst.write(src.read(1000))
    result = run(["profile", "-m", head, "-o", tmp_path / "s.json"])
    assert result.exit_code == 1 and "truncated" in result.output


def test_a_gguf_header_claiming_2_62_tensors_is_refused_at_once(tmp_path):
    import struct

    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2 ** 62, 1) + b"\0" * 64)
    started = time.time()
    result = run(["profile", "-m", bogus, "-o", tmp_path / "s.json"])
    assert result.exit_code == 1 and "claims 4,611,686,018,427,387,904 tensors" in result.output
    assert time.time() - started < 5


def test_a_non_utf8_folder_name_is_not_blamed_on_the_file(tiny_llama, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/mod\xe9le"))
    shutil.copytree(tiny_llama, odd)
    with pytest.raises(ModelLoadError, match="is not valid UTF-8.*rename the file or folder"):
        load_model(odd)


def test_an_unknown_model_type_lists_the_supported_ones(tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path / "foo")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "foo_bar"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model_type='foo_bar' is not supported; supported: "
                                             r"llama, mistral") as info:
        load_model(model)
    assert "upgrade" not in str(info.value)


# -- 10. invisible characters in generated files -------------------------------------------------------


def test_bidi_overrides_and_zero_width_never_reach_cmake_or_markdown():
    from apq_sdk.native_glue import cmake_string, markdown_text, shell_single

    name = "safe\u202eevil\u200bname\u2066x"
    assert "\u202e" not in cmake_string(name) and "\u200b" not in cmake_string(name)
    assert markdown_text(name) == "safeU+202EevilU+200BnameU+2066x"
    assert "\u202e" not in shell_single(name)


# -- 12. permissions, Ctrl-C ---------------------------------------------------------------------------


def test_outputs_get_ordinary_permissions(tiny_llama, tmp_path, calib):
    old = os.umask(0o022)
    try:
        result = run(["build", "--target", "arm64-linux", "-m", tiny_llama, "-o", tmp_path / "out",
                      "--calib", calib, *SMALL, "--verify-windows", "1"])
        assert result.exit_code == 0, result.output
        plan = _plan(tiny_llama, tmp_path, calib)
    finally:
        os.umask(old)
    package = next((tmp_path / "out").iterdir())
    assert stat.S_IMODE(package.stat().st_mode) == 0o755
    assert stat.S_IMODE((package / "plan.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(plan.stat().st_mode) == 0o644


def test_ctrl_c_exits_130_and_leaves_nothing(tiny_llama, tmp_path, calib):
    out = tmp_path / "out"
    env = {**os.environ, "APQ_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "apq_sdk.cli", "build", "--target",
                             "arm64-linux", "-m", str(tiny_llama), "-o", str(out), "--calib",
                             str(calib), "-n", "8", "-L", "48", "--verify-windows", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and any(".building-" in p.name for p in out.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_dropped_inside_a_finalizer_still_stops_the_commit(tmp_path, sig):
    """Python raises a signal handler's exception wherever the main thread is; inside __del__ it
    is printed and dropped (seen once: a SIGTERM build exited 0). The CLI notes every signal, and
    nothing is committed after one: the output is removed and the exit code says so."""
    script = f"""
import gc, os, signal, sys
from pathlib import Path
from apq_sdk import cli
from apq_sdk.fsutil import atomic_directory

class Dropper:
    def __del__(self):
        os.kill(os.getpid(), {int(sig)})  # the handler's exception is raised here and dropped

def fill(tmp):
    (tmp / "model.onnx").write_bytes(b"x")
    Dropper()  # collected at once: the signal arrives inside its finalizer
    gc.collect()
    (tmp / "done").write_text("the fill went on after the signal")

@cli.main.command()
def job():
    atomic_directory(Path(sys.argv[1]) / "package", fill)

cli.main(["job"], standalone_mode=True)
"""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", script.replace("sys.argv[1]", repr(str(out)))],
                          capture_output=True, text=True, timeout=120)
    assert "Exception ignored" in proc.stderr  # the exception really was dropped
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + int(sig)), proc.stderr
    assert list(out.iterdir()) == []


def test_usage_errors_are_usage_errors():
    assert issubclass(UsageError, ApqError)
