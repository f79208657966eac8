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


@dataclass(frozen=True)
class Capabilities:
    """What a target can run. One table; `apq-sdk targets` prints it."""

    weight_bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    activation_modes: tuple[str, ...]
    default_activation: str = "none"  # what `build` plans with unless --activations says otherwise
    fused: tuple[str, ...] = ("qkv", "gate_up")  # layer groups the runtime fuses: must share bits
    head_bits: tuple[int, ...] = (4, 8, 16)
    max_context: int = 2048
    symmetric_only: bool = False
    notes: str = ""

    def __post_init__(self):
        if self.default_activation not in self.activation_modes:
            raise ValueError(f"default_activation: expected one of {self.activation_modes}, "
                             f"found {self.default_activation!r}")

    def as_planning(self, name: str):
        from apq_sdk.planning import Capability

        return Capability(name=name, bits=self.weight_bits, group_sizes=self.group_sizes,
                          activations=self.activation_modes, symmetric_only=self.symmetric_only,
                          fuse_qkv="qkv" in self.fused, fuse_gate_up="gate_up" in self.fused)

    def to_dict(self) -> dict:
        return {"weight_bits": list(self.weight_bits), "group_sizes": list(self.group_sizes),
                "activation_modes": list(self.activation_modes),
                "default_activation": self.default_activation, "fused": list(self.fused),
                "head_bits": list(self.head_bits), "max_context": self.max_context,
                "symmetric_only": self.symmetric_only, "notes": self.notes}


@dataclass(frozen=True)
class Violation:
    module: str
    field: str
    found: object
    allowed: object

    def __str__(self) -> str:
        return f"{self.module}: {self.field}={self.found!r} not in {self.allowed!r}"


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
        caps = cls.capabilities
        found = []
        for name, entry in plan.modules.items():
            if entry.kind == "linear":
                if entry.bits not in caps.weight_bits:
                    found.append(Violation(name, "bits", entry.bits, caps.weight_bits))
                elif entry.bits != 16 and entry.group_size not in caps.group_sizes:
                    found.append(Violation(name, "group_size", entry.group_size, caps.group_sizes))
                if entry.activation not in caps.activation_modes:
                    found.append(Violation(name, "activation", entry.activation, caps.activation_modes))
            elif entry.bits not in caps.head_bits:
                found.append(Violation(name, "bits", entry.bits, caps.head_bits))
            elif entry.bits != 16 and entry.group_size not in caps.group_sizes:
                found.append(Violation(name, "group_size", entry.group_size, caps.group_sizes))
            if caps.symmetric_only and not entry.symmetric and entry.bits != 16:
                found.append(Violation(name, "symmetric", False, (True,)))
        return found

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
