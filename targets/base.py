"""The target interface: a capability table, tools, lowering, and what verify needs to run it.

A target is one folder under `targets/` holding a `Target` subclass, one entry in `BUILTIN_TARGETS`
below (name -> module, imported only when needed, so a missing runtime never breaks the others), and
its templates under `templates/<name>/` layered over `templates/common/`. A subclass declares:

* `capabilities`: the one table profile, plan and check obey (apq_sdk.capabilities);
* `tools`: what it needs on the build machine, and `runtime_packages`: the Python distributions
  whose versions go into the package manifest;
* `lower(ctx)`: write the artifact, native glue and README from `ctx.checkpoint` (the core's integers
  and scales, bit for bit: targets never re-quantize);
* `runner(package_dir)`: the artifact running here, for the shared verify
  (apq_sdk.verification); optionally `read_weights` (the artifact's weights in checkpoint layout,
  for the bit-exact check of every build), `float_twin` (the artifact with float activations) and
  `model_files`.

A build checks the plan against `capabilities` before any work starts; a plan that asks for
something the target cannot run is refused with the modules and the fix, or re-planned with
`--replan`.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import ClassVar

import numpy as np

from apq_sdk.capabilities import Capabilities, Violation  # noqa: F401  (re-exported)
from apq_sdk.verification import LOGIT_TOLERANCE

#: every built-in target: name -> module under apq_sdk.targets that defines (registers) it
BUILTIN_TARGETS = {
    "arm64-linux": "onnxruntime.target",
    "jetson-orin": "tensorrt.target",
    "cuda-x86_64": "tensorrt.target",
    "android": "executorch.target",
    "android-lowbit": "executorch.target",
    "qualcomm": "executorch.target",
    "macos": "coreai.target",
    "ios": "coreai.target",
}
TARGETS: dict[str, type["Target"]] = {}


@dataclass(frozen=True)
class BuildOption:
    """A target-specific build option: `apq-sdk build --target-option NAME=VALUE`, recorded in
    the package's manifest (target.options) and given to `lower` as BuildContext.options."""

    name: str
    choices: tuple[str, ...]
    default: str
    help: str


@dataclass(frozen=True)
class Tool:
    """Something a target needs on the build machine: a Python module, an executable, or an SDK
    (`name` an environment variable naming its directory, which must hold `requires`)."""

    name: str
    kind: str  # "python" | "executable" | "sdk"
    how_to_get: str
    needed_for: str = "build"  # "build" | "verify" | "compile-check"
    requires: str = ""  # kind "sdk": a file the SDK directory holds

    def present(self) -> bool:
        if self.kind == "python":
            return importlib.util.find_spec(self.name) is not None
        if self.kind == "sdk":
            import os

            root = os.environ.get(self.name)
            return bool(root) and (Path(root) / self.requires).is_file()
        return shutil.which(self.name) is not None


@dataclass
class BuildContext:
    """What a target's `lower` gets: the checkpoint to lower and where to write."""

    package_dir: Path  # write every package file under here (a temporary directory)
    checkpoint: object  # apq_sdk.checkpoint.QuantizedCheckpoint (its .plan is the build's plan)
    model_name: str
    package_name: str
    options: dict = field(default_factory=dict)  # target-specific build options

    @property
    def plan(self):
        return self.checkpoint.plan


