"""Weight quantization: integer codes with a float16 scale (and integer zero point) per group.

A quantizer maps a weight matrix and a ``LayerPrecision`` to a ``QuantizedWeight``;
``QUANTIZERS`` finds it by the plan's method name. Round-to-nearest (``rtn``) is here;
a calibrated method (GPTQ) is one more function with the same signature that also
takes the layer's calibration inputs.

Grid (b bits, one group = ``group_size`` consecutive inputs of a row; the last group
of a row is shorter when the width is not a multiple of it):
- asymmetric: range [min(w, 0), max(w, 0)] split in 2^b - 1 steps; the zero point is an
  integer code, so a weight of exactly 0 (a pruned one) stays exactly 0.
- symmetric: codes -(2^(b-1) - 1) .. 2^(b-1) - 1 around zero, scale = max|w| / (2^(b-1) - 1).
Scales are rounded to float16 before use, as they are stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llmtailor.evaluators.cost import num_groups
from llmtailor.plan import LayerPrecision


@dataclass
class QuantizedWeight:
    """Unsigned b-bit codes (one per weight, in uint8), scales and zero points per group."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float16 [out, groups]
    zeros: torch.Tensor  # uint8 [out, groups]; the constant 2^(b-1) when symmetric
    bits: int
    group_size: int  # effective group width (in_features when one group per row)
    symmetric: bool

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weights these codes stand for, written into `out` when given (a float32 [out, in] tensor on
        the codes' device: a search trial writes them straight into the teacher's tensor, no copy between). Made a
        block of rows at a time, in place in the result, so that a large layer (a 262k-token embedding) needs no
        float32 temporaries of its size: the codes are copied in as floats, then the zero point is subtracted and
        the scale multiplied per group, broadcast over a [rows, groups, size] view of the result."""
        rows_total, width = self.codes.shape
        result = torch.empty(rows_total, width, device=self.codes.device) if out is None else out
        if result.shape != self.codes.shape or result.dtype != torch.float32:
            raise ValueError(f"dequantize writes float32 {tuple(self.codes.shape)}, not {result.dtype} {tuple(result.shape)}")
        size = self.group_size
        whole = width // size * size  # the columns in whole groups; a shorter last group is done on its own
        for rows in row_blocks(rows_total, width):
            target, codes = result[rows], self.codes[rows]
            scales, zeros = self.scales[rows].float(), self.zeros[rows].float()
            for columns, groups in ((slice(0, whole), slice(0, whole // size)), (slice(whole, width), slice(whole // size, None))):
                if columns.start == columns.stop:
                    continue
                part = target[:, columns]
                part = part.unflatten(1, (-1, size)) if columns.start == 0 else part[:, None, :]
                part.copy_(codes[:, columns].reshape(part.shape))
                part.sub_(zeros[:, groups, None]).mul_(scales[:, groups, None])
        return result


BLOCK_ELEMENTS = 1 << 22  # rows of a large layer are processed this many weights at a time (16 MB in float32)


def row_blocks(rows: int, width: int, elements: int = BLOCK_ELEMENTS) -> list[slice]:
    """Slices of about `elements` weights each over the rows of a [rows, width] matrix (one, when it holds fewer)."""
    step = max(1, elements // max(1, width))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _grouped(weight: torch.Tensor, size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, size], zero-padded (zeros never change a group's range)."""
    out, width = weight.shape
    groups = math.ceil(width / size)
    padded = torch.nn.functional.pad(weight, (0, groups * size - width)) if groups * size != width else weight
    return padded.reshape(out, groups, size)


def grid(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-rounded, as stored) and integer zero point of each group: groups [..., size] -> [...]."""
    if symmetric:
        scale = groups.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        low = groups.amin(dim=-1).clamp(max=0)
        scale = (groups.amax(dim=-1).clamp(min=0) - low) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
    if not symmetric:
        zero = torch.round(-low / scale).clamp(0, 2**bits - 1)
    return scale, zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w on the grid (scale, zero), as floats in [0, 2^bits - 1]."""
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)


def _group_width(width: int, precision: LayerPrecision) -> int:
    return width if num_groups(width, precision.group_size) == 1 else precision.group_size


