"""The tensorrt template set: hostile names cannot break the generated C++/CMake/shell/README, the
runtime compiles, and its embedding lookup equals the Python reference bit for bit.

No package registry here carries TensorRT's headers (its packages download from a host this
machine cannot reach), so src/apq_model.cpp is compiled against the real CUDA runtime headers
(the CUDA toolkit beside nvcc) and tests/templates/tensorrt_decls/, a minimal declaration set of
TensorRT 10's C++ API written from its documentation and labelled as such; with
APQ_TENSORRT_INCLUDE pointing at TensorRT's public headers (e.g. NVIDIA/TensorRT's include/ at
v10.3.0 plus onnx-tensorrt's NvOnnxParser.h) it is compiled against those too. It is not linked
and not run here.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from apq_sdk.native_glue import render_templates, template_variables

ROOT = Path(__file__).resolve().parents[2]
DECLS = ROOT / "tests" / "templates" / "tensorrt_decls"
SETS = ("common", "tensorrt")  # what the jetson-orin and cuda-x86_64 targets render
HOSTILE_PACKAGE = 'evil"pkg\\ */ /* ??= ??/ $(rm -rf /); `id` ${HOME} ü 日本 </script> # *md* [a](b)\nnext'
HOSTILE_MODEL = "Model \"X\" '; DROP --\\\\n */ ??' ;; ${CMAKE_COMMAND} \U0001F600 <b>bold</b>\r\n\ttab"
GXX = shutil.which("g++")
CLANG = shutil.which("clang++")
CMAKE = shutil.which("cmake")
CUDA_INCLUDE = next((Path(p).parent for p in sorted(glob.glob("/usr/local/cuda*/include/cuda_runtime_api.h"))
                     + sorted(glob.glob("/usr/include/cuda_runtime_api.h"))), None)
needs_cuda_headers = pytest.mark.skipif(
    GXX is None or CUDA_INCLUDE is None,
    reason="g++ or the CUDA runtime headers (cuda_runtime_api.h of a CUDA toolkit) are missing")


def _context(**changes) -> dict:
    from apq_sdk.targets.tensorrt.target import engine_profiles

    numbers = dict(vocab_size=384, num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64,
                   max_context=256, eos_token_id=2, bos_token_id=-1)
    context = dict(package_name=HOSTILE_PACKAGE, model_name=HOSTILE_MODEL,
                   target='jetson-orin"; ??= */', sdk_version="0.1.0 $(x) \\ ;",
                   runtime='TensorRT "10.3" */', gpu_arch="sm_87",
                   device="Orin 'x' $(touch PWNED) `touch PWNED`",
                   device_check="jetson-orin", tensorrt_version="10.3",
                   jetpack="6.1 \"$(touch PWNED)\"",
                   plan_sha256="ab" * 32, on_jetson=1, prefill_chunk=128, embed_format=2,
                   embed_bits=4, embed_group=32, embed_zero=8, embed_codes_offset=0,
                   embed_scales_offset=384 * 32, embed_bytes=384 * 32 + 384 * 2 * 2,
                   **numbers, **engine_profiles(numbers))
    context.update(changes)
    return context


def run(cmd, **kw):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert result.returncode == 0, \
        f"{' '.join(map(str, cmd))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile-trt") / "pkg"
    written = render_templates(SETS, _context(), out)
    assert {p.relative_to(out).as_posix() for p in written} == {
        "CMakeLists.txt", "README.md", "build_engine.sh", "include/apq_model.h",
        "src/apq_model.cpp", "src/apq_embeddings.hpp", "src/apq_run.cpp", "src/apq_util.hpp",
        "src/tokenizer.cpp", "src/tokenizer.hpp"}
    return out


def test_the_test_context_covers_every_template_key():
    from apq_sdk.targets.tensorrt.target import embedding_macros, engine_profiles

    assert set(_context()) == template_variables(SETS)
    assert set(embedding_macros({"format": "float16", "bytes": 4})) == \
        {k for k in template_variables(SETS) if k.startswith("embed_")}
    assert set(engine_profiles(dict(num_layers=1, num_kv_heads=1, head_dim=8, hidden_size=8,
                                    max_context=16))) == \
        {k for k in template_variables(SETS) if k.startswith(("decode_", "prefill_"))} - \
        {"prefill_chunk"}


def test_rendering_is_deterministic(hostile, tmp_path):
    render_templates(SETS, _context(), tmp_path / "again")
    for path in hostile.rglob("*"):
        if path.is_file():
            assert (tmp_path / "again" / path.relative_to(hostile)).read_bytes() == path.read_bytes()


def test_build_engine_script_is_valid_bash_with_hostile_names(hostile, tmp_path):
    script = hostile / "build_engine.sh"
    run(["bash", "-n", script])
    for line in script.read_text().splitlines():  # the names reach comments and quoted words only
        if "PWNED" in line and not line.startswith("#"):
            assert line.startswith(("device='", "jetpack='")), line
    result = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--force" in result.stdout
    if not Path("/proc/device-tree/model").is_file():  # off a Jetson: the refusal names the device
        result = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 1
        assert "$(touch PWNED)" in result.stderr and not (tmp_path / "PWNED").exists()


@needs_cuda_headers
@pytest.mark.parametrize("embed_format", [0, 1, 2])
@pytest.mark.parametrize("on_jetson", [0, 1])
def test_runtime_compiles_against_cuda_and_the_tensorrt_declarations(embed_format, on_jetson,
                                                                     tmp_path):
    out = tmp_path / "pkg"
    render_templates(SETS, _context(embed_format=embed_format, on_jetson=on_jetson), out)
    compilers = [GXX] + ([CLANG] if CLANG else [])
    for cxx in compilers:
        for source in ("src/apq_model.cpp", "src/apq_run.cpp", "src/tokenizer.cpp"):
            run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                 f"-I{out / 'include'}", f"-I{out / 'src'}", f"-I{DECLS}", f"-I{CUDA_INCLUDE}",
                 out / source])


REAL_TENSORRT = os.environ.get("APQ_TENSORRT_INCLUDE")


@pytest.mark.skipif(
    not REAL_TENSORRT or GXX is None or CUDA_INCLUDE is None,
    reason="set APQ_TENSORRT_INCLUDE to a directory with TensorRT's public headers (NvInfer.h and "
           "friends, NvOnnxParser.h) to compile against them; no package registry here carries them")
@pytest.mark.parametrize("embed_format", [0, 1, 2])
def test_runtime_compiles_against_tensorrts_own_headers(embed_format, tmp_path):
    out = tmp_path / "pkg"
    render_templates(SETS, _context(embed_format=embed_format), out)
    run([GXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
         f"-I{out / 'include'}", f"-I{out / 'src'}", "-isystem", REAL_TENSORRT,
         "-isystem", CUDA_INCLUDE, out / "src/apq_model.cpp"])


def test_the_declaration_set_says_what_it_is():
    for header in DECLS.glob("*.h"):
        assert "MINIMAL DECLARATION SET, NOT NVIDIA'S HEADER" in header.read_text(), header.name


@pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")
def test_cmake_configure_stops_at_a_clear_message(hostile, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TENSORRT_ROOT"}
    result = subprocess.run([CMAKE, "-S", hostile, "-B", tmp_path / "build"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    # with a CUDA toolkit here configure gets as far as TensorRT; without one it stops at CUDA
    want = "TensorRT not found" if CUDA_INCLUDE is not None else "CUDAToolkit"
    assert want in result.stderr, result.stderr


def test_readme_escapes_markdown_and_shell(hostile):
    text = (hostile / "README.md").read_text()
    assert "<script>" not in text and "<b>" not in text
    scp = next(line for line in text.splitlines() if line.startswith("scp -r "))
    assert scp.startswith("scp -r 'evil") and "\n" not in scp  # one quoted word


# -- the embedding lookup, compiled and run, against the Python reference ---------------------------

LOOKUP_DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "apq_embeddings.hpp"
int main(int argc, char** argv) {
  std::FILE* f = std::fopen(argv[1], "rb");
  std::vector<unsigned char> data(APQ_EMBED_BYTES);
  if (!f || std::fread(data.data(), 1, data.size(), f) != data.size()) return 2;
  std::fclose(f);
  std::vector<int32_t> ids;
  for (int i = 2; i < argc; ++i) ids.push_back(std::atoi(argv[i]));
  std::vector<float> out(ids.size() * APQ_HIDDEN_SIZE);
  apq::lookup_embeddings(data.data(), ids.data(), ids.size(), out.data());
  std::fwrite(out.data(), sizeof(float), out.size(), stdout);
  return 0;
}
"""


