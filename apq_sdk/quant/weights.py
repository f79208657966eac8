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
CLIP_GRID = torch.linspace(1.0, 0.7, 8)  # range clip factors searched per group


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


def round_scales(scale: torch.Tensor, scale_dtype: str = "float16") -> torch.Tensor:
    """Scales on the grid they are stored and run with, as float32.

    "float16": float16's grid. "bfloat16": bfloat16's grid (XNNPACK keeps 4-bit block scales in
    bfloat16), from float16's smallest normal up to 65280, where every bfloat16 value is a
    float16 value too: the checkpoint still stores float16, and the target converts them
    exactly. "qnn-lpbq": float16's grid per group; `lpbq_scales` then ties a row's groups
    together."""
    tiny = torch.finfo(torch.float16).tiny
    if scale_dtype in ("float16", QNN_LPBQ):
        return scale.half().float().clamp(min=tiny)
    if scale_dtype == "bfloat16":
        return scale.clamp(min=tiny, max=BF16_IN_F16_MAX).to(torch.bfloat16).float()
    raise ValueError(f"scale_dtype: expected 'float16', 'bfloat16' or {QNN_LPBQ!r}, "
                     f"found {scale_dtype!r}")


BF16_IN_F16_MAX = 65280.0  # the largest bfloat16 value float16 holds (0x477f)

#: QNN's block encoding ("blockwise expansion", ExecuTorch's 16a4w_block): a float scale per row
#: and a 4-bit multiplier 1..16 per block, the row scale being the largest block scale / 16; the
#: codes are symmetric without the most negative one (-7..7 for 4 bits)
QNN_LPBQ = "qnn-lpbq"
LPBQ_STEPS = 16
LPBQ_ROW_SCALE_BITS = 6  # significant bits of the row scale: row scale x 1..16 is exact in float16


def code_floor(symmetric: bool, scale_dtype: str) -> int:
    """The smallest code a symmetric group may hold: 1 on QNN's grid, whose codes stop at
    -(2**(b-1) - 1) (the zero point being 2**(b-1)), else 0."""
    return 1 if symmetric and scale_dtype == QNN_LPBQ else 0


def lpbq_row_scale(largest: torch.Tensor) -> torch.Tensor:
    """The row scale of QNN's block encoding for rows whose largest block scale is `largest`:
    largest / 16 rounded to 6 significant bits, a normal float16, so that every multiple 1..16
    of it is exact in float16 and QNN's own encoding (largest / 16, then block / row rounded)
    gives back exactly the multiples chosen."""
    mantissa, exponent = torch.frexp(largest.float() / LPBQ_STEPS)
    steps = float(1 << LPBQ_ROW_SCALE_BITS)
    row = torch.ldexp(torch.round(mantissa * steps) / steps, exponent)
    return row.clamp(min=torch.finfo(torch.float16).tiny, max=4032.0).half().float()


def lpbq_scales(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                weights: torch.Tensor, floor: int) -> torch.Tensor:
    """Block scales [N, G] for groups w [N, G, g] on QNN's grid: the row scale from the largest
    searched scale of a group that holds a non-zero weight, then for each group the multiple
    1..16 with the least weighted squared error; the group with the largest searched scale takes
    16, so that the row scale is the largest block scale / 16 as QNN computes it."""
    live = w.abs().amax(-1) > 0
    searched = torch.where(live, scale, torch.zeros_like(scale))
    row = lpbq_row_scale(searched.amax(-1)).unsqueeze(-1)  # [N, 1]
    z = zero.unsqueeze(-1)
    best_err = torch.full_like(scale, float("inf"))
    best = torch.ones_like(scale)
    for k in range(1, LPBQ_STEPS + 1):
        s = (row * k).unsqueeze(-1)  # [N, 1, 1]
        d = torch.div(w, s).round_().add_(z).clamp_(min=floor)
        torch.minimum(d, maxq.unsqueeze(-1), out=d)
        err = d.sub_(z).mul_(s).sub_(w).square_().mul_(weights).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, float(k)), best)
    best.scatter_(1, searched.argmax(-1, keepdim=True),
                  torch.full_like(best[:, :1], float(LPBQ_STEPS)))
    return row * best


