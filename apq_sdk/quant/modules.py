"""Torch reference modules for quantized inference.

`QuantLinear` holds the packed integers, float16 scales and zero points exactly as stored, and
computes with their dequantized values. Activation modes (docs/formats.md):

* `int8-per-token-dynamic`: every token's activation row is scaled by its own absolute maximum
  (times a calibrated clip) and rounded to int8 before the matmul;
* `int8-per-block-dynamic`: every token's row is cut into blocks of the layer's weight group size
  along the input dimension, and each block gets its own scale amax / 127 with codes
  round-half-to-even(x * (127 / amax)), no clip. This is what int8 kernels with block-quantized
  weights compute (onnxruntime's MatMulNBits at accuracy_level 4: the integer dot product of a
  block of codes with a block of weight codes, times both scales);
* `int8-per-token-asym-dynamic`: every token's row gets an affine int8 grid over
  [min(x, 0), max(x, 0)]: scale (max - min) / 255, an integer zero point, codes -128..127. This is
  what XNNPACK's dynamically quantized linears (ExecuTorch's "8da", torchao's
  int8_asym_per_token) compute, formula for formula as torchao writes it.

Eval uses these modules, and every target's output is checked against them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..plan_file import ACT_INT8, ACT_INT8_ASYM, ACT_INT8_BLOCK, ACT_NONE  # noqa: F401
from ..plan_file import ACTIVATIONS as ACTIVATION_MODES
from .weights import QuantizedWeight
#: modes that quantize the activations of quantized layers only (a 16-bit layer keeps floats)
QUANTIZED_LAYERS_ONLY = (ACT_INT8_BLOCK, ACT_INT8_ASYM)


def quantize_activations_per_token(x: torch.Tensor, clip: float = 1.0):
    """(xq, scale): xq float tensor of int8 values, scale [..., 1], per docs/formats.md (float32)."""
    x32 = x.float()
    amax = x32.abs().amax(-1, keepdim=True)
    scale = (amax * torch.tensor(clip, dtype=torch.float32)) / torch.tensor(127.0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    xq = torch.clamp(torch.round(x32 / scale), -127, 127)
    return xq, scale


def fake_quantize_activations(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    xq, scale = quantize_activations_per_token(x, clip)
    return (xq * scale).to(x.dtype)


def quantize_activations_per_block(x: torch.Tensor, block: int):
    """(codes, scale) for blocks of `block` values along the last dim (the last may be short).

    codes [..., K] are float int8 values round-half-to-even(x * (127 / amax)); scale [..., G] is
    amax / 127 per block (0 for an all-zero block, whose codes are 0). float32 throughout.
    """
    x32 = x.float()
    k = x32.shape[-1]
    groups = -(-k // block)
    padded = F.pad(x32, (0, groups * block - k)) if groups * block != k else x32
    blocks = padded.reshape(*x32.shape[:-1], groups, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax != 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse)
    scale = amax / torch.tensor(127.0)
    return codes.reshape(*x32.shape[:-1], groups * block)[..., :k], scale.squeeze(-1)


def fake_quantize_activations_per_block(x: torch.Tensor, block: int) -> torch.Tensor:
    codes, scale = quantize_activations_per_block(x, block)
    k = x.shape[-1]
    return (codes * scale.repeat_interleave(block, dim=-1)[..., :k]).to(x.dtype)


def quantize_activations_per_token_asym(x: torch.Tensor):
    """(codes, scale, zero) per token row, float32: lo = min(x, 0), hi = max(x, 0),
    scale = max((hi - lo) / 255, float32's smallest normal),
    zero = clamp(-128 - round(lo / scale), -128, 127),
    codes = clamp(round(x * (1 / scale)) + zero, -128, 127), round-half-to-even."""
    x32 = x.float()
    lo = x32.amin(-1, keepdim=True).clamp(max=0)
    hi = x32.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).smallest_normal)
    zero = torch.clamp(-128 - torch.round(lo / scale), -128, 127)
    codes = torch.clamp(torch.round(x32 * (1.0 / scale)) + zero, -128, 127)
    return codes, scale, zero


def fake_quantize_activations_asym(x: torch.Tensor) -> torch.Tensor:
    codes, scale, zero = quantize_activations_per_token_asym(x)
    return ((codes - zero) * scale).to(x.dtype)


class QuantLinear(nn.Module):
    """A linear layer with b-bit group-quantized weights and optional dynamic int8 activations."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None,
                 activation: str = ACT_NONE, act_clip: float = 1.0):
        super().__init__()
        if activation not in ACTIVATION_MODES:
            raise ValueError(f"activation: expected one of {ACTIVATION_MODES}, found {activation!r}")
        self.out_features, self.in_features = qweight.shape
        self.bits = qweight.bits
        self.group_size = qweight.group_size
        self.activation = activation
        self.act_clip = float(act_clip)
        self.register_buffer("codes", qweight.codes, persistent=False)
        self.register_buffer("scales", qweight.scales, persistent=False)
        self.register_buffer("zeros", qweight.zeros, persistent=False)
        self.register_buffer("weight", qweight.dequantize(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == ACT_INT8:
            x = fake_quantize_activations(x, self.act_clip)
        elif self.activation == ACT_INT8_BLOCK:
            x = fake_quantize_activations_per_block(x, self.group_size)
        elif self.activation == ACT_INT8_ASYM:
            x = fake_quantize_activations_asym(x)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group={self.group_size}, act={self.activation}")


class Float16Linear(nn.Module):
    """A layer the plan keeps at 16 bits: float16 storage, optional dynamic int8 activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = ACT_NONE,
                 act_clip: float = 1.0):
        super().__init__()
        if activation in QUANTIZED_LAYERS_ONLY:
            raise ValueError(f"activation: {activation!r} quantizes the activations of quantized "
                             f"layers only; a 16-bit layer keeps float activations ('none') in "
                             f"that mode")
        self.out_features, self.in_features = weight.shape
        self.bits = 16
        self.activation = activation
        self.act_clip = float(act_clip)
        self.register_buffer("weight", weight.detach().half().float(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == ACT_INT8:
            x = fake_quantize_activations(x, self.act_clip)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
