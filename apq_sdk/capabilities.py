"""What a target can run: one table, read by profile (candidates), plan (options) and check.

Every target declares one `Capabilities`; the generic core set is `GENERIC`. The same object

* chooses what `profile` measures (`profile_group_sizes`, `symmetric`),
* limits what `make_plan` may choose (bit-widths, group sizes, activation modes, symmetry, fused
  layer groups, head bits), and
* checks a finished plan (`check_plan`), naming every module that does not fit and the fix.

The plan records the table's name and `sha256()`, a hash of every field that changes what runs
(everything but the prose `notes`), so two targets that differ in anything, head bits or context
included, never share a capability hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from .plan_file import (ACT_INT8, ACT_INT8_ASYM, ACT_INT8_BLOCK, ACT_NONE,  # noqa: F401
                        ACTIVATIONS, SCALE_DTYPES, SUPPORTED_BITS)
FUSED_GROUPS = ("qkv", "gate_up")
TIED_LOOKUPS = ("shared", "scales", "copy")
#: group sizes profiled when a target runs them: groups of 32 reproduce the demo model's Q4_1 grid
#: for free, so quality is planned and reported on groups of 64 or more unless a target needs less
PREFERRED_GROUP_SIZES = (64, 128)


def _tuple_of_ints(value, name: str, allowed=None, positive=True) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: expected a tuple of integers, found {value!r}")
    out = tuple(value)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or (positive and v < 1):
            raise ValueError(f"{name}: expected positive integers, found {v!r} in {out}")
        if allowed is not None and v not in allowed:
            raise ValueError(f"{name}: expected values from {allowed}, found {v!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: expected distinct values, found {out}")
    return out


@dataclass(frozen=True)
class Violation:
    """One module of a plan that the capability table does not allow."""

    module: str
    field: str
    found: object
    allowed: object

    def __str__(self) -> str:
        return f"{self.module}: {self.field}={self.found!r} not in {self.allowed!r}"


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What one target (or the generic core) can run. `apq-sdk targets` prints it."""

    version: ClassVar[int] = 1

    name: str = "generic"
    weight_bits: tuple[int, ...] = (2, 3, 4, 8, 16)  # decoder linears; 16 = float16
    group_sizes: tuple[int, ...] = (32, 64, 128, 256)  # block sizes the kernels run
    activation_modes: tuple[str, ...] = (ACT_NONE, ACT_INT8, ACT_INT8_BLOCK)
    default_activation: str = ACT_NONE  # what `build` plans with unless --activations says otherwise
    symmetric_only: bool = False  # group kernels without zero points (XNNPACK, QNN)
    whole_groups: bool = False  # a group size must divide the layer's input width: no short last
    #                             group (XNNPACK's and TensorRT's blocked kernels, coreai-opt)
    fused: tuple[str, ...] = FUSED_GROUPS  # layer groups the runtime fuses: they share bits
    head_bits: tuple[int, ...] = (4, 8, 16)  # output head (and a tied embedding)
    max_context: int = 2048
    families: tuple[str, ...] | None = None  # model families it lowers; None: every registered one
    # how the artifact stores a block-quantized tensor, so budgets bound what the package weighs:
    scale_bytes: int = 2  # bytes per group scale (ONNX Runtime's MatMulNBits: float32, 4)
    pads_last_block: bool = False  # a short last group is stored padded to a whole block
    tied_lookup: str = "shared"  # what the embedding lookup of a tied head stores besides the
    #                              head: nothing ("shared"), a second copy of its scales and
    #                              unpacked zero points ("scales", ONNX Runtime's
    #                              GatherBlockQuantized), or a whole second copy in the core's
    #                              layout ("copy", TensorRT: the runtime looks rows up)
    float_weight_bytes: int = 2  # bytes per weight of a 16-bit linear in the artifact: float16,
    #                              or float32 (4) where the runtime's float GEMM reads float32
    scale_dtype: str = "float16"  # the grid block scales lie on: "bfloat16" where the runtime
    #                               keeps bfloat16 scales (XNNPACK's 4-bit kernels), so the
    #                               core rounds to it and the artifact holds the same values
    quantized_activation: str | None = None  # set where low-bit weights run only with dynamic
    #                               int8 activations (XNNPACK): every quantized layer must take
    #                               this mode and every 16-bit one float activations
    notes: str = field(default="", compare=False)

    #: fields added after the first tables were published: hashed only when they differ from
    #: these defaults, so a table that does not use them keeps its capability hash
    _HASHED_WHEN_SET: ClassVar[dict] = {"float_weight_bytes": 2, "scale_dtype": "float16",
                                        "quantized_activation": None}

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, found {self.name!r}")
        object.__setattr__(self, "weight_bits",
                           _tuple_of_ints(self.weight_bits, "weight_bits", SUPPORTED_BITS))
        groups = _tuple_of_ints(self.group_sizes, "group_sizes")
        for g in groups:
            if g % 8:
                raise ValueError(f"group_sizes: expected multiples of 8, found {g}")
        object.__setattr__(self, "group_sizes", groups)
        object.__setattr__(self, "head_bits", _tuple_of_ints(self.head_bits, "head_bits",
                                                             SUPPORTED_BITS))
        modes = tuple(self.activation_modes)
        for mode in modes:
            if mode not in ACTIVATIONS:
                raise ValueError(f"activation_modes: expected values from {ACTIVATIONS}, "
                                 f"found {mode!r}")
        object.__setattr__(self, "activation_modes", modes)
        if self.default_activation not in modes:
            raise ValueError(f"default_activation: expected one of {modes}, "
                             f"found {self.default_activation!r}")
        fused = tuple(self.fused)
        for group in fused:
            if group not in FUSED_GROUPS:
                raise ValueError(f"fused: expected values from {FUSED_GROUPS}, found {group!r}")
        object.__setattr__(self, "fused", fused)
        if not isinstance(self.symmetric_only, bool):
            raise ValueError(f"symmetric_only: expected true or false, found {self.symmetric_only!r}")
        if not isinstance(self.whole_groups, bool):
            raise ValueError(f"whole_groups: expected true or false, found {self.whole_groups!r}")
        if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) \
                or self.max_context < 2:
            raise ValueError(f"max_context: expected an integer >= 2, found {self.max_context!r}")
        if self.families is not None:
            object.__setattr__(self, "families", tuple(self.families))
        if self.tied_lookup not in TIED_LOOKUPS:
            raise ValueError(f"tied_lookup: expected one of {TIED_LOOKUPS}, "
                             f"found {self.tied_lookup!r}")
        if self.scale_bytes not in (2, 4):
            raise ValueError(f"scale_bytes: expected 2 (float16) or 4 (float32), "
                             f"found {self.scale_bytes!r}")
        if not [b for b in self.weight_bits if b != 16] and 16 not in self.weight_bits:
            raise ValueError("weight_bits: expected at least one bit-width")
        if self.float_weight_bytes not in (2, 4):
            raise ValueError(f"float_weight_bytes: expected 2 (float16) or 4 (float32), "
                             f"found {self.float_weight_bytes!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype: expected one of {SCALE_DTYPES}, "
                             f"found {self.scale_dtype!r}")
        if self.quantized_activation is not None and \
                self.quantized_activation not in self.activation_modes:
            raise ValueError(f"quantized_activation: expected one of activation_modes "
                             f"{self.activation_modes} or None, found {self.quantized_activation!r}")

    # -- what profile measures ------------------------------------------------------------------

    @property
    def symmetric(self) -> bool:
        """Whether plans for this table store symmetric groups (no zero points)."""
        return self.symmetric_only

    def runs_group(self, k: int, group: int) -> bool:
        """Whether groups of `group` over an input width of `k` are in this table."""
        return group in self.group_sizes and not (self.whole_groups and k % group)

    def profile_group_sizes(self, preferred: tuple[int, ...] = PREFERRED_GROUP_SIZES
                            ) -> tuple[int, ...]:
        """The group sizes to profile for this table: the preferred ones it runs, else its own."""
        chosen = tuple(g for g in preferred if g in self.group_sizes)
        return chosen or tuple(sorted(self.group_sizes))

    # -- what the package weighs -------------------------------------------------------------------

    def stored_bytes(self, n: int, k: int, bits: int, group: int | None, symmetric: bool, *,
                     tied_lookup: bool = False) -> int:
        """Bytes of one [n, k] tensor in this target's artifact: the core's storage
        (apq_sdk.quant.packing.stored_bytes) plus the target's own overheads (wider scales,
        padded last blocks, the lookup copy of a tied head)."""
        from .quant.packing import stored_bytes

        core = stored_bytes(n, k, bits, group, symmetric)
        copy = core if tied_lookup and self.tied_lookup == "copy" else 0
        if bits == 16:  # a lookup copy of a tied float head stays float16
            return n * k * self.float_weight_bytes + copy
        groups = -(-k // group)
        extra = n * groups * (self.scale_bytes - 2)
        if self.pads_last_block:
            extra += n * (groups * group - k) * bits // 8
        if tied_lookup and self.tied_lookup == "scales":
            extra += n * groups * (self.scale_bytes + (0 if symmetric else 1))
        return core + extra + copy

    # -- identity ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        data["version"] = self.version
        return data

    def sha256(self) -> str:
        """Hash of everything that changes what runs (all fields but `notes`)."""
        data = self.to_dict()
        data.pop("notes")
        for key, default in self._HASHED_WHEN_SET.items():
            if data[key] == default:
                data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    # -- plan check -------------------------------------------------------------------------------

    def check_plan(self, plan) -> list[Violation]:
        """Every module of `plan` that this table cannot run (empty when the plan fits)."""
        found = []
        for name, entry in plan.modules.items():
            allowed_bits = self.weight_bits if entry.kind == "linear" else self.head_bits
            if entry.bits not in allowed_bits:
                found.append(Violation(name, "bits", entry.bits, allowed_bits))
            elif entry.bits != 16 and entry.group_size not in self.group_sizes:
                found.append(Violation(name, "group_size", entry.group_size, self.group_sizes))
            elif entry.bits != 16 and not self.runs_group(entry.shape[1], entry.group_size):
                k = entry.shape[1]
                found.append(Violation(name, "group_size", entry.group_size,
                                       tuple(g for g in self.group_sizes if k % g == 0)
                                       or f"a divisor of its input width {k}"))
            if self.quantized_activation is not None:
                want = self.quantized_activation if entry.bits != 16 else ACT_NONE
                if entry.activation != want:
                    found.append(Violation(name, "activation", entry.activation, (want,)))
            elif entry.activation not in self.activation_modes:
                found.append(Violation(name, "activation", entry.activation,
                                       self.activation_modes))
            if entry.bits != 16 and self.scale_dtype != "float16" \
                    and entry.scale_dtype != self.scale_dtype:
                found.append(Violation(name, "scale_dtype", entry.scale_dtype,
                                       (self.scale_dtype,)))
            if self.symmetric_only and not entry.symmetric and entry.bits != 16:
                found.append(Violation(name, "symmetric", False, (True,)))
        if self.families is not None and plan.model.model_type not in self.families:
            found.append(Violation("model", "model_type", plan.model.model_type, self.families))
        return found


GENERIC = Capabilities()
