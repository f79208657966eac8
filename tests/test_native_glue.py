"""apq_sdk.native_glue: escaping filters (proved by compilers and interpreters, not by string checks
alone), template rendering and the tokenizer export's refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from apq_sdk import native_glue as glue
from apq_sdk.native_glue import (TemplateContextError, TokenizerExportError, c_comment, c_identifier,
                          c_int, c_string, cmake_string, export_tokenizer, markdown_text,
                          render_templates, shell_single)

HOSTILE = [
    'plain',
    'quote " and \' apostrophe',
    'back\\slash and trailing \\',
    'new\nline\r\n and\ttab',
    'comment */ close /* open // line',
    'trigraphs ??= ??/ ??\' ??( ??) ??! ??< ??> ??- ???',
    'shell $(rm -rf /) `id` ${HOME} $HOME; ls | cat && x || y',
    'semi;colon;list',
    'ünïcödé 日本語 😀 \u00a0nbsp \u2028sep',
    '</script><script>alert(1)</script> &amp; <b>',
    '# heading *bold* _it_ [link](http://x) `code` | pipe ~~ ! +-.',
    '\\x41 \\101 \\u0041 %s %n',
    '',
    '1digit-start',
    'int',
]

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


# ------------------------------------------------------------------------------ c_string / C89

@needs_gcc
def test_c_string_round_trips_through_a_c89_compiler(tmp_path):
    """Every hostile value, escaped, compiles as C89 with trigraphs on (-std=c89) and the program
    prints exactly the UTF-8 bytes of the value."""
    body = "\n".join(f'  dump("{c_string(v)}", sizeof("{c_string(v)}") - 1);' for v in HOSTILE)
    src = tmp_path / "strings.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n"
        "static void dump(const char* s, size_t n) { size_t i;\n"
        "  for (i = 0; i < n; ++i) printf(\"%02x\", (unsigned char)s[i]);\n"
        "  printf(\"\\n\"); }\n"
        f"int main(void) {{\n{body}\n  return 0;\n}}\n", encoding="ascii")
    exe = tmp_path / "strings"
    subprocess.run(["gcc", "-std=c89", "-pedantic", "-Wall", "-Werror", "-Wno-overlength-strings",
                    str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    for value, line in zip(HOSTILE, lines):
        assert bytes.fromhex(line) == value.encode("utf-8"), value


def test_c_string_output_is_plain_ascii_without_trigraphs():
    for value in HOSTILE:
        out = c_string(value)
        assert out.isascii() and "??" not in out and "\n" not in out
        assert all(0x20 <= ord(ch) < 0x7F for ch in out)
    assert c_string("a?b") == "a\\?b"
    assert c_string("é1") == "\\303\\2511"  # octal escapes cannot swallow the digit after them


def test_c_identifier():
    assert c_identifier("my-model v2.1") == "my_model_v2_1"
    assert c_identifier("1st") == "m_1st"
    assert c_identifier("int") == "int_"
    assert c_identifier("__x__") == "x"  # no reserved leading double underscore
    assert c_identifier("日本語") == "apq_package"
    for value in HOSTILE:
        ident = c_identifier(value)
        assert ident and (ident[0].isalpha() or ident[0] == "_")
        assert all(ch.isascii() and (ch.isalnum() or ch == "_") for ch in ident)


def test_c_comment_and_c_int():
    for value in HOSTILE:
        out = c_comment(value)
        assert "*/" not in out and "/*" not in out and "??" not in out and "\\" not in out
        assert "\n" not in out and out.isascii()
    assert c_int(7) == "7" and c_int(-1) == "(-1)"
    for bad in ("7", 7.0, True, None):
        with pytest.raises(TypeError):
            c_int(bad)


# ---------------------------------------------------------------------------- cmake / shell / md

@needs_cmake
def test_cmake_string_round_trips_through_cmake(tmp_path):
    """The value survives (CMake keeps `\\;` as written, which keeps the value one list
    element) and nothing is expanded or executed."""
    lines = []
    for i, value in enumerate(HOSTILE):
        lines.append(f'set(V{i} "{cmake_string(value)}")')
        lines.append(f'list(LENGTH V{i} N{i})')
        lines.append(f'file(WRITE "${{OUT}}/{i}.txt" "${{N{i}}}:${{V{i}}}")')
    script = tmp_path / "probe.cmake"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    subprocess.run(["cmake", f"-DOUT={tmp_path}", "-P", str(script)], check=True,
                   capture_output=True, text=True)
    for i, value in enumerate(HOSTILE):
        expected = "".join("?" if ord(ch) < 0x20 and ch not in "\n\r\t" else ch for ch in value)
        expected = ("1:" if value else "0:") + expected.replace(";", "\\;")
        assert (tmp_path / f"{i}.txt").read_bytes() == expected.encode("utf-8"), value


@needs_bash
def test_shell_single_is_one_literal_word():
    for value in HOSTILE:
        word = shell_single(value)
        assert "\n" not in word
        out = subprocess.run(["bash", "-c", f"printf '%s' {word}"], check=True,
                             capture_output=True).stdout
        assert out == value.encode("utf-8"), value


def test_markdown_text_escapes_specials_and_html():
    for value in HOSTILE:
        out = markdown_text(value)
        assert "<" not in out and ">" not in out and "\n" not in out
        for ch in "`*_[]()#|":
            assert out.count(ch) == out.count("\\" + ch), (value, ch)
    assert markdown_text("</script>") == "&lt;/script&gt;"
    assert markdown_text("a*b_c") == "a\\*b\\_c"


# ----------------------------------------------------------------------------------- rendering

def _write_set(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_render_templates_paths_suffixes_and_determinism(tmp_path, monkeypatch):
    root = tmp_path / "templates"
    _write_set(root / "demo", {
        "a.txt.j2": '#define NAME "{{ name | c_string }}"\n',
        "sub/b.cmake.j2": 'set(N "{{ name | cmake_string }}")\n',
        "static.bin": "copied {{ as is }}",
        "__pycache__/x.pyc": "skip",
    })
    monkeypatch.setattr(glue, "TEMPLATES_ROOT", root)
    out1 = render_templates("demo", {"name": 'a"b'}, tmp_path / "o1")
    out2 = render_templates("demo", {"name": 'a"b'}, tmp_path / "o2")
    assert [p.relative_to(tmp_path / "o1").as_posix() for p in out1] == [
        "a.txt", "static.bin", "sub/b.cmake"]
    assert (tmp_path / "o1/a.txt").read_text() == '#define NAME "a\\"b"\n'  # trailing newline kept
    assert (tmp_path / "o1/static.bin").read_text() == "copied {{ as is }}"
    for a, b in zip(out1, out2):
        assert a.read_bytes() == b.read_bytes()


def test_render_templates_names_every_missing_key(tmp_path, monkeypatch):
    root = tmp_path / "templates"
    _write_set(root / "demo", {"a.j2": "{{ alpha | c_string }} {{ beta | c_int }}\n"})
    monkeypatch.setattr(glue, "TEMPLATES_ROOT", root)
    with pytest.raises(TemplateContextError, match="alpha, beta"):
        render_templates("demo", {}, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(TemplateContextError, match="available: demo"):
        render_templates("nope", {}, tmp_path / "o")
    with pytest.raises(TemplateContextError, match="plain name"):
        render_templates("../demo", {}, tmp_path / "o")


def test_shipped_template_sets_are_listed():
    assert "onnxruntime" in glue.template_sets()
    keys = glue.template_variables("onnxruntime")
    assert {"package_name", "model_name", "vocab_size", "eos_token_id"} <= keys


# ----------------------------------------------------------------------------- tokenizer export

@pytest.fixture(scope="module")
def tiny_tokenizer_json(tmp_path_factory):
    from apq_sdk.testing import make_tokenizer

    out = tmp_path_factory.mktemp("tok")
    make_tokenizer(384).save_pretrained(out)
    return out / "tokenizer.json"


def test_export_tokenizer_files_and_determinism(tiny_tokenizer_json, tmp_path):
    a = export_tokenizer(tiny_tokenizer_json, tmp_path / "a")
    b = export_tokenizer(tiny_tokenizer_json, tmp_path / "b")
    assert [p.name for p in a] == list(glue.TOKENIZER_FILES)
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes()
    vocab = (tmp_path / "a/vocab.txt").read_text().splitlines()
    assert vocab[0] == "apq-vocab 1 384" and len(vocab) == 385
    spec = json.loads(tiny_tokenizer_json.read_text())
    space_id = spec["model"]["vocab"]["Ġ"]
    assert vocab[1 + space_id] == "x20"  # the byte-level 'Ġ' is the space byte
    config = (tmp_path / "a/tokenizer.txt").read_text()
    assert "pretokenize regex:gpt2\n" in config and "eos_id 2\n" in config


def _mutated(tokenizer_json: Path, tmp_path: Path, change) -> Path:
    spec = json.loads(tokenizer_json.read_text())
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda s: s["model"].update(type="WordPiece"), "not BPE"),
    (lambda s: s["model"].update(type="Unigram"), "not BPE"),
    (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer 'NFC'"),
    (lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "Metaspace"),
    (lambda s: s.update(decoder={"type": "Metaspace"}), "not ByteLevel"),
    (lambda s: s.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "\\w+"},
                                       "behavior": "Isolated", "invert": False}), "Split"),
    (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda s: s["model"].update(continuing_subword_prefix="##"), "continuing_subword_prefix"),
    (lambda s: s.update(post_processor={"type": "BertProcessing"}), "BertProcessing"),
])
def test_export_tokenizer_refuses_what_it_cannot_reproduce(tiny_tokenizer_json, tmp_path, change,
                                                           message):
    path = _mutated(tiny_tokenizer_json, tmp_path, change)
    with pytest.raises(TokenizerExportError, match=message):
        export_tokenizer(path, tmp_path / "out")


def test_export_tokenizer_refuses_sentencepiece_style_vocab(tiny_tokenizer_json, tmp_path):
    def to_spm(spec):
        spec["model"]["vocab"] = {f"▁tok{i}": i for i in range(300)}
        spec["model"]["merges"] = []
    path = _mutated(tiny_tokenizer_json, tmp_path, to_spm)
    with pytest.raises(TokenizerExportError, match="ByteLevel alphabet"):
        export_tokenizer(path, tmp_path / "out")


def test_export_tokenizer_unreadable_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerExportError, match="cannot read"):
        export_tokenizer(tmp_path / "tokenizer.json", tmp_path / "out")
