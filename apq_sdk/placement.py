"""Spreading a model over several devices with accelerate's device maps (`--device-map`).

The pipeline runs one decoder block at a time, so a block (and its Hessians and GPTQ work) lives on
the device that holds its weights: accelerate's hooks move each block's inputs there, and the
stages create their buffers on the device of the weights they belong to. Nothing here schedules
work itself; the map is accelerate's (`infer_auto_device_map`) or the user's own JSON file.

Every weight must be resident on a device. Offloading (weights kept in CPU memory or on disk and
copied in for each forward) is refused: the stages read and replace weights directly, and an
offloaded module holds placeholders instead of its weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | None) -> dict | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'}."""
    if not text:
        return None
    out: dict = {}
    for item in text.split(","):
        device, sep, amount = item.strip().partition("=")
        if not sep or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", amount.strip(), re.I):
            raise UsageError(f"--max-memory: expected DEVICE=AMOUNT items separated by commas "
                             f"(e.g. '0=20GiB,1=20GiB'), found {item!r}")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = amount.strip()
    return out


def _normalize_device(value) -> str:
    if isinstance(value, int):
        return f"cuda:{value}"
    text = str(value)
    return f"cuda:{text}" if text.isdigit() else text


def _check_devices(device_map: dict, origin: str) -> None:
    devices = {_normalize_device(v) for v in device_map.values()}
    if "disk" in devices or "meta" in devices:
        raise UsageError(f"{origin} puts modules on disk or meta (offloading); apq-sdk needs every "
                         f"weight resident on a device. Give it more memory with --max-memory, or "
                         f"use more GPUs")
    gpus = sorted(d for d in devices if d.startswith("cuda"))
    if gpus and "cpu" in devices:
        on_cpu = sorted(k for k, v in device_map.items() if _normalize_device(v) == "cpu")
        raise UsageError(f"{origin} mixes GPUs ({', '.join(gpus)}) with the CPU for "
                         f"{len(on_cpu)} modules (e.g. {on_cpu[0]!r}): accelerate would offload "
                         f"those weights, which apq-sdk does not support. Raise --max-memory for "
                         f"the GPUs or add GPUs")
    for device in gpus:
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"{origin} uses {device}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")


def resolve_device_map(model: nn.Module, spec: str, max_memory: dict | None = None) -> dict:
    """The module -> device map for `spec`: a strategy name or a JSON file of such a map."""
    if spec in DEVICE_MAP_STRATEGIES:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if spec != "sequential":
            max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split,
                                             low_zero=spec == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=no_split)
        origin = f"--device-map {spec}"
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--device-map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                             f"or a JSON file mapping module names to devices, found {spec!r}")
        try:
            device_map = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--device-map {path}: not valid JSON ({exc})") from exc
        if not isinstance(device_map, dict) or not device_map:
            raise UsageError(f"--device-map {path}: expected a JSON object such as "
                             f'{{"model.embed_tokens": 0, "model.layers.0": 0, ...}}, found '
                             f"{type(device_map).__name__}")
        origin = f"--device-map {path}"
        names = dict(model.named_modules())
        unknown = [k for k in device_map if k and k not in names]
        if unknown:
            raise UsageError(f"{origin}: {unknown[0]!r} is not a module of "
                             f"{type(model).__name__} (e.g. {', '.join(list(names)[1:4])})")
        uncovered = [p for p, _ in model.named_parameters()
                     if not any(k == "" or p == k or p.startswith(k + ".") for k in device_map)]
        if uncovered:
            raise UsageError(f"{origin} places no module holding {uncovered[0]!r}; cover every "
                             f"parameter (a key of \"\" places the whole model)")
    _check_devices(device_map, origin)
    return device_map


def place_model(model: nn.Module, device_map: dict) -> nn.Module:
    """Dispatch `model` over `device_map` with accelerate hooks (also when every entry is one
    device, so the same code path runs on a CPU-only machine)."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=device_map, force_hooks=True,
                          skip_keys=getattr(model, "_skip_keys_device_placement", None))


def input_device(model: nn.Module) -> str:
    """Where the input ids go: the device of the input embedding."""
    return str(model.get_input_embeddings().weight.device)


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` in place of the module `name` ("lm_head" for the output head), on the old one's
    device and with its accelerate hook, if it had one."""
    old = model.get_output_embeddings() if name == "lm_head" else model.get_submodule(name)
    new = new.to(module_device(old))
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    if name == "lm_head":
        model.set_output_embeddings(new)
    else:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new
