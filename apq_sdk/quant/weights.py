"""Group-wise weight quantization: formats, round-to-nearest and GPTQ error compensation.

Each weight format is a small class registered by bit-width through `__init_subclass__`. Codes and
scales follow docs/formats.md: asymmetric groups store an integer zero point, scales are float16 and
every computation uses the float16-rounded scale, so what is stored is exactly what was evaluated.

GPTQ (Frantar et al., 2022) quantizes one column at a time and spreads each column's error over the
not-yet-quantized columns through the inverse Hessian of the layer's squared output error,
H = 2/n * X^T X. Group parameters are fixed before the sweep ("static groups"), so columns may be
visited in order of decreasing Hessian diagonal (act-order) while the stored layout stays the plain
row-major group layout every runtime reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

WEIGHT_FORMATS: dict[int, type["WeightFormat"]] = {}
CLIP_GRID = torch.linspace(1.0, 0.7, 16)


class WeightFormat:
    """A b-bit integer weight format. Subclasses register themselves by `bits`."""

    bits: ClassVar[int]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.bits in WEIGHT_FORMATS:
            raise TypeError(f"weight format for {cls.bits} bits registered twice")
        WEIGHT_FORMATS[cls.bits] = cls

    @classmethod
    def maxq(cls) -> int:
        return (1 << cls.bits) - 1

    @classmethod
    def symmetric_zero(cls) -> int:
        return 1 << (cls.bits - 1)


class Int2(WeightFormat):
    bits = 2


class Int3(WeightFormat):
    bits = 3


class Int4(WeightFormat):
    bits = 4


class Int8(WeightFormat):
    bits = 8


def weight_format(bits: int) -> type[WeightFormat]:
    try:
        return WEIGHT_FORMATS[bits]
    except KeyError:
        raise ValueError(f"bits: expected one of {sorted(WEIGHT_FORMATS)} (or 16 for float16), "
                         f"found {bits}") from None


@dataclass
class QuantizedWeight:
    """Integer codes [N, K] (uint8), float16 scales [N, G], integer zeros [N, G] (None if symmetric)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        zeros = (self.zeros.float() if self.zeros is not None
                 else torch.full_like(self.scales, float(weight_format(self.bits).symmetric_zero()),
                                      dtype=torch.float32))
        return dequantize_codes(self.codes.float(), self.scales.float(), zeros, self.group_size)

    def to_packed(self) -> dict[str, np.ndarray]:
        """The stored arrays of docs/formats.md: qweight, scales, and qzeros if asymmetric."""
        from .packing import pack_bits

        out = {"qweight": pack_bits(self.codes.cpu().numpy(), self.bits),
               "scales": self.scales.cpu().numpy().astype(np.float16)}
        if self.zeros is not None:
            out["qzeros"] = pack_bits(self.zeros.cpu().numpy(), self.bits, pad=True)
        return out

    @classmethod
    def from_packed(cls, arrays: dict[str, np.ndarray], bits: int, group_size: int,
                    shape: tuple[int, int]) -> "QuantizedWeight":
        from .packing import unpack_bits

        n, k = shape
        codes = torch.from_numpy(unpack_bits(arrays["qweight"], bits, k).astype(np.uint8))
        scales = torch.from_numpy(np.ascontiguousarray(arrays["scales"]).astype(np.float16))
        zeros = None
        if "qzeros" in arrays:
            zeros = torch.from_numpy(unpack_bits(arrays["qzeros"], bits, num_groups(k, group_size)))
        return cls(codes, scales, zeros, bits, group_size)


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size < 8 or group_size % 8:
        raise ValueError(f"group_size: expected a positive multiple of 8, found {group_size}")
    if in_features % 8:
        raise ValueError(f"in_features: expected a multiple of 8 (whole bytes for every bit-width), "
                         f"found {in_features}; keep this layer at 16 bits")


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[N, G] -> [N, K]: each group's value repeated over its columns (last group may be short)."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    k = codes.shape[1]
    return (codes - expand_groups(zeros, group_size, k)) * expand_groups(scales, group_size, k)


