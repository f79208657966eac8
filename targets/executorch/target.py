"""ExecuTorch targets: `android` (XNNPACK on Arm CPUs) and `qualcomm` (QNN on Snapdragon NPUs).

`lower` builds the program from the checkpoint (targets/executorch/program.py: the core's codes
and scales in torchao's unpacked int4 tensors, never re-quantized), exports it with its KV cache
(ExecuTorch's LLM ops llama::update_cache and llama::custom_sdpa where the family allows, as
export_llm does; option `attention`), lowers it with the XNNPACK partitioner and audits the
result: every planned linear must sit inside an XNNPACK delegate, or the build fails naming the
module. It writes

* `model.pte`: the program, with the metadata ExecuTorch's LLM runner and Android's `LlmModule`
  read (get_max_seq_len, get_max_context_len, get_vocab_size, get_bos_id, get_eos_ids,
  use_kv_cache, enable_dynamic_shape, use_sdpa_with_kv_cache);
* `tokenizer.json` (the runner's HF tokenizer), `program.json` (the I/O contract, geometry and
  the delegation audit);
* the Android library module and README (templates/executorch).

What XNNPACK runs, measured here with ExecuTorch 1.5.1 and torchao 0.18 (tests/targets/executorch):
4-bit weights per group (a group size dividing the input width) or per channel with int8
per-token asymmetric dynamic activations, and int8 weights per channel. 2-, 3- and 8-bit groups
fail at lowering ("Only 4b group quantization is supported"); 2 and 3 bits per channel are
silently widened to int8 (no memory saved); weight-only int4 (float activations) is taken by the
partitioner and computes garbage (max error 1e3 on a unit-scale layer), so quantized layers must
take the dynamic activations; the 4-bit kernels keep their scales in bfloat16, so the core rounds
them to bfloat16's grid for this target; float16 weights are not delegated (a cast and a portable
matmul), so 16-bit layers are float32 in the program.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..base import (BuildContext, BuildOption, Capabilities, PrefixCacheRunner, Target, Tool,
                    export_glue_tokenizer, glue_numbers)
from . import quiet_toolchain

MODEL_FILE = "model.pte"
PROGRAM_FILE = "program.json"
TOKENIZER_FILE = "tokenizer.json"
LLM_OPS_SOURCE = "executorch_llm_ops.cpp"  # runtime_kernels/: reference kernels of llama:: ops
LOWBIT_SOURCES = ("executorch_lowbit_linear.cpp",  # runtime_kernels/: apq::lowbit_linear
                  "apq_lowbit_linear.hpp")  # and its arithmetic
EXECUTORCH_VERSION = "1.5.1"  # what packages are exported with and checked against here

ATTENTION = BuildOption(
    "attention", ("auto", "custom-ops", "static-cache"), "auto",
    "how the program attends over its KV cache: ExecuTorch's LLM kernels (llama::update_cache, "
    "llama::custom_sdpa, what export_llm emits; 'auto' picks them unless the family has "
    "sliding windows or soft-capping) or transformers' static cache with aten SDPA over the "
    "whole context (any family, several times slower decode); recorded in program.json")

ANDROID_CAPABILITIES = Capabilities(
    name="android",
    weight_bits=(4, 16),
    group_sizes=(32, 64, 128, 256),
    activation_modes=("int8-per-token-asym-dynamic",),
    default_activation="int8-per-token-asym-dynamic",
    quantized_activation="int8-per-token-asym-dynamic",
    symmetric_only=True,
    whole_groups=True,
    fused=(),
    head_bits=(4, 16),
    max_context=2048,
    families=("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
              "smollm3"),
    scale_bytes=2,  # XNNPACK's blockwise int4 kernels keep bfloat16 scales
    scale_dtype="bfloat16",
    float_weight_bytes=4,  # XNNPACK's float GEMM reads float32 weights
    tied_lookup="copy",  # embedding_4bit reads its own copy of a tied head's codes
    notes=("XNNPACK (ExecuTorch 1.5.1, torchao 0.18): 4-bit symmetric groups that divide the "
           "input width, with int8 per-token asymmetric dynamic activations (qd8-f32-qb4w); "
           "bfloat16 block scales; 16-bit layers float32. 2-, 3- and 8-bit groups are refused "
           "(no XNNPACK kernel: they fail at lowering or are silently widened to int8), and "
           "weight-only int4 is refused (XNNPACK computes it wrongly). A tied 4-bit head's "
           "lookup is quantized_decomposed::embedding_4bit over a second copy of its codes."),
)


class ExecuTorchTarget(Target):
    """The ExecuTorch build path shared by the Android (XNNPACK) and Qualcomm (QNN) targets."""

    backend: ClassVar[str]
    #: whether the backend's runtime runs ExecuTorch's LLM ops (program.py, ATTENTION)
    llm_custom_ops: ClassVar[bool] = False
    #: whether 2- and 3-bit layers run apq::lowbit_linear (lowbit.py; the runtime must link
    #: runtime_kernels/executorch_lowbit_linear.cpp)
    lowbit_kernel: ClassVar[bool] = False
    backend_name: ClassVar[str]  # as the README names it
    maven_artifact: ClassVar[str]  # the Android runtime the generated Gradle module depends on
    min_sdk: ClassVar[int] = 26
    template_sets = ("executorch",)
    tools = (
        Tool("executorch", "python", "pip install 'apq-sdk[executorch]' torch==2.13.0", "build"),
        Tool("torchao", "python", "pip install 'apq-sdk[executorch]' torch==2.13.0", "build"),
    )
    runtime_packages = ("executorch", "torchao")

    def partitioners(self) -> list:
        raise NotImplementedError

    # -- lowering ----------------------------------------------------------------------------------

    def lower(self, ctx: BuildContext) -> None:
        import torch

        from apq_sdk.plan_file import plan_sha256

        from ..onnx_graph import LoweringError, dumps_json
        from .lowbit import EMBEDDING_KERNEL_NAME, KERNEL_NAME
        from .program import (ATTENTION_CUSTOM_OPS, LLM_OPS, audit_delegation, export_program,
                              exportable_model, kernel_modules, lower_program)

        package_dir = Path(ctx.package_dir)
        package_dir.mkdir(parents=True, exist_ok=True)
        ckpt = ctx.checkpoint
        numbers = glue_numbers(ckpt, self.capabilities.max_context)
        max_context = int((ctx.options or {}).get("max_context", numbers["max_context"]))
        metadata = {
            "get_max_seq_len": max_context, "get_max_context_len": max_context,
            "get_vocab_size": numbers["vocab_size"], "get_n_layers": numbers["num_layers"],
            "get_bos_id": numbers["bos_token_id"], "get_eos_ids": eos_ids(ckpt),
            "use_kv_cache": True, "enable_dynamic_shape": True,
        }
        attention = self._attention(ctx)
        metadata["use_sdpa_with_kv_cache"] = attention == ATTENTION_CUSTOM_OPS
        with torch.no_grad(), quiet_toolchain():
            model = exportable_model(ckpt, lowbit_kernel=self.lowbit_kernel)
            exported = export_program(model, max_context, attention)
            edge = lower_program(exported, self.partitioners(), metadata)
        planned = {n for n, m in ckpt.plan.modules.items() if m.kind != "embedding"}
        kernel = kernel_modules(ckpt, self.lowbit_kernel)
        audit = audit_delegation(edge, planned, kernel)
        if audit.undelegated_modules:
            shown = ", ".join(audit.undelegated_modules[:8])
            more = f" and {len(audit.undelegated_modules) - 8} more" \
                if len(audit.undelegated_modules) > 8 else ""
            raise LoweringError(
                f"{len(audit.undelegated_modules)} planned layers stayed outside the "
                f"{self.backend} delegate after lowering (they would run as portable float ops): "
                f"{shown}{more}. Ops outside any delegate: {dict(audit.outside)}")
        with quiet_toolchain():
            program = edge.to_executorch()
        kernels = [KERNEL_NAME] if audit.kernel_linears else []
        if "lm_head" in kernel:
            kernels.append(EMBEDDING_KERNEL_NAME)
        from .pte_reader import Pte, PteFormatError, weights_index

        try:
            weights = weights_index(Pte(program.buffer), ckpt, kernel)
        except PteFormatError as exc:
            raise LoweringError(f"the lowered program does not hold the checkpoint's weights "
                                f"as planned: {exc}") from exc
        (package_dir / MODEL_FILE).write_bytes(program.buffer)
        for source in ckpt.tokenizer_files():
            (package_dir / source.name).write_bytes(source.read_bytes())
        from executorch.version import __version__ as et_version

        description = {
            "model_file": MODEL_FILE, "model_type": ckpt.spec.family, **numbers,
            "max_context": max_context,
            "forward": {"inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "n"]},
                                   {"name": "cache_position", "dtype": "int64", "shape": ["n"]}],
                        "outputs": [{"name": "logits", "dtype": "float32",
                                     "shape": [1, "n", numbers["vocab_size"]]}],
                        "n": f"1..{max_context}; positions continue the cache"},
            "metadata": metadata, "backend": self.backend, "executorch": et_version,
            "attention": attention,
            "llm_ops": list(LLM_OPS) if attention == ATTENTION_CUSTOM_OPS else [],
            "apq_kernels": kernels,
            "plan_sha256": plan_sha256(ckpt.plan), "delegation": audit.to_dict(),
            "weights": weights}
        (package_dir / PROGRAM_FILE).write_text(dumps_json(description))
        if (ctx.options or {}).get("native_glue", True):
            self._write_glue(ctx, package_dir, {**numbers, "max_context": max_context},
                             et_version, len(program.buffer))

    def _attention(self, ctx: BuildContext) -> str:
        """The attention the program is exported with (ATTENTION), or a LoweringError where
        custom ops were asked for a family they cannot serve."""
        from ..onnx_graph import LoweringError
        from .program import ATTENTION_CUSTOM_OPS, ATTENTION_STATIC_CACHE, custom_ops_refusal

        if not self.llm_custom_ops:
            return ATTENTION_STATIC_CACHE
        asked = (ctx.options or {}).get("attention", ATTENTION.default)
        refusal = custom_ops_refusal(ctx.checkpoint.spec)
        if asked == "auto":
            return ATTENTION_STATIC_CACHE if refusal else ATTENTION_CUSTOM_OPS
        if asked == ATTENTION_CUSTOM_OPS and refusal:
            raise LoweringError(
                f"--target-option attention=custom-ops: {ctx.checkpoint.spec.family} cannot use "
                f"llama::custom_sdpa because of {refusal}; build with attention=static-cache "
                f"(or auto, which picks it for this family)")
        return asked

    def _write_glue(self, ctx: BuildContext, package_dir: Path, numbers: dict, et_version: str,
                    model_bytes: int) -> None:
        """The C API, tokenizer and command-line runner (templates/common) on the ExecuTorch
        runtime, the Android library module, the example screen and the README
        (templates/executorch), and the plain-text tokenizer the C++ runner reads."""
        from apq_sdk import __version__
        from apq_sdk.native_glue import render_templates
        from apq_sdk.plan_file import plan_sha256

        export_glue_tokenizer(ctx.checkpoint, package_dir, self.name)
        spec = ctx.checkpoint.spec
        kv_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * \
            numbers["max_context"]
        context = {"package_name": ctx.package_name, "model_name": ctx.model_name,
                   "target": self.name, "sdk_version": __version__,
                   "runtime": f"ExecuTorch {et_version} ({self.backend_name})",
                   "backend_name": self.backend_name, "executorch_version": et_version,
                   "maven_artifact": self.maven_artifact, "min_sdk": self.min_sdk,
                   "namespace": f"org.apq.{ctx.package_name}", "model_file": MODEL_FILE,
                   "tokenizer_file": TOKENIZER_FILE, "plan_sha256": plan_sha256(ctx.plan),
                   "model_megabytes": f"{model_bytes / 1e6:.1f}",
                   "kv_cache_megabytes": f"{kv_bytes / 1e6:.1f}", **numbers}
        program = read_program(package_dir)
        llm_ops = bool(program.get("llm_ops"))
        context["llm_ops"] = llm_ops
        context["lowbit_kernel"] = bool(program.get("apq_kernels"))
        render_templates(("common", *self.template_sets), context, package_dir)
        from apq_sdk.runtime_kernels_build import kernel_source_dir

        # kernels the C API compiles in (CMakeLists.txt): ExecuTorch's LLM ops where the runtime
        # lacks them, and apq::lowbit_linear, which no ExecuTorch runtime has
        for needed, sources in ((llm_ops, (LLM_OPS_SOURCE,)),
                                (context["lowbit_kernel"], LOWBIT_SOURCES)):
            for source in sources if needed else ():
                (package_dir / "src" / source).write_bytes(
                    (kernel_source_dir() / source).read_bytes())

    # -- what verify runs --------------------------------------------------------------------------

    def model_files(self, package_dir: Path) -> list[Path]:
        return [Path(package_dir) / MODEL_FILE]

    def runner(self, package_dir: Path, *, threads: int = 1, checkpoint=None) -> "PteDecoder":
        """The package's program; with `checkpoint`, it can also record every linear's input
        and output (from a recording program lowered the same way: verify's per-layer check)."""
        recorder = None
        if checkpoint is not None:
            from .program import recording_program

            def recorder(length: int):
                with quiet_toolchain():
                    return recording_program(checkpoint, length, self.partitioners(),
                                             lowbit_kernel=self.lowbit_kernel)
        return PteDecoder(Path(package_dir) / MODEL_FILE, threads=threads, recorder=recorder,
                          apq_kernels=bool(read_program(package_dir).get("apq_kernels")))

    def manifest_extra(self, package_dir: Path) -> dict:
        return {"validation": {
            "validated_here": [
                f"model.pte runs in ExecuTorch's Python runtime (its C++ runtime, the "
                f"{self.backend_name} delegate and kernels, for x86-64) and matches the torch "
                f"reference of the plan (verify.json: logits, KL, perplexity, prefill and decode "
                f"through the KV cache, every linear on recorded inputs)",
                "every weight in model.pte equals the checkpoint, bit for bit "
                "(program.json: weights)",
                f"every planned linear sits inside a {self.backend_name} delegate "
                f"(program.json: delegation)"],
            "not_validated_here": [
                "building the Android library with Gradle and the Android Gradle plugin, and "
                f"resolving {self.maven_artifact} from Maven Central (no Android SDK, no "
                "network); the Kotlin and Gradle files are checked for syntax only",
                f"{self.backend_name}'s Arm kernels and the speed and memory on a phone "
                "(verification ran the x86-64 kernels)"],
        }}

    def read_weights(self, package_dir: Path, plan) -> dict:
        from apq_sdk.errors import ApqError

        from .pte_reader import Pte, PteFormatError, read_weights

        package_dir = Path(package_dir)
        try:
            index = read_program(package_dir)["weights"]
            return read_weights(Pte.load(package_dir / MODEL_FILE), index, plan)
        except (PteFormatError, KeyError, ValueError) as exc:
            raise ApqError(f"{package_dir / MODEL_FILE}: {exc}") from exc

    def verify(self, package_dir: Path, *, checkpoint, text_path, windows: int,
               threads: int = 1, float_model=None, **options):
        """The shared verify, with a runner that can record linears (it needs the checkpoint)."""
        import tempfile

        from apq_sdk.verification import verify_runner

        package_dir = Path(package_dir)
        program = read_program(package_dir)

        with tempfile.TemporaryDirectory(prefix="apq-verify-") as tmp:
            def cache_probe():
                """The program's cache and attention on float weights (program.py)."""
                from .program import RECORDED_LAYERS, cache_probe_program

                path = Path(tmp) / "cache-probe.pte"
                with quiet_toolchain():
                    path.write_bytes(cache_probe_program(
                        checkpoint, int(program["max_context"]),
                        program.get("attention", "static-cache"), self.partitioners()))
                return (f"float probe ({RECORDED_LAYERS} layers, attention "
                        f"{program.get('attention', 'static-cache')})",
                        PteDecoder(path, threads=threads))

            return verify_runner(
                target=self.name,
                runner=self.runner(package_dir, threads=threads, checkpoint=checkpoint),
                checkpoint=checkpoint, package_dir=package_dir, text_path=text_path,
                windows=windows, max_context=self.capabilities.max_context,
                model_bytes=sum(p.stat().st_size for p in self.model_files(package_dir)),
                read_weights=lambda: self.read_weights(package_dir, checkpoint.plan),
                float_model=float_model, cache_probe=cache_probe, threads=threads, **options)


def eos_ids(checkpoint) -> list[int]:
    """Every end-of-sequence id the config names (the runner stops on any of them)."""
    value = getattr(checkpoint.config, "eos_token_id", None)
    values = value if isinstance(value, (list, tuple)) else [value]
    vocab = checkpoint.spec.vocab_size
    return [int(v) for v in values if isinstance(v, int) and 0 <= v < vocab]


class AndroidTarget(ExecuTorchTarget):
    name = "android"
    description = ("ExecuTorch with XNNPACK on Android (Arm64 CPUs): 4-bit blockwise weights "
                   "with dynamic int8 activations, an Android library module over LlmModule")
    backend = "XnnpackBackend"
    backend_name = "XNNPACK"
    maven_artifact = "org.pytorch:executorch-android"
    capabilities = ANDROID_CAPABILITIES
    llm_custom_ops = True  # executorch-android's LlmModule runtime ships the llama:: kernels
    build_options = (ATTENTION,)

    def partitioners(self) -> list:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]


