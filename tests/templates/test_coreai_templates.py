"""The coreai template set (macos, ios): hostile package and model names cannot break the
generated Swift package, its sources or the README, and the Swift parses.

What is checked: syntax, with tree-sitter's Swift grammar (PyPI tree-sitter-swift), on every
generated .swift file, and that every string constant reads back as the exact value it was
given. Not checked here (no Swift toolchain or Apple SDK on this machine): type checking against
CoreAILanguageModels, FoundationModels and SwiftUI, and a build in Xcode.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apq_sdk.native_glue import invisible, render_templates, swift_string, template_variables

HOSTILE_PACKAGE = 'evil"pkg\\ */ /* ??= $(rm -rf /); `id` \\(x) ${HOME} ü 日本 </script> # *md* [a](b)\nnext'
HOSTILE_MODEL = "Model \"X\" '; DROP --\\\\n */ ??' \\(x)\" \U0001F600 <b>bold</b>\r\n\ttab \u202eRLO"


def _context(**changes) -> dict:
    context = dict(package_name=HOSTILE_PACKAGE, model_name=HOSTILE_MODEL,
                   target='macos"; */ \\(x)', platform="macOS", sdk_version="0.1.0 \\(x) ;",
                   runtime='coreai-torch 0.4.3"', bundle_dir="CoreAI",
                   asset_name="model.aimodel", coreai_models_revision="86b363d" * 5 + "abcde",
                   coreml_dir="CoreML", coreml_file="model.mlpackage", coreml_stem="model",
                   plan_sha256="ab" * 32, coreai_megabytes="90.1", coreml_megabytes="92.0",
                   coreai_included=True, coreml_included=True, kv_cache_megabytes="47.2",
                   vocab_size=384, num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64,
                   max_context=256, bos_token_id=1, eos_token_id=2)
    context.update(changes)
    return context


@pytest.fixture(scope="module")
def swift_parser():
    ts = pytest.importorskip("tree_sitter", reason="pip install tree-sitter tree-sitter-swift")
    swift = pytest.importorskip("tree_sitter_swift",
                                reason="pip install tree-sitter tree-sitter-swift")
    return ts.Parser(ts.Language(swift.language()))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coreai-glue")
    render_templates(("coreai",), _context(), out)
    return out


def _errors(node, out):
    if node.type == "ERROR" or node.is_missing:
        out.append((node.start_point, node.end_point, node.type))
    for child in node.children:
        _errors(child, out)
    return out


def test_the_set_needs_exactly_the_context_the_target_gives():
    assert template_variables(("coreai",)) <= set(_context())


def test_every_swift_file_parses(rendered, swift_parser):
    files = sorted(rendered.rglob("*.swift"))
    assert {f.name for f in files} == {"Package.swift", "ApqModel.swift", "ChatView.swift"}
    for path in files:
        errors = _errors(swift_parser.parse(path.read_bytes()).root_node, [])
        assert not errors, f"{path.relative_to(rendered)}: syntax errors at {errors[:3]}"


@pytest.mark.parametrize("coreai,coreml", [(True, False), (False, True)])
def test_a_package_of_one_artifact_names_only_that_one(coreai, coreml, swift_parser, tmp_path):
    """`--target-option artifacts=coreai|coreml`: the Swift still parses, declares which engine
    it has, and the README sends the developer to the artifact the package holds."""
    render_templates(("coreai",), _context(coreai_included=coreai, coreml_included=coreml),
                     tmp_path)
    for path in sorted(tmp_path.rglob("*.swift")):
        errors = _errors(swift_parser.parse(path.read_bytes()).root_node, [])
        assert not errors, f"{path.relative_to(tmp_path)}: syntax errors at {errors[:3]}"
    swift = (tmp_path / "swift/Sources/ApqModel/ApqModel.swift").read_text()
    assert f"includesCoreAI = {str(coreai).lower()}" in swift
    assert f"includesCoreML = {str(coreml).lower()}" in swift
    readme = (tmp_path / "README.md").read_text()
    assert ("model.mlpackage" in readme) == coreml
    assert ("CoreAILanguageModel" in readme) == coreai
    assert ("Core AI asset is 90\\.1 MB" in readme) == coreai
    assert ("Core ML package is 92\\.0 MB" in readme) == coreml


def test_a_broken_file_is_caught_by_the_parser(swift_parser):
    """The check can fail: the raw name (a quote, a line break) breaks the string constant."""
    good = 'let name = "%s"\n' % swift_string(HOSTILE_PACKAGE)
    bad = 'let name = "%s"\n' % HOSTILE_PACKAGE
    assert not _errors(swift_parser.parse(good.encode()).root_node, [])
    assert _errors(swift_parser.parse(bad.encode()).root_node, [])


def _swift_unescape(body: str) -> str:
    """Decode a Swift string literal body written by swift_string."""
    simple = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "0": "\0"}
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
        elif body[i + 1] == "u":
            end = body.index("}", i)
            out.append(chr(int(body[i + 3:end], 16)))
            i = end + 1
        elif body[i + 1] == "(":
            raise AssertionError(f"an interpolation \\( in {body!r}")
        else:
            out.append(simple[body[i + 1]])
            i += 2
    return "".join(out)


def test_string_constants_hold_the_exact_names(rendered):
    source = (rendered / "swift/Sources/ApqModel/ApqModel.swift").read_text()
    constants = dict(re.findall(r'static let (\w+) = "((?:[^"\\]|\\.)*)"', source))
    assert _swift_unescape(constants["packageName"]) == HOSTILE_PACKAGE
    assert _swift_unescape(constants["modelName"]) == HOSTILE_MODEL
    package = (rendered / "swift/Package.swift").read_text()
    name = re.search(r'name: "((?:[^"\\]|\\.)*)",\n', package).group(1)
    assert _swift_unescape(name) == HOSTILE_PACKAGE
    assert 'platforms: [.iOS(.v18), .macOS(.v15)]' in package
    assert '.product(name: "Tokenizers", package: "swift-transformers")' in package
    readme = (rendered / "README.md").read_text()
    assert "86b363d" * 5 + "abcde" in readme  # the coreai-models revision the bundle follows


def test_comments_cannot_be_closed_or_continued(rendered):
    for path in rendered.rglob("*.swift"):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("//"):
                assert "*/" not in line and "/*" not in line, line


def test_generated_files_carry_no_invisible_characters(rendered):
    for path in rendered.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            bad = [hex(ord(c)) for c in text if invisible(c) and c not in "\n"]
            assert not bad, f"{path.name}: {bad[:5]}"


@pytest.mark.parametrize("value", ["", "\\(x)", '"', "\ud800", "\U0001F600", "a\u2028b"])
def test_swift_strings_escape_everything_that_could_break_them(value):
    body = swift_string(value)
    assert all(0x20 <= ord(c) < 0x7F for c in body)
    assert "\\(" not in body.replace("\\\\", "")
