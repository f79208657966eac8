"""The android target (targets/executorch): the program holds the core's weights and runs them as
the plan says, inside XNNPACK, in ExecuTorch's own LLM runner too; nothing planned is left in
float or outside the delegate without the build failing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="pip install 'apq-sdk[executorch]' torch==2.13.0")
pytest.importorskip("torchao", reason="pip install 'apq-sdk[executorch]' torch==2.13.0")

from apq_sdk.builder import BuildRequest, build  # noqa: E402
from apq_sdk.calibration import builtin_text  # noqa: E402
from apq_sdk.checkpoint import load_quantized, read_checkpoint  # noqa: E402
from apq_sdk.errors import ApqError  # noqa: E402
from apq_sdk.package import reference_dir  # noqa: E402
from apq_sdk.targets.executorch import program as et_program  # noqa: E402
from apq_sdk.targets.executorch.pte_reader import Pte, PteFormatError, weights_index  # noqa: E402
from apq_sdk.targets.base import get_target  # noqa: E402
from apq_sdk.targets.executorch.target import AndroidTarget, PteDecoder  # noqa: E402
from apq_sdk.testing import TINY_MODELS, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text(builtin_text()[:60_000])
    model = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")
    out = tmp_path_factory.mktemp("pkg")
    return build(BuildRequest(target="android", model=str(model), output=out, calib=str(calib),
                              memory_reduction=0.5, samples=8, seq_len=48, verify_windows=1),
                 log=lambda _: None)


@pytest.fixture(scope="module")
def checkpoint(package):
    return read_checkpoint(reference_dir(package))


@pytest.fixture(scope="module")
def lowbit_package(tmp_path_factory) -> Path:
    """The android-lowbit preset at 4.2 bits per weight (the tiny llama's least is 3.9): most of
    its layers at 2 and 3 bits, on apq::lowbit_linear."""
    import shutil

    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("a C++ compiler is needed to build apq::lowbit_linear")
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text(builtin_text()[:60_000])
    model = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")
    out = tmp_path_factory.mktemp("pkg")
    return build(BuildRequest(target="android-lowbit", model=str(model), output=out,
                              calib=str(calib), bits_per_weight=4.2, samples=8, seq_len=48,
                              verify_windows=1), log=lambda _: None)


@pytest.fixture(scope="module")
def lowbit_checkpoint(lowbit_package):
    return read_checkpoint(reference_dir(lowbit_package))


def test_the_program_is_delegated_and_says_what_it_holds(package, checkpoint):
    desc = json.loads((package / "program.json").read_text())
    audit = desc["delegation"]
    planned = [n for n, m in checkpoint.plan.modules.items() if m.kind != "embedding"]
    assert audit["planned_linears"] == audit["delegated_linears"] == len(planned)
    assert audit["undelegated_modules"] == []
    assert set(desc["weights"]) == set(checkpoint.plan.modules)
    meta = desc["metadata"]
    assert meta["use_kv_cache"] and meta["enable_dynamic_shape"]
    assert meta["get_max_seq_len"] == desc["max_context"]
    assert meta["get_vocab_size"] == checkpoint.spec.vocab_size
    # the quantized layers are XNNPACK's blockwise int4 with the plan's dynamic activations
    quantized = {n for n, m in checkpoint.plan.modules.items() if m.bits == 4}
    assert quantized and all(desc["weights"][n]["kind"] == "xnnpack-qbint4" for n in quantized)
    assert all(checkpoint.plan.modules[n].activation == "int8-per-token-asym-dynamic"
               and checkpoint.plan.modules[n].scale_dtype == "bfloat16" for n in quantized)


def test_the_exportable_model_is_the_reference_in_eager_torch(checkpoint):
    """torchao's int4 tensors built from the codes compute what the reference modules do."""
    ids = torch.randint(0, checkpoint.spec.vocab_size, (1, 24), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        want = load_quantized(checkpoint.path, checkpoint=checkpoint)(ids).logits
        got = et_program.exportable_model(checkpoint)(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("which", ["package", "lowbit_package"])
def test_executorchs_own_llm_runner_generates_what_our_runner_decodes(which, request):
    """The .pte and tokenizer.json load in ExecuTorch's TextLLMRunner (the C++ runner Android's
    LlmModule wraps); its greedy text equals argmax decoding through our runner. The lowbit
    program runs there too once apq::lowbit_linear is registered with the runtime."""
    import executorch.kernels.quantized  # noqa: F401  (embedding_4bit in the runner's registry)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from tokenizers import Tokenizer

    package = request.getfixturevalue(which)
    if json.loads((package / "program.json").read_text())["apq_kernels"]:
        from apq_sdk.targets.executorch.lowbit import load_kernel_library

        load_kernel_library()

    prompt = "The history of the city begins"
    tokenizer = Tokenizer.from_file(str(package / "tokenizer.json"))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    ours = PteDecoder(package / "model.pte")
    logits, state = ours.step(np.array(ids), None)
    tokens = []
    for _ in range(6):
        tokens.append(int(np.argmax(logits[-1])))
        logits, state = ours.step(np.array(tokens[-1:]), state)
    pieces: list[str] = []
    runner = TextLLMRunner(str(package / "model.pte"), str(package / "tokenizer.json"))
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=6, temperature=0.0),
                    token_callback=pieces.append)
    assert "".join(pieces) == tokenizer.decode(tokens)


def test_a_runner_step_from_an_older_state_refills_the_cache(package):
    runner = PteDecoder(package / "model.pte")
    ids = np.arange(3, 19)
    full = runner.full(ids)
    _, state = runner.step(ids[:8], None)
    runner.full(ids[:3])  # the program's cache now holds something else
    tail, _ = runner.step(ids[8:], state)
    assert np.abs(tail - full[8:]).max() <= 1e-4 * np.abs(full).max()


def test_the_custom_op_program_computes_what_the_static_cache_program_does(package, checkpoint):
    """The package's program attends through ExecuTorch's LLM ops (what export_llm emits); the
    same weights exported over transformers' static cache give the same logits, prefill and
    decode, in the runtime."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    program = json.loads((package / "program.json").read_text())
    assert program["attention"] == "custom-ops"
    assert program["metadata"]["use_sdpa_with_kv_cache"] is True
    outside = program["delegation"]["ops_outside_delegates"]
    assert outside.get("custom_sdpa") and outside.get("update_cache"), outside
    ids = torch.arange(5, 25)[None]
    logits = {}
    for attention in et_program.ATTENTION:
        with torch.no_grad():
            exported = et_program.export_program(et_program.exportable_model(checkpoint), 64,
                                                 attention)
        edge = et_program.lower_program(exported, [XnnpackPartitioner()], {})
        method = et_program.LoadedMethod(edge.to_executorch().buffer)
        prefill = method.execute([ids[:, :13], torch.arange(13)])[0]
        steps = [method.execute([ids[:, i:i + 1], torch.tensor([i])])[0] for i in range(13, 20)]
        logits[attention] = torch.cat([prefill, *steps], 1)
    static, ops = logits["static-cache"], logits["custom-ops"]
    assert (ops - static).abs().max() <= 1e-5 * static.abs().max()


def test_verify_checks_the_cache_exactly_on_a_float_probe(package, checkpoint, monkeypatch):
    """Per-token int8 rounding blurs the package's own KV-cache check (custom_sdpa sums in a
    length-dependent order), so verify also runs a float program with the same cache and
    attention: its decode must equal its full sequence. A runner that decodes one position off
    fails that check, while it can still pass the blurred one on a tiny model."""
    from apq_sdk.targets.executorch import target as et_target

    result = json.loads((package / "verify.json").read_text())
    probe = result["kv_cache"]["float_probe"]
    assert probe["relative"] < 1e-5 and "custom-ops" in probe["probe"]

    class OffByOne(PteDecoder):
        def _run(self, ids, start):
            return super()._run(ids, start + 1 if len(ids) == 1 and start > 0 else start)

    monkeypatch.setattr(et_target, "PteDecoder", OffByOne)
    broken = AndroidTarget().verify(package, checkpoint=checkpoint, text_path=None, windows=1)
    check = next(c for c in broken.checks if c.name.startswith("KV cache, float probe"))
    assert not check.passed and check.measured > 1e-3, broken.table()


@pytest.mark.parametrize("family", TINY_MODELS)
def test_the_attention_follows_the_family(family):
    """ExecuTorch's custom_sdpa attends causally over the whole cache, without soft-capping:
    'auto' takes it where the family allows and the static cache elsewhere; asking for it where
    it cannot serve is refused naming the reason and the fix."""
    from types import SimpleNamespace

    from apq_sdk.families import decoder_spec
    from apq_sdk.targets.onnx_graph import LoweringError
    from apq_sdk.testing import _config

    spec = decoder_spec(_config(family))
    plain = all(w is None for w in spec.sliding_windows) and not spec.attn_softcap
    assert (et_program.custom_ops_refusal(spec) is None) == plain

    def attention(asked):
        ctx = SimpleNamespace(options={"attention": asked}, checkpoint=SimpleNamespace(spec=spec))
        return AndroidTarget()._attention(ctx)

    assert attention("auto") == ("custom-ops" if plain else "static-cache")
    assert attention("static-cache") == "static-cache"
    if plain:
        assert attention("custom-ops") == "custom-ops"
    else:
        with pytest.raises(LoweringError, match="attention=static-cache"):
            attention("custom-ops")


def test_a_planned_layer_left_in_float_is_caught(checkpoint):
    """ExecuTorch's own recipe skips layers whose width its group size does not divide and
    leaves them in float; in an apq-sdk build every planned layer must be found in the program
    as planned, or the build fails naming it."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from apq_sdk.placement import replace_module

    model = et_program.exportable_model(checkpoint)
    victim = next(n for n, m in sorted(checkpoint.plan.modules.items())
                  if m.bits == 4 and m.kind == "linear")
    reference = load_quantized(checkpoint.path, checkpoint=checkpoint).get_submodule(victim)
    float_layer = torch.nn.Linear(reference.in_features, reference.out_features, bias=False)
    float_layer.weight = torch.nn.Parameter(reference.weight.clone(), requires_grad=False)
    replace_module(model, victim, float_layer)
    with torch.no_grad():
        exported = et_program.export_program(model, 64)
    edge = et_program.lower_program(exported, [XnnpackPartitioner()], {})
    with pytest.raises(PteFormatError, match=victim.replace(".", r"\.")):
        weights_index(Pte(edge.to_executorch().buffer), checkpoint)


