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
``c_int``          an integer literal (refuses anything that is not an int)
=================  ==========================================================================

`export_tokenizer(tokenizer_json, out_dir)` converts a Hugging Face byte-level BPE
`tokenizer.json` into the plain-text files described in `TOKENIZER_FORMAT`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import keyword
import re
import shutil
import unicodedata
from pathlib import Path

import jinja2
import jinja2.meta

__all__ = ["render_templates", "template_sets", "template_variables", "make_environment",
           "export_tokenizer", "TokenizerExportError", "TemplateContextError", "TOKENIZER_DIR",
           "TOKENIZER_FILES", "c_string", "c_identifier", "c_comment", "cmake_string",
           "shell_single", "markdown_text", "c_int"]

def _templates_root() -> Path:
    """`apq_sdk.templates` (the repository's templates/ in a source checkout or editable install,
    apq_sdk/templates/ in an installed wheel)."""
    spec = importlib.util.find_spec("apq_sdk.templates")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "templates"


TEMPLATES_ROOT = _templates_root()
TOKENIZER_DIR = "tokenizer"  # where a package keeps the exported tokenizer files (runtime contract)
TOKENIZER_FILES = ("tokenizer.txt", "vocab.txt", "merges.txt", "added_tokens.txt", "unicode.txt")


class TemplateContextError(ValueError):
    """The context lacks keys the template set uses, or the template set does not exist."""


class TokenizerExportError(ValueError):
    """The tokenizer.json is not a byte-level BPE tokenizer the C++ runner can reproduce exactly."""


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


def cmake_string(value) -> str:
    """Body of a quoted CMake argument: `\\`, `"`, `$`, `;` escaped, newlines as `\\n`.

    Other control characters have no CMake escape and become `?`. `@` is left alone (quoted
    arguments are not `configure_file` input)."""
    out = []
    for ch in _text(value):
        if ch in '\\"$;':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def shell_single(value) -> str:
    """One bash word with its own quoting: `'...'`, single quotes as `'\\''`, and control
    characters as ANSI-C `$'\\xHH'` pieces so the snippet stays on one line."""
    parts = ["'"]
    for ch in _text(value):
        if ch == "'":
            parts.append("'\\''")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            parts.append("'$'\\x%02x''" % ord(ch))
        else:
            parts.append(ch)
    parts.append("'")
    return "".join(parts)


_MD_SPECIALS = set("\\`*_{}[]()#+-.!|~")


def markdown_text(value) -> str:
    """Inline Markdown: one line, Markdown punctuation backslash-escaped, `& < > "` as entities."""
    out = []
    for ch in _text(value):
        if ch in "\r\n\t":
            out.append(" ")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            continue
        elif ch in _MD_SPECIALS:
            out.append("\\" + ch)
        elif ch == "&":
            out.append("&amp;")
        elif ch == "<":
            out.append("&lt;")
        elif ch == ">":
            out.append("&gt;")
        elif ch == '"':
            out.append("&quot;")
        else:
            out.append(ch)
    return "".join(out)


def c_int(value) -> str:
    """An integer literal; negative values parenthesized so a macro expands safely."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"c_int: expected an int, found {value!r}")
    return f"({value})" if value < 0 else str(value)


FILTERS = {"c_string": c_string, "c_identifier": c_identifier, "c_comment": c_comment,
           "cmake_string": cmake_string, "shell_single": shell_single,
           "markdown_text": markdown_text, "c_int": c_int}


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


def template_variables(template_set: str) -> set[str]:
    """Every top-level context key the set's templates reference."""
    root = _set_dir(template_set)
    env = make_environment(root)
    names: set[str] = set()
    for rel in _template_files(root):
        if rel.suffix == ".j2":
            source = (root / rel).read_text(encoding="utf-8")
            names |= jinja2.meta.find_undeclared_variables(env.parse(source))
    return names


