"""The quantized checkpoint: the one reader and writer of what `apq-sdk quantize` produces.

A checkpoint directory holds

* `model.safetensors`: for every planned module, its packed codes (`<name>.qweight`, uint8
  [N, K*b/8]), float16 scales (`<name>.scales`, [N, G]) and, for asymmetric groups, packed zero
  points (`<name>.qzeros`, uint8 [N, ceil(G*b/8)]), or its float16 weight (`<name>.weight`) when the
  plan keeps it at 16 bits, plus `<name>.bias` (float32) where the layer has one; every other tensor
  of the model (norms, an untied embedding) as float32. Layout: docs/formats.md.
* `config.json` (the transformers config), `plan.json` (the plan it was quantized with) and the
  tokenizer files.

`read_checkpoint` checks all of it (every planned tensor present with the shape and dtype its plan
entry implies, no stray planned tensor) and returns a `QuantizedCheckpoint` whose `modules` hold the
arrays exactly as stored. Every consumer reads through it: `load_quantized` (the torch reference
that eval and verify use) and every target's lowering, which receive the checkpoint from the build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelLoadError
from .fsutil import atomic_directory

MODEL_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FORMAT_PREFIX = "apq-quantized/plan-v"
PACKED_KEYS = ("qweight", "scales", "qzeros")


class CheckpointError(ModelLoadError):
    """A quantized checkpoint that is missing, incomplete or inconsistent with its plan."""


@dataclass
class CheckpointModule:
    """One planned module as stored.

    kind "packed": arrays qweight / scales / (qzeros) exactly as stored by the core;
    kind "float16": arrays weight [N, K] float16 as stored; kind "float32": weight [N, K] float32
    (float exports of an unquantized model, for comparisons).
    """

    name: str
    kind: str
    shape: tuple[int, int]  # (N, K) = (out, in) features
    arrays: dict[str, np.ndarray]
    bits: int = 16
    group_size: int | None = None
    bias: np.ndarray | None = None
    activation: str = "none"
    act_clip: float = 1.0

    @property
    def symmetric(self) -> bool:
        return "qzeros" not in self.arrays

    def fuse_key(self) -> tuple:
        """Modules with equal keys can share one fused matmul."""
        return (self.kind, self.bits, self.group_size, self.symmetric, self.activation,
                float(self.act_clip), self.bias is not None, self.shape[1])

    def dequantize(self) -> np.ndarray:
        """The float32 weight [N, K] the stored arrays stand for (docs/formats.md)."""
        if self.kind != "packed":
            return np.asarray(self.arrays["weight"], dtype=np.float32)
        from .quant.packing import dequantize

        return dequantize(self.arrays["qweight"], self.arrays["scales"], self.arrays.get("qzeros"),
                          self.bits, self.group_size, self.shape[1])


@dataclass
class QuantizedCheckpoint:
    path: Path
    plan: object  # apq_sdk.plan_file.Plan
    config: object  # transformers PretrainedConfig
    tensors: dict[str, np.ndarray]  # every stored tensor, by name
    modules: dict[str, CheckpointModule] = field(default_factory=dict)

    @property
    def spec(self):
        """The runtime-neutral decoder description (apq_sdk.families.DecoderSpec)."""
        from .families import decoder_spec

        return decoder_spec(self.config)

    def tensor(self, name: str) -> np.ndarray:
        """A stored tensor that is not a planned module's (norms, an untied embedding)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path / MODEL_FILE} has no tensor {name!r}")
        return self.tensors[name]

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]


def is_checkpoint_dir(path) -> bool:
    """Whether `path` holds an earlier checkpoint (which a new one may replace)."""
    path = Path(path)
    return (path / MODEL_FILE).is_file() and (path / PLAN_FILE).is_file()


# --------------------------------------------------------------------------------------------------
# writing