class Target:
    name: ClassVar[str]
    description: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    tools: ClassVar[tuple[Tool, ...]] = ()
    runtime_packages: ClassVar[tuple[str, ...]] = ()  # versions recorded in the manifest
    template_sets: ClassVar[tuple[str, ...]] = ()  # rendered in order over templates/common
    glue_languages: ClassVar[tuple[str, ...]] = ("c",)  # what its native glue is written in
    #: verify's bound on max |logit diff| / logit scale against the torch reference: float32
    #: summation order unless the artifact's contract rounds its cache and logits to float16
    logit_tolerance: ClassVar[float] = LOGIT_TOLERANCE
    preset_of: ClassVar[str | None] = None  # a device preset of this target: the same build
    #                                         path and artifact (`build --target all` skips it)
    build_options: ClassVar[tuple[BuildOption, ...]] = ()

    @classmethod
    def resolve_options(cls, given: dict | None) -> dict:
        """`given` ({name: value}) checked against the target's build options, defaults filled
        in; UsageError naming what was expected."""
        from apq_sdk.errors import UsageError

        known = {o.name: o for o in cls.build_options}
        listing = "; ".join(f"{o.name} ({'|'.join(o.choices)}, default {o.default})"
                            for o in cls.build_options) or "it has none"
        for name, value in (given or {}).items():
            if name not in known:
                raise UsageError(f"--target-option {name}={value}: target {cls.name!r} has no "
                                 f"build option {name!r}; its options: {listing}")
            if value not in known[name].choices:
                raise UsageError(f"--target-option {name}={value}: expected one of "
                                 f"{', '.join(known[name].choices)} for target {cls.name!r}, "
                                 f"found {value!r}")
        return {o.name: (given or {}).get(o.name, o.default) for o in cls.build_options}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            if cls.name in TARGETS and TARGETS[cls.name] is not cls:
                raise TypeError(f"target {cls.name!r} registered twice")
            if cls.capabilities.name != cls.name:
                raise TypeError(f"target {cls.name!r}: its capability table is named "
                                f"{cls.capabilities.name!r}; give it the target's name")
            TARGETS[cls.name] = cls

    @classmethod
    def missing_tools(cls, stage: str = "build") -> list[Tool]:
        return [t for t in cls.tools if t.needed_for == stage and not t.present()]

    @classmethod
    def build_refusal(cls) -> str | None:
        """Why `build` cannot finish for this target on any input, with its tools present (a
        stage not implemented), or None. `build` says it before loading anything."""
        return None

    @classmethod
    def check_plan(cls, plan) -> list[Violation]:
        return cls.capabilities.check_plan(plan)

    @classmethod
    def runtime_versions(cls) -> dict[str, str]:
        """Versions of torch, transformers and the target's runtime packages installed here."""
        out = {}
        for name in ("torch", "transformers", *cls.runtime_packages):
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                pass
        return out

    # -- what every target implements ---------------------------------------------------------------

    def lower(self, ctx: BuildContext) -> None:
        """Write the model artifact, native glue and package README into ctx.package_dir."""
        raise NotImplementedError

    def runner(self, package_dir: Path, *, threads: int = 1):
        """The package's artifact running here (apq_sdk.verification.Runner)."""
        raise NotImplementedError

    def model_files(self, package_dir: Path) -> list[Path]:
        """The artifact's files (their bytes are the package's model size)."""
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------------------

    def read_weights(self, package_dir: Path, plan) -> dict | None:
        """Every planned module's weights as the artifact stores them, in checkpoint layout
        (apq_sdk.checkpoint.CheckpointModule), or None when the format cannot be read here."""
        return None

    def stored_codes(self, module) -> bytes:
        """A packed module's codes as the artifact stores them (for tests that corrupt one layer
        where it lies in the model files): the core's first qweight row unless the format
        re-lays the codes out."""
        return module.arrays["qweight"][0].tobytes()

    def manifest_extra(self, package_dir: Path) -> dict:
        """Entries the target adds to manifest.json (e.g. what was validated and what was not)."""
        return {}

    def float_twin(self, package_dir: Path, workdir: Path, *, threads: int = 1):
        """A Runner of the artifact with float activations (for int8-per-block plans), or None."""
        return None

    # -- shared ------------------------------------------------------------------------------------

    def verify(self, package_dir: Path, *, checkpoint, text_path: Path | None, windows: int,
               threads: int = 1, float_model=None, runner=None, read_weights=None, **options):
        """Run the package here and compare it with the torch reference (apq_sdk.verification);
        `float_model` (the unquantized torch model) enables the accuracy checks of int8 plans.
        `runner` and `read_weights` replace the target's own (a package of two artifacts)."""
        import tempfile

        from apq_sdk.verification import verify_runner

        package_dir = Path(package_dir)
        with tempfile.TemporaryDirectory(prefix="apq-verify-") as work:
            return verify_runner(
                target=self.name,
                runner=runner if runner is not None else self.runner(package_dir, threads=threads),
                checkpoint=checkpoint, package_dir=package_dir, text_path=text_path,
                windows=windows, max_context=self.capabilities.max_context,
                model_bytes=sum(p.stat().st_size for p in self.model_files(package_dir)),
                read_weights=read_weights or (lambda: self.read_weights(package_dir,
                                                                        checkpoint.plan)),
                float_twin=lambda: self.float_twin(package_dir, Path(work), threads=threads),
                float_model=float_model, threads=threads,
                logit_tolerance=self.logit_tolerance, **options)


