"""ONNX Runtime on generic ARM64 Linux (the same package runs on x86-64 for checking).

`lower` writes `model.onnx` (with `model.onnx.data` beside it only past protobuf's 2 GiB), the
tokenizer files, `onnx_io.json` (the I/O contract and model geometry, for runners other than the
C++ one) and the native glue: templates/common (C API, tokenizer, command-line runner) with
templates/onnxruntime layered over it (the ONNX Runtime implementation of the C API, CMake, README),
rendered by `apq_sdk.native_glue`, with the tokenizer exported to `tokenizer/`. The graph is the
shared decoder with a KV cache for prefill and decode (targets/onnx_graph.py); every planned linear
and the head are `com.microsoft.MatMulNBits` holding the core's packed codes, scales and zero points
bit for bit (targets/onnxruntime/linears.py). The shared verify runs it in onnxruntime
(CPUExecutionProvider, fixed thread count) beside the torch reference `load_quantized`.

Activation modes. The default, int8-per-block-dynamic, is exactly what MatMulNBits computes at
accuracy_level=4 (per token and block: codes RNE(a * 127 / amax), scale amax / 127, integer dot
products; tests/targets: one node vs the torch reference within ~5e-7 of the output scale for 2/4/8
bits at blocks 32-128). It is the default because it is fast at every bit-width: with float
activations (accuracy_level 0) onnxruntime 1.32 has a fast kernel for 4 bits only, and 2- and 8-bit
nodes dequantize their whole weight on every call (bench/bench_ort_kernels.py).

Per-token dynamic int8 activations: explicit ops vs MatMulNBits accuracy_level=4, measured with
onnxruntime 1.32 on x86-64 (tiny llama / mistral / qwen2 of apq_sdk.testing, hidden 64, mixed
2/4-bit plans at 4.0 bits per weight, every linear int8-per-token-dynamic; 4 windows x 128 tokens
of text against `load_quantized`, reference max |logit| ~3):

    lowering                        per-token max |logit diff|     KL(torch||onnx)  top-1
                                    median    tokens <= 1e-5       nats/token       agreement
    explicit ops + accuracy_level 0 6.0e-07   90-94 %              3.5e-07-8.7e-07  99.6-100 %
    accuracy_level=4 only           3.8e-02   0 %                  7.9e-05-8.0e-05  96.1-97.5 %

accuracy_level=4 quantizes A per block of block_size inside the kernel, not per token with the
calibrated clip, so it computes a different function; the explicit ops (ReduceMax(Abs), scale =
amax * clip / 127 with 0 -> 1, Div, Round half-to-even, Clip(-127, 127), Mul) reproduce the
reference except where a value lies within float rounding of a rounding tie (the remaining tokens,
see the tolerances below). `lower` emits the explicit ops; `ctx.options["activation_lowering"] =
"accuracy-level-4"` builds the other variant, for this measurement only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import BuildContext, Capabilities, Target, Tool, export_glue_tokenizer, glue_numbers
from ..onnx_graph import (EXTERNAL_DATA_FILE, OPSET, GraphOptions, build_decoder, describe_io,
                          dumps_json, linear_nodes, save_model, write_package_model)
from .linears import MatMulNBitsLowering, read_weights

MODEL_FILE = "model.onnx"
IO_FILE = "onnx_io.json"


class OnnxRuntimeTarget(Target):
    name = "arm64-linux"
    description = "ONNX Runtime (CPU execution provider) on ARM64 Linux; MatMulNBits weights"
    capabilities = Capabilities(
        name="arm64-linux",
        weight_bits=(2, 4, 8, 16),
        group_sizes=(32, 64, 128, 256),
        activation_modes=("int8-per-block-dynamic", "int8-per-token-dynamic", "none"),
        default_activation="int8-per-block-dynamic",
        fused=("qkv", "gate_up"),
        head_bits=(4, 8, 16),
        families=("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                  "smollm3"),
        scale_bytes=4,  # MatMulNBits scales have A's type: float32
        pads_last_block=True,  # B is [N, blocks, blob]: a ragged row ends in a padded block
        tied_lookup="scales",  # GatherBlockQuantized: its own float32 scales, unpacked zeros
        notes=("MatMulNBits packs 2, 4 and 8 bits only: 3-bit layers are excluded. Block sizes are "
               "powers of two >= 32 (at 16, 2-bit accuracy_level 4 silently computes with float "
               "activations in onnxruntime 1.32). Default activations int8-per-block-dynamic: MatMulNBits "
               "accuracy_level 4, the int8 kernels, fast at every bit-width. With float "
               "activations ('none', accuracy_level 0) onnxruntime 1.32 has a fast kernel for "
               "4 bits only: 2- and 8-bit layers dequantize their whole weight on every call "
               "(~20-40x slower than float32 at decode, bench/results/onnxruntime-kernels.md). "
               "int8-per-token-dynamic is explicit ops before each matmul. A tied quantized head "
               "feeds the embedding through GatherBlockQuantized."),
    )
    tools = (
        Tool("onnx", "python", "pip install 'apq-sdk[onnxruntime]'", "build"),
        Tool("onnxruntime", "python", "pip install 'apq-sdk[onnxruntime]'", "verify"),
    )
    runtime_packages = ("onnx", "onnxruntime")
    template_sets = ("onnxruntime",)

    # -- lowering ----------------------------------------------------------------------------------

    def lower(self, ctx: BuildContext) -> None:
        from apq_sdk.plan_file import plan_sha256

        package_dir = Path(ctx.package_dir)
        package_dir.mkdir(parents=True, exist_ok=True)
        ckpt = ctx.checkpoint
        plan = ckpt.plan
        options = ctx.options or {}
        lowering = MatMulNBitsLowering(options.get("activation_lowering", "explicit"))
        metadata = {"apq.target": self.name, "apq.model": ctx.model_name,
                    "apq.plan_sha256": plan_sha256(plan),
                    "apq.activation_lowering": lowering.activation_lowering}
        model = build_decoder(ckpt.config, ckpt.tensors, ckpt.modules, lowering,
                              options=GraphOptions(fuse=bool(options.get("fuse", True))),
                              metadata=metadata)
        write_package_model(model, package_dir / MODEL_FILE, options.get("external_data"))
        for source in ckpt.tokenizer_files():
            (package_dir / source.name).write_bytes(source.read_bytes())
        spec = ckpt.spec
        numbers = glue_numbers(ckpt, self.capabilities.max_context)
        io = describe_io(spec)
        io.update(numbers)
        io.update({"model_file": MODEL_FILE, "model_type": spec.family, "onnx_opset": OPSET,
                   "contrib_ops": sorted({n.op_type for n in model.graph.node
                                          if n.domain == "com.microsoft"})})
        (package_dir / IO_FILE).write_text(dumps_json(io))
        if options.get("native_glue", True):
            self._write_glue(ctx, package_dir, numbers)

    def _write_glue(self, ctx: BuildContext, package_dir: Path, numbers: dict) -> None:
        """The C/C++ runner (templates/common + templates/onnxruntime), its README and the
        plain-text tokenizer."""
        from apq_sdk import __version__
        from apq_sdk.native_glue import render_templates

        export_glue_tokenizer(ctx.checkpoint, package_dir, self.name)
        render_templates(("common", *self.template_sets),
                         {"package_name": ctx.package_name, "model_name": ctx.model_name,
                          "target": self.name, "runtime": "ONNX Runtime",
                          "sdk_version": __version__, **numbers}, package_dir)

    # -- what verify runs --------------------------------------------------------------------------

    def model_files(self, package_dir: Path) -> list[Path]:
        return [Path(package_dir) / n for n in (MODEL_FILE, EXTERNAL_DATA_FILE)
                if (Path(package_dir) / n).is_file()]

    def runner(self, package_dir: Path, *, threads: int = 1) -> "OnnxDecoder":
        return OnnxDecoder(Path(package_dir) / MODEL_FILE, threads=threads)

    def read_weights(self, package_dir: Path, plan) -> dict:
        import onnx

        return read_weights(onnx.load(str(Path(package_dir) / MODEL_FILE)), plan)

    def float_twin(self, package_dir: Path, workdir: Path, *, threads: int = 1) -> "OnnxDecoder":
        """The same model.onnx with accuracy_level 0 on every MatMulNBits: float activations."""
        import onnx

        model = onnx.load(str(Path(package_dir) / MODEL_FILE))
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = 0
        save_model(model, Path(workdir) / MODEL_FILE)
        return OnnxDecoder(Path(workdir) / MODEL_FILE, threads=threads)


class OnnxDecoder:
    """model.onnx in an onnxruntime session: full-sequence and step-wise runs (a verify Runner)."""

    def __init__(self, model_path: Path, threads: int = 1, config: dict[str, str] | None = None):
        """`config`: extra session config entries (a Q/DQ graph needs
        session.qdq_matmulnbits_accuracy_level = 0, targets/tensorrt/linears.py)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        self.model_path = Path(model_path)
        self.options = options
        self.session = ort.InferenceSession(str(model_path), options,
                                            providers=["CPUExecutionProvider"])
        self.version = ort.__version__
        self.runtime = f"onnxruntime {ort.__version__}"
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]

    def step(self, ids: np.ndarray, past: list[np.ndarray] | None):
        """Logits [S, V] of `ids` after `past` (None = empty cache), and the new cache."""
        outputs = self.session.run(["logits"] + self.present_names, self.feeds(ids, past))
        return outputs[0][0], outputs[1:]

    def full(self, ids: np.ndarray) -> np.ndarray:
        return self.step(ids, None)[0]

    def feeds(self, ids: np.ndarray, past: list[np.ndarray] | None) -> dict[str, np.ndarray]:
        """The session inputs for `ids` after `past` (None = empty cache)."""
        ids = np.asarray(ids, dtype=np.int64)
        p = 0 if past is None else past[0].shape[2]
        if past is None:
            past = [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)] * len(self.past_names)
        feeds = {**self.first_input(ids),
                 "attention_mask": np.ones((1, p + ids.shape[0]), np.int64),
                 "position_ids": np.arange(p, p + ids.shape[0], dtype=np.int64)[None]}
        feeds.update(zip(self.past_names, past))
        return feeds

    def first_input(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """What stands for the tokens: input_ids here (TensorRT's graph takes embedding rows)."""
        return {"input_ids": ids[None]}

    def record_linears(self, ids: np.ndarray) -> list[dict]:
        """Every linear layer's input (before activation quantization) and output on `ids`, from
        a copy of the model whose graph also outputs those tensors."""
        import tempfile

        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        model = onnx.load(str(self.model_path))
        nodes = linear_nodes(model)
        outputs = {o.name for o in model.graph.output}
        for name in sorted({n["input"] for n in nodes} | {n["output"] for n in nodes}):
            if name not in outputs:
                model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                        None))
        with tempfile.TemporaryDirectory(prefix="apq-record-") as tmp:
            save_model(model, Path(tmp) / "record.onnx")
            session = ort.InferenceSession(str(Path(tmp) / "record.onnx"), self.options,
                                           providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(names, self.feeds(ids, None))))
        return [{"node": n["node"], "modules": n["modules"], "x": values[n["input"]][0],
                 "y": values[n["output"]][0]} for n in nodes]
