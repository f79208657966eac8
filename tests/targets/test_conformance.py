"""The checks every target must pass, written once against the Target interface.

Parametrized over every registered target (apq_sdk.targets.base.BUILTIN_TARGETS) and every model
tiny model (every family of apq_sdk.families and its RoPE and window variants,
apq_sdk.testing.TINY_MODELS), through the real build path (profile, plan within the target's table,
quantize, lower, verify) on tiny random models whose directory name is hostile, so the model name
reaches every generated file. A target joins by registering; a target whose tools are missing here
is skipped with the reason.

Per target and family: the artifact's weights equal the checkpoint's byte for byte; verify passes;
a corrupted weight fails verify; a rebuild is byte-identical; decode through the KV cache matches
the full sequence. Per target: a plan outside its capability table is refused naming the module
and the fix; generated files are valid in their language and carry no control, bidi-override or
zero-width characters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from apq_sdk.builder import BuildRequest, build
from apq_sdk.calibration import builtin_text
from apq_sdk.checkpoint import read_checkpoint
from apq_sdk.errors import ApqError
from apq_sdk.package import reference_dir
from apq_sdk.plan_file import compute_totals, load_plan, save_plan
from apq_sdk.planning import BudgetTooSmall
from apq_sdk.quant.packing import stored_bytes
from apq_sdk.targets.base import BUILTIN_TARGETS, get_target
from apq_sdk.testing import TINY_MODELS, make_tiny_model
from apq_sdk.verification import compare_weights

TARGETS = sorted(BUILTIN_TARGETS)
# a model directory name that tries to break out of every language the glue is written in ("/"
# cannot be part of a directory name, so no "*/" here: tests/templates covers it in package names)
HOSTILE = 'evil"m \'x\' ??= $(id) `id` ${HOME} ;; <b>x<b> [a](b) \\ \u202eRLO\u200bZW ü'
SMALL = dict(samples=8, seq_len=48, verify_windows=1)
# the whole model within half its float16 size: feasible for the tiny untied models too, whose
# float16 embedding table alone is 40 % of their parameters, on every target (TensorRT's least,
# 4-bit layers with float32 scales, is 7.2 bits per weight for the tiny phi3), or else the least
# the target stores the model in (android: the tiny qwen3's attention output, 96 wide, fits no
# profiled group, so it stays 16-bit, which XNNPACK stores as float32: 8.35 bits per weight)
BUDGET = dict(memory_reduction=0.5)
#: targets whose point is a lower budget: android-lowbit exists for 2- and 3-bit layers, which
#: the tiny llama gets at 4.2 bits per weight (its least there is 3.9)
TARGET_BUDGETS = {"android-lowbit": dict(bits_per_weight=4.2)}
#: targets whose rebuild (a second lowering, ~25 s a tiny model) is compared on a few families:
#: the plain decoder, window layers with their own RoPE and q/k norms, and fused projections
FEW_REBUILDS = {"android": ("llama", "gemma3_text", "phi3"),
                "macos": ("llama", "gemma3_text", "phi3")}
#: the one check a target may skip here, because it needs another host (Core ML prediction runs
#: only on macOS; on a Mac nothing may be skipped); verify must skip nothing else
HOST_SKIPS = {} if sys.platform == "darwin" else {
    t: "prediction needs macOS" for t in ("macos", "ios")}
_BUILDS: dict = {}
_BUDGETS: dict = {}


pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(builtin_text()[:60_000])
    return path


def _target(name):
    cls = get_target(name)
    missing = cls.missing_tools("build") + cls.missing_tools("verify")
    if missing:
        pytest.skip(f"{name}: missing " + "; ".join(f"{t.name} ({t.how_to_get})" for t in missing))
    if cls.build_refusal():
        pytest.skip(f"{name}: {cls.build_refusal()}")
    return cls


def _family_target(name, family):
    """_target for the per-family tests. A device preset (Target.preset_of) shares its target's
    build path and artifact, which runs every family; the preset runs one, for its own table."""
    cls = _target(name)
    if cls.preset_of is not None and family != "llama":
        pytest.skip(f"{name} is a preset of {cls.preset_of}, which runs every family")
    return cls


def _model(tmp_path_factory, family) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(f"conf-{family}") / f"{HOSTILE}-{family}", family)


def _build(name, family, tmp_path_factory, calib) -> tuple[Path, Path, Path]:
    """(model dir, package dir, checkpoint dir) of the target's default build of the family."""
    if (name, family) not in _BUILDS:
        model = _model(tmp_path_factory, family)
        out = tmp_path_factory.mktemp(f"pkg-{name}-{family}")
        budget = TARGET_BUDGETS.get(name, BUDGET)
        try:
            package = build(BuildRequest(target=name, model=str(model), output=out,
                                         calib=str(calib), **budget, **SMALL), log=lambda _: None)
            _BUDGETS[name, family] = budget
        except BudgetTooSmall as exc:  # see BUDGET: the least the target stores the model in
            least = dict(bits_per_weight=math.ceil(exc.least_bits_per_weight * 100) / 100)
            package = build(BuildRequest(target=name, model=str(model), output=out,
                                         calib=str(calib), **least, **SMALL), log=lambda _: None)
            _BUDGETS[name, family] = least
        _BUILDS[name, family] = (model, package, reference_dir(package))
    return _BUILDS[name, family]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("name", TARGETS)
