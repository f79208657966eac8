"""Native glue code for device packages: Jinja templates with language-aware escaping, and a
tokenizer export that a C++ runner can read without a JSON library.

`render_templates(template_set, context, out_dir)` renders every file of
`templates/<template_set>/` (relative paths kept, a `.j2` suffix stripped; other files are copied
byte for byte). Values from the context that reach generated code must go through one of the
escaping filters, chosen by the language of the spot they land in:

=================  ==========================================================================
``c_string``       body of a C/C++ string literal (``"{{ x | c_string }}"``)
``c_identifier``   a C identifier / CMake project name: ``[A-Za-z_][A-Za-z0-9_]*``
``c_comment``      text inside a ``/* ... */`` or ``//`` comment (one line, no ``*/``)
``cmake_string``   body of a quoted CMake argument (``"{{ x | cmake_string }}"``)
``shell_single``   one complete bash word (adds its own quotes) for README shell snippets
``markdown_text``  inline Markdown text (Markdown specials and HTML escaped, one line)
``markdown_code``  a whole inline code span (adds its own backticks): the value shown verbatim
``c_int``          an integer literal (refuses anything that is not an int)
``kotlin_string``  body of a Kotlin (and Gradle Kotlin DSL) string literal (``"{{ x | kotlin_string }}"``)
``jvm_package``    a Kotlin/Java package name (Android namespace): dotted lowercase identifiers
=================  ==========================================================================

Several template sets can be rendered in order, later sets replacing files of the same path:
every target renders `common` (the C API header, tokenizer and command-line runner, which hold no
runtime code) and then its own set (the runtime implementation, build files, README). The
tokenizer files the C++ runner reads come from `apq_sdk.tokenizer_export`.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import shutil
import unicodedata
from pathlib import Path

import jinja2
import jinja2.meta

__all__ = ["render_templates", "template_sets", "template_variables", "make_environment",
           "TemplateContextError", "c_string", "c_identifier", "c_comment", "cmake_string",
           "shell_single", "markdown_text", "markdown_code", "c_int", "kotlin_string", "jvm_package"]

def _templates_root() -> Path:
    """`apq_sdk.templates` (the repository's templates/ in a source checkout or editable install,
    apq_sdk/templates/ in an installed wheel)."""
    spec = importlib.util.find_spec("apq_sdk.templates")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "templates"


TEMPLATES_ROOT = _templates_root()


class TemplateContextError(ValueError):
    """The context lacks keys the template set uses, or the template set does not exist."""


# ----------------------------------------------------------------------------- escaping filters

_C_KEYWORDS = frozenset("""
alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t
char32_t class compl concept const consteval constexpr constinit const_cast continue co_await
co_return co_yield decltype default delete do double dynamic_cast else enum explicit export extern
false float for friend goto if inline int long mutable namespace new noexcept not not_eq nullptr
operator or or_eq private protected public register reinterpret_cast requires restrict return short
signed sizeof static static_assert static_cast struct switch template this thread_local throw true
try typedef typeid typename union unsigned using virtual void volatile wchar_t while xor xor_eq
_Alignas _Alignof _Atomic _Bool _Complex _Generic _Imaginary _Noreturn _Static_assert _Thread_local
""".split())

_C_SIMPLE_ESCAPES = {0x5C: "\\\\", 0x22: '\\"', 0x27: "\\'", 0x3F: "\\?", 0x0A: "\\n",
                     0x0D: "\\r", 0x09: "\\t"}


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if value is None or isinstance(value, jinja2.Undefined):
        raise TypeError("escaping filter got no value")
    return str(value)


def c_string(value) -> str:
    """Body of a C89/C++ string literal: UTF-8 bytes, printable ASCII kept, everything else escaped.

    Backslash, both quotes and newlines get their short escapes; every `?` becomes `\\?` so no
    trigraph (`??=`, `??/`, ...) can form; control and non-ASCII bytes become 3-digit octal escapes
    (octal, not hex: a hex escape would swallow the hex digits that follow it).
    """
    out = []
    for byte in _text(value).encode("utf-8", "surrogateescape"):
        if byte in _C_SIMPLE_ESCAPES:
            out.append(_C_SIMPLE_ESCAPES[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append("\\%03o" % byte)
    return "".join(out)


def c_identifier(value) -> str:
    """A valid, non-reserved C/C++ identifier (and CMake project name) derived from the value."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", _text(value))
    ident = re.sub(r"_+", "_", ident).strip("_")
    if not ident:
        return "apq_package"
    if ident[0].isdigit():
        ident = "m_" + ident
    if ident in _C_KEYWORDS or keyword.iskeyword(ident):
        ident += "_"
    return ident