def _pad_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, g] with zero padding of the last group (zeros leave min/max unchanged)."""
    n, k = w.shape
    groups = num_groups(k, group_size)
    if groups * group_size != k:
        w = torch.nn.functional.pad(w, (0, groups * group_size - k))
    return w.view(n, groups, group_size)


def group_params(w: torch.Tensor, maxq: torch.Tensor, symmetric: bool,
                 importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group for w [..., g], with a clip search on the range.

    `maxq` broadcasts against w[..., 0] (one value per row allows batching bit-widths). The clip
    factor minimises the importance-weighted squared error of the group (importance = the Hessian
    diagonal of each input channel, or 1). Scales are rounded to float16 before codes are chosen.
    """
    maxq = maxq.to(w.dtype)
    weights = importance if importance is not None else torch.ones_like(w[..., :1])
    best_err = torch.full(w.shape[:-1], float("inf"), dtype=w.dtype, device=w.device)
    best_scale = torch.zeros_like(best_err)
    best_zero = torch.zeros_like(best_err)
    wmin = w.amin(-1).clamp(max=0)
    wmax = w.amax(-1).clamp(min=0)
    for factor in CLIP_GRID.tolist():
        lo, hi = wmin * factor, wmax * factor
        if symmetric:
            amax = torch.maximum(-lo, hi)
            scale = amax / ((maxq + 1) / 2 - 1).clamp(min=1)
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            scale = scale.half().float().clamp(min=torch.finfo(torch.float16).tiny)
            zero = torch.floor((maxq + 1) / 2)
            zero = zero.expand_as(scale)
        else:
            scale = (hi - lo) / maxq
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            scale = scale.half().float().clamp(min=torch.finfo(torch.float16).tiny)
            zero = torch.clamp(torch.round(-lo / scale), torch.zeros_like(maxq), maxq)
        q = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1),
                        torch.zeros_like(maxq).unsqueeze(-1), maxq.unsqueeze(-1))
        err = (((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - w) ** 2 * weights).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _grouped_params(weight: torch.Tensor, bits_per_row: torch.Tensor, group_size: int,
                    symmetric: bool, hessian_diag: torch.Tensor | None):
    n, k = weight.shape
    groups = num_groups(k, group_size)
    maxq = (2.0 ** bits_per_row.float() - 1).view(n, 1).expand(n, groups)
    diag = hessian_diag.clamp(min=0) + 1e-8 if hessian_diag is not None else \
        torch.ones(k, device=weight.device)
    importance = _pad_groups(diag.view(1, k), group_size)  # padding gets importance 0
    return group_params(_pad_groups(weight, group_size), maxq, symmetric, importance)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                 hessian_diag: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest with the clip search; the baseline GPTQ improves on."""
    weight_format(bits)
    n, k = weight.shape
    check_group_size(k, group_size)
    w = weight.float()
    bits_row = torch.full((n,), bits, device=w.device)
    scales, zeros = _grouped_params(w, bits_row, group_size, symmetric, hessian_diag)
    maxq = float((1 << bits) - 1)
    codes = torch.clamp(torch.round(w / expand_groups(scales, group_size, k))
                        + expand_groups(zeros, group_size, k), 0, maxq)
    return QuantizedWeight(codes.to(torch.uint8), scales.half(),
                           None if symmetric else zeros.to(torch.uint8), bits, group_size)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening, with growing damping if H is singular."""
    k = hessian.shape[0]
    mean_diag = torch.mean(torch.diag(hessian)).clamp(min=1e-8)
    eye = torch.eye(k, device=hessian.device, dtype=hessian.dtype)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(hessian + eye * (damp * (10 ** attempt)) * mean_diag)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except RuntimeError:  # torch raises LinAlgError (a RuntimeError) when not positive definite
            continue
    raise RuntimeError("Hessian is not positive definite even after dampening x1e5; the "
                       "calibration activations of this layer are degenerate")


def gptq_quantize_rows(weight: torch.Tensor, hessian: torch.Tensor, bits_per_row: torch.Tensor,
                       group_size: int, symmetric: bool = False, act_order: bool = True,
                       damp: float = 0.01, block_size: int = 128):
    """GPTQ for rows with their own bit-widths (rows are independent given H).

    Returns (codes [N, K] float, scales [N, G], zeros [N, G]) in the original column order.
    Stacking one weight at several bit-widths along rows quantizes all candidates in one sweep.
    """
    w = weight.float().clone()
    n, k = w.shape
    check_group_size(k, group_size)
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scales, zeros = _grouped_params(w, bits_per_row, group_size, symmetric, torch.diag(h))
    maxq = (2.0 ** bits_per_row.float() - 1).to(w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)
    group_of_col = perm // group_size
    codes = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            grp = group_of_col[i1 + i]
            scale, zero = scales[:, grp], zeros[:, grp]
            code = torch.clamp(torch.round(col / scale) + zero, torch.zeros_like(maxq), maxq)
            codes[:, i1 + i] = code
            err = (col - (code - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inverse_perm = torch.argsort(perm)
    return codes[:, inverse_perm], scales, zeros


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool = False, act_order: bool = True,
                  damp: float = 0.01) -> QuantizedWeight:
    weight_format(bits)
    bits_row = torch.full((weight.shape[0],), bits, device=weight.device)
    codes, scales, zeros = gptq_quantize_rows(weight, hessian, bits_row, group_size, symmetric,
                                              act_order, damp)
    return QuantizedWeight(codes.to(torch.uint8), scales.half(),
                           None if symmetric else zeros.to(torch.uint8), bits, group_size)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row tr(dW H dW^T) / 2: the increase of the layer's mean squared output error."""
    return 0.5 * ((delta @ hessian) * delta).sum(-1)