def render_templates(template_set: str, context: dict, out_dir: Path) -> list[Path]:
    """Render `templates/<template_set>/` into `out_dir`; returns the written paths, sorted.

    Raises TemplateContextError naming every missing key before anything is written."""
    root = _set_dir(template_set)
    missing = sorted(template_variables(template_set) - set(context))
    if missing:
        raise TemplateContextError(f"template set {template_set!r} needs context keys "
                                   f"{', '.join(missing)}; the context has "
                                   f"{', '.join(sorted(context)) or 'none'}")
    env = make_environment(root)
    out_dir = Path(out_dir)
    written = []
    for rel in _template_files(root):
        if rel.suffix == ".j2":
            dest = out_dir / rel.with_suffix("")
            text = env.get_template(rel.as_posix()).render(**context)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(text.encode("utf-8"))
        else:
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest)
        written.append(dest)
    return sorted(written)


# ---------------------------------------------------------------------------- tokenizer export

TOKENIZER_FORMAT = """\
All files are UTF-8/ASCII text, '\\n' line ends, first line a header `apq-<kind> 1 ...`.
tokenizer.txt     `key value...` lines: pretokenize (steps, in order), ignore_merges, unk_id,
                  fuse_unk, prefix_ids / suffix_ids (post-processor specials around one
                  sequence), bos_id, eos_id (-1: none).
vocab.txt         line k after the header is token id k: `x<HEX>` bytes the decoder emits, then
                  either nothing (BPE vocabulary bytes are the same), `-` (not in the BPE
                  vocabulary) or `x<HEX>` (BPE vocabulary bytes); `-` alone: unused id.
merges.txt        line k after the header is the merge of rank k: `LEFT_ID RIGHT_ID MERGED_ID`.
added_tokens.txt  `ID SPECIAL NORMALIZED LSTRIP RSTRIP SINGLE_WORD x<HEX content>`.
unicode.txt       `L|N FIRST LAST` hex code point ranges of the letter / number categories.
"""