ANDROID_LOWBIT_CAPABILITIES = dataclasses.replace(
    ANDROID_CAPABILITIES,
    name="android-lowbit",
    weight_bits=(2, 3, 4, 16),
    tied_lookup="shared",  # apq::lowbit_embedding reads a tied head's own operands
    notes=("The android target's XNNPACK program, plus 2- and 3-bit symmetric groups through the "
           "custom op apq::lowbit_linear (runtime_kernels/executorch_lowbit_linear.cpp: the "
           "checkpoint's packed codes and float16 scales, int8 per-token asymmetric dynamic "
           "activations, output rows over ExecuTorch's thread pool), outside the delegate; a "
           "tied 4-bit head runs there too, so "
           "that its embedding lookup (apq::lowbit_embedding) reads the same codes and scales "
           "instead of a second copy. The runtime must link that kernel: "
           "the package's C API compiles it in; executorch-android's stock LlmModule runtime "
           "does not have it (the package README says how to build one that does)."),
)


QNN_SDK_VERSION = "2.37.0.250724"  # what ExecuTorch 1.5.1's Qualcomm backend is built against

QUALCOMM_CAPABILITIES = dataclasses.replace(
    ANDROID_CAPABILITIES,
    name="qualcomm",
    weight_bits=(4,),
    activation_modes=("none",),
    default_activation="none",
    quantized_activation=None,
    head_bits=(4,),
    scale_dtype="qnn-lpbq",
    # QNN stores a block's 4-bit multiplier in a byte plus a float32 per row: never more than the
    # 2 bytes per block counted here once a row has 4 blocks or more
    scale_bytes=2,
    float_weight_bytes=2,
    notes=("QNN's HTP (Hexagon NPU) runs statically quantized graphs: 16-bit activations with "
           "ranges calibrated ahead of time (uint16 per tensor) and 4-bit weights per block in "
           "QNN's block encoding (ExecuTorch's 16a4w_block): codes -7..7, each block scale a "
           "multiple 1..16 of a per-row scale. The core quantizes onto that grid (scale_dtype "
           "qnn-lpbq), so the graph holds its codes and scales bit for bit. Per-token dynamic "
           "scaling becomes static 16-bit activations on this target; the plan is weight-only "
           "and bench/bench_qnn_simulation.py measures what the static activations cost. "
           "Building needs Qualcomm's QNN SDK (QNN_SDK_ROOT); without it the build stops "
           "before any work. The QNN partitioner and HTP compilation need that SDK and are not "
           "run or validated here."),
)