class PrefixCacheRunner:
    """A verify Runner over an artifact whose KV cache lives inside it (mutable buffers, state):
    a step's state is the token ids the cache holds, and a step from any other state first fills
    the cache with them again. Subclasses give `_run(ids, start) -> logits [n, vocab]` (the ids
    written into the cache from position `start`) and may clear the cache in `_reset_cache`."""

    live: tuple = ()

    def _run(self, ids: np.ndarray, start: int) -> np.ndarray:
        raise NotImplementedError

    def _reset_cache(self) -> None:
        """Positions past the ones written are masked; clearing them is optional."""

    def step(self, ids, state):
        prefix = () if state is None else tuple(state)
        if self.live != prefix:  # the cache holds something else: fill it with `prefix` again
            self._reset_cache()
            if prefix:
                self._run(np.array(prefix), 0)
            self.live = prefix
        logits = self._run(ids, len(prefix))
        self.live = prefix + tuple(int(i) for i in np.asarray(ids).reshape(-1))
        return logits, self.live

    def full(self, ids):
        return self.step(ids, None)[0]


# -- helpers the targets' lowerings share ------------------------------------------------------------

def glue_numbers(checkpoint, max_context: int) -> dict:
    """The model constants the native glue is rendered with (apq_model.h's macros)."""
    spec = checkpoint.spec
    config = checkpoint.config
    return {"vocab_size": spec.vocab_size, "num_layers": spec.num_layers,
            "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "hidden_size": spec.hidden_size, "max_context": min(max_context, spec.max_context),
            "bos_token_id": _token_id(getattr(config, "bos_token_id", None), spec.vocab_size),
            "eos_token_id": _token_id(getattr(config, "eos_token_id", None), spec.vocab_size)}


def _token_id(value, vocab: int) -> int:
    """A config's bos/eos id (the first of a list) when it is inside the vocabulary, else -1."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, int) and 0 <= v < vocab), None)
    return value if isinstance(value, int) and 0 <= value < vocab else -1


def export_glue_tokenizer(checkpoint, package_dir: Path, target: str) -> None:
    """The checkpoint's tokenizer as the plain-text files the C++ tokenizer reads (tokenizer/);
    LoweringError when the package's runtime cannot reproduce it."""
    from apq_sdk.tokenizer_export import TOKENIZER_DIR, TokenizerExportError, export_tokenizer

    from .onnx_graph import LoweringError

    tokenizer = checkpoint.path / "tokenizer.json"
    if not tokenizer.is_file():
        raise LoweringError(f"{checkpoint.path} has no tokenizer.json; the package's C++ runtime "
                            f"needs it (quantize again: the checkpoint keeps the model's "
                            f"tokenizer)")
    try:
        export_tokenizer(tokenizer, Path(package_dir) / TOKENIZER_DIR)
    except TokenizerExportError as exc:
        raise LoweringError(f"the package's C++ runtime cannot reproduce this model's tokenizer: "
                            f"{exc}. It reproduces byte-level BPE tokenizers (GPT-2, Llama 3, "
                            f"Qwen, SmolLM) id for id; this one is not supported by the {target} "
                            f"target") from exc


def get_target(name: str) -> type[Target]:
    load_builtin_targets()
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; registered targets: {', '.join(sorted(TARGETS))} "
                       f"(see apq-sdk targets)") from None


def load_builtin_targets() -> dict[str, type[Target]]:
    for module in BUILTIN_TARGETS.values():
        importlib.import_module(f"{__package__}.{module}")
    return TARGETS