@pytest.mark.skipif(GXX is None, reason="g++ is not installed")
@pytest.mark.parametrize("family,budget", [("llama", 0.5), ("phi3", 0.5), ("qwen3", 0.2)])
def test_the_compiled_lookup_equals_the_python_reference(family, budget, tiny_model_factory,
                                                         tmp_path, monkeypatch):
    from apq_sdk.builder import BuildRequest, build
    from apq_sdk.calibration import builtin_text
    from apq_sdk.targets.tensorrt.embeddings import EmbeddingTable

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    calib = tmp_path / "calib.txt"
    calib.write_text(builtin_text()[:60_000])
    package = build(BuildRequest(target="jetson-orin", model=str(tiny_model_factory(family)),
                                 output=tmp_path / "out", calib=str(calib),
                                 memory_reduction=budget, verify=False, samples=8, seq_len=48,
                                 head_bits="16" if family == "qwen3" else "auto"),
                    log=lambda _: None)
    desc = json.loads((package / "onnx_io.json").read_text())["embeddings"]
    (tmp_path / "driver.cpp").write_text(LOOKUP_DRIVER)
    exe = tmp_path / "lookup"
    run([GXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{package / 'src'}",
         tmp_path / "driver.cpp", "-o", exe])
    ids = list(range(0, desc["rows"], 5)) + [desc["rows"] - 1]
    result = subprocess.run([exe, package / "embeddings.bin", *map(str, ids)], capture_output=True)
    assert result.returncode == 0, result.stderr
    got = np.frombuffer(result.stdout, np.float32).reshape(len(ids), desc["cols"])
    want = EmbeddingTable(package, desc).lookup(np.array(ids))
    assert np.array_equal(got, want)  # bit for bit
    assert got.any()
