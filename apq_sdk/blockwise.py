"""Running a causal LM one decoder block at a time over calibration data.

Only one block's activations live beside the weights: the inputs of block 0 are captured once, then
each block maps its inputs to the next block's inputs. What else each block is called with (its
attention mask and rotary tables, which differ between sliding-window and global layers, and between
layers with their own RoPE base, as in Gemma 2 and 3) is captured for every block. Hooks on the block's linear layers accumulate
each layer's Hessian H = 2/n * sum_t x_t x_t^T (the Hessian of the layer's squared output error), once
per distinct input tensor, so q/k/v (and gate/up) share one accumulation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .model_io import ModelInfo


class _StopForward(Exception):
    pass


@dataclass
class BlockBatch:
    """One calibration batch at the input of decoder block `layer`: its hidden states, and the
    keyword arguments every block is called with (`layer_kwargs[i]` for block i)."""

    hidden: torch.Tensor
    layer_kwargs: list[dict] = field(default_factory=list)
    layer: int = 0

    @property
    def kwargs(self) -> dict:
        """What block `layer` is called with besides the hidden states."""
        return self.layer_kwargs[self.layer]

    def kwargs_for(self, layer: int) -> dict:
        return self.layer_kwargs[layer]

    def advanced(self, hidden: torch.Tensor) -> "BlockBatch":
        """The batch at the input of the next block, whose input is `hidden`."""
        return BlockBatch(hidden, self.layer_kwargs, self.layer + 1)


def _cast_floats(value, dtype, seen: dict | None = None):
    seen = {} if seen is None else seen
    if id(value) in seen:  # blocks of one layer type share their mask and tables: cast once
        return seen[id(value)]
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        out = value.to(dtype)
    elif isinstance(value, tuple):
        out = tuple(_cast_floats(v, dtype, seen) for v in value)
    else:
        out = value
    seen[id(value)] = out
    return out


def _cast_layer_kwargs(layer_kwargs: list[dict], dtype) -> list[dict]:
    seen: dict = {}
    return [{k: _cast_floats(v, dtype, seen) for k, v in kwargs.items()} for kwargs in layer_kwargs]


def cast_batches(batches: list["BlockBatch"], dtype: torch.dtype) -> list["BlockBatch"]:
    return [BlockBatch(b.hidden.to(dtype), _cast_layer_kwargs(b.layer_kwargs, dtype), b.layer)
            for b in batches]


@contextlib.contextmanager
def compute_dtype(block: nn.Module, dtype: torch.dtype):
    """Run `block` in `dtype` (e.g. bfloat16 for 2x faster CPU matmuls), restoring its exact
    float32 parameters and buffers afterwards."""
    tensors = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    saved = {name: t.data for name, t in tensors.items() if t.is_floating_point() and t.dtype != dtype}
    try:
        for name, t in tensors.items():
            if name in saved:
                t.data = t.data.to(dtype)
        yield block
    finally:
        for name, t in tensors.items():
            if name in saved:
                t.data = saved[name]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, info: ModelInfo, samples: torch.Tensor,
                         batch_size: int, device: str, dtype: torch.dtype | None = None) -> list[BlockBatch]:
    """Run the embedding stage and record what decoder block 0 receives, and what every block is
    called with besides its hidden states, batch by batch. The blocks are stood in for by
    pass-throughs while recording, so this costs one embedding lookup per batch.

    With `dtype`, hidden states and float keyword tensors are stored in that dtype.
    """
    layers = model.get_submodule(info.layers_path)
    originals = list(layers)
    captured: list[BlockBatch] = []
    recorded: list[dict | None] = [None] * len(layers)

    class Catcher(nn.Module):
        def __init__(self, inner, index):
            super().__init__()
            self.inner = inner
            self.index = index
            self.attention_type = getattr(inner, "attention_type", None)

        def forward(self, hidden_states, *args, **kwargs):
            kwargs.pop("past_key_values", None)
            kwargs.pop("past_key_value", None)
            kwargs.pop("cache", None)
            kwargs["use_cache"] = False
            if args:
                raise RuntimeError("decoder block called with unexpected positional arguments")
            recorded[self.index] = kwargs
            if self.index == 0:
                recorded.append(hidden_states.detach())
            if self.index == len(originals) - 1:
                raise _StopForward
            return hidden_states

    for index, layer in enumerate(originals):
        layers[index] = Catcher(layer, index)
    try:
        for start in range(0, samples.shape[0], batch_size):
            batch = samples[start:start + batch_size].to(device)
            del recorded[len(originals):]
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            hidden, layer_kwargs = recorded[len(originals)], list(recorded[:len(originals)])
            if dtype is not None:
                hidden = hidden.to(dtype)
                layer_kwargs = _cast_layer_kwargs(layer_kwargs, dtype)
            captured.append(BlockBatch(hidden, layer_kwargs))
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return captured


def slice_batch(batch: BlockBatch, count: int) -> BlockBatch:
    """The first `count` sequences of a batch (tensors whose first dim is the batch are sliced)."""
    size = batch.hidden.shape[0]

    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[:count]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    seen: dict = {}

    def cut_once(value):
        if id(value) not in seen:
            seen[id(value)] = cut(value)
        return seen[id(value)]

    return BlockBatch(batch.hidden[:count],
                      [{k: cut_once(v) for k, v in kwargs.items()} for kwargs in batch.layer_kwargs],
                      batch.layer)


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, batches: list[BlockBatch]) -> list[torch.Tensor]:
    return [block_output(block(b.hidden, **b.kwargs)) for b in batches]


class HessianCollector:
    """Accumulates H = 2/n X^T X for the named linear layers of one block during forwards."""

    def __init__(self, named_linears: dict[str, nn.Module], dtype=torch.float32,
                 keep_rows: int = 0):
        self.keep_rows = keep_rows
        self.kept: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._shared: dict[str, str] = {}  # name -> name owning the accumulation of the same input
        self._last: tuple[torch.Tensor, str] | None = None  # held, so its memory is not reused
        self._handles = []
        self.dtype = dtype
        self._call_order: list[str] = []
        self._stop_at: str | None = None
        for name, module in named_linears.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs):
            # a hooked module (device map split inside a block) gets its inputs moved only after
            # this hook; keep the Hessian beside the weight
            x = inputs[0]
            weight = getattr(module, "weight", None)
            if weight is not None and x.device != weight.device:
                x = x.to(weight.device)
            self._accumulate(name, x)
            if name == self._stop_at:
                raise _StopForward
        return hook

    def collect(self, block: nn.Module, batches: list[BlockBatch]) -> None:
        """Forward every batch through `block` only to accumulate Hessians; no output is kept.

        The first batch runs whole and records the order in which the linears read their inputs;
        later batches stop as soon as the last of them has its input (for a decoder block that
        skips the down projection and the residual add).
        """
        self._call_order.clear()
        self._stop_at = None
        for index, batch in enumerate(batches):
            try:
                block(batch.hidden, **batch.kwargs)
            except _StopForward:
                pass
            if index == 0 and self._call_order:
                self._stop_at = self._call_order[-1]

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        if name not in self._call_order:
            self._call_order.append(name)
        if self._last is not None and self._last[0] is x and self._last[1] != name:
            self._shared[name] = self._last[1]
            return
        self._last = (x, name)
        rows = x.reshape(-1, x.shape[-1])
        if name not in self.sums:
            self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype,
                                          device=rows.device)
            self.counts[name] = 0
        if name not in self.kept and self.keep_rows:
            self.kept[name] = rows[: self.keep_rows].to(self.dtype).clone()
        if rows.dtype in (torch.bfloat16, torch.float16) and self.dtype == torch.float32:
            # Inputs from a half-precision forward are exact in that dtype; its matmul
            # accumulates in float32 and rounds each batch's X^T X once (relative 2^-9), and
            # the batches add up in float32. Twice as fast on CPU; on the demo model GPTQ's
            # output error moves by at most 0.3 % either way against a float32 product.
            self.sums[name] += (rows.T @ rows).to(self.dtype)
        else:
            x2 = rows.to(self.dtype)
            self.sums[name].addmm_(x2.T, x2)
        self.counts[name] += rows.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        owner = self._shared.get(name, name)
        return self.sums[owner] * (2.0 / self.counts[owner])

    def input_groups(self, names) -> dict[str, list[str]]:
        """`names` grouped by the input they read (q/k/v, gate/up): owner -> members, in order."""
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(self._shared.get(name, name), []).append(name)
        return groups

    def kept_rows(self, name: str) -> torch.Tensor:
        """The first `keep_rows` input rows seen by this layer (for activation-clip search)."""
        return self.kept[self._shared.get(name, name)]

    def remove(self) -> None:
        self._last = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    from .quant.modules import Float16Linear, QuantLinear

    kinds = (nn.Linear, QuantLinear, Float16Linear)
    return {f"{prefix}.{sub}": mod for sub, mod in block.named_modules() if isinstance(mod, kinds)}
