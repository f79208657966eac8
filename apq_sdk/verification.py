"""Shared verification: run a package's artifact here and compare it with the torch reference.

Every target provides a `Runner` (full-sequence logits, one step through its KV cache and, where
it can, the inputs and outputs of every linear layer) and its weights read back from the
artifact; everything else is here, once. On the verification text (apq_sdk/data/verify-text.txt
unless another is given; never random ids):

* **weights**: every planned module's stored integers, scales and zero points (or float16 weights)
  read back from the artifact equal the checkpoint's, byte for byte;
* **linears on recorded inputs** (int8 activations): every quantized linear of the package, run by
  the package on real activations, against the torch reference module on the same recorded
  inputs. This is exact up to float summation order and the rare rounding tie, so the median over
  tokens must be within LINEAR_TOLERANCE; a wrong scale, zero point, bit-width, group size, a
  swapped layer or a missing activation-quantization step moves every token;
* **float twin** (int8-per-block packages): the artifact with float activations against the
  reference with float activations: the exact check of weights and graph end to end;
* **logits** (float activations): within float summation order of the reference (LOGIT_TOLERANCE,
  KL_TOLERANCE, PPL_TOLERANCE);
* **accuracy** (int8 activations): two correct int8 implementations round a few activations
  differently and drift apart, so they are not compared with each other; instead the package's own
  accuracy against the unquantized model (KL and perplexity) must be within a margin of the torch
  reference's accuracy against the same model (ACCURACY_KL_MARGIN, ACCURACY_PPL_MARGIN);
* **KV cache**: prefill then one token at a time, against the package's own full sequence;
* **timings**: prefill and decode medians (information, never a check).

The result is a typed `VerifyResult` whose checks (name, measured, bound, pass) print as a table.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .plan_file import ACT_INT8, ACT_INT8_ASYM, ACT_INT8_BLOCK

# Exact checks (float activations, float twin): only float32 summation order differs between a
# runtime and torch; measured <= 7e-7 of the logit scale on the tiny models of every family, so
# 1e-3 leaves a wide margin and still fails a wrong scale by 100x (scales of one o_proj x1.5 gave
# 0.11 to 0.36), and KL <= 1e-4 nats where a corrupted scale gives >= 1.8e-3.
LOGIT_TOLERANCE = 1e-3
KL_TOLERANCE = 1e-4
PPL_TOLERANCE = 1e-3
# Linears on recorded inputs: per token, max |package - reference| over the layer's outputs,
# relative to the layer's largest reference output; the median over tokens must stay below this.
# Summation order and rounding ties leave it near 1e-7; the planted faults give 1e-3 and more, a
# missing activation-quantization step 1e-4 and more (tests/test_verification.py).
LINEAR_TOLERANCE = 2e-5
# Accuracy of an int8 package against the unquantized model, relative to the torch reference's:
# KL(float || package) <= (1 + margin) * KL(float || reference) + 1e-3, and perplexity within 1 %.
ACCURACY_KL_MARGIN = 0.10
ACCURACY_KL_SLACK = 1e-3
ACCURACY_PPL_MARGIN = 0.01
# The KV cache of an int8 package against its own full sequence (the same kernels, but prefill and
# decode may accumulate in another order): mean KL. Per-token int8 rounding turns an attention
# kernel's length-dependent summation order (ExecuTorch's custom_sdpa tiles by sequence length)
# into different roundings downstream: measured on the demo android package (30 layers, 16 decode
# steps after 256), a correct cache gives 0.009-0.024 and two correct programs of the same weights
# differ by 0.02-0.03, while decoding one position off gives 0.05. So this bound catches a cache
# that is not used or not written; the exact check of the cache is a runner's float probe
# (verify_runner's cache_probe), where a target has one.
CACHE_KL_TOLERANCE_INT8 = 5e-2


class Runner(Protocol):
    """A package's artifact running here: what each target provides to verify."""

    runtime: str  # e.g. "onnxruntime 1.32.0"

    def full(self, ids: np.ndarray) -> np.ndarray:
        """Logits [S, vocab] (float32) of one sequence from an empty cache."""

    def step(self, ids: np.ndarray, state):
        """(logits [S, vocab], new state) of `ids` after `state` (None: an empty cache)."""

    # optional: record_linears(ids) -> list of {"node", "modules", "x", "y"}: every linear layer's
    # input (before activation quantization) and output as the package computes them on `ids`