class AndroidLowbitTarget(AndroidTarget):
    """A device preset of `android` for plans below 4 bits per weight: the same program, build
    path and Android module, with 2- and 3-bit layers on apq::lowbit_linear (lowbit.py), which
    XNNPACK cannot hold. The app's ExecuTorch runtime must link the kernel."""

    name = "android-lowbit"
    description = ("android with 2- and 3-bit layers on apq-sdk's ExecuTorch kernel "
                   "(apq::lowbit_linear) beside XNNPACK's 4-bit ones; the runtime must link it")
    capabilities = ANDROID_LOWBIT_CAPABILITIES
    preset_of = "android"
    lowbit_kernel = True
    tools = AndroidTarget.tools + (
        Tool("c++", "executable", "apt-get install g++ (or set CXX)", "verify"),)

    def manifest_extra(self, package_dir: Path) -> dict:
        extra = super().manifest_extra(package_dir)
        if read_program(package_dir).get("apq_kernels"):
            validation = extra["validation"]
            validation["validated_here"] = [
                line if "sits inside" not in line else
                (f"every planned 4- and 16-bit linear sits inside a {self.backend_name} delegate, "
                 f"every 2/3-bit one and a tied head in apq::lowbit_linear, nothing else outside "
                 f"(program.json: delegation)")
                for line in validation["validated_here"]]
            validation["validated_here"].append(
                "apq::lowbit_linear (runtime_kernels/executorch_lowbit_linear.cpp, in src/) "
                "compiled against the executorch wheel's runtime and loaded into it: verify ran "
                "model.pte with it; the kernel equals its torch reference bit for bit "
                "(tests/targets/executorch/test_lowbit.py)")
            validation["not_validated_here"].append(
                "an Android runtime with apq::lowbit_linear linked in: executorch-android's "
                "stock AAR does not have it, and building one (README) needs the Android NDK")
        return extra