def group_params(w: torch.Tensor, maxq: torch.Tensor, symmetric: bool,
                 importance: torch.Tensor | None = None,
                 scale_dtype: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group for w [..., g], with a clip search on the range.

    `maxq` broadcasts against w[..., 0] (one value per row allows batching bit-widths). The clip
    factor minimises the importance-weighted squared error of the group (importance = the Hessian
    diagonal of each input channel, or 1). Scales are rounded to their stored grid (`round_scales`)
    before codes are chosen; on QNN's grid (w [N, G, g]) a row's scales are then tied together
    (`lpbq_scales`).
    """
    if scale_dtype == QNN_LPBQ and not symmetric:
        raise ValueError(f"scale_dtype {QNN_LPBQ!r}: expected symmetric groups (QNN's block "
                         f"encoding has no zero points), found asymmetric")
    floor = code_floor(symmetric, scale_dtype)
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
            scale = round_scales(scale, scale_dtype)
            zero = torch.floor((maxq + 1) / 2)
            zero = zero.expand_as(scale)
        else:
            scale = (hi - lo) / maxq
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            scale = round_scales(scale, scale_dtype)
            zero = torch.clamp(torch.round(-lo / scale), torch.zeros_like(maxq), maxq)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        d = torch.div(w, s).round_().add_(z).clamp_(min=floor)  # in place: this loop dominates
        torch.minimum(d, maxq.unsqueeze(-1), out=d)
        err = d.sub_(z).mul_(s).sub_(w).square_().mul_(weights).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    if scale_dtype == QNN_LPBQ:
        best_scale = lpbq_scales(w, best_scale, best_zero, maxq, weights, floor)
    return best_scale, best_zero


def _grouped_params(weight: torch.Tensor, bits_per_row: torch.Tensor, group_size: int,
                    symmetric: bool, hessian_diag: torch.Tensor | None,
                    scale_dtype: str = "float16"):
    n, k = weight.shape
    groups = num_groups(k, group_size)
    maxq = (2.0 ** bits_per_row.float() - 1).view(n, 1).expand(n, groups)
    diag = hessian_diag.clamp(min=0) + 1e-8 if hessian_diag is not None else \
        torch.ones(k, device=weight.device)
    importance = _pad_groups(diag.view(1, k), group_size)  # padding gets importance 0
    return group_params(_pad_groups(weight, group_size), maxq, symmetric, importance,
                        scale_dtype)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                 hessian_diag: torch.Tensor | None = None,
                 scale_dtype: str = "float16") -> QuantizedWeight:
    """Round-to-nearest with the clip search; the baseline GPTQ improves on."""
    weight_format(bits)
    n, k = weight.shape
    check_group_size(k, group_size)
    w = weight.float()
    bits_row = torch.full((n,), bits, device=w.device)
    scales, zeros = _grouped_params(w, bits_row, group_size, symmetric, hessian_diag,
                                    scale_dtype)
    maxq = float((1 << bits) - 1)
    codes = torch.clamp(torch.round(w / expand_groups(scales, group_size, k))
                        + expand_groups(zeros, group_size, k),
                        code_floor(symmetric, scale_dtype), maxq)
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


@dataclass(frozen=True)
class GptqTask:
    """One weight [N, K] to quantize at (bits, group_size) in a GPTQ sweep shared with others."""

    weight: torch.Tensor
    bits: int
    group_size: int
    scale_dtype: str = "float16"  # the grid its scales are rounded to (round_scales)


MAX_SWEEP_ELEMENTS = 1 << 25  # rows x columns swept at once (~128 MiB per float32 buffer)


def gptq_quantize_many(tasks: list[GptqTask], hessian: torch.Tensor, symmetric: bool = False,
                       act_order: bool = True, damp: float = 0.01,
                       block_size: int = 128) -> list[QuantizedWeight]:
    """GPTQ for several weights that see the same inputs (one Hessian), in shared sweeps.

    Rows are independent given H, so the layers that read one input (q/k/v, gate/up) and every
    candidate (bits, group size) of them go through one column sweep: one inverse Hessian and one
    Python loop over the K columns instead of one per weight and candidate. Each row carries its own
    bit-width and group parameters, expanded to one scale and zero point per column.
    """
    if not tasks:
        return []
    k = tasks[0].weight.shape[1]
    for task in tasks:
        weight_format(task.bits)
        check_group_size(k, task.group_size)
        if task.weight.shape[1] != k:
            raise ValueError(f"weight: expected {k} input columns like the first task, found "
                             f"{task.weight.shape[1]}")
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    diag = torch.diag(h)
    perm = (torch.argsort(diag, descending=True, stable=True) if act_order
            else torch.arange(k, device=h.device))
    hinv = _inverse_hessian_factor(h[perm][:, perm], damp)

    prepared = []  # per task: weight with dead columns zeroed, scales [N, G], zeros [N, G],
    #                the smallest code
    for task in tasks:
        w = task.weight.float().clone()
        w[:, dead] = 0
        bits_row = torch.full((w.shape[0],), task.bits, device=w.device)
        scales, zeros = _grouped_params(w, bits_row, task.group_size, symmetric, diag,
                                        task.scale_dtype)
        prepared.append((w, scales, zeros, code_floor(symmetric, task.scale_dtype)))

    max_rows = max(1, MAX_SWEEP_ELEMENTS // k)
    pieces = [(t, r0, min(r0 + max_rows, task.weight.shape[0]))
              for t, task in enumerate(tasks) for r0 in range(0, task.weight.shape[0], max_rows)]
    codes = [torch.empty(task.weight.shape, dtype=torch.uint8, device=h.device) for task in tasks]
    chunk: list[tuple[int, int, int]] = []
    rows = 0
    for piece in pieces + [None]:
        if piece is not None and (not chunk or rows + piece[2] - piece[1] <= max_rows):
            chunk.append(piece)
            rows += piece[2] - piece[1]
            continue
        _sweep_chunk(chunk, tasks, prepared, codes, perm, hinv, block_size)
        chunk, rows = ([piece], piece[2] - piece[1]) if piece is not None else ([], 0)
    return [QuantizedWeight(codes[t], prepared[t][1].half(),
                            None if symmetric else prepared[t][2].to(torch.uint8), task.bits,
                            task.group_size) for t, task in enumerate(tasks)]


ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: x + M - M rounds float32 x to the nearest even integer


def _sweep_chunk(chunk, tasks, prepared, codes, perm, hinv, block_size, inner_block=16) -> None:
    """The GPTQ column sweep over the stacked rows of `chunk`, written into `codes`.

    Working copies are column-major (column i of the weights is the contiguous row i), and the
    error spreads in two levels: rank-1 updates within `inner_block` columns, one matmul for the
    rest of the `block_size` block, one for the columns after it, so most of the update is matmul
    rather than memory-bound rank-1 work. The per-column work is a handful of vector ops.
    """
    k = perm.shape[0]
    w_cols, scale_cols, zero_cols, maxq_rows, floor_rows = [], [], [], [], []
    for t, r0, r1 in chunk:
        w, scales, zeros, floor = prepared[t]
        group_of_column = perm // tasks[t].group_size
        w_cols.append(w[r0:r1].T[perm])
        scale_cols.append(scales[r0:r1].T[group_of_column])
        zero_cols.append(zeros[r0:r1].T[group_of_column])
        maxq_rows.append(torch.full((r1 - r0,), float((1 << tasks[t].bits) - 1), device=w.device))
        floor_rows.append(torch.full((r1 - r0,), float(floor), device=w.device))
    w = torch.cat(w_cols, dim=1)
    scale = torch.cat(scale_cols, dim=1)
    zero = torch.cat(zero_cols, dim=1)
    low = torch.cat(floor_rows).sub(zero)  # codes minus zero point: [floor - zero, maxq - zero]
    high = torch.cat(maxq_rows).sub(zero)
    code = torch.empty_like(w)  # codes minus zero point until the end
    err = torch.empty_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        for j1 in range(i1, i2, inner_block):
            j2 = min(j1 + inner_block, i2)
            for c in range(j1, j2):
                q = torch.div(w[c], scale[c], out=code[c])
                # round half to even, exact here: anything beyond 2**22 is clamped just below
                q.add_(ROUND_MAGIC).sub_(ROUND_MAGIC)
                q.clamp_(min=low[c], max=high[c])
                e = torch.mul(q, scale[c], out=err[c])
                torch.sub(w[c], e, out=e).div_(hinv[c, c])
                if c + 1 < j2:
                    w[c + 1:j2].addr_(hinv[c, c + 1:j2], e, alpha=-1)
            if j2 < i2:
                w[j2:i2].addmm_(hinv[j1:j2, j2:i2].T, err[j1:j2], alpha=-1)
        if i2 < k:
            w[i2:].addmm_(hinv[i1:i2, i2:].T, err[i1:i2], alpha=-1)
    code.add_(zero)
    code = code[torch.argsort(perm)].T
    start = 0
    for t, r0, r1 in chunk:
        codes[t][r0:r1] = code[start:start + r1 - r0].to(torch.uint8)
        start += r1 - r0


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool = False, act_order: bool = True,
                  damp: float = 0.01, scale_dtype: str = "float16") -> QuantizedWeight:
    """GPTQ of one weight (static groups, act-order); see gptq_quantize_many."""
    return gptq_quantize_many([GptqTask(weight, bits, group_size, scale_dtype)], hessian,
                              symmetric, act_order, damp)[0]


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row tr(dW H dW^T) / 2: the increase of the layer's mean squared output error."""
    return 0.5 * ((delta @ hessian) * delta).sum(-1)