@dataclass
class Check:
    """One verify check; `detail` says what went wrong (empty when it passed)."""

    name: str
    measured: float | None
    bound: float | None
    passed: bool
    detail: str = ""

    def __post_init__(self) -> None:
        if self.passed:
            self.detail = ""

    @classmethod
    def at_most(cls, name: str, measured, bound, detail: str) -> "Check":
        """A check that passes when `measured <= bound` (never for NaN)."""
        return cls(name, measured, bound, bool(measured <= bound), detail)

    def to_dict(self) -> dict:
        return {"name": self.name, "measured": self.measured, "bound": self.bound,
                "passed": self.passed, "detail": self.detail}


@dataclass
class VerifyResult:
    target: str
    runtime: str
    text: str  # the verification text
    int8_activations: bool
    model_bytes: int
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checks that could not run here, and why
    accuracy: dict | None = None  # package and reference against the unquantized model
    linears: dict | None = None  # the linears-on-recorded-inputs summary
    logits: dict = field(default_factory=dict)
    kv_cache: dict = field(default_factory=dict)
    perplexity: dict | None = None
    float_twin: dict | None = None
    weights: dict | None = None
    tolerance: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    threads: int = 1

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"target": self.target, "runtime": self.runtime, "text": self.text,
                "int8_activations": self.int8_activations, "model_bytes": self.model_bytes,
                "threads": self.threads, "checks": [c.to_dict() for c in self.checks],
                "skipped": self.skipped, "logits": self.logits, "kv_cache": self.kv_cache,
                "perplexity": self.perplexity, "accuracy": self.accuracy,
                "linears": self.linears, "float_twin": self.float_twin, "weights": self.weights,
                "tolerance": self.tolerance, "timings": self.timings, "passed": self.passed,
                "failures": self.failures}

    def table(self) -> str:
        """The checks as a plain-text table: check, measured, bound, pass/fail."""
        rows = [("check", "measured", "bound", "result")]
        for c in self.checks:
            rows.append((c.name, _fmt(c.measured), _fmt(c.bound), "pass" if c.passed else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"not run: {why}" for why in self.skipped]
        return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# numbers


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_sum(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Sum over tokens of KL(reference || candidate) of the next-token distributions (nats)."""
    ref, cand = log_softmax(reference), log_softmax(candidate)
    return float(np.maximum((np.exp(ref) * (ref - cand)).sum(-1), 0.0).sum())


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    logp = log_softmax(logits[:-1])
    return float(-logp[np.arange(ids.shape[0] - 1), ids[1:]].sum())


def verify_text_path() -> Path:
    """The verification text shipped with apq-sdk (apq_sdk/data/README.md: source, licence)."""
    return Path(__file__).resolve().parent / "data" / "verify-text.txt"


def token_windows(package_dir: Path, text_path: Path, windows: int, seq_len: int) -> np.ndarray:
    """[windows, seq_len] token ids of the text, tokenized with the package's tokenizer (fewer
    windows if the text is short; an error if it holds less than one)."""
    from transformers import AutoTokenizer

    from .calibration import eval_windows

    tokenizer = AutoTokenizer.from_pretrained(str(package_dir))
    ids = eval_windows(tokenizer, Path(text_path), seq_len, max(1, windows))
    return ids.numpy().astype(np.int64)


def compare(runner: Runner, reference, batch: np.ndarray, float_model=None) -> dict:
    """Logits of the package and of the torch reference on the same windows, compared (and both
    against the unquantized model when it is given)."""
    import torch

    out = {"diff": 0.0, "ref_scale": 0.0, "agree": 0, "count": 0, "kl": 0.0, "nll_package": 0.0,
           "nll_torch": 0.0, "nll_float": 0.0, "kl_float_package": 0.0,
           "kl_float_torch": 0.0, "first_logits": None}
    for row in batch:
        logits = runner.full(row)
        with torch.no_grad():
            ref = reference(input_ids=torch.from_numpy(row[None]), use_cache=False).logits[0]
            base = None if float_model is None else \
                float_model(input_ids=torch.from_numpy(row[None]), use_cache=False).logits[0]
        ref = ref.float().numpy()
        if out["first_logits"] is None:
            out["first_logits"] = logits
        out["diff"] = max(out["diff"], float(np.abs(logits - ref).max()))
        out["ref_scale"] = max(out["ref_scale"], float(np.abs(ref).max()))
        out["agree"] += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        out["count"] += row.shape[0]
        out["nll_package"] += nll(logits, row)
        out["nll_torch"] += nll(ref, row)
        out["kl"] += kl_sum(ref, logits)
        if base is not None:
            base = base.float().numpy()
            out["nll_float"] += nll(base, row)
            out["kl_float_package"] += kl_sum(base, logits)
            out["kl_float_torch"] += kl_sum(base, ref)
    return out


def measure_timings(runner: Runner, ids: np.ndarray, *, prefill_tokens: int, decode_tokens: int,
                    runs: int) -> dict:
    """Median prefill time of `prefill_tokens` and per-token decode time after them."""
    ids = np.resize(np.asarray(ids, dtype=np.int64), prefill_tokens)
    runner.step(ids, None)  # warm-up
    prefill_ms, decode_ms = [], []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        logits, state = runner.step(ids, None)
        prefill_ms.append(1000 * (time.perf_counter() - start))
    token = np.array([int(logits[-1].argmax())], np.int64)
    for _ in range(decode_tokens):
        start = time.perf_counter()
        logits, state = runner.step(token, state)
        decode_ms.append(1000 * (time.perf_counter() - start))
        token = np.array([int(logits[-1].argmax())], np.int64)
    decode_median = statistics.median(decode_ms)
    return {"prefill_tokens": int(prefill_tokens), "prefill_ms_median": statistics.median(prefill_ms),
            "prefill_runs": len(prefill_ms), "decode_tokens": int(decode_tokens),
            "decode_ms_per_token_median": decode_median,
            "decode_tokens_per_s_median": 1000.0 / decode_median,
            "decode_context_start": int(prefill_tokens)}


def compare_weights(checkpoint, read) -> dict:
    """Every planned module's weights as read back from the artifact against the checkpoint."""
    mismatched = []
    for name, want in checkpoint.modules.items():
        got = read.get(name)
        if got is None:
            mismatched.append(f"{name}: not found in the artifact")
            continue
        if (got.kind, got.bits, got.group_size) != (want.kind, want.bits, want.group_size):
            mismatched.append(f"{name}: stored as {got.kind} {got.bits}-bit group "
                              f"{got.group_size}, planned {want.kind} {want.bits}-bit group "
                              f"{want.group_size}")
            continue
        keys = sorted(set(got.arrays) | set(want.arrays))
        for key in keys:
            a, b = got.arrays.get(key), want.arrays.get(key)
            if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype \
                    or a.tobytes() != b.tobytes():
                mismatched.append(f"{name}.{key}: differs from the checkpoint")
                break
    return {"modules": len(checkpoint.modules), "mismatched": len(mismatched),
            "examples": mismatched[:5]}


def check_linears(records: list[dict], reference) -> dict:
    """Every recorded linear against the torch reference module(s) on the same inputs."""
    import torch

    nodes = []
    for rec in records:
        modules = [reference.get_output_embeddings() if name == "lm_head"
                   else reference.get_submodule(name) for name in rec["modules"]]
        x = torch.from_numpy(np.ascontiguousarray(rec["x"], dtype=np.float32))
        with torch.no_grad():
            want = torch.cat([m(x) for m in modules], dim=-1).numpy()
        got = np.asarray(rec["y"], dtype=np.float32)
        if got.shape != want.shape:
            nodes.append({"node": rec["node"], "modules": rec["modules"], "median": math.inf,
                          "p99": math.inf, "shape": [list(got.shape), list(want.shape)]})
            continue
        scale = float(np.abs(want).max()) or 1.0
        per_token = (np.abs(got - want).reshape(-1, want.shape[-1]).max(-1) / scale)
        nodes.append({"node": rec["node"], "modules": rec["modules"],
                      "median": float(np.median(per_token)),
                      "p99": float(np.quantile(per_token, 0.99))})
    failing = [n for n in nodes if not n["median"] <= LINEAR_TOLERANCE]
    worst = sorted(nodes, key=lambda n: -n["median"])[:5]
    return {"nodes": len(nodes), "failing": len(failing),
            "worst_median": max((n["median"] for n in nodes), default=0.0),
            "worst": [{k: v for k, v in n.items()} for n in worst],
            "failing_modules": sorted(m for n in failing for m in n["modules"])}


def kv_cache_check(runner: Runner, row: np.ndarray, full: np.ndarray) -> dict:
    """Prefill half of `row`, then up to 16 tokens one at a time, against the full sequence."""
    prefill = max(1, row.shape[0] // 2)
    steps = min(16, row.shape[0] - prefill)
    logits, state = runner.step(row[:prefill], None)
    stepped = [logits]
    for t in range(prefill, prefill + steps):
        logits, state = runner.step(row[t:t + 1], state)
        stepped.append(logits)
    stepped = np.concatenate(stepped)
    full = full[:prefill + steps]
    return {"prefill_tokens": int(prefill), "decode_steps": int(steps),
            "max_abs_diff": float(np.abs(stepped - full).max()),
            "kl_mean": kl_sum(full, stepped) / stepped.shape[0]}


# --------------------------------------------------------------------------------------------------
# the whole verification


def verify_runner(*, target: str, runner: Runner, checkpoint, package_dir: Path,
                  text_path: Path | None, windows: int, max_context: int, model_bytes: int,
                  read_weights=None, float_twin=None, float_model=None, cache_probe=None,
                  seq_len: int | None = None,
                  threads: int = 1, timing_runs: int = 5, prefill_tokens: int = 128,
                  decode_tokens: int = 32, record_tokens: int = 64,
                  logit_tolerance: float = LOGIT_TOLERANCE) -> VerifyResult:
    """Verify one package (see the module docstring). `read_weights()` returns the artifact's
    weights per module (or raises an ApqError naming what is wrong); `float_twin()` returns a Runner
    of the artifact with float activations (int8-per-block packages); `float_model` is the
    unquantized torch model (for the accuracy checks of int8 packages; skipped without it).
    `cache_probe()` returns (name, Runner): a float program with the artifact's cache and attention
    (and fewer layers), whose prefill + decode must equal its own full sequence exactly: the
    KV-cache check an int8 artifact's rounding blurs (CACHE_KL_TOLERANCE_INT8).
    `logit_tolerance` replaces LOGIT_TOLERANCE for an artifact whose contract rounds its cache and
    logits to float16 (Target.logit_tolerance)."""
    from .checkpoint import load_quantized
    from .errors import ApqError

    reference = load_quantized(checkpoint.path, checkpoint=checkpoint).eval()
    plan = checkpoint.plan
    int8 = any(m.activation in (ACT_INT8, ACT_INT8_BLOCK, ACT_INT8_ASYM)
               for m in plan.modules.values())
    per_block = any(m.activation == ACT_INT8_BLOCK for m in plan.modules.values())
    text_path = Path(text_path) if text_path is not None else verify_text_path()
    max_ctx = min(max_context, checkpoint.spec.max_context)  # a static RoPE's limit included
    seq_len = min(seq_len or 512, max_ctx)
    batch = token_windows(package_dir, text_path, windows, seq_len)
    result = VerifyResult(target=target, runtime=runner.runtime, text=str(text_path),
                          int8_activations=int8, model_bytes=model_bytes, threads=threads)
    checks = result.checks

    # 1. the weights, byte for byte
    try:
        read = read_weights() if read_weights is not None else None
        result.weights = None if read is None else compare_weights(checkpoint, read)
    except ApqError as exc:
        result.weights = {"modules": len(checkpoint.modules), "mismatched": None,
                          "examples": [str(exc)]}
    if result.weights is None:
        result.skipped.append(f"weights: {target} cannot read its artifact's weights here")
    else:
        bad = result.weights["mismatched"]
        checks.append(Check("weights equal the checkpoint (modules differing)", bad, 0, bad == 0,
                            "weights differ from the checkpoint: "
                            + "; ".join(result.weights["examples"])))

    # 2. every linear on recorded inputs (int8 activations)
    if int8 and record_tokens < 1:
        result.skipped.append("linears on recorded inputs: not asked for (record_tokens=0)")
    elif int8 and hasattr(runner, "record_linears"):
        result.linears = check_linears(runner.record_linears(batch[0][:record_tokens]), reference)
        lin = result.linears
        checks.append(Check("linears on recorded inputs (nodes off the reference)",
                            lin["failing"], 0, lin["failing"] == 0,
                            f"{lin['failing']} of {lin['nodes']} linear layers compute something "
                            f"else than the reference on the same inputs (median per-token error "
                            f"up to {lin['worst_median']:.3g} of the output scale, tolerance "
                            f"{LINEAR_TOLERANCE:g}): {', '.join(lin['failing_modules'][:6])}"))
    elif int8:
        result.skipped.append(f"linears on recorded inputs: the {target} runner cannot record them")

    # 3. logits on the text
    cmp = compare(runner, reference, batch, float_model)
    ref_scale = cmp["ref_scale"]
    relative = cmp["diff"] / ref_scale if ref_scale > 0 else math.inf
    kl_mean = cmp["kl"] / cmp["count"]
    result.logits = {"max_abs_diff": cmp["diff"], "reference_max_abs": ref_scale,
                     "relative": relative, "kl_mean": kl_mean,
                     "top1_agreement": cmp["agree"] / cmp["count"], "tokens": cmp["count"]}
    predicted = batch.shape[0] * (batch.shape[1] - 1)
    ppl_pkg, ppl_torch = (math.exp(cmp["nll_package"] / predicted),
                          math.exp(cmp["nll_torch"] / predicted))
    result.perplexity = {"package": ppl_pkg, "torch": ppl_torch,
                         "relative_diff": abs(ppl_pkg - ppl_torch) / ppl_torch,
                         "windows": int(batch.shape[0]), "seq_len": int(batch.shape[1]),
                         "predicted_tokens": int(predicted), "text": str(text_path)}
    if float_model is not None:
        result.accuracy = {
            "kl_float_package": cmp["kl_float_package"] / cmp["count"],
            "kl_float_reference": cmp["kl_float_torch"] / cmp["count"],
            "ppl_float": math.exp(cmp["nll_float"] / predicted),
            "ppl_package": ppl_pkg, "ppl_reference": ppl_torch}
    twin_runner = float_twin() if per_block and float_twin is not None else None
    if twin_runner is not None:
        twin = _float_twin_compare(twin_runner, reference, batch)
        result.float_twin = twin
        checks.append(Check.at_most(
            "float twin: max |logit diff| / logit scale", twin["relative"], LOGIT_TOLERANCE,
            f"float-activation twin: logits differ from the torch reference by "
            f"{twin['relative']:.3g} of the logit scale (tolerance {LOGIT_TOLERANCE:g}); the "
            f"weights or the graph are wrong"))
        checks.append(Check.at_most(
            "float twin: mean KL (nats/token)", twin["kl_mean"], KL_TOLERANCE,
            f"float-activation twin: mean KL(torch || package) {twin['kl_mean']:.3g} "
            f"(tolerance {KL_TOLERANCE:g})"))
    elif per_block:
        result.skipped.append(f"float twin: the {target} artifact has no float-activation twin")
    if not int8:
        rel_ppl = result.perplexity["relative_diff"]
        checks.append(Check.at_most(
            "logits: max |diff| / logit scale", relative, logit_tolerance,
            f"logits differ from the torch reference by {relative:.3g} of the logit scale "
            f"(tolerance {logit_tolerance:g})"))
        checks.append(Check.at_most(
            "logits: mean KL (nats/token)", kl_mean, KL_TOLERANCE,
            f"mean KL(torch || package) {kl_mean:.3g} nats/token (tolerance {KL_TOLERANCE:g})"))
        checks.append(Check.at_most(
            "perplexity: relative difference", rel_ppl, PPL_TOLERANCE,
            f"perplexity {ppl_pkg:.4f} vs torch {ppl_torch:.4f} (relative tolerance "
            f"{PPL_TOLERANCE:g})"))
    elif result.accuracy is not None:
        acc = result.accuracy
        kl_bound = (1 + ACCURACY_KL_MARGIN) * acc["kl_float_reference"] + ACCURACY_KL_SLACK
        ppl_bound = (1 + ACCURACY_PPL_MARGIN) * acc["ppl_reference"]
        checks.append(Check.at_most(
            "accuracy: KL(unquantized || package)", acc["kl_float_package"], kl_bound,
            f"the package is less accurate than its torch reference: KL to the unquantized model "
            f"{acc['kl_float_package']:.4g} against the reference's "
            f"{acc['kl_float_reference']:.4g} (bound {kl_bound:.4g})"))
        checks.append(Check.at_most(
            "accuracy: perplexity", ppl_pkg, ppl_bound,
            f"perplexity {ppl_pkg:.4f} against the reference's {ppl_torch:.4f} (bound "
            f"{ppl_bound:.4f})"))
    else:
        result.skipped.append("accuracy against the unquantized model: the unquantized model was "
                              "not loaded (pass --model to apq-sdk verify)")

    # 4. the KV cache against the package's own full sequence
    cache = kv_cache_check(runner, batch[0], cmp["first_logits"])
    cache["relative"] = cache["max_abs_diff"] / ref_scale if ref_scale > 0 else math.inf
    result.kv_cache = cache
    cache_kl_tol = CACHE_KL_TOLERANCE_INT8 if int8 else KL_TOLERANCE
    if not int8:
        checks.append(Check.at_most(
            "KV cache: max |diff| / logit scale", cache["relative"], logit_tolerance,
            f"prefill + decode through the KV cache differs from the full sequence by "
            f"{cache['relative']:.3g} of the logit scale (tolerance {logit_tolerance:g})"))
    checks.append(Check.at_most(
        "KV cache: mean KL to the full sequence", cache["kl_mean"], cache_kl_tol,
        f"prefill + decode through the KV cache: mean KL to the full sequence "
        f"{cache['kl_mean']:.3g} (tolerance {cache_kl_tol:g})"))
    if cache_probe is not None:
        probe_name, probe = cache_probe()
        full = probe.full(batch[0])
        scale = float(np.abs(full).max())
        exact = kv_cache_check(probe, batch[0], full)
        exact["relative"] = exact["max_abs_diff"] / scale if scale > 0 else math.inf
        exact["probe"] = probe_name
        cache["float_probe"] = exact
        checks.append(Check.at_most(
            "KV cache, float probe: max |diff| / logit scale", exact["relative"],
            LOGIT_TOLERANCE,
            f"{probe_name}: prefill + decode through the KV cache differs from its full sequence "
            f"by {exact['relative']:.3g} of the logit scale (tolerance {LOGIT_TOLERANCE:g}): the "
            f"cache or the attention over it is wrong"))
    result.tolerance = {
        "logits_relative": logit_tolerance, "kl_mean": KL_TOLERANCE,
        "perplexity_relative": PPL_TOLERANCE, "linears_median": LINEAR_TOLERANCE,
        "accuracy_kl_margin": ACCURACY_KL_MARGIN, "accuracy_kl_slack": ACCURACY_KL_SLACK,
        "accuracy_ppl_margin": ACCURACY_PPL_MARGIN, "kv_cache_kl_int8": CACHE_KL_TOLERANCE_INT8,
        "definition": "logits_relative: max |package - torch| logit / max |torch logit| (float "
                      "activations and the float twin); kl_mean: mean KL(torch || package) "
                      "per token, nats; linears_median: median over tokens of max |package - "
                      "reference| per linear / its output scale; accuracy (int8 activations): "
                      "KL(unquantized || package) <= (1 + margin) * KL(unquantized || reference) "
                      "+ slack, perplexity <= (1 + margin) * the reference's"}
    result.timings = measure_timings(
        runner, batch[0], prefill_tokens=min(prefill_tokens, max_ctx - decode_tokens),
        decode_tokens=decode_tokens, runs=timing_runs)
    return result


def _float_twin_compare(twin: Runner, reference, batch: np.ndarray) -> dict:
    """The exact half of verifying an int8-per-block-dynamic package.

    int8 activations round, so two correct runtimes whose float32 sums differ in the last bit
    flip a few codes and drift apart by a small KL on a real model. The package's weights and
    graph are therefore checked exactly on its float-activation twin (the target's artifact with
    float activations) against the same torch reference with float activations.
    """
    from .quant.modules import ACT_NONE, QuantLinear

    switched = [m for m in reference.modules()
                if isinstance(m, QuantLinear) and m.activation == ACT_INT8_BLOCK]
    for m in switched:
        m.activation = ACT_NONE
    try:
        cmp = compare(twin, reference, batch)
    finally:
        for m in switched:
            m.activation = ACT_INT8_BLOCK
    relative = cmp["diff"] / cmp["ref_scale"] if cmp["ref_scale"] > 0 else math.inf
    return {"relative": relative, "kl_mean": cmp["kl"] / cmp["count"],
            "top1_agreement": cmp["agree"] / cmp["count"], "tokens": cmp["count"]}


# --------------------------------------------------------------------------------------------------
# apq-sdk verify


def verify_package(package_dir: Path, reference: Path | None = None, windows: int = 8,
                   text_path: Path | None = None, model: str | None = None,
                   log=lambda _: None) -> VerifyResult:
    """Check every hash, run the package here, compare with the torch reference; write verify.json.

    The unquantized model (for the accuracy checks of int8 packages) is `model`, else the one the
    manifest names, when it can be loaded and has the plan's weights; otherwise those checks are
    listed as not run."""

    from .checkpoint import read_checkpoint
    from .errors import ApqError
    from .package import check_manifest, read_manifest, reference_dir, write_verify
    from .targets.base import get_target

    package_dir = Path(package_dir)
    problems = check_manifest(package_dir)
    manifest = read_manifest(package_dir)
    try:
        target_cls = get_target(manifest["target"]["name"])
    except KeyError as exc:
        raise ApqError(f"{package_dir}: {exc.args[0]}") from None
    reference = Path(reference) if reference else reference_dir(package_dir, manifest)
    if not (reference / "model.safetensors").is_file():
        raise ApqError(f"{reference} holds no quantized checkpoint (model.safetensors); pass "
                       f"--reference QUANTIZED_DIR (from apq-sdk quantize with the same plan)")
    result = None
    if not problems:
        checkpoint = read_checkpoint(reference)
        float_model = _unquantized_model(model or manifest["model"].get("spec"),
                                         checkpoint.plan.model.weights_sha256, log)
        result = target_cls().verify(package_dir, checkpoint=checkpoint, text_path=text_path,
                                     windows=windows, float_model=float_model)
    write_verify(package_dir, result.to_dict() if result is not None else {"passed": False},
                 problems)
    if problems:
        raise ApqError("manifest check failed:\n  " + "\n  ".join(problems))
    if not result.passed:
        raise ApqError(f"package output does not match the torch reference:\n{result.table()}\n"
                       f"(full report: {package_dir / 'verify.json'})")
    return result


def _unquantized_model(spec: str | None, weights_sha256: str, log):
    """The unquantized model of a package, or None (with a log line) when it cannot be had."""
    from .errors import ApqError
    from .model_io import load_model

    if not spec:
        log("verify: the manifest names no model; pass --model for the accuracy checks")
        return None
    try:
        model, _, info = load_model(spec)
    except ApqError as exc:
        log(f"verify: cannot load the unquantized model {spec!r} ({exc}); pass --model")
        return None
    if info.weights_sha256 != weights_sha256:
        log(f"verify: {spec!r} has other weights than the package's plan; pass --model")
        return None
    return model