def test_a_linear_outside_the_delegate_fails_the_build(checkpoint, tmp_path, monkeypatch):
    """Lowered without the partitioner, every planned linear stays outside: the audit names
    them and lower() refuses to write the package."""
    from apq_sdk.targets.base import BuildContext
    from apq_sdk.targets.onnx_graph import LoweringError

    monkeypatch.setattr(AndroidTarget, "partitioners", lambda self: [])
    with pytest.raises(LoweringError, match=r"planned layers stayed outside the XnnpackBackend "
                                            r"delegate.*lm_head"):
        AndroidTarget().lower(BuildContext(package_dir=tmp_path, checkpoint=checkpoint,
                                           model_name="m", package_name="p"))
    assert not (tmp_path / "model.pte").exists()


def test_executorchs_recipe_skips_layers_its_group_does_not_divide():
    """The peer's behaviour the plan avoids: export_llm's quantize_model_ with 8da4w at groups
    of 128 leaves a layer of width 576 (SmolLM2's) unquantized when told to skip, and fails
    otherwise."""
    from executorch.extension.llm.export.quantize import quantize_model_

    model = torch.nn.Sequential(torch.nn.Linear(576, 64, bias=False),
                                torch.nn.Linear(256, 64, bias=False))
    quantize_model_(model, qlinear_config="8da4w", qlinear_group_size=128,
                    skip_incompatible_shapes=True)
    assert type(model[0].weight) is torch.nn.Parameter and model[0].weight.dtype == torch.float32
    assert type(model[1].weight).__name__ == "IntxUnpackedToInt8Tensor"
    with pytest.raises(RuntimeError, match="incompatible with 8da4w"):
        quantize_model_(torch.nn.Sequential(torch.nn.Linear(576, 64)), qlinear_config="8da4w",
                        qlinear_group_size=128)