class QualcommTarget(ExecuTorchTarget):
    """Snapdragon NPUs through ExecuTorch's QNN backend. The build stops before any work
    without Qualcomm's QNN SDK. What is built and checked without it: plans on QNN's grid
    (QUALCOMM_CAPABILITIES), quantized by the core, and ExecuTorch's QNN quantizer graph over
    them (qnn.py: the checkpoint's codes and scales bit for bit, static 16-bit activations
    calibrated on the calibration text). With the SDK the build stops before any work too: the
    KV-cache program, QNN partitioning and HTP compilation are not implemented, because none of
    it can be run or validated on a machine without the SDK."""

    name = "qualcomm"
    description = ("ExecuTorch with Qualcomm's QNN backend on Snapdragon NPUs (HTP): static "
                   "16-bit activations, 4-bit weights in QNN's block encoding; needs the QNN SDK")
    backend = "QnnBackend"
    backend_name = "QNN"
    maven_artifact = "org.pytorch:executorch-android-qnn"
    capabilities = QUALCOMM_CAPABILITIES
    tools = ExecuTorchTarget.tools + (
        Tool("QNN_SDK_ROOT", "sdk",
             f"Qualcomm AI Engine Direct (QNN) SDK {QNN_SDK_VERSION}, the version ExecuTorch "
             f"{EXECUTORCH_VERSION}'s Qualcomm backend is built against: download it from "
             f"Qualcomm's software center (softwarecenter.qualcomm.com, 'Qualcomm AI Engine "
             f"Direct SDK'; free account), unpack it and set QNN_SDK_ROOT to its directory, "
             f"which holds lib/x86_64-linux-clang/libQnnHtp.so; apq-sdk[executorch] brings "
             f"the rest", "build", requires="lib/x86_64-linux-clang/libQnnHtp.so"),
    )

    @classmethod
    def build_refusal(cls) -> str:
        return QUALCOMM_REFUSAL

    def lower(self, ctx: BuildContext) -> None:
        from ..onnx_graph import LoweringError

        raise LoweringError(QUALCOMM_REFUSAL)