def write_checkpoint(out_dir, tensors: dict[str, np.ndarray], config: dict, plan,
                     tokenizer=None) -> Path:
    """Write a checkpoint directory atomically (temporary directory renamed into place)."""
    from safetensors.numpy import save_file

    from .plan_file import save_plan

    config = {k: v for k, v in config.items()
              if k not in ("quantization_config", "transformers_version")}

    def write(tmp: Path) -> None:
        save_file(dict(sorted(tensors.items())), str(tmp / MODEL_FILE),
                  # one key: safetensors writes metadata from a hash map, whose order varies
                  # from process to process, so several keys would break byte-identical files
                  metadata={"format": f"{FORMAT_PREFIX}{plan.version}"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_plan(plan, tmp / PLAN_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return atomic_directory(Path(out_dir), write, tag="tmp")


# --------------------------------------------------------------------------------------------------
# reading


def _expect(tensors, name: str, dtype, shape, where: Path) -> np.ndarray:
    if name not in tensors:
        raise CheckpointError(f"{where} lacks {name} required by the plan; the file is "
                              f"incomplete: quantize again")
    array = tensors[name]
    if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"{where}: {name} is {array.dtype} {list(array.shape)}, expected "
                              f"{np.dtype(dtype)} {list(shape)} for its plan entry; the checkpoint "
                              f"does not match its plan.json: quantize again")
    return array


def _module(name: str, entry, tensors, where: Path) -> CheckpointModule:
    n, k = entry.shape
    bias = tensors.get(f"{name}.bias")
    if bias is not None:
        bias = _expect(tensors, f"{name}.bias", np.float32, (n,), where)
    common = dict(name=name, shape=(n, k), bias=bias, activation=entry.activation,
                  act_clip=float(entry.act_clip))
    if entry.bits == 16:
        weight = _expect(tensors, f"{name}.weight", np.float16, (n, k), where)
        return CheckpointModule(kind="float16", arrays={"weight": weight}, **common)
    groups = -(-k // entry.group_size)
    arrays = {"qweight": _expect(tensors, f"{name}.qweight", np.uint8, (n, k * entry.bits // 8), where),
              "scales": _expect(tensors, f"{name}.scales", np.float16, (n, groups), where)}
    if entry.symmetric:
        if f"{name}.qzeros" in tensors:
            raise CheckpointError(f"{where}: {name} is symmetric in the plan but has stored zero "
                                  f"points ({name}.qzeros); quantize again")
    else:
        arrays["qzeros"] = _expect(tensors, f"{name}.qzeros", np.uint8,
                                   (n, (groups * entry.bits + 7) // 8), where)
    return CheckpointModule(kind="packed", arrays=arrays, bits=entry.bits,
                            group_size=entry.group_size, **common)


def read_checkpoint(path) -> QuantizedCheckpoint:
    """Read and check a checkpoint directory (see the module docstring)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from .plan_file import PlanError, load_plan

    path = Path(path)
    for required in (MODEL_FILE, PLAN_FILE, CONFIG_FILE):
        if not (path / required).is_file():
            raise CheckpointError(f"{path} is not a quantized model directory: {required} is "
                                  f"missing (expected the output of apq-sdk quantize)")
    try:
        plan = load_plan(path / PLAN_FILE)
    except PlanError as exc:
        raise CheckpointError(str(exc)) from exc
    where = path / MODEL_FILE
    try:
        with safe_open(str(where), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(where))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"could not read {where}: {exc}; the file may be truncated or "
                              f"corrupt: quantize again") from exc
    fmt = metadata.get("format", "")
    if not fmt.startswith(FORMAT_PREFIX):
        raise CheckpointError(f"{where} is not an apq-sdk quantized checkpoint (metadata format "
                              f"{fmt!r}, expected {FORMAT_PREFIX}N); pass the output of apq-sdk "
                              f"quantize")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise CheckpointError(f"could not read {path / CONFIG_FILE}: {exc}") from exc
    modules = {name: _module(name, entry, tensors, where) for name, entry in plan.modules.items()}
    planned = tuple(f"{name}." for name in plan.modules)
    allowed = {f"{name}.{key}" for name in plan.modules for key in (*PACKED_KEYS, "weight", "bias")}
    stray = sorted(k for k in tensors if k.startswith(planned) and k not in allowed)
    if stray:
        raise CheckpointError(f"{where} has tensors its plan does not describe, e.g. {stray[0]}; "
                              f"the checkpoint does not match its plan.json: quantize again")
    return QuantizedCheckpoint(path=path, plan=plan, config=config, tensors=tensors, modules=modules)


# --------------------------------------------------------------------------------------------------
# the torch reference


def load_quantized(path, device: str = "cpu", device_map: str | None = None,
                   max_memory: dict | None = None, checkpoint: QuantizedCheckpoint | None = None):
    """A torch module (transformers model) with the quantized layers of `path`, on `device` or
    spread over the devices of `device_map` (placement.py). `model.apq_plan` is its plan."""
    import copy

    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from .placement import replace_module
    from .quant.modules import Float16Linear, QuantLinear
    from .quant.weights import QuantizedWeight

    ckpt = checkpoint if checkpoint is not None else read_checkpoint(path)
    plan, config = ckpt.plan, ckpt.config
    # every model its own config: transformers keeps the object it is given, and a caller that
    # edits its model's config (the ExecuTorch recorder keeps 2 layers) must not change another's
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    model.eval().requires_grad_(False)
    for name, module in ckpt.modules.items():
        bias = None if module.bias is None else torch.from_numpy(module.bias)
        if plan.modules[name].kind == "embedding":  # a float16 table (the input embedding)
            embedding = model.get_submodule(name)
            embedding.weight = nn.Parameter(torch.from_numpy(module.arrays["weight"]).float(),
                                            requires_grad=False)
            continue
        if module.kind == "packed":
            qweight = QuantizedWeight.from_packed(module.arrays, module.bits, module.group_size,
                                                  module.shape)
            replacement = QuantLinear(qweight, bias, module.activation, module.act_clip)
        else:
            replacement = Float16Linear(torch.from_numpy(module.arrays["weight"]).float(), bias,
                                        module.activation, module.act_clip)
        replace_module(model, name, replacement)
    planned = tuple(f"{n}." for n in plan.modules)
    rest = {k: torch.from_numpy(v) for k, v in ckpt.tensors.items() if not k.startswith(planned)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    tied_embedding = next((f"{n}.weight" for n, m in model.named_modules()
                           if m is model.get_input_embeddings()), None)
    missing = [k for k in missing if not k.startswith(planned)
               and not (config.tie_word_embeddings and k == tied_embedding)]
    where = ckpt.path / MODEL_FILE
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} tensors the model needs, e.g. "
                              f"{missing[0]}; the file is incomplete: quantize again")
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} tensors the model does not have, "
                              f"e.g. {unexpected[0]}; it does not match its config.json: "
                              f"quantize again")
    if config.tie_word_embeddings and "lm_head" in plan.modules:
        model.get_input_embeddings().weight = nn.Parameter(model.get_output_embeddings().weight,
                                                           requires_grad=False)
    model.apq_plan = plan
    if device_map:
        from .placement import place_model, resolve_device_map

        return place_model(model, resolve_device_map(model, device_map, max_memory))
    return model.to(device)