def c_comment(value) -> str:
    """Text safe inside a C/C++ block or line comment: one line of printable ASCII, no `*/`,
    no `??` trigraph, no backslash (a trailing one would continue a `//` comment)."""
    text = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in _text(value))
    text = text.replace("\\", "/").replace("*/", "* /").replace("/*", "/ *")
    while "??" in text:
        text = text.replace("??", "? ?")
    return text


def invisible(ch: str) -> bool:
    """Control, format (bidi overrides, zero-width), private-use, surrogate and line/paragraph
    separator characters: never written raw into generated files, where they would hide or
    reorder what a reader sees ("Trojan Source")."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Zl", "Zp")


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}  # CMake and Kotlin alike


def cmake_string(value) -> str:
    """Body of a quoted CMake argument: `\\`, `"`, `$`, `;` escaped, newlines as `\\n`.

    Other control and invisible characters have no CMake escape and become `?`. `@` is left
    alone (quoted arguments are not `configure_file` input)."""
    out = []
    for ch in _text(value):
        if ch in '\\"$;':
            out.append("\\" + ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif invisible(ch):
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def shell_single(value) -> str:
    """One bash word with its own quoting: `'...'`, single quotes as `'\\''`, and control and
    invisible characters as ANSI-C `$'\\xHH'` / `$'\\uHHHH'` pieces, so the snippet stays on one
    visible line and still passes the exact value."""
    parts = ["'"]
    for ch in _text(value):
        if ch == "'":
            parts.append("'\\''")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            parts.append("'$'\\x%02x''" % ord(ch))
        elif invisible(ch) and not 0xD800 <= ord(ch) <= 0xDFFF:
            parts.append("'$'\\U%08x''" % ord(ch))
        elif invisible(ch):
            parts.append("?")
        else:
            parts.append(ch)
    parts.append("'")
    return "".join(parts)


_MD_SPECIALS = set("\\`*_{}[]()#+-.!|~")


def _markdown_line(value, replace: dict) -> str:
    """One line of Markdown: line breaks and tabs as spaces, other control characters dropped,
    invisible characters (bidi overrides, zero-width) written out as `U+XXXX` (shown, never
    acting on the text around them), each character of `replace` as its value."""
    out = []
    for ch in _text(value):
        if ch in "\r\n\t":
            out.append(" ")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            continue
        elif invisible(ch):
            out.append("U+%04X" % ord(ch))
        else:
            out.append(replace.get(ch, ch))
    return "".join(out)


_MD_TEXT = {**{ch: "\\" + ch for ch in _MD_SPECIALS},
            "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}


def markdown_text(value) -> str:
    """Inline Markdown: one line, Markdown punctuation backslash-escaped, `& < > "` as entities,
    invisible characters (bidi overrides, zero-width) written out as `U+XXXX`."""
    return _markdown_line(value, _MD_TEXT)


def markdown_code(value) -> str:
    """A complete inline code span showing `value` verbatim (a code span does not process
    backslash escapes or entities, so markdown_text inside backticks would show its escapes):
    one line, invisible characters written out as `U+XXXX`, a fence one backtick longer than
    the longest run inside, padded when the value starts or ends with a backtick or space, and
    `|` as `\\|` so a table cell holding the span is not split (GFM)."""
    body = _markdown_line(value, {"|": "\\|"}) or " "
    fence = "`" * (max((len(run) for run in re.findall("`+", body)), default=0) + 1)
    if body[0] in "` " or body[-1] in "` ":
        body = f" {body} "
    return f"{fence}{body}{fence}"


def c_int(value) -> str:
    """An integer literal; negative values parenthesized so a macro expands safely."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"c_int: expected an int, found {value!r}")
    return f"({value})" if value < 0 else str(value)


