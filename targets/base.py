"""The target interface: capabilities in one table, tools, plan checks, lowering and verification.

Every backend is a subclass of `Target`, registered by its `name` through `__init_subclass__`. A
build checks the plan against `capabilities` before any work starts; a plan that asks for something
the target cannot run is refused with the modules and the fix, or re-planned with `--replan`.
Targets never re-quantize: they lower the core's integers, scales and zero points bit for bit.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from apq_sdk.capabilities import Capabilities, Violation  # noqa: F401  (re-exported)

TARGETS: dict[str, type["Target"]] = {}


@dataclass(frozen=True)
class Tool:
    """Something a target needs on the build machine: a Python module or an executable."""

    name: str
    kind: str  # "python" | "executable"
    how_to_get: str
    needed_for: str = "build"  # "build" | "verify" | "compile-check"

    def present(self) -> bool:
        if self.kind == "python":
            return importlib.util.find_spec(self.name) is not None
        return shutil.which(self.name) is not None


@dataclass
class BuildContext:
    """What a target's `lower` gets: the quantized model and where to write."""

    package_dir: Path  # write every package file under here (a temporary directory)
    quantized_dir: Path  # output of apq_sdk.quantizer.save_quantized (model.safetensors, plan.json, ...)
    plan: object  # apq_sdk.plan_file.Plan
    model_name: str
    package_name: str
    extra: dict = field(default_factory=dict)


class Target:
    name: ClassVar[str]
    description: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    tools: ClassVar[tuple[Tool, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            if cls.name in TARGETS:
                raise TypeError(f"target {cls.name!r} registered twice")
            TARGETS[cls.name] = cls

    @classmethod
    def missing_tools(cls, stage: str = "build") -> list[Tool]:
        return [t for t in cls.tools if t.needed_for == stage and not t.present()]

    @classmethod
    def check_plan(cls, plan) -> list[Violation]:
        return cls.capabilities.check_plan(plan)

    def lower(self, ctx: BuildContext) -> None:
        """Write the model artifact, native glue and package README into ctx.package_dir."""
        raise NotImplementedError

    def verify(self, package_dir: Path, *, reference_dir: Path, text_path: Path | None,
               windows: int) -> dict:
        """Run the package's artifact here and compare it with the torch reference."""
        raise NotImplementedError


def get_target(name: str) -> type[Target]:
    load_builtin_targets()
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; registered targets: {', '.join(sorted(TARGETS))} "
                       f"(see apq-sdk targets)") from None


def load_builtin_targets() -> dict[str, type[Target]]:
    from . import onnxruntime_target  # noqa: F401  (registers itself)

    return TARGETS