def rtn(weight: torch.Tensor, precision: LayerPrecision, hessian: torch.Tensor | None = None,
        mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Round each weight to the nearest point of its group's grid (needs no calibration)."""
    bits, (out, width) = precision.bits, weight.shape
    size = _group_width(width, precision)
    codes, scales, zeros = [], [], []
    for rows in row_blocks(out, width):  # each row is quantized alone: blocks only bound the temporaries
        groups = _grouped(weight[rows].float(), size)
        scale, zero = grid(groups, bits, precision.symmetric)
        codes.append(_round(groups, scale[..., None], zero[..., None], bits).reshape(len(groups), -1)[:, :width]
                     .to(torch.uint8))
        scales.append(scale.half())
        zeros.append(zero.to(torch.uint8))
    return QuantizedWeight(torch.cat(codes), torch.cat(scales), torch.cat(zeros), bits, size, precision.symmetric)


def gptq(weight: torch.Tensor, precision: LayerPrecision, hessian: torch.Tensor | None = None,
         mask: torch.Tensor | None = None, block_size: int = 128) -> QuantizedWeight:
    """GPTQ (Frantar et al., 2022): quantize one input column at a time and spread its error over the columns
    not yet quantized, weighted by the inverse of H = XᵀX/n, so that ‖WX - QX‖² stays small (``obs.sweep``).

    Lazy batch updates (``block_size`` columns at a time), shrinkage of H toward its diagonal
    (``precision.shrink``; 0 is the paper's method), dampening (``precision.damp`` times the mean of
    diag H added to the diagonal), and optional act-order (columns in order of decreasing diag H). Groups are
    always consecutive inputs in the stored order, so the packed format and its byte count are the same as
    RTN's: without act-order a group's grid is fitted when its first column is reached (to the weights as
    updated so far); with act-order, and per channel, every grid is fitted up front to the original weights
    ("static groups"), because columns of one group are no longer quantized together.
    ``mask`` (pruned weights) stays exact: a pruned weight is stored as the code of 0 and its error is spread.
    """
    from llmtailor.compression.obs import Grid, sweep

    if hessian is None:
        raise ValueError("gptq needs the layer's calibration statistics (H = XᵀX/n)")
    size = _group_width(weight.shape[1], precision)
    layout = Grid(precision.bits, size, precision.symmetric, static=precision.act_order or size == weight.shape[1])
    parts = []
    # Each row is solved on its own (its error spreads over its own later columns, by H's inverse, which all rows
    # share), so a layer larger than GPTQ_ROW_BLOCK_ELEMENTS, such as a 262k-token embedding, is solved a block of
    # rows at a time: its float32 working copies would otherwise be twice the layer's size on top of it.
    for rows in row_blocks(*weight.shape, GPTQ_ROW_BLOCK_ELEMENTS):
        parts.append(sweep(weight[rows], hessian, damp=precision.damp, shrink=precision.shrink,
                           act_order=precision.act_order, grid=layout, keep=None if mask is None else mask[rows],
                           block_size=block_size))
    return QuantizedWeight(torch.cat([p.values.cpu().to(torch.uint8) for p in parts]),
                           torch.cat([p.scales.cpu().half() for p in parts]),
                           torch.cat([p.zeros.cpu().to(torch.uint8) for p in parts]), precision.bits, size,
                           precision.symmetric)


# Above this many weights GPTQ solves blocks of rows: 8M (32 MB in float32), so that SmolLM2-135M's tied
# embedding/head (28M weights, the only layer above it) is solved in four blocks and its working copies stay near
# 64 MB; at 32M (the earlier bound) it was one block, 226 MB of copies, most of a cold sweep's peak beyond 3x the
# teacher. The codes of a blocked solve match a whole one's to float rounding (tests/test_gptq.py).
GPTQ_ROW_BLOCK_ELEMENTS = 1 << 23


Quantizer = Callable[..., QuantizedWeight]
# By the plan's method name: (weight, precision, hessian=None, mask=None) -> QuantizedWeight.
QUANTIZERS: dict[str, Quantizer] = {"rtn": rtn, "gptq": gptq}
CALIBRATED = {"gptq"}  # methods that need calibration statistics (register a new one here too)


def pack_bits(values: torch.Tensor, bits: int) -> np.ndarray:
    """Bit-pack unsigned integers of `bits` bits each into ceil(n * bits / 8) bytes."""
    flat = values.reshape(-1).numpy().astype(np.uint8)
    if bits == 8:
        return flat.copy()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    bit_planes = (flat[:, None] >> shifts) & 1
    return np.packbits(bit_planes.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> torch.Tensor:
    """The inverse of pack_bits."""
    if bits == 8:
        return torch.from_numpy(packed[:count].copy())
    bit_planes = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return torch.from_numpy((bit_planes * weights).sum(axis=1).astype(np.uint8))