def test_read_weights_names_a_program_without_its_index(package, checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "p"
    shutil.copytree(package, broken)
    desc = json.loads((broken / "program.json").read_text())
    del desc["weights"]
    (broken / "program.json").write_text(json.dumps(desc))
    with pytest.raises(ApqError, match="model.pte"):
        AndroidTarget().read_weights(broken, checkpoint.plan)


LOGITS_PROGRAM = r"""
// Runs model.pte's forward on token ids from argv through ExecuTorch's C++ Module (prefill of
// all but the last id, then one decode step) and writes both logits as raw float32 to stdout.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
using executorch::extension::Module;
int main(int argc, char** argv) {
  Module module(argv[1]);
  std::vector<int64_t> ids;
  for (int i = 2; i < argc; ++i) ids.push_back(std::atoll(argv[i]));
  const int64_t n = static_cast<int64_t>(ids.size()) - 1;
  std::vector<int64_t> prefill(ids.begin(), ids.end() - 1), positions(n), last(1, ids.back()),
      where(1, n);
  for (int64_t k = 0; k < n; ++k) positions[k] = k;
  auto a = module.forward({executorch::extension::from_blob(prefill.data(), {1, (int)n},
                                                            executorch::aten::ScalarType::Long),
                           executorch::extension::from_blob(positions.data(), {(int)n},
                                                            executorch::aten::ScalarType::Long)});
  if (!a.ok()) return 3;
  auto ta = a.get()[0].toTensor();
  fwrite(ta.const_data_ptr<float>(), sizeof(float), ta.numel(), stdout);
  auto b = module.forward({executorch::extension::from_blob(last.data(), {1, 1},
                                                            executorch::aten::ScalarType::Long),
                           executorch::extension::from_blob(where.data(), {1},
                                                            executorch::aten::ScalarType::Long)});
  if (!b.ok()) return 4;
  auto tb = b.get()[0].toTensor();
  fwrite(tb.const_data_ptr<float>(), sizeof(float), tb.numel(), stdout);
  return 0;
}
"""

API_PROGRAM = r"""
#include <stdio.h>
#include "apq_model.h"
static int on_token(const char* text, size_t len, int token_id, void* user) {
  (void)text; (void)len; (void)user;
  if (token_id >= 0) printf("%d\n", token_id);
  return 0;
}
int main(int argc, char** argv) {
  apq_model* model;
  apq_generate_options opts;
  if (argc < 3) return 2;
  if (apq_model_open(argv[1], &model) != APQ_OK) { fprintf(stderr, "%s\n", apq_last_error()); return 3; }
  apq_generate_options_init(&opts);
  opts.max_new_tokens = 8;
  opts.stop_at_eos = 0;
  if (apq_generate(model, argv[2], &opts, on_token, NULL) != APQ_OK) {
    fprintf(stderr, "%s\n", apq_last_error()); return 4;
  }
  apq_model_close(model);
  return 0;
}
"""


def _executorch_root() -> Path:
    """The wheel's directory. ``executorch`` is a namespace package, so this test folder
    (tests/targets/executorch, on sys.path's tests/targets through test_conformance.py) can be
    one of its portions, and the first one in CI: pick the portion that holds the CMake package."""
    import executorch  # a namespace package: no __file__

    for portion in map(Path, executorch.__path__):
        if (portion / "lib" / "cmake" / "executorch").is_dir():
            return portion
    pytest.fail(f"no portion of the executorch package holds lib/cmake/executorch: "
                f"{list(executorch.__path__)}")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["package", "lowbit_package"])