#: why `build --target qualcomm` stops (before any work) even with the QNN SDK present
QUALCOMM_REFUSAL = (
    "its QNN lowering is not implemented in this release of apq-sdk. What is: plans on QNN's "
    "block grid and their checkpoints (apq-sdk plan --target qualcomm, apq-sdk quantize), and "
    "ExecuTorch's QNN quantizer graph over them (targets/executorch/qnn.py, checked bit for bit; "
    "bench/bench_qnn_simulation.py measures it). Not implemented: the KV-cache program, QNN "
    "partitioning and HTP compilation, which could not be run or validated without the SDK. "
    "Build the android target (XNNPACK, Arm CPUs) for Snapdragon phones meanwhile.")


class PteDecoder(PrefixCacheRunner):
    """model.pte in the ExecuTorch Python runtime (portable, quantized and XNNPACK kernels): a
    verify Runner. The KV cache lives in the program's mutable buffers, so a step's state is the
    token ids the cache holds; a step from any other state first re-fills the cache."""

    def __init__(self, path: Path, threads: int = 1, recorder=None, apq_kernels: bool = False):
        if apq_kernels:  # apq::lowbit_linear, compiled against the wheel's runtime and loaded
            from .lowbit import load_kernel_library

            load_kernel_library()
        with quiet_toolchain():
            import executorch.kernels.quantized  # noqa: F401  (embedding_4bit)
            from executorch.version import __version__

            from .program import LoadedMethod, load_llm_ops

            load_llm_ops()  # llama::update_cache and llama::custom_sdpa (program.py, ATTENTION)

        from executorch.extension.pybindings import portable_lib

        # the thread pool is the process's; size it as asked (verify and benches record it)
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        self.path = Path(path)
        self.method = LoadedMethod(str(self.path))
        self.runtime = f"executorch {__version__} (XNNPACK, Python runtime)"
        self.live: tuple[int, ...] = ()
        self.recorder = recorder
        if recorder is not None:
            self.record_linears = self._record_linears

    def _record_linears(self, ids: np.ndarray) -> list[dict]:
        """Every planned linear's input and output on `ids` (verify's per-layer check)."""
        import torch

        from .program import LoadedMethod

        ids = np.asarray(ids, dtype=np.int64)
        buffer, names = self.recorder(int(ids.shape[0]))
        method = LoadedMethod(buffer)
        outputs = method.execute([torch.from_numpy(ids.copy())[None]])
        records = []
        for i, name in enumerate(names):
            x, y = outputs[1 + 2 * i], outputs[2 + 2 * i]
            records.append({"node": name, "modules": [name], "x": x[0].numpy().copy(),
                            "y": y[0].numpy().copy()})
        return records

    def _run(self, ids: np.ndarray, start: int) -> np.ndarray:
        import torch

        ids = np.asarray(ids, dtype=np.int64)
        tokens = torch.from_numpy(ids.copy())[None]
        positions = torch.arange(start, start + ids.shape[0], dtype=torch.long)
        logits = self.method.execute([tokens, positions])[0]
        return logits[0].numpy().astype(np.float32, copy=True)



def read_program(package_dir: Path) -> dict:
    return json.loads((Path(package_dir) / PROGRAM_FILE).read_text())