_KNOWN_SPLIT_PATTERNS = {
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _bytelevel_bytes(token: str) -> bytes | None:
    """Bytes of a byte-level token string, or None if a character is outside the alphabet."""
    table = _unicode_to_byte()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError:
        return None


def _decode_bytes(token: str) -> bytes:
    """What the ByteLevel decoder emits for one token (tokenizers: mapped bytes, or the raw UTF-8
    of the token when any character is outside the alphabet)."""
    mapped = _bytelevel_bytes(token)
    return mapped if mapped is not None else token.encode("utf-8")


def _hex(data: bytes) -> str:
    return "x" + data.hex()


def _pretokenize_steps(pre, where: str) -> list[str]:
    if pre is None:
        raise TokenizerExportError(f"{where}: no pre_tokenizer; a byte-level BPE tokenizer needs a "
                                   f"ByteLevel pre-tokenizer")
    kind = pre.get("type")
    if kind == "Sequence":
        steps = []
        for i, sub in enumerate(pre.get("pretokenizers", [])):
            steps += _pretokenize_steps(sub, f"{where}.pretokenizers[{i}]")
        return steps
    if kind == "ByteLevel":
        steps = ["prefix_space"] if pre.get("add_prefix_space") else []
        if pre.get("use_regex", True):
            steps.append("regex:gpt2")
        return steps + ["bytelevel"]
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex")
        name = next((k for k, v in _KNOWN_SPLIT_PATTERNS.items() if v == regex), None)
        if name is None or pre.get("behavior") != "Isolated" or pre.get("invert"):
            raise TokenizerExportError(
                f"{where}: Split pre-tokenizer {json.dumps(pre)[:300]} is not supported; the C++ "
                f"runner knows behavior=Isolated, invert=false with the regex of "
                f"{', '.join(sorted(_KNOWN_SPLIT_PATTERNS))}")
        return [f"regex:{name}"]
    if kind == "Digits":
        return ["digits:individual" if pre.get("individual_digits") else "digits:contiguous"]
    raise TokenizerExportError(f"{where}: pre-tokenizer type {kind!r} is not byte-level BPE "
                               f"(supported: ByteLevel, Split with a known regex, Digits, Sequence)")


def _post_ids(post, specials_by_name: dict[str, int], where: str) -> tuple[list[int], list[int]]:
    if post is None:
        return [], []
    kind = post.get("type")
    if kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        prefix, suffix = [], []
        for i, sub in enumerate(post.get("processors", [])):
            p, s = _post_ids(sub, specials_by_name, f"{where}.processors[{i}]")
            prefix, suffix = prefix + p, suffix + s
        return prefix, suffix
    if kind == "TemplateProcessing":
        prefix, suffix, seen_a = [], [], False
        tokens = post.get("special_tokens", {})
        for piece in post.get("single", []):
            if "Sequence" in piece:
                if piece["Sequence"].get("id") != "A" or seen_a:
                    raise TokenizerExportError(f"{where}: single template {post['single']} unsupported")
                seen_a = True
            elif "SpecialToken" in piece:
                name = piece["SpecialToken"]["id"]
                ids = tokens.get(name, {}).get("ids") or (
                    [specials_by_name[name]] if name in specials_by_name else None)
                if not ids:
                    raise TokenizerExportError(f"{where}: special token {name!r} has no id")
                (suffix if seen_a else prefix).extend(int(i) for i in ids)
        return prefix, suffix
    raise TokenizerExportError(f"{where}: post-processor type {kind!r} is not supported "
                               f"(supported: TemplateProcessing, ByteLevel, Sequence, none)")


@functools.lru_cache(maxsize=1)
def _unicode_ranges() -> tuple[str, ...]:
    lines = []
    for cls in ("L", "N"):
        start = None
        for cp in range(0x110001):
            inside = cp <= 0x10FFFF and unicodedata.category(chr(cp))[0] == cls
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                lines.append(f"{cls} {start:x} {cp - 1:x}")
                start = None
    return tuple(lines)


def _token_id(config: dict, key: str, ids_by_content: dict[str, int]) -> int:
    token = config.get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return ids_by_content.get(token, -1) if isinstance(token, str) else -1


def export_tokenizer(tokenizer_json: Path, out_dir: Path) -> list[Path]:
    """Write the C++ runner's tokenizer files (see TOKENIZER_FORMAT) for a HF byte-level BPE
    `tokenizer.json`; bos/eos come from a `tokenizer_config.json` beside it when there is one.

    Refuses (TokenizerExportError) anything the runner could not reproduce id for id: other
    models (Unigram, WordPiece, WordLevel), normalizers, non-byte-level pre-tokenizers or
    decoders, unknown split regexes, BPE dropout or subword prefixes/suffixes."""
    tokenizer_json = Path(tokenizer_json)
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerExportError(f"cannot read {tokenizer_json}: {exc}") from exc
    where = str(tokenizer_json)
    model = spec.get("model") or {}
    if model.get("type", "BPE") != "BPE":
        raise TokenizerExportError(f"{where}: model type {model.get('type')!r} is not BPE; only "
                                   f"byte-level BPE tokenizers (GPT-2/Llama-3/SmolLM2 style) export")
    if spec.get("normalizer") is not None:
        raise TokenizerExportError(f"{where}: normalizer {spec['normalizer'].get('type')!r} is not "
                                   f"supported; byte-level BPE tokenizers have none")
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise TokenizerExportError(f"{where}: decoder {decoder.get('type')!r} is not ByteLevel: "
                                   f"not a byte-level BPE tokenizer")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise TokenizerExportError(f"{where}: BPE {key}={model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise TokenizerExportError(f"{where}: BPE byte_fallback is for SentencePiece-style "
                                   f"tokenizers, not byte-level BPE")
    steps = _pretokenize_steps(spec.get("pre_tokenizer"), f"{where}: pre_tokenizer")
    if steps.count("bytelevel") != 1:
        raise TokenizerExportError(f"{where}: expected exactly one ByteLevel pre-tokenizer, found "
                                   f"{steps.count('bytelevel')}")
    steps.remove("bytelevel")  # the C++ side works on raw bytes: the byte map is implicit

    vocab: dict[str, int] = model.get("vocab") or {}
    if not vocab:
        raise TokenizerExportError(f"{where}: empty BPE vocabulary")
    model_bytes: dict[int, bytes] = {}
    for token, idx in vocab.items():
        data = _bytelevel_bytes(token)
        if data is not None:
            model_bytes[int(idx)] = data
    if len(model_bytes) < len(vocab) // 2:
        raise TokenizerExportError(f"{where}: most vocabulary entries are outside the ByteLevel "
                                   f"alphabet: not a byte-level BPE tokenizer")
    added = sorted(spec.get("added_tokens") or [], key=lambda t: t["id"])
    added_by_id = {int(t["id"]): t["content"] for t in added}
    id_to_token = {int(i): t for t, i in vocab.items()}
    id_to_token.update(added_by_id)
    size = max(id_to_token) + 1

    vocab_lines = [f"apq-vocab 1 {size}"]
    for idx in range(size):
        token = id_to_token.get(idx)
        if token is None:
            vocab_lines.append("-")
            continue
        shown = _decode_bytes(token)
        bpe = model_bytes.get(idx)
        if bpe is None:
            vocab_lines.append(f"{_hex(shown)} -")
        elif bpe == shown:
            vocab_lines.append(_hex(shown))
        else:
            vocab_lines.append(f"{_hex(shown)} {_hex(bpe)}")

    merge_lines = []
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        try:
            merge_lines.append(f"{vocab[left]} {vocab[right]} {vocab[left + right]}")
        except KeyError as exc:
            raise TokenizerExportError(f"{where}: merge #{rank} {left!r} {right!r} uses a token "
                                       f"missing from the vocabulary ({exc})") from None
    merge_lines.insert(0, f"apq-merges 1 {len(merge_lines)}")

    added_lines = [f"apq-added 1 {len(added)}"]
    for tok in added:
        flags = [int(bool(tok.get(k))) for k in ("special", "normalized", "lstrip", "rstrip",
                                                  "single_word")]
        added_lines.append(" ".join([str(tok["id"])] + [str(f) for f in flags] +
                                    [_hex(tok["content"].encode("utf-8"))]))

    ids_by_content = {t: i for i, t in id_to_token.items()}
    specials_by_name = {t["content"]: int(t["id"]) for t in added}
    prefix, suffix = _post_ids(spec.get("post_processor"), specials_by_name,
                               f"{where}: post_processor")
    config_path = tokenizer_json.with_name("tokenizer_config.json")
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            config = {}
    unk = model.get("unk_token")
    config_lines = [
        "apq-tokenizer 1",
        "pretokenize " + (" ".join(steps) if steps else "none"),
        f"ignore_merges {int(bool(model.get('ignore_merges')))}",
        f"unk_id {vocab.get(unk, -1) if unk else -1}",
        f"fuse_unk {int(bool(model.get('fuse_unk')))}",
        "prefix_ids " + " ".join(str(i) for i in prefix),
        "suffix_ids " + " ".join(str(i) for i in suffix),
        f"bos_id {_token_id(config, 'bos_token', ids_by_content)}",
        f"eos_id {_token_id(config, 'eos_token', ids_by_content)}",
    ]
    unicode_lines = [f"apq-unicode 1 {unicodedata.unidata_version}", *_unicode_ranges()]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, lines in (("tokenizer.txt", config_lines), ("vocab.txt", vocab_lines),
                        ("merges.txt", merge_lines), ("added_tokens.txt", added_lines),
                        ("unicode.txt", unicode_lines)):
        path = out_dir / name
        path.write_text("\n".join(lines) + "\n", encoding="ascii", newline="\n")
        written.append(path)
    return written