def test_weights_are_the_checkpoints_bit_for_bit(name, family, tmp_path_factory, calib):
    cls = _family_target(name, family)
    _, package, ckpt_dir = _build(name, family, tmp_path_factory, calib)
    checkpoint = read_checkpoint(ckpt_dir)
    read = cls().read_weights(package, checkpoint.plan)
    assert read is not None, f"{name} must read its artifact's weights back for this check"
    result = compare_weights(checkpoint, read)
    assert result["mismatched"] == 0, result["examples"]
    assert set(read) == set(checkpoint.plan.modules)


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("name", TARGETS)
def test_verify_passes_and_decode_matches_the_full_sequence(name, family, tmp_path_factory, calib):
    _family_target(name, family)
    _, package, ckpt_dir = _build(name, family, tmp_path_factory, calib)
    result = json.loads((package / "verify.json").read_text())
    assert result["passed"], result["failures"]
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["weights equal the checkpoint (modules differing)"]["measured"] == 0
    kv = [c for n, c in checks.items() if n.startswith("KV cache")]
    assert kv and all(c["passed"] for c in kv)
    assert result["kv_cache"]["decode_steps"] > 0
    windows = [w for w in read_checkpoint(ckpt_dir).spec.sliding_windows if w is not None]
    if windows:  # the whole decode runs past the window: a cache that keeps too much fails
        assert result["kv_cache"]["prefill_tokens"] > max(windows)
    assert Path(result["text"]).name == "verify-text.txt"  # the shipped text, never random ids
    plan = load_plan(package / "plan.json")
    if any(m.activation != "none" for m in plan.modules.values()):  # int8: exact per layer and
        assert checks["linears on recorded inputs (nodes off the reference)"]["measured"] == 0
        assert checks["accuracy: KL(unquantized || package)"]["passed"]  # accurate end to end
    host_only = HOST_SKIPS.get(name)
    others = [s for s in result["skipped"] if host_only is None or host_only not in s]
    assert not others, others


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("name", TARGETS)
def test_a_corrupted_weight_fails_verify(name, family, tmp_path_factory, calib, tmp_path):
    cls = _family_target(name, family)
    _, package, ckpt_dir = _build(name, family, tmp_path_factory, calib)
    checkpoint = read_checkpoint(ckpt_dir)
    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    # flip bits of one quantized layer's codes where the artifact stores them
    module = next(m for n, m in sorted(checkpoint.modules.items())
                  if m.kind == "packed" and n != "lm_head")
    needle = cls().stored_codes(module)[:32]  # not fused with others (down_proj leads the sort)
    for path in cls().model_files(broken):
        data = bytearray(path.read_bytes())
        at = data.find(needle)
        if at >= 0:
            assert data.find(needle, at + 1) < 0, "the needle must be unique"
            data[at:at + len(needle)] = bytes(b ^ 0x11 for b in needle)
            path.write_bytes(bytes(data))
            break
    else:
        pytest.fail(f"{name}: {module.name}'s codes are not stored as raw bytes in "
                    f"{[p.name for p in cls().model_files(broken)]}")
    # the weights check names the module; recording every linear (a second program to lower on
    # the android target) would only repeat it
    result = cls().verify(broken, checkpoint=checkpoint, text_path=calib, windows=1, seq_len=48,
                          timing_runs=1, prefill_tokens=8, decode_tokens=2, record_tokens=0)
    assert not result.passed
    assert any(module.name in f for f in result.failures), result.failures


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("name", TARGETS)
def test_a_rebuild_is_byte_identical(name, family, tmp_path_factory, calib, tmp_path):
    """Every file of a rebuild equals the first build's. One family per target rebuilds with
    verify (whose results the manifest and the report carry); the others skip it, which halves
    the rebuild's time (the android program is lowered twice per verify) and still compares
    every artifact and glue file."""
    _family_target(name, family)
    if name in FEW_REBUILDS and family not in FEW_REBUILDS[name]:
        pytest.skip(f"{name}'s rebuild is checked on {', '.join(FEW_REBUILDS[name])}: one "
                    f"lowering path for every family, and each rebuild lowers again")
    model, package, _ = _build(name, family, tmp_path_factory, calib)
    verify = family == "llama"
    again = build(BuildRequest(target=name, model=str(model), output=tmp_path, calib=str(calib),
                               verify=verify, **_BUDGETS[name, family], **SMALL),
                  log=lambda _: None)
    first, second = _digests(package), _digests(again)
    if not verify:  # what verify writes: its own file, the manifest's measurements, the report
        first.pop("verify.json")
        for digests, root in ((first, package), (second, again)):
            digests.pop("report.html")
            manifest = json.loads((root / "manifest.json").read_text())
            manifest.pop("measured_at_build")
            digests["manifest.json"] = hashlib.sha256(
                json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    assert first.keys() == second.keys()
    differing = sorted(k for k in first if first[k] != second[k])
    assert set(differing) <= {"verify.json"}, differing  # its timings vary; the report has none


@pytest.mark.parametrize("name", TARGETS)
def test_a_plan_outside_the_table_is_refused_with_the_module_and_the_fix(name, tmp_path_factory,
                                                                          calib, tmp_path):
    cls = _target(name)
    model, package, _ = _build(name, "llama", tmp_path_factory, calib)
    plan = load_plan(package / "plan.json")
    victim = "model.layers.1.self_attn.o_proj"
    old = plan.modules[victim]
    group = 8 if 8 not in cls.capabilities.group_sizes else 24
    bits = 4 if 4 in cls.capabilities.weight_bits else next(
        b for b in cls.capabilities.weight_bits if b != 16)
    changed = dataclasses.replace(old, bits=bits, group_size=group, symmetric=old.symmetric,
                                  bytes=stored_bytes(*old.shape, bits, group, old.symmetric))
    modules = {**plan.modules, victim: changed}
    bad = dataclasses.replace(plan, modules=modules, totals=compute_totals(modules))
    path = save_plan(bad, tmp_path / "bad-plan.json")
    with pytest.raises(ApqError) as info:
        build(BuildRequest(target=name, model=str(model), plan_path=path, output=tmp_path / "out",
                           calib=str(calib), **SMALL), log=lambda _: None)
    message = str(info.value)
    assert victim in message and f"group_size={group}" in message
    assert "--replan" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- generated files: valid in their language, no invisible or control characters -----------------

_FORBIDDEN = {"Cc", "Cf", "Co", "Cs"}  # control, format (bidi overrides, zero width), private, surrogate
_TEXT_SUFFIXES = {".h", ".hpp", ".c", ".cpp", ".txt", ".md", ".json", ".cmake", ".kts", ".kt",
                  ".swift", ".gradle", ".sh", ".py", ".xml", ".properties", ".html"}


def _generated_text_files(package: Path) -> list[Path]:
    return [p for p in sorted(package.rglob("*")) if p.is_file() and p.suffix in _TEXT_SUFFIXES
            and "tokenizer" not in p.relative_to(package).parts[0]  # the tokenizer's own data
            and not p.name.startswith("tokenizer")]


@pytest.mark.parametrize("name", TARGETS)
def test_generated_files_carry_no_invisible_or_control_characters(name, tmp_path_factory, calib):
    _target(name)
    _, package, _ = _build(name, "llama", tmp_path_factory, calib)
    files = _generated_text_files(package)
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        bad = sorted({f"U+{ord(ch):04X}" for ch in text
                      if ch not in "\n\t" and unicodedata.category(ch) in _FORBIDDEN})
        assert not bad, f"{path.relative_to(package)}: {bad}"
        if path.suffix == ".json":
            json.loads(text)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["model"]["name"] == f"{HOSTILE}-llama"  # the name reached the package


@pytest.mark.parametrize("name", TARGETS)
def test_generated_c_sources_compile_with_the_hostile_name(name, tmp_path_factory, calib, tmp_path):
    cls = _target(name)
    if "c" not in cls.glue_languages:
        pytest.skip(f"{name}'s glue is {', '.join(cls.glue_languages)}, not C "
                    f"(tests/templates check it)")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    _, package, _ = _build(name, "llama", tmp_path_factory, calib)
    headers = sorted(package.rglob("*.h"))
    assert headers, f"{name} generates no C header"
    for header in headers:
        for lang, std in (("c", "-std=c89"), ("c++", "-std=c++17")):
            probe = tmp_path / f"probe.{'c' if lang == 'c' else 'cpp'}"
            probe.write_text(f'#include "{header}"\nint main(void) {{ return 0; }}\n')
            result = subprocess.run([gxx, "-x", lang, std, "-Wall", "-Werror", "-fsyntax-only",
                                     str(probe)], capture_output=True, text=True)
            assert result.returncode == 0, f"{header.name} ({lang}): {result.stderr[-2000:]}"


def _extras() -> dict[str, list[str]]:
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]


