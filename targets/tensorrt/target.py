"""TensorRT on NVIDIA GPUs: `jetson-orin` (JetPack 6.1/6.2: TensorRT 10.3, CUDA 12.6, SM 8.7) and
its checking preset `cuda-x86_64` (a desktop NVIDIA GPU). One build path, two device presets that
differ only in the device the package's engine script accepts and the GPU architecture it names.

TensorRT engines are specific to the GPU and the TensorRT version, so the package carries the
ONNX and the engine is built on the device (`build_engine.sh`, trtexec), as NVIDIA's TensorRT
Edge-LLM does. `lower` writes

* `model.onnx` (with `model.onnx.data` past protobuf's 2 GiB): the shared decoder graph
  (targets/onnx_graph.py) taking `inputs_embeds`, every planned linear and the head as INT4
  `DequantizeLinear` (block_size, opset 21) feeding `MatMul` (targets/tensorrt/linears.py: the
  core's codes and scales, re-laid out, never re-quantized), 16-bit layers as float16 weights;
  per-token dynamic int8 activations, where planned, as explicit float ops TensorRT's parser takes;
* `embeddings.bin`: the embedding rows the runtime looks up (targets/tensorrt/embeddings.py);
* `onnx_io.json`: the I/O contract, geometry, embedding layout and the support-matrix check;
* the tokenizer, the C API header and tokenizer sources (templates/common), `build_engine.sh`
  and the README (templates/tensorrt).

Every build checks every node, data type and opset against TensorRT's ONNX-parser support matrix
(targets/tensorrt/support_matrix.py, data from onnx-tensorrt) and refuses a graph that fails it.
The shared verify runs the same ONNX in onnxruntime (DequantizeLinear + MatMul held at float
activations) with the same embedding lookup, beside the torch reference of the plan.

What this machine cannot validate, and the manifest says so: building an engine (no NVIDIA GPU,
no TensorRT), TensorRT's own numerics (FP16 kernels under --fp16) and the on-device speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from ..base import BuildContext, Capabilities, Target, Tool, export_glue_tokenizer, glue_numbers
from ..onnx_graph import (EXTERNAL_DATA_FILE, OPSET, GraphOptions, LoweringError, build_decoder,
                          describe_io, dumps_json, write_package_model)
from ..onnxruntime.target import OnnxDecoder
from .embeddings import EMBEDDINGS_FILE, EmbeddingTable, write_table
from .linears import DequantizeLinearLowering, read_weights

MODEL_FILE = "model.onnx"
IO_FILE = "onnx_io.json"
PREFILL_CHUNK = 128  # the C++ runtime feeds a prompt in chunks of this many tokens
#: TensorRT's DequantizeLinear runs symmetric INT4 blocks along the input dimension; weight-only
#: INT8 is per channel (one scale per output row), which the core's groups do not express, and
#: 2/3-bit layers have no TensorRT kernel (a plugin in runtime_kernels/ is the way to add them)
CAPABILITIES = dict(
    weight_bits=(4, 16),
    group_sizes=(32, 64, 128),
    activation_modes=("none", "int8-per-token-dynamic"),
    default_activation="none",
    symmetric_only=True,
    whole_groups=True,
    fused=("qkv", "gate_up"),
    head_bits=(4, 16),
    families=("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
              "smollm3"),
    scale_bytes=4,  # DequantizeLinear's scale has the output's type: float32
    tied_lookup="copy",  # the runtime's lookup rows (embeddings.bin) beside the head's INT4 GEMM
    notes=("TensorRT 10 on SM 8.7 (Jetson Orin) runs FP16 and weight-only INT4 blocks (no FP8 "
           "or FP4): 4-bit layers are INT4 DequantizeLinear(block_size) -> MatMul, symmetric, "
           "whole groups; 16-bit layers are float16. 2- and 3-bit layers are refused (no "
           "TensorRT kernel), 8-bit too (TensorRT's INT8 weights are per channel, not per "
           "group). A tied quantized head is stored twice: the INT4 GEMM's [K, V] codes in the "
           "ONNX and the rows the runtime looks up (embeddings.bin)."),
)


class TensorRtTarget(Target):
    """The TensorRT build path; subclasses are device presets (name, device, GPU architecture)."""

    device: ClassVar[str]
    gpu_arch: ClassVar[str]  # nvcc's -arch for the device (sm_87: Orin)
    device_check: ClassVar[str]  # what build_engine.sh checks before it builds an engine
    tensorrt_version: ClassVar[str] = "10.3"
    jetpack: ClassVar[str] = "6.1 / 6.2"
    tools = (
        Tool("onnx", "python", "pip install 'apq-sdk[tensorrt]'", "build"),
        Tool("onnxruntime", "python", "pip install 'apq-sdk[tensorrt]'", "verify"),
    )
    runtime_packages = ("onnx", "onnxruntime")
    template_sets = ("tensorrt",)

    # -- lowering ----------------------------------------------------------------------------------

    def lower(self, ctx: BuildContext) -> None:
        from apq_sdk.plan_file import plan_sha256

        from .support_matrix import check_model, load_matrix, summary

        package_dir = Path(ctx.package_dir)
        package_dir.mkdir(parents=True, exist_ok=True)
        ckpt = ctx.checkpoint
        options = ctx.options or {}
        metadata = {"apq.target": self.name, "apq.model": ctx.model_name,
                    "apq.plan_sha256": plan_sha256(ckpt.plan)}
        model = build_decoder(ckpt.config, ckpt.tensors, ckpt.modules, DequantizeLinearLowering(),
                              options=GraphOptions(fuse=bool(options.get("fuse", True)),
                                                   embeddings_input=True),
                              metadata=metadata)
        matrix = load_matrix()
        findings = check_model(model, matrix)
        if findings:
            shown = "\n".join(f"  - {f}" for f in findings[:12])
            more = f"\n  … and {len(findings) - 12} more" if len(findings) > 12 else ""
            raise LoweringError(f"the graph for {self.name} has {len(findings)} nodes TensorRT "
                                f"{self.tensorrt_version}'s ONNX parser does not take:\n{shown}"
                                f"{more}\n(targets/tensorrt/onnx_support_matrix.json)")
        write_package_model(model, package_dir / MODEL_FILE, options.get("external_data"))
        spec = ckpt.spec
        embeddings = write_table(spec, ckpt.modules, ckpt.tensors, package_dir)
        for source in ckpt.tokenizer_files():
            (package_dir / source.name).write_bytes(source.read_bytes())
        numbers = glue_numbers(ckpt, self.capabilities.max_context)
        io = describe_io(spec, embeddings_input=True)
        io.update(numbers)
        io.update({"model_file": MODEL_FILE, "model_type": spec.family, "onnx_opset": OPSET,
                   "embeddings": embeddings,
                   "tensorrt": {"version": self.tensorrt_version, "jetpack": self.jetpack,
                                "device": self.device, "gpu_arch": self.gpu_arch,
                                "support_matrix_check": {**summary(model, matrix), "findings": 0}}})
        (package_dir / IO_FILE).write_text(dumps_json(io))
        if options.get("native_glue", True):
            self._write_glue(ctx, package_dir, {**numbers, **embedding_macros(embeddings)})

    def _write_glue(self, ctx: BuildContext, package_dir: Path, numbers: dict) -> None:
        """The C API header and tokenizer (templates/common), build_engine.sh and the README
        (templates/tensorrt), and the plain-text tokenizer."""
        import os
        import stat

        from apq_sdk import __version__
        from apq_sdk.native_glue import render_templates
        from apq_sdk.plan_file import plan_sha256

        export_glue_tokenizer(ctx.checkpoint, package_dir, self.name)
        context = {"package_name": ctx.package_name, "model_name": ctx.model_name,
                   "target": self.name, "runtime": f"TensorRT {self.tensorrt_version}",
                   "sdk_version": __version__, "device": self.device, "gpu_arch": self.gpu_arch,
                   "device_check": self.device_check, "tensorrt_version": self.tensorrt_version,
                   "jetpack": self.jetpack, "plan_sha256": plan_sha256(ctx.plan), **numbers,
                   "on_jetson": int(self.device_check == "jetson-orin"),
                   "prefill_chunk": min(PREFILL_CHUNK, numbers["max_context"]),
                   **engine_profiles(numbers)}
        render_templates(("common", *self.template_sets), context, package_dir)
        script = package_dir / "build_engine.sh"
        os.chmod(script, script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    # -- what verify runs --------------------------------------------------------------------------

    def model_files(self, package_dir: Path) -> list[Path]:
        return [Path(package_dir) / n for n in (MODEL_FILE, EXTERNAL_DATA_FILE, EMBEDDINGS_FILE)
                if (Path(package_dir) / n).is_file()]

    def runner(self, package_dir: Path, *, threads: int = 1) -> "TensorRtOnnxDecoder":
        return TensorRtOnnxDecoder(Path(package_dir), threads=threads)

    def read_weights(self, package_dir: Path, plan) -> dict:
        import json

        import onnx

        package_dir = Path(package_dir)
        out = read_weights(onnx.load(str(package_dir / MODEL_FILE)), plan)
        desc = json.loads((package_dir / IO_FILE).read_text())["embeddings"]
        table = EmbeddingTable(package_dir, desc).as_module(desc["source"].removesuffix(".weight"))
        if table.name in out:  # a tied head: both copies must hold the same weights
            graph = out[table.name]
            same = (graph.kind, graph.bits, graph.group_size) == \
                (table.kind, table.bits, table.group_size) and all(
                    np.array_equal(graph.arrays[k], table.arrays[k]) for k in table.arrays)
            if not same:
                raise LoweringError(f"{EMBEDDINGS_FILE} does not hold the same {table.name} "
                                    f"weights as {MODEL_FILE}; build the package again")
        elif table.name in plan.modules:
            out[table.name] = table
        return out

    def stored_codes(self, module) -> bytes:
        """The INT4 initializer of a module lowered on its own: signed codes [K, N], two per byte."""
        from .linears import dq_arrays, pack_int4

        return pack_int4(dq_arrays([module])[0])

    def manifest_extra(self, package_dir: Path) -> dict:
        return {"validation": {
            "validated_here": [
                "the ONNX runs in onnxruntime with the same embedding lookup and matches the "
                "torch reference of the plan (verify.json)",
                "every weight in model.onnx and embeddings.bin equals the checkpoint, bit for bit",
                "every node, data type and opset against TensorRT's ONNX-parser support matrix "
                "(onnx_io.json: tensorrt.support_matrix_check)"],
            "not_validated_here": [
                "building the TensorRT engine (needs an NVIDIA GPU and TensorRT "
                f"{self.tensorrt_version}: build_engine.sh on {self.device})",
                "TensorRT's numerics: under --fp16 activations run in float16 on the device, "
                "while verify ran the graph in float32",
                "speed and memory on the device",
                "the C++ runtime (src/apq_model.cpp): compiled (syntax) against the CUDA runtime "
                "headers and TensorRT's public headers or, where those cannot be had, a minimal "
                "declaration set of its documented API; not linked, not run"],
        }}


def embedding_macros(desc: dict) -> dict[str, int]:
    """embeddings.bin's layout as the C++ runtime's constants (apq_model.cpp: APQ_EMBED_*)."""
    blocks = desc["format"] == "blocks"
    return {"embed_format": {"float32": 0, "float16": 1, "blocks": 2}[desc["format"]],
            "embed_bits": desc["bits"] if blocks else 0,
            "embed_group": desc["group_size"] if blocks else 0,
            "embed_zero": desc["zero_point"] if blocks else 0,
            "embed_codes_offset": desc["codes"]["offset"] if blocks else 0,
            "embed_scales_offset": desc["scales"]["offset"] if blocks else 0,
            "embed_bytes": desc["bytes"]}


def engine_profiles(numbers: dict) -> dict[str, str]:
    """trtexec's shape lists of the two optimization profiles: decode (one new token after up to
    max_context - 1 cached ones) and prefill (up to max_context new tokens, after a cache too:
    a later turn of a chat). TensorRT bounds each dimension on its own; the runtime keeps
    past + new <= max_context."""
    ctx, hidden = numbers["max_context"], numbers["hidden_size"]
    kv, dim = numbers["num_kv_heads"], numbers["head_dim"]

    def shapes(seq: int, past: int, total: int) -> str:
        items = [f"inputs_embeds:1x{seq}x{hidden}", f"attention_mask:1x{total}",
                 f"position_ids:1x{seq}"]
        for i in range(numbers["num_layers"]):
            items += [f"past_key_values.{i}.{kind}:1x{kv}x{past}x{dim}" for kind in ("key", "value")]
        return ",".join(items)

    return {"decode_min": shapes(1, 0, 1), "decode_opt": shapes(1, ctx // 2, ctx // 2 + 1),
            "decode_max": shapes(1, ctx - 1, ctx), "prefill_min": shapes(1, 0, 1),
            "prefill_opt": shapes(min(PREFILL_CHUNK, ctx), 0, min(PREFILL_CHUNK, ctx)),
            "prefill_max": shapes(ctx, ctx - 1, ctx)}


class JetsonOrinTarget(TensorRtTarget):
    name = "jetson-orin"
    description = ("TensorRT 10.3 on Jetson Orin (JetPack 6.1/6.2, SM 8.7): INT4 DequantizeLinear "
                   "weights, engine built on the device")
    device = "a Jetson Orin (Nano, NX or AGX)"
    gpu_arch = "sm_87"
    device_check = "jetson-orin"
    capabilities = Capabilities(name="jetson-orin", **CAPABILITIES)


class CudaX86Target(TensorRtTarget):
    name = "cuda-x86_64"
    preset_of = "jetson-orin"
    description = ("TensorRT 10 on a desktop NVIDIA GPU (x86-64 Linux), for checking a "
                   "jetson-orin build off the device; the same ONNX")
    device = "an x86-64 Linux machine with an NVIDIA GPU, CUDA 12 and TensorRT 10"
    gpu_arch = "native"
    device_check = "cuda-x86_64"
    tensorrt_version = "10.3"
    jetpack = "none (desktop CUDA 12 + TensorRT 10.3 or later)"
    capabilities = Capabilities(name="cuda-x86_64", **CAPABILITIES)


class TensorRtOnnxDecoder(OnnxDecoder):
    """The package's model.onnx in onnxruntime, fed embedding rows from embeddings.bin, with
    DequantizeLinear + MatMul held at float activations (a verify Runner)."""

    def __init__(self, package_dir: Path, threads: int = 1):
        import json

        super().__init__(Path(package_dir) / MODEL_FILE, threads=threads,
                         config={"session.qdq_matmulnbits_accuracy_level": "0"})
        desc = json.loads((Path(package_dir) / IO_FILE).read_text())["embeddings"]
        self.embeddings = EmbeddingTable(package_dir, desc)
        self.runtime = f"onnxruntime {self.version} (the TensorRT package's ONNX)"

    def first_input(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"inputs_embeds": self.embeddings.lookup(ids)[None]}
