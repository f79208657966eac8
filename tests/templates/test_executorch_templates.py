"""The executorch template set (android, qualcomm): hostile package and model names cannot break
the generated Kotlin, Gradle Kotlin DSL or README, and the Kotlin parses.

What is checked: syntax, with tree-sitter's Kotlin grammar (PyPI tree-sitter-kotlin), on every
generated .kt and .kts file, and that every string constant reads back as the exact value it was
given. Not checked here (no Android SDK or Gradle on this machine): type checking against
LlmModule and the Android APIs, and a Gradle build.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apq_sdk.native_glue import invisible, jvm_package, kotlin_string, render_templates, \
    template_variables

HOSTILE_PACKAGE = 'evil"pkg\\ */ /* ??= $(rm -rf /); `id` ${HOME} $x ü 日本 </script> # *md* [a](b)\nnext'
HOSTILE_MODEL = "Model \"X\" '; DROP --\\\\n */ ??' ${'$'}{x} \U0001F600 <b>bold</b>\r\n\ttab \u202eRLO"


def _context(**changes) -> dict:
    context = dict(package_name=HOSTILE_PACKAGE, model_name=HOSTILE_MODEL,
                   target='android"; */ $(x)', sdk_version="0.1.0 $(x) \\ ;",
                   backend_name="XNNPACK", executorch_version='1.5.1"; $x',
                   maven_artifact="org.pytorch:executorch-android", min_sdk=26,
                   namespace=f"org.apq.{HOSTILE_PACKAGE}", model_file="model.pte",
                   tokenizer_file="tokenizer.json", plan_sha256="ab" * 32,
                   model_megabytes="90.1", kv_cache_megabytes="47.2", vocab_size=384,
                   num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, max_context=256,
                   bos_token_id=1, eos_token_id=2, llm_ops=True, lowbit_kernel=False)
    context.update(changes)
    return context


@pytest.fixture(scope="module")
def kotlin_parser():
    ts = pytest.importorskip("tree_sitter", reason="pip install tree-sitter tree-sitter-kotlin")
    kotlin = pytest.importorskip("tree_sitter_kotlin",
                                 reason="pip install tree-sitter tree-sitter-kotlin")
    return ts.Parser(ts.Language(kotlin.language()))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("executorch-glue")
    render_templates(("executorch",), _context(), out)
    return out


@pytest.mark.parametrize("llm_ops", [True, False])
def test_the_cmake_project_builds_the_llm_op_kernels_only_for_a_program_that_calls_them(
        llm_ops, tmp_path):
    render_templates(("executorch",), _context(llm_ops=llm_ops), tmp_path)
    cmake = (tmp_path / "CMakeLists.txt").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert ("src/executorch_llm_ops.cpp" in cmake) == llm_ops
    assert ("APQ_BUNDLED_LLM_OPS" in readme) == llm_ops
    assert ("static-cache" in readme) != llm_ops


@pytest.mark.parametrize("lowbit_kernel", [True, False])
def test_a_program_with_apq_kernels_builds_them_and_says_how_android_gets_them(lowbit_kernel,
                                                                              tmp_path,
                                                                              kotlin_parser):
    """An android-lowbit package: the C API compiles apq::lowbit_linear (no fused multiply-add),
    the README says how to build ExecuTorch's AAR with it, and the Gradle module depends on that
    AAR (a property it refuses to build without) instead of Maven's runtime, which lacks it."""
    render_templates(("executorch",), _context(lowbit_kernel=lowbit_kernel), tmp_path)
    cmake = (tmp_path / "CMakeLists.txt").read_text()
    readme = (tmp_path / "README.md").read_text()
    gradle = (tmp_path / "android/apq-model/build.gradle.kts").read_text()
    assert ("src/executorch_lowbit_linear.cpp" in cmake) == lowbit_kernel
    assert ("-ffp-contract=off" in cmake) == lowbit_kernel
    assert ("executorch_jni" in readme and "apqExecutorchAar" in readme) == lowbit_kernel
    assert ("apqExecutorchAar" in gradle) == lowbit_kernel
    assert ('implementation("org.pytorch:executorch-android:' in gradle) != lowbit_kernel
    assert not _errors(kotlin_parser.parse(gradle.encode()).root_node, [])


def _errors(node, out):
    if node.type == "ERROR" or node.is_missing:
        out.append((node.start_point, node.end_point, node.type))
    for child in node.children:
        _errors(child, out)
    return out


def test_the_set_needs_exactly_the_context_the_target_gives():
    assert template_variables(("executorch",)) <= set(_context())


def test_every_kotlin_and_gradle_file_parses(rendered, kotlin_parser):
    files = sorted(rendered.rglob("*.kt")) + sorted(rendered.rglob("*.kts"))
    assert {f.name for f in files} == {"ApqModel.kt", "ChatActivity.kt", "build.gradle.kts"}
    for path in files:
        tree = kotlin_parser.parse(path.read_bytes())
        errors = _errors(tree.root_node, [])
        assert not errors, f"{path.relative_to(rendered)}: syntax errors at {errors[:3]}"


def test_a_broken_file_is_caught_by_the_parser(kotlin_parser):
    """The check can fail: the raw name (a quote, a line break) breaks the string constant."""
    good = 'const val NAME = "%s"\n' % kotlin_string(HOSTILE_PACKAGE)
    bad = 'const val NAME = "%s"\n' % HOSTILE_PACKAGE
    assert not _errors(kotlin_parser.parse(good.encode()).root_node, [])
    assert _errors(kotlin_parser.parse(bad.encode()).root_node, [])


def _kotlin_unescape(body: str) -> str:
    """Decode a Kotlin string literal body written by kotlin_string."""
    simple = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "$": "$"}
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "$":
            raise AssertionError(f"unescaped $ (a string template) in {body!r}")
        if ch != "\\":
            out.append(ch)
            i += 1
        elif body[i + 1] == "u":
            out.append(chr(int(body[i + 2:i + 6], 16)))
            i += 6
        else:
            out.append(simple[body[i + 1]])
            i += 2
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16")


def test_string_constants_hold_the_exact_names(rendered):
    source = (rendered / "android/apq-model/src/main/kotlin/ApqModel.kt").read_text()
    constants = dict(re.findall(r'const val (\w+) = "((?:[^"\\]|\\.)*)"', source))
    assert _kotlin_unescape(constants["PACKAGE_NAME"]) == HOSTILE_PACKAGE
    assert _kotlin_unescape(constants["MODEL_NAME"]) == HOSTILE_MODEL
    namespace = jvm_package(f"org.apq.{HOSTILE_PACKAGE}")
    assert re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+", namespace)
    assert f"package {namespace}\n" in source
    gradle = (rendered / "android/apq-model/build.gradle.kts").read_text()
    assert f'namespace = "{namespace}"' in gradle
    assert 'implementation("org.pytorch:executorch-android:1.5.1\\"; \\$x")' in gradle


def test_generated_files_carry_no_invisible_characters(rendered):
    for path in rendered.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            bad = [hex(ord(c)) for c in text if invisible(c) and c not in "\n"]
            assert not bad, f"{path.name}: {bad[:5]}"


def test_jvm_package_names_are_valid_for_any_input():
    for value in ("", ".", "9", "org.class.int", "Ü.日本", "a..b", "_.__", "org.apq.x-y"):
        name = jvm_package(value)
        assert re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+", name), (value, name)
        assert not {"class", "int", "fun", "val"} & set(name.split(".")), name
