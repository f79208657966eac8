"""Export a Hugging Face BPE `tokenizer.json` into plain-text files that a C/C++ runner reads
without a JSON library (the format is `TOKENIZER_FORMAT`; templates/common/src/tokenizer.cpp reads
it). Two kinds of BPE are reproduced id for id:

* byte-level BPE (GPT-2, Llama 3, Qwen2/3, SmolLM, Phi-4): the GPT-2, Llama 3 and Qwen2 split
  patterns, digit splitting, NFC;
* SentencePiece-style BPE (Gemma, Gemma 2 and 3, Llama 2, Mistral, Phi-3): spaces become U+2581,
  prepended as its normalizer or Metaspace pre-tokenizer says, characters outside the vocabulary
  fall back to <0xXX> byte tokens, and the decoder turns them back (ByteFallback, Fuse, Strip).

Anything else is refused with `TokenizerExportError` rather than exported inexactly.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

__all__ = ["export_tokenizer", "TokenizerExportError", "TOKENIZER_DIR", "TOKENIZER_FILES",
           "TOKENIZER_FORMAT"]

TOKENIZER_DIR = "tokenizer"  # where a package keeps the exported tokenizer files (runtime contract)
TOKENIZER_FILES = ("tokenizer.txt", "vocab.txt", "merges.txt", "added_tokens.txt", "unicode.txt")


class TokenizerExportError(ValueError):
    """The tokenizer.json is not a byte-level BPE tokenizer the C++ runner can reproduce exactly."""


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
unicode.txt       `L|N FIRST LAST` hex code point ranges of the letter / number categories; with an
                  NFC normalizer also `D CP SEQ...` full canonical decompositions (Hangul
                  syllables are algorithmic), `C CP CLASS` nonzero canonical combining classes
                  and `P FIRST SECOND COMPOSITE` primary composites, all hex.
tokenizer.txt also has `normalizer nfc` when the tokenizer normalizes to NFC (Qwen2/Qwen3).
SentencePiece-style BPE adds `model spm`, `byte_fallback 0|1`, `spm_spaces normalize|pretokenize`
(where spaces become U+2581: before or after the split on normalized added tokens),
`spm_prepend never|each|first|always` (U+2581 before every normalized piece: a Prepend
normalizer; or, as Metaspace, before the piece at the start of the text / every piece, unless it
starts with one), `spm_split 0|1` (Metaspace split: a new piece at every U+2581) and
`decode_strip N` (the Strip decoder: up to N leading spaces of the decoded text) or
`decode_strip first` (the Metaspace decoder: every space of the first token). Its
vocab.txt shows U+2581 as a space and <0xXX> tokens as their byte; ByteFallback's rule (a run of
byte tokens that is not valid UTF-8 becomes one U+FFFD per token) is applied by the runner.
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


@functools.lru_cache(maxsize=1)
def _nfc_tables() -> tuple[str, ...]:
    """Unicode canonical decomposition, combining classes and primary composites: what the C++
    tokenizer's NFC needs, from this Python's unicodedata (version in unicode.txt's header)."""
    lines = []
    composites = []
    for cp in range(0x110000):
        if 0xAC00 <= cp < 0xAC00 + 11172 or 0xD800 <= cp <= 0xDFFF:
            continue  # Hangul syllables compose and decompose algorithmically; surrogates never
        ch = chr(cp)
        nfd = unicodedata.normalize("NFD", ch)
        if nfd != ch:
            lines.append("D %x %s" % (cp, " ".join("%x" % ord(c) for c in nfd)))
        if unicodedata.combining(ch):
            lines.append("C %x %x" % (cp, unicodedata.combining(ch)))
        mapping = unicodedata.decomposition(ch)
        if mapping and not mapping.startswith("<"):
            parts = [int(x, 16) for x in mapping.split()]
            if len(parts) == 2 and unicodedata.normalize("NFC", chr(parts[0]) + chr(parts[1])) == ch:
                composites.append("P %x %x %x" % (parts[0], parts[1], cp))
    return tuple(lines + composites)


def _normalizer(spec, where: str) -> str | None:
    """'nfc' or None; anything else is refused."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence" and len(spec.get("normalizers") or []) == 1:
        return _normalizer(spec["normalizers"][0], where)
    if kind == "NFC":
        return "nfc"
    raise TokenizerExportError(f"{where}: normalizer {kind!r} is not supported (NFC or none: "
                               f"the byte-level BPE tokenizers of GPT-2, Llama 3, Qwen2, SmolLM)")


METASPACE = "\u2581"


def _is_space_replace(spec, old: str, new: str) -> bool:
    return (spec or {}).get("type") == "Replace" and \
        (spec.get("pattern") or {}).get("String") == old and spec.get("content") == new


def _byte_token(token: str) -> int | None:
    """The byte of a <0xXX> byte-fallback token, else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def _spm_settings(spec: dict, where: str) -> list[str]:
    """tokenizer.txt lines of a SentencePiece-style BPE (see TOKENIZER_FORMAT); refuses any
    normalizer, pre-tokenizer or decoder the runner does not reproduce."""
    normalizer, pre, decoder = spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")
    norms = normalizer.get("normalizers", []) if (normalizer or {}).get("type") == "Sequence" \
        else [normalizer] if normalizer else []
    prepend, spaces, split = "never", None, 0
    for i, step in enumerate(norms):
        if step.get("type") == "Prepend" and step.get("prepend") == METASPACE and i == 0:
            prepend = "each"
        elif _is_space_replace(step, " ", METASPACE):
            spaces = "normalize"
        else:
            raise TokenizerExportError(
                f"{where}: normalizer: {json.dumps(step)[:200]} is not supported for "
                f"SentencePiece-style BPE (Prepend U+2581 then Replace ' ' by U+2581, or none)")
    if pre is not None:
        kind = pre.get("type")
        if kind == "Metaspace" and spaces is None and prepend == "never" and \
                pre.get("replacement") == METASPACE:
            spaces = "pretokenize"
            scheme = pre.get("prepend_scheme")
            if scheme is None:  # older files: add_prefix_space
                scheme = "always" if pre.get("add_prefix_space", True) else "never"
            if scheme not in ("always", "first", "never"):
                raise TokenizerExportError(f"{where}: Metaspace prepend_scheme {scheme!r}")
            prepend, split = scheme, int(bool(pre.get("split", True)))
        elif kind == "Split" and spaces == "normalize" and \
                (pre.get("pattern") or {}).get("String") == " " and not pre.get("invert"):
            pass  # Gemma: splits on " " after the normalizer replaced every " ": a no-op
        else:
            raise TokenizerExportError(
                f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is not supported for "
                f"SentencePiece-style BPE (Metaspace, Split on ' ' after a Replace normalizer, "
                f"or none)")
    if spaces is None:
        raise TokenizerExportError(f"{where}: SentencePiece-style BPE without a Replace normalizer "
                                   f"or Metaspace pre-tokenizer: spaces would not become U+2581")
    steps = decoder.get("decoders", []) if (decoder or {}).get("type") == "Sequence" \
        else [decoder] if decoder else []
    names = []
    strip = "0"
    for step in steps:
        kind = step.get("type")
        if _is_space_replace(step, METASPACE, " ") and not names:
            names.append("replace")
        elif kind == "Metaspace" and not names and step.get("replacement") == METASPACE:
            names.append("metaspace")
            scheme = step.get("prepend_scheme")
            if scheme is None:
                scheme = "always" if step.get("add_prefix_space", True) else "never"
            strip = "first" if scheme != "never" else "0"
        elif kind == "ByteFallback" and names and names[-1] in ("replace", "metaspace"):
            names.append("bytefallback")
        elif kind == "Fuse" and names and names[-1] == "bytefallback":
            names.append("fuse")
        elif kind == "Strip" and names and names[-1] == "fuse" and step.get("content") == " " \
                and not step.get("stop") and strip == "0":
            strip = str(int(step.get("start", 0)))
            names.append("strip")
        else:
            raise TokenizerExportError(
                f"{where}: decoder step {json.dumps(step)[:200]} is not supported for "
                f"SentencePiece-style BPE (Replace U+2581 by ' ' or Metaspace, ByteFallback, "
                f"Fuse, Strip ' ')")
    if names[:3] not in (["replace", "bytefallback", "fuse"], ["metaspace", "bytefallback", "fuse"]):
        raise TokenizerExportError(f"{where}: decoder {json.dumps(decoder)[:200]} is not "
                                   f"Replace/Metaspace, ByteFallback, Fuse")
    return ["model spm", f"byte_fallback {int(bool((spec.get('model') or {}).get('byte_fallback')))}",
            f"spm_spaces {spaces}", f"spm_prepend {prepend}", f"spm_split {split}",
            f"decode_strip {strip}"]


def _is_spm(spec: dict) -> bool:
    """A SentencePiece-style BPE: byte fallback, or U+2581 for spaces in its vocabulary."""
    model = spec.get("model") or {}
    if model.get("byte_fallback"):
        return True
    decoder = spec.get("decoder") or {}
    return decoder.get("type") != "ByteLevel" and any(
        METASPACE in t for t in list((model.get("vocab") or {}))[:5000])


def _token_id(config: dict, key: str, ids_by_content: dict[str, int]) -> int:
    token = config.get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return ids_by_content.get(token, -1) if isinstance(token, str) else -1


def export_tokenizer(tokenizer_json: Path, out_dir: Path) -> list[Path]:
    """Write the C++ runner's tokenizer files (see TOKENIZER_FORMAT) for a HF byte-level BPE
    `tokenizer.json`; bos/eos come from a `tokenizer_config.json` beside it when there is one.

    Refuses (TokenizerExportError) anything the runner could not reproduce id for id: other
    models (Unigram, WordPiece, WordLevel), normalizers other than NFC, non-byte-level pre-tokenizers or
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
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise TokenizerExportError(f"{where}: BPE {key}={model[key]!r} is not supported")
    vocab: dict[str, int] = model.get("vocab") or {}
    if not vocab:
        raise TokenizerExportError(f"{where}: empty BPE vocabulary")
    spm = _is_spm(spec)
    added = sorted(spec.get("added_tokens") or [], key=lambda t: t["id"])
    if spm:  # SentencePiece-style: the vocabulary is text, U+2581 for spaces, <0xXX> bytes
        settings = _spm_settings(spec, where)
        normalizer, steps = None, []
        model_bytes = {int(i): t.encode("utf-8") for t, i in vocab.items()}
        prepend_each = "spm_prepend each" in settings
        for tok in added:
            if tok.get("normalized") and prepend_each:
                raise TokenizerExportError(
                    f"{where}: added token {tok['content']!r} is normalized by a Prepend "
                    f"normalizer, which the runner does not reproduce")

        def shown(token: str, *, in_vocab: bool) -> bytes:
            byte = _byte_token(token) if in_vocab else None
            return bytes([byte]) if byte is not None else \
                token.replace(METASPACE, " ").encode("utf-8")
    else:
        settings = []
        normalizer = _normalizer(spec.get("normalizer"), f"{where}: normalizer")
        decoder = spec.get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise TokenizerExportError(f"{where}: decoder {decoder.get('type')!r} is not "
                                       f"ByteLevel: not a byte-level BPE tokenizer")
        steps = _pretokenize_steps(spec.get("pre_tokenizer"), f"{where}: pre_tokenizer")
        if steps.count("bytelevel") != 1:
            raise TokenizerExportError(f"{where}: expected exactly one ByteLevel pre-tokenizer, "
                                       f"found {steps.count('bytelevel')}")
        steps.remove("bytelevel")  # the C++ side works on raw bytes: the byte map is implicit
        model_bytes = {}
        for token, idx in vocab.items():
            data = _bytelevel_bytes(token)
            if data is not None:
                model_bytes[int(idx)] = data
        if len(model_bytes) < len(vocab) // 2:
            raise TokenizerExportError(f"{where}: most vocabulary entries are outside the "
                                       f"ByteLevel alphabet: not a byte-level BPE tokenizer")

        def shown(token: str, *, in_vocab: bool) -> bytes:
            return _decode_bytes(token)
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
        bpe = model_bytes.get(idx)
        text = shown(token, in_vocab=bpe is not None and idx not in added_by_id)
        if bpe is None:
            vocab_lines.append(f"{_hex(text)} -")
        elif bpe == text:
            vocab_lines.append(_hex(text))
        else:
            vocab_lines.append(f"{_hex(text)} {_hex(bpe)}")

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
        content = tok["content"]
        if spm and tok.get("normalized") and "spm_spaces normalize" in settings:
            content = content.replace(" ", METASPACE)  # matched in the normalized text
        added_lines.append(" ".join([str(tok["id"])] + [str(f) for f in flags] +
                                    [_hex(content.encode("utf-8"))]))

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
        *settings,
    ]
    unicode_lines = [f"apq-unicode 1 {unicodedata.unidata_version}", *_unicode_ranges()]
    if normalizer == "nfc":
        config_lines.append("normalizer nfc")
        unicode_lines.extend(_nfc_tables())

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