def kotlin_string(value) -> str:
    """Body of a Kotlin string literal (Gradle's Kotlin DSL included): backslash, quotes and `$`
    (string templates) escaped, printable ASCII kept, everything else as `\\uXXXX` (UTF-16 units,
    so a character outside the BMP is a surrogate pair), so no invisible character is written
    raw."""
    out = []
    for ch in _text(value):
        if ch in '\\"\'$':
            out.append("\\" + ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            units = ch.encode("utf-16-be", "surrogatepass")
            for i in range(0, len(units), 2):
                out.append("\\u%04x" % int.from_bytes(units[i:i + 2], "big"))
    return "".join(out)


def swift_string(value) -> str:
    """Body of a Swift string literal: backslash and quotes escaped (so no `\\(...)`
    interpolation can form), printable ASCII kept, everything else as `\\u{XXXX}` (Unicode scalar
    values: Swift has no surrogates), so no invisible character is written raw."""
    out = []
    for ch in _text(value):
        if ch in '\\"\'':
            out.append("\\" + ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        elif 0xD800 <= ord(ch) <= 0xDFFF:  # a lone surrogate (from undecodable bytes)
            out.append("\\u{FFFD}")
        else:
            out.append("\\u{%X}" % ord(ch))
    return "".join(out)


_JVM_KEYWORDS = frozenset("""
abstract as assert boolean break byte case catch char class const continue default do double else
enum extends false final finally float for fun goto if implements import in instanceof int
interface is long native new null object package private protected public return short static
strictfp super switch synchronized this throw throws transient true try typealias typeof val var
void volatile when while _
""".split())


def jvm_package(value) -> str:
    """A Kotlin/Java package name (an Android namespace) derived from a dotted value: each part
    lowercase `[a-z][a-z0-9_]*`, no Java or Kotlin keyword, at least two parts."""
    parts = []
    for part in _text(value).split("."):
        ident = re.sub(r"[^a-z0-9_]", "_", part.lower())
        ident = re.sub(r"_+", "_", ident).strip("_")
        if not ident:
            continue
        if not ident[0].isalpha():
            ident = "m" + ident
        if ident in _JVM_KEYWORDS:
            ident += "_"
        parts.append(ident)
    while len(parts) < 2:
        parts.insert(0, "apq")
    return ".".join(parts)


FILTERS = {"c_string": c_string, "c_identifier": c_identifier, "c_comment": c_comment,
           "cmake_string": cmake_string, "shell_single": shell_single,
           "markdown_text": markdown_text, "markdown_code": markdown_code, "c_int": c_int, "kotlin_string": kotlin_string,
           "jvm_package": jvm_package, "swift_string": swift_string}


# ------------------------------------------------------------------------------------ rendering

def template_sets() -> list[str]:
    """Names of the template sets shipped with the SDK."""
    return sorted(p.name for p in TEMPLATES_ROOT.iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")))


def _set_dir(template_set: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", template_set or ""):
        raise TemplateContextError(f"template set: expected a plain name, found {template_set!r}")
    path = TEMPLATES_ROOT / template_set
    if not path.is_dir():
        raise TemplateContextError(f"template set {template_set!r} not found under {TEMPLATES_ROOT}; "
                                   f"available: {', '.join(template_sets()) or 'none'}")
    return path


def _template_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__"
                                     for part in rel.parts) or path.suffix == ".pyc":
            continue
        files.append(rel)
    return files


def make_environment(root: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True, trim_blocks=False, lstrip_blocks=False,
                             newline_sequence="\n", auto_reload=False, cache_size=0)
    env.filters.update(FILTERS)
    return env


def _sets(template_set) -> list[str]:
    return [template_set] if isinstance(template_set, str) else list(template_set)


def template_variables(template_set) -> set[str]:
    """Every top-level context key the set's (or the sets') templates reference."""
    names: set[str] = set()
    for name in _sets(template_set):
        root = _set_dir(name)
        env = make_environment(root)
        for rel in _template_files(root):
            if rel.suffix == ".j2":
                source = (root / rel).read_text(encoding="utf-8")
                names |= jinja2.meta.find_undeclared_variables(env.parse(source))
    return names


def render_templates(template_set, context: dict, out_dir: Path) -> list[Path]:
    """Render `templates/<set>/` (or several sets in order, a later set's file replacing an
    earlier one of the same path) into `out_dir`; returns the written paths, sorted.

    Raises TemplateContextError naming every missing key before anything is written."""
    sets = _sets(template_set)
    roots = [_set_dir(name) for name in sets]
    missing = sorted(template_variables(sets) - set(context))
    if missing:
        raise TemplateContextError(f"template set {'+'.join(sets)!r} needs context keys "
                                   f"{', '.join(missing)}; the context has "
                                   f"{', '.join(sorted(context)) or 'none'}")
    sources: dict[Path, tuple[Path, Path]] = {}  # output path -> (set root, template path)
    for root in roots:
        for rel in _template_files(root):
            out_rel = rel.with_suffix("") if rel.suffix == ".j2" else rel
            sources[out_rel] = (root, rel)
    out_dir = Path(out_dir)
    written = []
    for out_rel, (root, rel) in sorted(sources.items()):
        dest = out_dir / out_rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.suffix == ".j2":
            text = make_environment(root).get_template(rel.as_posix()).render(**context)
            dest.write_bytes(text.encode("utf-8"))
        else:
            shutil.copyfile(root / rel, dest)
        written.append(dest)
    return sorted(written)


