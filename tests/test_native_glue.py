"""apq_sdk.native_glue: escaping filters (proved by compilers and interpreters, not by string checks
alone), template rendering and the tokenizer export's refusals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from apq_sdk import native_glue as glue
from apq_sdk.native_glue import (TemplateContextError, c_comment, c_identifier, c_int, c_string,
                                 cmake_string, markdown_code, markdown_text, render_templates,
                                 shell_single)

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
        # control and invisible characters (here U+2028) have no CMake escape: "?"
        expected = "".join("?" if glue.invisible(ch) and ch not in "\n\r\t" else ch
                           for ch in value)
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


def test_markdown_code_shows_the_value_verbatim_in_one_span():
    """A code span does not process escapes: the value is shown as it is, in one span whose
    fence no backtick inside can close, on one line, without splitting a table cell."""
    assert markdown_code("model.pte") == "`model.pte`"
    assert markdown_code("a`b") == "``a`b``"
    assert markdown_code("`x") == "`` `x ``"
    assert markdown_code("a|b") == "`a\\|b`"
    for value in HOSTILE:
        out = markdown_code(value)
        assert "\n" not in out
        fence = len(out) - len(out.lstrip("`"))
        body = out[fence:len(out) - fence]
        assert "`" * fence not in body and out.endswith("`" * fence), value


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
    assert {"common", "onnxruntime"} <= set(glue.template_sets())
    keys = glue.template_variables(["common", "onnxruntime"])
    assert {"package_name", "model_name", "vocab_size", "eos_token_id", "runtime"} <= keys


def test_later_template_sets_replace_files_of_the_same_path(tmp_path, monkeypatch):
    root = tmp_path / "templates"
    (root / "base" / "src").mkdir(parents=True)
    (root / "top").mkdir(parents=True)
    (root / "base" / "README.md.j2").write_text("base {{ name | markdown_text }}\n")
    (root / "base" / "src" / "common.h.j2").write_text("/* {{ name | c_comment }} */\n")
    (root / "top" / "README.md.j2").write_text("top {{ name | markdown_text }} {{ extra }}\n")
    monkeypatch.setattr(glue, "TEMPLATES_ROOT", root)
    with pytest.raises(TemplateContextError, match="needs context keys extra"):
        render_templates(["base", "top"], {"name": "x"}, tmp_path / "o")
    written = render_templates(["base", "top"], {"name": "x", "extra": 1}, tmp_path / "o")
    assert [p.relative_to(tmp_path / "o").as_posix() for p in written] == ["README.md",
                                                                          "src/common.h"]
    assert (tmp_path / "o" / "README.md").read_text() == "top x 1\n"
    assert (tmp_path / "o" / "src" / "common.h").read_text() == "/* x */\n"
