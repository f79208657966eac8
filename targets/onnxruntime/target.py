"""ONNX Runtime on generic ARM64 Linux (the same package runs on x86-64 for checking).

`lower` writes `model.onnx` (with `model.onnx.data` beside it only past protobuf's 2 GiB), the
tokenizer files, `onnx_io.json` (the I/O contract and model geometry, for runners other than the
C++ one) and the native glue: templates/onnxruntime rendered by `apq_sdk.native_glue` (C API, runner,
CMake, README) with the tokenizer exported to `tokenizer/`. The graph is a decoder with a KV cache
for prefill and decode (contract in targets/onnx_lowering.py); every planned linear and the head
are `com.microsoft.MatMulNBits` holding the core's packed codes, scales and zero points bit for
bit. `verify` runs it in onnxruntime (CPUExecutionProvider, fixed thread count) beside the torch
reference `load_quantized`.

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
see the tolerances below). `lower` emits the explicit ops; `ctx.extra["activation_lowering"] =
"accuracy-level-4"` builds the other variant, for this measurement only.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from .base import BuildContext, Capabilities, Target, Tool
from .onnx_lowering import (EXTERNAL_DATA_FILE, OPSET, LoweringError, LoweringOptions,
                            build_decoder, decoder_spec, describe_io, dumps_json,
                            load_quantized_weights, save_model)

MODEL_FILE = "model.onnx"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
IO_FILE = "onnx_io.json"

# Pass criteria of verify (onnx vs the torch reference on the same tokens, and prefill + decode
# through the KV cache vs the full sequence):
# * plans without int8 activations: max |logit diff| / max |reference logit| <= 1e-3. Only float32
#   summation order differs (MatMulNBits and MLAS vs torch); measured <= 7e-7 on the tiny models of
#   every family, so 1e-3 leaves a wide margin and still fails a wrong scale by 100x (scales of one
#   o_proj x1.5 gave 0.11 to 0.36).
# * every plan: mean KL(reference || onnx) per token <= 1e-4 nats. With int8-per-token-dynamic
#   activations the rounding is discontinuous: an activation within float rounding of a .5 tie can
#   round the other way in onnxruntime than in torch and move one int8 code by one step. Such flips
#   are inherent (no float32 graph reproduces torch's summation order) and propagate through
#   attention to every later token, giving max logit differences up to ~1e-2 of the logit scale on
#   the tiny models, so the max-diff bound is not applied to those plans; but they leave the
#   distributions intact (KL <= 6e-6 measured), while the corrupted scale above gives KL >= 1.8e-3.
# * perplexity over the text windows within 1e-3 (relative) of the torch reference's.
# * int8-per-block-dynamic plans (the default): the float-activation twin (same model.onnx with
#   accuracy_level 0, against the reference with float activations) must meet the two bounds above:
#   that is the exact check of weights and graph. The int8 package itself must stay within
#   KL <= 1e-2 and perplexity within 1 % of the reference: on the demo model, rounding flips between
#   the runtimes give KL 5.5e-3 and perplexity 0.3 % apart although every node agrees with the
#   reference to ~5e-7 of its output scale (tests/targets), and on the tiny test models < 1e-5.
LOGIT_TOLERANCE = 1e-3
KL_TOLERANCE = 1e-4
PPL_TOLERANCE = 1e-3
BLOCK_KL_TOLERANCE = 1e-2
BLOCK_PPL_TOLERANCE = 1e-2


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
        Tool("onnx", "python", "pip install onnx", "build"),
        Tool("onnxruntime", "python", "pip install onnxruntime", "verify"),
        Tool("onnxscript", "python", "pip install onnxscript (optional: torch.onnx's exporter; "
             "this target writes its graph with onnx.helper)", "compile-check"),
    )

    # -- lowering ----------------------------------------------------------------------------------

    def lower(self, ctx: BuildContext) -> None:
        from apq_sdk.plan_file import plan_sha256

        package_dir = Path(ctx.package_dir)
        package_dir.mkdir(parents=True, exist_ok=True)
        config, plan, tensors, modules = load_quantized_weights(Path(ctx.quantized_dir))
        if ctx.plan is not None and plan_sha256(ctx.plan) != plan_sha256(plan):
            raise LoweringError(f"{ctx.quantized_dir}/plan.json differs from the build's plan; "
                                f"quantize again with this plan")
        violations = self.check_plan(plan)
        if violations:
            raise LoweringError("the plan does not fit arm64-linux: " +
                                "; ".join(str(v) for v in violations[:5]))
        extra = ctx.extra or {}
        options = LoweringOptions(fuse=bool(extra.get("fuse", True)),
                                  activation_lowering=extra.get("activation_lowering", "explicit"))
        metadata = {"apq.target": self.name, "apq.model": ctx.model_name,
                    "apq.plan_sha256": plan_sha256(plan),
                    "apq.activation_lowering": options.activation_lowering}
        model = build_decoder(config, tensors, modules, options=options, metadata=metadata)
        for stale in (MODEL_FILE, EXTERNAL_DATA_FILE):
            (package_dir / stale).unlink(missing_ok=True)
        files = save_model(model, package_dir / MODEL_FILE, extra.get("external_data"))
        if len(files) == 1:
            import onnx

            onnx.checker.check_model(model)
        for name in TOKENIZER_FILES:
            source = Path(ctx.quantized_dir) / name
            if source.is_file():
                shutil.copyfile(source, package_dir / name)
        spec = decoder_spec(config)
        numbers = {"vocab_size": spec.vocab_size, "num_layers": spec.num_layers,
                   "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                   "max_context": min(self.capabilities.max_context, config.max_position_embeddings),
                   "bos_token_id": _token_id(getattr(config, "bos_token_id", None), spec.vocab_size),
                   "eos_token_id": _token_id(getattr(config, "eos_token_id", None), spec.vocab_size)}
        io = describe_io(spec)
        io.update(numbers)
        io.update({"model_file": MODEL_FILE, "model_type": spec.family, "onnx_opset": OPSET,
                   "contrib_ops": sorted({n.op_type for n in model.graph.node
                                          if n.domain == "com.microsoft"})})
        (package_dir / IO_FILE).write_text(dumps_json(io))
        if extra.get("native_glue", True):
            self._write_glue(ctx, package_dir, numbers)

    def _write_glue(self, ctx: BuildContext, package_dir: Path, numbers: dict) -> None:
        """The C/C++ runner (templates/onnxruntime), its README and the plain-text tokenizer."""
        from apq_sdk import __version__
        from apq_sdk.native_glue import TOKENIZER_DIR, TokenizerExportError, export_tokenizer, render_templates

        tokenizer = package_dir / "tokenizer.json"
        if not tokenizer.is_file():
            raise LoweringError(f"{ctx.quantized_dir} has no tokenizer.json; the package's C++ runner "
                                f"needs it (save the tokenizer with the quantized model)")
        try:
            export_tokenizer(tokenizer, package_dir / TOKENIZER_DIR)
        except TokenizerExportError as exc:
            raise LoweringError(f"the C++ runner cannot reproduce this tokenizer: {exc}; build "
                                f"without native glue (extra native_glue=False) to ship the model "
                                f"for Python use only") from exc
        render_templates("onnxruntime", {"package_name": ctx.package_name,
                                         "model_name": ctx.model_name, "target": self.name,
                                         "sdk_version": __version__, **numbers}, package_dir)

    # -- verification ------------------------------------------------------------------------------

    def verify(self, package_dir: Path, *, reference_dir: Path, text_path: Path | None,
               windows: int, seq_len: int | None = None, threads: int = 1, timing_runs: int = 5,
               prefill_tokens: int = 128, decode_tokens: int = 32) -> dict:
        """Compare the package with the torch reference; `timings` holds the run-to-run numbers."""
        import torch

        from apq_sdk.quantizer import load_quantized

        package_dir, reference_dir = Path(package_dir), Path(reference_dir)
        runner = OnnxDecoder(package_dir / MODEL_FILE, threads=threads)
        reference = load_quantized(reference_dir).eval()
        int8 = any(m.activation in ("int8-per-token-dynamic", "int8-per-block-dynamic")
                   for m in reference.apq_plan.modules.values())
        max_ctx = min(self.capabilities.max_context, reference.config.max_position_embeddings)
        seq_len = min(seq_len or 512, max_ctx)
        batch, source = _token_windows(package_dir, reference.config.vocab_size, text_path,
                                       windows, seq_len)

        per_block = any(m.activation == "int8-per-block-dynamic"
                        for m in reference.apq_plan.modules.values())
        cmp = _compare(runner, reference, batch)
        diff, ref_scale, agree, count = cmp["diff"], cmp["ref_scale"], cmp["agree"], cmp["count"]
        nll_onnx, nll_torch, first_logits = cmp["nll_onnx"], cmp["nll_torch"], cmp["first_logits"]
        predicted = batch.shape[0] * (batch.shape[1] - 1)
        relative = diff / ref_scale if ref_scale > 0 else math.inf
        kl_mean = cmp["kl"] / count
        twin = None
        if per_block:
            twin = _float_twin_check(package_dir, reference, batch, threads)

        # prefill P tokens, then one token at a time through the KV cache
        row = batch[0]
        prefill = max(1, row.shape[0] // 2)
        steps = min(16, row.shape[0] - prefill)
        logits, past = runner.step(row[:prefill], None)
        stepped = [logits]
        for t in range(prefill, prefill + steps):
            logits, past = runner.step(row[t:t + 1], past)
            stepped.append(logits)
        stepped = np.concatenate(stepped)
        full = first_logits[:prefill + steps]
        cache_diff = float(np.abs(stepped - full).max())
        cache_relative = cache_diff / ref_scale if ref_scale > 0 else math.inf
        cache_kl = _kl_sum(full, stepped) / stepped.shape[0]

        ppl = None
        if source == "text":
            ppl_onnx, ppl_torch = math.exp(nll_onnx / predicted), math.exp(nll_torch / predicted)
            ppl = {"onnx": ppl_onnx, "torch": ppl_torch,
                   "relative_diff": abs(ppl_onnx - ppl_torch) / ppl_torch,
                   "windows": int(batch.shape[0]), "seq_len": int(batch.shape[1]),
                   "predicted_tokens": int(predicted), "text": str(text_path)}
        kl_tol = BLOCK_KL_TOLERANCE if per_block else KL_TOLERANCE
        ppl_tol = BLOCK_PPL_TOLERANCE if per_block else PPL_TOLERANCE
        failures = []
        if twin is not None:
            if not twin["relative"] <= LOGIT_TOLERANCE:
                failures.append(f"float-activation twin: logits differ from the torch reference by "
                                f"{twin['relative']:.3g} of the logit scale (tolerance "
                                f"{LOGIT_TOLERANCE:g}); the weights or the graph are wrong")
            if not twin["kl_mean"] <= KL_TOLERANCE:
                failures.append(f"float-activation twin: mean KL(torch || onnx) "
                                f"{twin['kl_mean']:.3g} (tolerance {KL_TOLERANCE:g})")
        if not int8 and not relative <= LOGIT_TOLERANCE:
            failures.append(f"logits differ from the torch reference by {relative:.3g} of the logit "
                            f"scale (tolerance {LOGIT_TOLERANCE:g})")
        if not kl_mean <= kl_tol:
            failures.append(f"mean KL(torch || onnx) {kl_mean:.3g} nats/token "
                            f"(tolerance {kl_tol:g})")
        if not int8 and not cache_relative <= LOGIT_TOLERANCE:
            failures.append(f"prefill + decode through the KV cache differs from the full sequence by "
                            f"{cache_relative:.3g} of the logit scale (tolerance {LOGIT_TOLERANCE:g})")
        if not cache_kl <= kl_tol:
            failures.append(f"prefill + decode through the KV cache: mean KL to the full sequence "
                            f"{cache_kl:.3g} (tolerance {kl_tol:g})")
        if ppl is not None and not ppl["relative_diff"] <= ppl_tol:
            failures.append(f"perplexity {ppl['onnx']:.4f} vs torch {ppl['torch']:.4f} (relative "
                            f"tolerance {ppl_tol:g})")

        timings = runner.timings(batch[0], prefill_tokens=min(prefill_tokens, max_ctx - decode_tokens),
                                 decode_tokens=decode_tokens, runs=timing_runs)
        return {
            "target": self.name,
            "model_file": MODEL_FILE,
            "model_bytes": _package_bytes(package_dir),
            "onnxruntime": runner.version,
            "threads": threads,
            "inputs": source,
            "int8_activations": int8,
            "float_twin": twin,
            "tolerance": {
                "logits_relative": None if int8 else LOGIT_TOLERANCE,
                "kl_mean": kl_tol,
                "perplexity_relative": ppl_tol,
                "float_twin": None if twin is None else {"logits_relative": LOGIT_TOLERANCE,
                                                         "kl_mean": KL_TOLERANCE},
                "definition": "logits_relative: max |onnx - torch| logit over all compared tokens / "
                              "max |torch logit| (not applied with int8 activations, whose rounding "
                              "ties flip between runtimes); kl_mean: mean KL(torch || onnx) of the "
                              "next-token distributions, nats/token"},
            "logits": {"max_abs_diff": diff, "reference_max_abs": ref_scale, "relative": relative,
                       "kl_mean": kl_mean, "top1_agreement": agree / count, "tokens": count},
            "kv_cache": {"prefill_tokens": int(prefill), "decode_steps": int(steps),
                         "max_abs_diff": cache_diff, "relative": cache_relative, "kl_mean": cache_kl},
            "perplexity": ppl,
            "timings": timings,
            "passed": not failures,
            "failures": failures,
        }


# --------------------------------------------------------------------------------------------------


def _compare(runner: "OnnxDecoder", reference, batch: np.ndarray) -> dict:
    """Logits of the package and of the torch reference on the same windows, compared."""
    import torch

    out = {"diff": 0.0, "ref_scale": 0.0, "agree": 0, "count": 0, "kl": 0.0, "nll_onnx": 0.0,
           "nll_torch": 0.0, "first_logits": None}
    for row in batch:
        logits = runner.full(row)
        with torch.no_grad():
            ref = reference(input_ids=torch.from_numpy(row[None]), use_cache=False).logits[0]
        ref = ref.float().numpy()
        if out["first_logits"] is None:
            out["first_logits"] = logits
        out["diff"] = max(out["diff"], float(np.abs(logits - ref).max()))
        out["ref_scale"] = max(out["ref_scale"], float(np.abs(ref).max()))
        out["agree"] += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        out["count"] += row.shape[0]
        out["nll_onnx"] += _nll(logits, row)
        out["nll_torch"] += _nll(ref, row)
        out["kl"] += _kl_sum(ref, logits)
    return out


def _float_twin_check(package_dir: Path, reference, batch: np.ndarray, threads: int) -> dict:
    """The exact half of verifying an int8-per-block-dynamic package.

    int8 activations round, so two correct runtimes whose float32 sums differ in the last bit (onnx
    and torch) flip a few codes and drift apart by a small KL on a real model. The package's
    weights and graph are therefore checked exactly on its float-activation twin: the same
    model.onnx with accuracy_level 0 on every MatMulNBits, against the same torch reference with
    float activations. The int8 arithmetic itself is checked per node in the tests.
    """
    import tempfile

    import onnx

    from apq_sdk.quant.modules import ACT_INT8_BLOCK, ACT_NONE, QuantLinear

    model = onnx.load(str(package_dir / MODEL_FILE))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 0
    switched = [m for m in reference.modules()
                if isinstance(m, QuantLinear) and m.activation == ACT_INT8_BLOCK]
    with tempfile.TemporaryDirectory(prefix="apq-twin-") as tmp:
        save_model(model, Path(tmp) / MODEL_FILE)
        for m in switched:
            m.activation = ACT_NONE
        try:
            cmp = _compare(OnnxDecoder(Path(tmp) / MODEL_FILE, threads=threads), reference, batch)
        finally:
            for m in switched:
                m.activation = ACT_INT8_BLOCK
    relative = cmp["diff"] / cmp["ref_scale"] if cmp["ref_scale"] > 0 else math.inf
    return {"relative": relative, "kl_mean": cmp["kl"] / cmp["count"],
            "top1_agreement": cmp["agree"] / cmp["count"], "tokens": cmp["count"]}


class OnnxDecoder:
    """model.onnx in an onnxruntime session: full-sequence, step-wise and timed runs."""

    def __init__(self, model_path: Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), options,
                                            providers=["CPUExecutionProvider"])
        self.version = ort.__version__
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]

    def step(self, ids: np.ndarray, past: list[np.ndarray] | None):
        """Logits [S, V] of `ids` after `past` (None = empty cache), and the new cache."""
        ids = np.asarray(ids, dtype=np.int64)
        p = 0 if past is None else past[0].shape[2]
        if past is None:
            past = [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)] * len(self.past_names)
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, p + ids.shape[0]), np.int64),
                 "position_ids": np.arange(p, p + ids.shape[0], dtype=np.int64)[None]}
        feeds.update(zip(self.past_names, past))
        outputs = self.session.run(["logits"] + self.present_names, feeds)
        return outputs[0][0], outputs[1:]

    def full(self, ids: np.ndarray) -> np.ndarray:
        return self.step(ids, None)[0]

    def timings(self, ids: np.ndarray, *, prefill_tokens: int, decode_tokens: int, runs: int) -> dict:
        ids = np.resize(np.asarray(ids, dtype=np.int64), prefill_tokens)
        self.step(ids, None)  # warm-up
        prefill_ms, decode_ms = [], []
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            logits, past = self.step(ids, None)
            prefill_ms.append(1000 * (time.perf_counter() - start))
        token = np.array([int(logits[-1].argmax())], np.int64)
        for _ in range(decode_tokens):
            start = time.perf_counter()
            logits, past = self.step(token, past)
            decode_ms.append(1000 * (time.perf_counter() - start))
            token = np.array([int(logits[-1].argmax())], np.int64)
        decode_median = statistics.median(decode_ms)
        return {"prefill_tokens": int(prefill_tokens), "prefill_ms_median": statistics.median(prefill_ms),
                "prefill_runs": len(prefill_ms), "decode_tokens": int(decode_tokens),
                "decode_ms_per_token_median": decode_median,
                "decode_tokens_per_s_median": 1000.0 / decode_median,
                "decode_context_start": int(prefill_tokens)}


def _token_windows(package_dir: Path, vocab: int, text_path, windows: int, seq_len: int):
    """[windows, seq_len] token ids of the text (or seeded random ids when there is no text)."""
    if text_path is not None:
        from transformers import AutoTokenizer

        from apq_sdk.calibration import eval_windows

        tokenizer = AutoTokenizer.from_pretrained(str(package_dir))
        ids = eval_windows(tokenizer, Path(text_path), seq_len, max(1, windows))
        return ids.numpy().astype(np.int64), "text"
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, (max(1, windows), min(seq_len, 64)), dtype=np.int64), "random"


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    logp = _log_softmax(logits[:-1])
    return float(-logp[np.arange(ids.shape[0] - 1), ids[1:]].sum())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_sum(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Sum over tokens of KL(reference || candidate) of the next-token distributions (nats)."""
    ref, cand = _log_softmax(reference), _log_softmax(candidate)
    return float(np.maximum((np.exp(ref) * (ref - cand)).sum(-1), 0.0).sum())


def _token_id(value, vocab: int) -> int:
    """A config's bos/eos id (the first of a list) when it is inside the vocabulary, else -1."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, int) and 0 <= v < vocab), None)
    return value if isinstance(value, int) and 0 <= value < vocab else -1


def _package_bytes(package_dir: Path) -> int:
    return sum((package_dir / n).stat().st_size for n in (MODEL_FILE, EXTERNAL_DATA_FILE)
               if (package_dir / n).is_file())
