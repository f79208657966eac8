"""Check a package's C++ tokenizer against the Hugging Face `tokenizers` library, id for id.

Compiles templates/common/src/tokenizer.cpp with a small driver (encode text, or decode ids; print
the ids, decode, decode without specials and what the stream decoder emits), runs it on texts and
id lists, and compares every result with `tokenizers`. Used by tests/templates (tiny tokenizers
of every kind the export knows, natively and under qemu) and bench/bench_tokenizers.py (the real
tokenizers of Gemma 1-3, Llama 2, Llama 3.2 and Qwen3).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .native_glue import render_templates

#: texts that stress every part of a tokenizer: spaces, newlines, Unicode classes, NFC forms,
#: control characters, long runs, and the added tokens of the test vocabularies
STRESS_TEXTS = [
    "Hello world", "", " ", "  leading and trailing  ",
    "The quick brown fox's jumps; isn't it? I'll go, we've seen, they'd've. DON'T 'S 'LL",
    "Tabs\tand\nnewlines\r\n\n\nend \n", "numbers 1234567 and 3.14159, 42nd",
    "naïve café résumé — “quotes” ‘single’", "日本語のテキストと中文字符",
    "emoji 😀🎉👍🏽 and 🇫🇷 flags", "Ünïcödé ßtraße ﬁ ligature",
    "nbsp\u00a0here\u3000ideographic\u2028line\u2029para\u0085nel\u200bzwsp",
    "\x00\x01\x7f control", "a" * 300, " " * 40 + "x", "def f(x):\n    return x**2  # c\n",
    "Ω≈ç√∫˜µ≤≥÷ العربية עברית हिन्दी ไทย", "١٢٣ ٤٥ Ⅻ ½ ²³", "mixed123abc456 7_8-9",
    "<s>special</s> <unk> tok<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "a <|tool|>  b  <|tool|>c word words sword word_ x",
    # NFC: decomposed accents, reordered marks, Hangul jamo, singletons and exclusions
    "cafe\u0301 e\u0301\u0323 a\u0323\u0301 o\u0308\u0304 \u1100\u1161\u11a8 \u1100\u1161 \uac00\u11a8",
    "\u212b \u2126 \u0958 \u0915\u093c \u0344 \u1e9b\u0323 q\u0307\u0323 \u0301a ñ n\u0303",
]

DRIVER = r"""
#include "tokenizer.hpp"
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
static std::string unhex(const std::string& h) {
  std::string o;
  for (size_t i = 0; i + 1 < h.size(); i += 2) o.push_back((char)std::stoi(h.substr(i, 2), nullptr, 16));
  return o;
}
static std::string hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string o;
  for (unsigned char c : s) { o.push_back(d[c >> 4]); o.push_back(d[c & 15]); }
  return o;
}
int main(int argc, char** argv) {
  if (argc != 2) return 2;
  apq::Tokenizer tok;
  std::string err;
  if (!tok.load(argv[1], &err)) { std::fprintf(stderr, "load: %s\n", err.c_str()); return 3; }
  std::string line;
  while (std::getline(std::cin, line)) {
    std::vector<int32_t> ids;
    if (!line.empty() && line[0] == '#') {  // "#id id ...": decode these ids
      std::istringstream in(line.substr(1));
      int32_t id;
      while (in >> id) ids.push_back(id);
    } else {
      ids = tok.encode(unhex(line), true);
    }
    for (size_t i = 0; i < ids.size(); ++i) std::printf(i ? " %d" : "%d", ids[i]);
    apq::StreamDecoder stream(tok);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.push(id, false);
    streamed += stream.flush();
    std::printf("\n%s\n%s\n%s\n", hex(tok.decode(ids, false)).c_str(),
                hex(tok.decode(ids, true)).c_str(), hex(streamed).c_str());
  }
  return 0;
}
"""


#: what render_templates needs to render the common set (values appear in comments only)
_CONTEXT = dict(package_name="tokenizer-check", model_name="tokenizer-check", target="host",
                sdk_version="0", runtime="none", vocab_size=1, num_layers=1, num_kv_heads=1,
                head_dim=1, max_context=1, eos_token_id=-1, bos_token_id=-1)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def build_driver(compiler: str, out_dir: Path, *, sets=("common",), context: dict | None = None,
                 extra=()) -> Path:
    """Render the template sets (the tokenizer is in "common") into `out_dir` and compile the
    tokenizer with the driver; returns the executable."""
    out_dir = Path(out_dir)
    src = out_dir / "src"
    render_templates(sets, context or _CONTEXT, out_dir)
    (src / "driver.cpp").write_text(DRIVER)
    exe = out_dir / "tokenize"
    _run([compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{src}",
          src / "tokenizer.cpp", src / "driver.cpp", "-o", exe, *extra])
    return exe


def tokenize_with(exe_cmd: list, tokenizer_dir: Path, texts: list[str]) -> list[tuple]:
    """(ids, decode, decode skipping specials, streamed) of each text, by the C++ tokenizer."""
    stdin = "".join(s.encode("utf-8").hex() + "\n" for s in texts)
    out = _run([*exe_cmd, tokenizer_dir], input=stdin, timeout=600).stdout.split("\n")
    results = []
    for k in range(len(texts)):
        ids_line, dec, dec_skip, streamed = out[4 * k: 4 * k + 4]
        results.append(([int(x) for x in ids_line.split()],
                        *(bytes.fromhex(h).decode("utf-8") for h in (dec, dec_skip, streamed))))
    return results


def decode_with(exe_cmd: list, tokenizer_dir: Path, id_lists: list[list[int]]) -> list[tuple]:
    """(decode, decode skipping specials, streamed) of each id list, by the C++ tokenizer."""
    stdin = "".join("#" + " ".join(map(str, ids)) + "\n" for ids in id_lists)
    out = _run([*exe_cmd, tokenizer_dir], input=stdin, timeout=600).stdout.split("\n")
    return [tuple(bytes.fromhex(h).decode("utf-8") for h in out[4 * k + 1: 4 * k + 4])
            for k in range(len(id_lists))]


def hf_functions(tokenizer_json: Path):
    """(encode, decode) of the `tokenizers` library for a tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return (lambda s: tok.encode(s).ids,
            lambda ids, skip: tok.decode(ids, skip_special_tokens=skip))


