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

    def dequantize(self) -> torch.Tensor:
        """The float32 weights these codes stand for."""
        out, width = self.codes.shape
        expand = lambda t: t.float().repeat_interleave(self.group_size, dim=1)[:, :width]  # noqa: E731
        return (self.codes.float() - expand(self.zeros)) * expand(self.scales)


def _grouped(weight: torch.Tensor, size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, size], zero-padded (zeros never change a group's range)."""
    out, width = weight.shape
    groups = math.ceil(width / size)
    padded = torch.nn.functional.pad(weight, (0, groups * size - width)) if groups * size != width else weight
    return padded.reshape(out, groups, size)


def rtn(weight: torch.Tensor, precision: LayerPrecision) -> QuantizedWeight:
    """Round each weight to the nearest point of its group's grid."""
    bits = precision.bits
    width = weight.shape[1]
    size = width if num_groups(width, precision.group_size) == 1 else precision.group_size
    groups = _grouped(weight.float(), size)
    if precision.symmetric:
        levels = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(dim=2) / levels
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        levels = 2**bits - 1
        low = groups.amin(dim=2).clamp(max=0)
        high = groups.amax(dim=2).clamp(min=0)
        scale = (high - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
    if not precision.symmetric:
        zero = torch.round(-low / scale).clamp(0, levels)
    codes = torch.round(groups / scale[..., None]) + zero[..., None]
    codes = codes.clamp(0, 2**bits - 1).reshape(weight.shape[0], -1)[:, :width]
    return QuantizedWeight(codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), bits, size, precision.symmetric)


Quantizer = Callable[[torch.Tensor, LayerPrecision], QuantizedWeight]
QUANTIZERS: dict[str, Quantizer] = {"rtn": rtn}


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