def _requirement_name(spec: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower()


@pytest.mark.parametrize("name", TARGETS)
def test_its_tools_come_from_an_extra_that_names_its_runtime(name):
    """Every `pip install 'apq-sdk[X]'` a target tells a user to run names an extra of
    pyproject.toml, and that extra installs the runtime packages its manifest records."""
    import re

    cls = get_target(name)  # no skip: this holds whether or not the tools are installed here
    extras = _extras()
    hinted = {m for t in cls.tools for m in re.findall(r"apq-sdk\[([\w,-]+)\]", t.how_to_get)}
    assert hinted, f"{name}: no tool says which extra installs it"
    for group in hinted:
        for extra in group.split(","):
            assert extra in extras, f"{name} points at apq-sdk[{extra}]; pyproject has {sorted(extras)}"
    installed = {_requirement_name(s) for g in hinted for e in g.split(",") for s in extras[e]}
    missing = [p for p in cls.runtime_packages if p.lower() not in installed]
    assert not missing, f"{name}: runtime packages {missing} are in no extra it names"


def test_every_runtime_of_the_roadmap_has_an_extra_and_none_pulls_torch_unpinned():
    extras = _extras()
    for extra in ("onnxruntime", "executorch", "coreml", "tensorrt"):
        assert extra in extras, f"pyproject.toml has no [{extra}] extra: {sorted(extras)}"
    for extra, specs in extras.items():
        names = [_requirement_name(s) for s in specs]
        assert "torch" not in names, f"[{extra}] names torch; the core pins it once"
    # coremltools 9.0 (pulled by executorch too) breaks with numpy >= 2.4
    for extra in ("executorch", "coreml"):
        assert "numpy<2.4" in [s.replace(" ", "") for s in extras[extra]], extra