@dataclass
class Comparison:
    texts: int = 0
    tokens: int = 0
    id_lists: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches


def compare(exe_cmd: list, exported_dir: Path, tokenizer_json: Path, texts: list[str],
            id_lists: list[list[int]] = ()) -> Comparison:
    """Encode every text and decode every id list with the C++ tokenizer and with `tokenizers`:
    ids, decode, decode without specials, and the stream decoder must all agree."""
    encode, decode = hf_functions(tokenizer_json)
    result = Comparison(texts=len(texts), id_lists=len(id_lists))
    for text, (ids, dec, dec_skip, streamed) in zip(texts, tokenize_with(exe_cmd, exported_dir,
                                                                         texts)):
        ref = encode(text)
        result.tokens += len(ref)
        if ids != ref:
            result.mismatches.append(f"ids of {text[:60]!r}: {ids[:12]} != {ref[:12]}")
        elif not dec == decode(ref, False) == streamed:
            result.mismatches.append(f"decode of {text[:60]!r}")
        elif dec_skip != decode(ref, True):
            result.mismatches.append(f"decode(skip_special) of {text[:60]!r}")
    if id_lists:
        for ids, (dec, dec_skip, streamed) in zip(id_lists, decode_with(exe_cmd, exported_dir,
                                                                        list(id_lists))):
            if not dec == decode(ids, False) == streamed or dec_skip != decode(ids, True):
                result.mismatches.append(f"decode of ids {ids[:12]}")
    return result
