"""Apple targets through Core AI (iOS 27 / macOS 27): `macos`, and `ios`, a preset of the same
build path and artifact.

`lower` builds the decoder of the checkpoint (targets/coreai/decoder.py: the core's codes, scales
and zero points in `coreai::constexpr_blockwise_shift_scale`, never re-quantized), exports two
entry points that share the KV-cache state, `prefill` (a dynamic number of new tokens) and
`decode` (one token), converts them with coreai-torch into one asset, reads every compressed
weight back from the saved asset and fails the build unless each equals the checkpoint, and
writes the resource bundle Apple's `CoreAILanguageModel` (apple/coreai-models) loads:

    <package>/<bundle>/metadata.json       bundle format 0.2: kind llm, assets.main, language
    <package>/<bundle>/model.aimodel/      the asset (MLIR bytecode, weights inline)
    <package>/<bundle>/tokenizer/          tokenizer.json, tokenizer_config.json

What converts, measured here with coreai-torch 0.4.3 / coreai-core 1.0.0b3
(tests/targets/coreai): blockwise integers of 2, 4 and 8 bits, signed (symmetric) or unsigned
with zero points (asymmetric), in blocks that divide the input width (a block that does not
divide it fails conversion); no 3-bit integer type, and 3-bit lookup tables fail in the
converter's packer, so 3-bit layers are refused by the table and the planner re-plans them at 2
or 4 bits. Core AI has no dynamic activation quantization in its converter: the plan's
activations are float ("none", weight-only), which is what the package runs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..base import (BuildContext, BuildOption, Capabilities, PrefixCacheRunner, Target, Tool,
                    glue_numbers)

BUNDLE_DIR = "CoreAI"
COREML_DIR = "CoreML"
ASSET_NAME = "model.aimodel"
PROGRAM_FILE = "program.json"
METADATA_VERSION = "0.2"  # CoreAILanguageModel's bundle format (apple/coreai-models)
WEIGHTS_KEY = "apq.weights"  # asset metadata: module names of the blockwise ops, in order
#: apple/coreai-models, whose CoreAILanguageModel reads the bundle: the revision its format was
#: learned from (bundle metadata 0.2 with function_map and states)
COREAI_MODELS_REVISION = "86b363dca67cf276c1a5c96eea5e4b57e3a0643c"
ARTIFACTS = BuildOption(
    "artifacts", ("coreai,coreml", "coreai", "coreml"), "coreai,coreml",
    "the artifacts the package holds: the Core AI asset (iOS 27 / macOS 27) and the Core ML "
    "package (iOS 18 / macOS 15), or one of them; recorded in the manifest")

APPLE_CAPABILITIES = Capabilities(
    name="macos",
    weight_bits=(2, 4, 8, 16),
    group_sizes=(32, 64, 128, 256),
    activation_modes=("none",),
    default_activation="none",
    symmetric_only=False,
    whole_groups=True,
    fused=(),
    head_bits=(4, 8, 16),
    max_context=2048,
    families=("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
              "smollm3"),
    scale_bytes=2,
    tied_lookup="shared",
    notes=("Core AI (coreai-torch 0.4.3, coreai-core 1.0.0b3): blockwise 2-, 4- and 8-bit "
           "integers (signed without zero points, or unsigned with b-bit zero points) in blocks "
           "that divide the input width, float16 scales, float16 16-bit layers. No 3-bit type: "
           "3-bit layers are refused (its 3-bit lookup tables fail in coreai-torch's packer). "
           "Activations are float (weight-only): Core AI's converter has no dynamic activation "
           "quantization, so per-token int8 scaling is not part of this target's plans. A tied "
           "head's lookup reads the head's own blockwise weight (no second copy)."),
)


class CoreAITarget(Target):
    """The Core AI build path shared by the macOS and iOS targets."""

    name = "macos"
    description = ("Core AI on macOS 27 (Apple silicon): blockwise 2/4/8-bit weights in one "
                   ".aimodel with prefill and decode, bundled for CoreAILanguageModel")
    capabilities = APPLE_CAPABILITIES
    platform: ClassVar[str] = "macOS"
    tools = (
        Tool("coreai_torch", "python", "pip install 'apq-sdk[coreml]' torch==2.13.0", "build"),
        Tool("coreai", "python", "pip install 'apq-sdk[coreml]' torch==2.13.0", "build"),
        Tool("coremltools", "python", "pip install 'apq-sdk[coreml]' torch==2.13.0", "build"),
    )
    runtime_packages = ("coreai-torch", "coreai-core", "coremltools")
    glue_languages = ("swift",)
    template_sets = ("coreai",)
    build_options = (ARTIFACTS,)
    # the contract CoreAILanguageModel calls keeps the cache and the logits in float16: their
    # rounding moves logits by up to ~4e-3 of the logit scale on the tiny models (float32
    # everywhere else); a wrong scale of one layer moves them by 0.1 and more
    logit_tolerance = 1e-2

    # -- lowering ----------------------------------------------------------------------------------

    def lower(self, ctx: BuildContext) -> None:
        from apq_sdk.plan_file import plan_sha256

        from ..onnx_graph import LoweringError, dumps_json
        from .program import convert, export_entry_points

        package_dir = Path(ctx.package_dir)
        bundle = package_dir / BUNDLE_DIR
        bundle.mkdir(parents=True, exist_ok=True)
        ckpt = ctx.checkpoint
        numbers = glue_numbers(ckpt, self.capabilities.max_context)
        max_context = int((ctx.options or {}).get("max_context", numbers["max_context"]))
        artifacts = self.resolve_options(
            {k: v for k, v in (ctx.options or {}).items() if k == ARTIFACTS.name})
        artifacts = artifacts[ARTIFACTS.name].split(",")
        weights = None
        if "coreai" in artifacts:
            programs, order = export_entry_points(ckpt, max_context)
            try:
                weights = convert(programs, order, bundle / ASSET_NAME, ckpt,
                                  {"apq.plan_sha256": plan_sha256(ckpt.plan),
                                   "apq.model": ctx.model_name})
            except ValueError as exc:
                raise LoweringError(f"the saved asset does not hold the checkpoint's weights "
                                    f"as planned: {exc}") from exc
        self._write_bundle(ctx, bundle, numbers, max_context, with_asset=weights is not None)
        coreml = None
        if "coreml" in artifacts:
            from .coreml import MODEL_FILE as COREML_FILE
            from .coreml import build_mlpackage
            from .weights import float16_digest

            (package_dir / COREML_DIR).mkdir(exist_ok=True)
            try:
                index = build_mlpackage(ckpt, max_context, package_dir / COREML_DIR / COREML_FILE)
            except ValueError as exc:
                raise LoweringError(f"the Core ML package does not hold the checkpoint's "
                                    f"weights as planned: {exc}") from exc
            coreml = {"file": f"{COREML_DIR}/{COREML_FILE}", "minimum_os": "iOS 18 / macOS 15",
                      "weights": index, "bytes": _tree_bytes(package_dir / COREML_DIR),
                      "float16": {n: float16_digest(m.arrays["weight"])
                                  for n, m in sorted(ckpt.modules.items())
                                  if m.kind == "float16"}}
        if (ctx.options or {}).get("native_glue", True):
            self._write_glue(ctx, package_dir, {**numbers, "max_context": max_context})
        description = {
            "artifacts": artifacts, "bundle": BUNDLE_DIR,
            "asset": f"{BUNDLE_DIR}/{ASSET_NAME}" if weights is not None else None,
            "model_type": ckpt.spec.family, **numbers, "max_context": max_context,
            "functions": {
                name: {"inputs": [{"name": "input_ids", "dtype": "int32", "shape": [1, q]},
                                  {"name": "position_ids", "dtype": "int32",
                                   "shape": [1, "past + " + str(q)]}],
                       "outputs": [{"name": "logits", "dtype": "float16",
                                    "shape": [1, q, numbers["vocab_size"]]}],
                       "states": ["keyCache", "valueCache"]}
                for name, q in (("prefill", "q"), ("decode", 1))},
            "state_shape": [numbers["num_layers"], 1, numbers["num_kv_heads"], max_context,
                            numbers["head_dim"]],
            "state_dtype": "float16",
            "plan_sha256": plan_sha256(ckpt.plan), "weights": weights, "coreml": coreml}
        (package_dir / PROGRAM_FILE).write_text(dumps_json(description))

    def _write_bundle(self, ctx: BuildContext, bundle: Path, numbers: dict,
                      max_context: int, with_asset: bool) -> None:
        """metadata.json and tokenizer/ as CoreAILanguageModel reads them (tokenizer/ only in a
        package without the Core AI asset: the Swift package reads it there)."""
        from ..onnx_graph import dumps_json

        tokenizer_dir = bundle / "tokenizer"
        tokenizer_dir.mkdir(exist_ok=True)
        for source in ctx.checkpoint.tokenizer_files():  # the bundle's, and verify's
            (tokenizer_dir / source.name).write_bytes(source.read_bytes())
            (bundle.parent / source.name).write_bytes(source.read_bytes())
        if not with_asset:
            return
        metadata = {
            "metadata_version": METADATA_VERSION, "kind": "llm", "name": ctx.model_name,
            "assets": {"main": ASSET_NAME},
            "language": {"tokenizer": ctx.model_name, "vocab_size": numbers["vocab_size"],
                         "max_context_length": max_context, "embedded_tokenizer": True,
                         "function_map": {"main": ["prefill"]},
                         "states": {"keyCache": "kv_cache", "valueCache": "kv_cache"}},
            "source": {"model_definition": "torch", "producer": "apq-sdk"},
            "compression": "apq-mixed-precision",
        }
        (bundle / "metadata.json").write_text(dumps_json(metadata))

    def _write_glue(self, ctx: BuildContext, package_dir: Path, numbers: dict) -> None:
        """The Swift package, the SwiftUI example and the README (templates/coreai)."""
        from importlib.metadata import version

        from apq_sdk import __version__
        from apq_sdk.native_glue import render_templates
        from apq_sdk.plan_file import plan_sha256

        from .coreml import MODEL_FILE as COREML_FILE

        spec = ctx.checkpoint.spec
        kv_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * \
            numbers["max_context"]
        asset, coreml = package_dir / BUNDLE_DIR / ASSET_NAME, package_dir / COREML_DIR
        context = {"package_name": ctx.package_name, "model_name": ctx.model_name,
                   "target": self.name, "platform": self.platform, "sdk_version": __version__,
                   "runtime": f"coreai-torch {version('coreai-torch')}",
                   "bundle_dir": BUNDLE_DIR, "asset_name": ASSET_NAME,
                   "coreml_dir": COREML_DIR, "coreml_file": COREML_FILE,
                   "coreml_stem": Path(COREML_FILE).stem,
                   "coreai_models_revision": COREAI_MODELS_REVISION,
                   "plan_sha256": plan_sha256(ctx.plan),
                   "coreai_included": asset.is_dir(), "coreml_included": coreml.is_dir(),
                   "coreai_megabytes": f"{_tree_bytes(asset) / 1e6:.1f}",
                   "coreml_megabytes": f"{_tree_bytes(coreml) / 1e6:.1f}",
                   "kv_cache_megabytes": f"{kv_bytes / 1e6:.1f}", **numbers}
        render_templates(self.template_sets, context, package_dir)

    # -- what verify runs --------------------------------------------------------------------------

    def model_files(self, package_dir: Path) -> list[Path]:
        """The Core AI asset's files, or the Core ML package's in a package without the asset."""
        asset = Path(package_dir) / BUNDLE_DIR / ASSET_NAME
        if not asset.is_dir():
            asset = Path(package_dir) / COREML_DIR
        return sorted(p for p in asset.rglob("*") if p.is_file())

    def stored_codes(self, module) -> bytes:
        """The first row's codes as the asset stores them: Core AI's little-endian bit stream
        of signed (symmetric: code - 2**(b-1)) or unsigned values."""
        from apq_sdk.quant.packing import pack_bits, unpack_bits

        k = module.shape[1]
        codes = unpack_bits(module.arrays["qweight"][:1], module.bits, k)
        if module.symmetric:
            codes = ((codes.astype(np.int16) - (1 << (module.bits - 1))) &
                     ((1 << module.bits) - 1)).astype(np.uint8)
        return pack_bits(codes, module.bits).tobytes()

    def runner(self, package_dir: Path, *, threads: int = 1):
        """The Core AI asset in coreai-core's CPU reference runtime, or, in a package without
        it, the Core ML package (macOS only)."""
        if (Path(package_dir) / BUNDLE_DIR / ASSET_NAME).is_dir():
            return AssetRunner(Path(package_dir) / BUNDLE_DIR / ASSET_NAME)
        from .coreml import CoreMLRunner

        return CoreMLRunner(self._coreml(package_dir)[0])

    @staticmethod
    def _coreml(package_dir: Path) -> tuple[Path, dict] | None:
        """(the Core ML package, its program.json index), or None when the package has none."""
        index = json.loads((Path(package_dir) / PROGRAM_FILE).read_text()).get("coreml")
        return None if not index else (Path(package_dir) / index["file"], index)

    def read_weights(self, package_dir: Path, plan) -> dict:
        from apq_sdk.checkpoint import CheckpointModule
        from apq_sdk.errors import ApqError

        from .weights import checkpoint_arrays, float_constants, stored_weights

        package_dir = Path(package_dir)
        asset = package_dir / BUNDLE_DIR / ASSET_NAME
        if not asset.is_dir():
            return self.read_coreml_weights(package_dir, plan)
        try:
            index = json.loads((package_dir / PROGRAM_FILE).read_text())["weights"]
            names, records = index["order"], stored_weights(asset)
            if len(records) != len(names):
                raise ValueError(f"{len(records)} blockwise ops, {len(names)} recorded names")
            read = {}
            for name, record in zip(names, records):
                entry = plan.modules[name]
                read[name] = CheckpointModule(
                    name=name, kind="packed", shape=tuple(entry.shape),
                    arrays=checkpoint_arrays(record, entry.bits, entry.group_size,
                                             entry.symmetric),
                    bits=entry.bits, group_size=entry.group_size)
            read.update(float_constants(asset, index["float16"], plan))
        except (ValueError, KeyError, OSError) as exc:
            raise ApqError(f"{asset}: {exc}") from exc
        return read

    def read_coreml_weights(self, package_dir: Path, plan) -> dict:
        """The Core ML package's weights in the checkpoint's layout (compression ops and float16
        constants, read back from the saved package)."""
        from apq_sdk.errors import ApqError

        from .coreml import read_weights

        path, index = self._coreml(package_dir)
        try:
            return read_weights(path, plan, index["weights"], index["float16"])
        except (ValueError, KeyError, OSError) as exc:
            raise ApqError(f"{path}: {exc}") from exc

    def verify(self, package_dir: Path, **options):
        """The shared verify of the Core AI asset (in coreai-core's CPU reference runtime), and of
        the Core ML package: its weights read back here, its prediction through the same checks
        on macOS (where Core ML runs); on Linux that part is listed as skipped. Timing runs fewer
        decode steps: the CPU reference runtime expands every compressed weight on each call
        (~15 s per decode step on the demo model) and its speed says nothing about a device's."""
        import sys

        from apq_sdk.verification import Check, VerifyResult, compare_weights

        options.setdefault("timing_runs", 1)
        options.setdefault("decode_tokens", 4)
        package_dir = Path(package_dir)
        coreml = self._coreml(package_dir)
        on_mac = sys.platform == "darwin"
        has_asset = (package_dir / BUNDLE_DIR / ASSET_NAME).is_dir()
        if has_asset or on_mac:  # the Core AI asset, or a Core ML-only package on macOS
            result = super().verify(package_dir, **options)
        else:
            result = VerifyResult(target=self.name, runtime="none on this machine", text="",
                                  int8_activations=False, model_bytes=sum(
                                      p.stat().st_size for p in self.model_files(package_dir)))
        if coreml is None:
            return result
        label = f"Core ML package ({coreml[0].relative_to(package_dir)})"
        if has_asset or not on_mac:  # weights of the Core ML package (on its own, verify did it)
            checkpoint = options["checkpoint"]
            weights = compare_weights(checkpoint, self.read_coreml_weights(package_dir,
                                                                           checkpoint.plan))
            bad = weights["mismatched"]
            result.checks.append(Check(f"{label}: weights equal the checkpoint (modules "
                                       f"differing)", bad, 0, bad == 0,
                                       f"{label}: weights differ from the checkpoint: "
                                       + "; ".join(weights["examples"])))
        if not on_mac:
            result.skipped.append(f"{label}: prediction needs macOS (coremltools runs Core ML "
                                  f"models only there); verify on a Mac runs it through the "
                                  f"same checks")
        elif has_asset:  # on macOS: the Core ML package through the same checks
            import dataclasses

            from .coreml import CoreMLRunner

            other = super().verify(
                package_dir, runner=CoreMLRunner(coreml[0]),
                read_weights=lambda: self.read_coreml_weights(package_dir,
                                                              options["checkpoint"].plan),
                **options)
            result.checks.extend(dataclasses.replace(c, name=f"{label}: {c.name}")
                                 for c in other.checks)
            result.skipped.extend(f"{label}: {s}" for s in other.skipped)
        return result

    def manifest_extra(self, package_dir: Path) -> dict:
        import sys

        package_dir = Path(package_dir)
        has_asset = (package_dir / BUNDLE_DIR / ASSET_NAME).is_dir()
        coreml = self._coreml(package_dir)
        done, not_done = [], [
            f"running on {self.platform} hardware (Metal, Neural Engine): speed and memory on a "
            "device were not measured",
            "loading the package in an app, and compiling the Swift package (no Apple SDK on "
            "the build machine; its syntax was checked)"]
        if has_asset:
            done += [
                "the Core AI asset runs in coreai-core's CPU reference runtime (prefill and "
                "decode through the shared KV-cache state) and matches the torch reference of "
                "the plan (verify.json: logits, KL, perplexity, decode through the state)",
                "every blockwise weight in the asset equals the checkpoint, bit for bit: codes, "
                "float16 scales and zero points read back from the saved bytecode "
                "(program.json: weights)",
                "the bundle's metadata.json, tokenizer/ and functions follow the layout "
                "apple/coreai-models' CoreAILanguageModel reads (format 0.2)"]
            not_done.append("loading the bundle with CoreAILanguageModel and FoundationModels")
        if coreml is not None:
            done.append(
                "CoreML/model.mlpackage: every planned layer is a compression op holding the "
                "checkpoint's codes, float16 scales and zero points (4/8-bit blockwise) or its "
                "grid as float16 tables (2/3-bit), and every 16-bit layer its float16 weight, "
                "read back from the saved package (program.json: coreml; verify.json)")
            if sys.platform == "darwin":
                done.append("Core ML prediction of model.mlpackage on macOS (CPU) through the "
                            "same checks as the asset (verify.json)")
            else:
                not_done.append("Core ML prediction of model.mlpackage (it needs macOS): the "
                                "package was converted and read back here, never run")
        return {"validation": {
            "artifacts": (["coreai"] if has_asset else []) + (["coreml"] if coreml else []),
            "validated_here": done, "not_validated_here": not_done,
            "activations": "float (weight-only): neither Core AI nor Core ML has dynamic "
                           "activation quantization; the plan's activation mode is 'none'",
        }}


class IosTarget(CoreAITarget):
    """iOS 27: the same asset and bundle (CoreAILanguageModel runs its `main`/prefill structure
    on the GPU); a preset of macos."""

    name = "ios"
    description = ("Core AI on iOS 27 (A17 Pro / M-series iPhones and iPads): the macos "
                   "package's asset and bundle")
    platform = "iOS"
    preset_of = "macos"
    capabilities = __import__("dataclasses").replace(APPLE_CAPABILITIES, name="ios")


class AssetRunner(PrefixCacheRunner):
    """The asset in coreai-core's CPU reference runtime: a verify Runner. The KV cache is the
    functions' state, which the caller owns (two float16 arrays); a step's state is the token ids
    the cache holds, and a step from any other state first re-fills it."""

    def __init__(self, path: Path):
        from coreai.authoring import AIModelAsset
        from coreai.runtime import NDArray

        from .weights import register_ops

        register_ops()
        self.path = Path(path)
        self._loop = asyncio.new_event_loop()
        self._executable = AIModelAsset.load(self.path).executable()
        self.model = self._loop.run_until_complete(self._executable.__aenter__())
        self.functions = {n: self.model.load_function(n) for n in ("prefill", "decode")}
        desc = self.functions["prefill"].desc
        self.state = {n: NDArray(np.zeros(tuple(desc.state_descriptor(n).shape), np.float16))
                      for n in desc.state_names}
        self._NDArray = NDArray
        from coreai import _version

        self.runtime = f"coreai-core {getattr(_version, '__version__', '?')} (CPU reference)"
        self.live: tuple[int, ...] = ()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._executable.__aexit__(None, None, None))
            self._loop.close()
            self._loop = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def _run(self, ids: np.ndarray, past: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        q = ids.shape[1]
        positions = np.arange(past + q, dtype=np.int32)[None]
        function = self.functions["decode" if q == 1 else "prefill"]
        out = self._loop.run_until_complete(function(
            {"input_ids": self._NDArray(ids), "position_ids": self._NDArray(positions)},
            state=self.state))
        return out["logits"].numpy()[0].astype(np.float32)

    def _reset_cache(self) -> None:
        for array in self.state.values():
            array.numpy()[:] = 0


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