def test_the_packages_c_api_builds_against_the_wheel_and_matches_the_python_runtime(which,
                                                                                   request,
                                                                                   tmp_path):
    """The package's CMake project (C API, tokenizer, apq_run, the bundled kernels of ExecuTorch's
    LLM ops, and apq::lowbit_linear where the program calls it) builds against the headers,
    libraries and CMake package ExecuTorch's wheel ships; ExecuTorch's C++ Module with those
    kernels gives the Python runtime's logits (the same function: within 2e-5, attention sums
    tiled differently), and the C API generates the same greedy tokens."""
    import shutil
    import subprocess

    from tokenizers import Tokenizer

    package = request.getfixturevalue(which)
    cmake, gxx, gcc = shutil.which("cmake"), shutil.which("g++"), shutil.which("gcc")
    if not (cmake and gxx and gcc):
        pytest.skip("cmake, g++ and gcc are needed to build the package's C API")
    root = _executorch_root()
    build_dir = tmp_path / "build"
    subprocess.run([cmake, "-S", package, "-B", build_dir, f"-DEXECUTORCH_ROOT={root}"],
                   check=True, capture_output=True, text=True)
    done = subprocess.run([cmake, "--build", build_dir, "-j", "2"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # ExecuTorch's C++ Module on model.pte == the Python runtime, bit for bit
    source = tmp_path / "logits.cpp"
    source.write_text(LOGITS_PROGRAM)
    exe = tmp_path / "logits"
    include = [f"-I{root / 'include'}",
               f"-I{root / 'include/executorch/runtime/core/portable_type/c10'}"]
    libs = [str(p) for p in sorted((root / "lib").glob("libexecutorch*.so"))
            if "openvino" not in p.name and "qnn" not in p.name]
    program = json.loads((package / "program.json").read_text())
    assert program["attention"] == "custom-ops" and program["llm_ops"]
    ops = [package / "src" / "executorch_llm_ops.cpp"]  # what the wheel's runtime lacks
    if program["apq_kernels"]:
        ops.append(package / "src" / "executorch_lowbit_linear.cpp")
    subprocess.run([gxx, "-std=c++17", "-O1", "-ffp-contract=off",
                    "-DC10_USING_CUSTOM_GENERATED_MACROS", *include, source, *ops, "-o", exe, "-Wl,--no-as-needed", *libs, "-Wl,--as-needed",
                    f"-Wl,-rpath,{root / 'lib'}"], check=True, capture_output=True)
    ids = [3, 17, 29, 41, 5, 77, 8]
    out = subprocess.run([exe, package / "model.pte", *map(str, ids)], capture_output=True,
                         check=True, timeout=300).stdout
    native = np.frombuffer(out, dtype=np.float32)
    runner = PteDecoder(package / "model.pte", apq_kernels=bool(program["apq_kernels"]))
    first, state = runner.step(np.array(ids[:-1]), None)
    second, _ = runner.step(np.array(ids[-1:]), state)
    python = np.concatenate([first.ravel(), second.ravel()])
    assert native.shape == python.shape
    assert np.abs(native - python).max() <= 2e-5 * max(1.0, np.abs(python).max())

    # the C API (a C89 program over libapq_model) generates the Python runtime's greedy tokens
    api = tmp_path / "api.c"
    api.write_text(API_PROGRAM)
    api_exe = tmp_path / "api"
    subprocess.run([gcc, "-std=c89", "-pedantic", "-Wall", "-Werror", f"-I{package / 'include'}",
                    api, "-o", api_exe, f"-L{build_dir}", "-lapq_model",
                    f"-Wl,-rpath,{build_dir}"], check=True, capture_output=True)
    prompt = "The history of the city"
    got = [int(t) for t in subprocess.run([api_exe, package, prompt], capture_output=True,
                                          check=True, text=True, timeout=300).stdout.split()]
    tokens = Tokenizer.from_file(str(package / "tokenizer.json")).encode(prompt).ids
    logits, state = runner.step(np.array(tokens), None)
    want = []
    for _ in range(8):
        want.append(int(np.argmax(logits[-1])))
        logits, state = runner.step(np.array(want[-1:]), state)
    assert got == want
    version = subprocess.run([build_dir / "apq_run", "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.startswith("tiny-llama")


def test_the_recorder_keeps_one_layer_without_touching_the_reference(checkpoint):
    """verify loads the torch reference, then lowers a recorder with fewer layers: the recorder's
    truncation must not reach the reference's config (it once did through a shared config object,
    and the reference ran only the recorder's layers: its perplexity on the demo was ~1e8, which
    made the int8 accuracy bound of every android package vacuous)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    reference = load_quantized(checkpoint.path, checkpoint=checkpoint).eval()
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        before = reference(input_ids=ids, use_cache=False).logits
        et_program.recording_program(checkpoint, 8, [XnnpackPartitioner()], layers=1)
        after = reference(input_ids=ids, use_cache=False).logits
    assert reference.config.num_hidden_layers == checkpoint.config.num_hidden_layers == 2
    assert torch.equal(before, after)


def test_the_recording_program_keeps_the_first_layers_and_the_head(checkpoint):
    """verify records every linear of the first RECORDED_LAYERS layers and the head from a
    program lowered like the package's (a 30-layer recorder would double a build's time)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    _, names = et_program.recording_program(checkpoint, 16, [XnnpackPartitioner()], layers=1)
    assert "lm_head" in names
    assert {et_program._layer_of(n) for n in names} == {0, None}
    assert len(names) == 1 + sum(1 for n in checkpoint.plan.modules
                                 if et_program._layer_of(n) == 0)


# -- android-lowbit: 2- and 3-bit layers on apq::lowbit_linear ------------------------------------

def test_the_lowbit_program_runs_its_low_layers_on_the_kernel(lowbit_package, lowbit_checkpoint):
    """Every 2/3-bit layer is one apq::lowbit_linear over the checkpoint's own bytes, and so is
    the tied head, whose lookup (apq::lowbit_embedding) reads the same constants: the program
    holds them once. The other 4-bit and the 16-bit layers are still XNNPACK's; nothing else is
    outside the delegate."""
    desc = json.loads((lowbit_package / "program.json").read_text())
    plan = lowbit_checkpoint.plan.modules
    low = {n for n, m in plan.items() if m.kind != "embedding" and m.bits in (2, 3)}
    assert low, "the budget must plan 2/3-bit layers for this test to mean anything"
    assert lowbit_checkpoint.config.tie_word_embeddings and plan["lm_head"].bits == 4
    kernel = low | {"lm_head"}
    audit = desc["delegation"]
    assert audit["kernel_linears"] == len(kernel)
    assert audit["delegated_linears"] == audit["planned_linears"] - len(kernel)
    assert audit["undelegated_modules"] == []
    assert audit["ops_outside_delegates"]["lowbit_linear"] == len(kernel)
    assert audit["ops_outside_delegates"]["lowbit_embedding"] == 1
    assert "embedding_4bit" not in audit["ops_outside_delegates"]
    assert desc["apq_kernels"] == ["apq::lowbit_linear.out", "apq::lowbit_embedding.out"]
    assert {n for n, w in desc["weights"].items() if w["kind"] == "apq-lowbit"} == kernel
    assert desc["weights"]["lm_head"]["lookup"] == {"kind": "shared"}
    # the whole program: the plan's bytes as the target counts them (one copy of the head)
    totals = lowbit_checkpoint.plan.totals
    assert totals.target_bits_per_weight == pytest.approx(totals.model_bits_per_weight)
    manifest = json.loads((lowbit_package / "manifest.json").read_text())
    assert manifest["target"]["name"] == "android-lowbit"
    assert any("apq::lowbit_linear" in line
               for line in manifest["validation"]["not_validated_here"])
    assert (lowbit_package / "src" / "executorch_lowbit_linear.cpp").is_file()
    gradle = (lowbit_package / "android" / "apq-model" / "build.gradle.kts").read_text()
    assert "apqExecutorchAar" in gradle and "org.pytorch:executorch-android:" not in gradle


def test_a_changed_lowbit_code_byte_is_caught(lowbit_package, lowbit_checkpoint, tmp_path):
    """read_weights reads the kernel's operands back from model.pte: a flipped byte in one 2/3-bit
    layer's codes makes that module differ from the checkpoint."""
    import shutil

    from apq_sdk.verification import compare_weights

    broken = tmp_path / "p"
    shutil.copytree(lowbit_package, broken)
    desc = json.loads((broken / "program.json").read_text())
    name = next(n for n, w in sorted(desc["weights"].items()) if w["kind"] == "apq-lowbit")
    codes = lowbit_checkpoint.modules[name].arrays["qweight"].tobytes()
    data = bytearray((broken / "model.pte").read_bytes())
    at = bytes(data).find(codes)
    assert at >= 0 and bytes(data).find(codes, at + 1) < 0
    data[at + 5] ^= 0x10
    (broken / "model.pte").write_bytes(bytes(data))
    target = get_target("android-lowbit")()
    try:
        read = target.read_weights(broken, lowbit_checkpoint.plan)
    except ApqError as exc:  # the index no longer finds it where it was: also a catch
        assert name in str(exc) or "constant" in str(exc)
        return
    result = compare_weights(lowbit_checkpoint, read)
    assert result["mismatched"] == 1 and name in str(result["examples"])


def test_the_android_target_refuses_what_only_the_kernel_runs(lowbit_checkpoint):
    """Without the kernel (the android target), a 2/3-bit layer is refused at lowering with the
    target that runs it; a kernel layer found anywhere but in apq::lowbit_linear fails the audit."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from apq_sdk.targets.onnx_graph import LoweringError

    with pytest.raises(LoweringError, match="android-lowbit"):
        et_program.exportable_model(lowbit_checkpoint)
    model = et_program.exportable_model(lowbit_checkpoint, lowbit_kernel=True)
    with torch.no_grad():
        exported = et_program.export_program(model, 64)
    edge = et_program.lower_program(exported, [XnnpackPartitioner()], {})
    planned = {n for n, m in lowbit_checkpoint.plan.modules.items() if m.kind != "embedding"}
    kernel = et_program.kernel_modules(lowbit_checkpoint, True)
    four = planned - kernel  # XNNPACK's
    assert four and all(lowbit_checkpoint.plan.modules[n].bits in (4, 16) for n in four)
    audit = et_program.audit_delegation(edge, planned, kernel=kernel)
    assert audit.undelegated_modules == []
    # the audit told that XNNPACK's layers are kernel layers: each is found in the delegate
    wrong = et_program.audit_delegation(edge, planned, kernel=planned)
    assert set(wrong.undelegated_modules) == four
    # and a kernel layer the audit was not told about is refused by name
    unplanned = et_program.audit_delegation(edge, planned, kernel=set())
    assert set(unplanned.undelegated_modules) == kernel
