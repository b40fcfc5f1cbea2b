"""The stored form of a compressed layer, laid out as the cost model counts it (see evaluators/cost.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from llmtailor.compression.quantize import QuantizedWeight, pack_bits, unpack_bits
from llmtailor.evaluators.cost import tensor_bytes
from llmtailor.plan import LayerPrecision, LayerSparsity, nm_pair


@dataclass
class PackedWeight:
    """Byte arrays of one stored weight matrix: values, scales, zero points and sparse index."""

    format: str  # dense | bitmask | csr | n:m
    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    pattern: str
    values: np.ndarray  # bit-packed codes, or float16 values when bits == 16
    scales: np.ndarray | None = None  # float16, one per group
    zeros: np.ndarray | None = None  # bit-packed integer zero points, one per group
    index: list[np.ndarray] = field(default_factory=list)  # bitmask | (columns, row pointers) | N:M positions

    @property
    def nbytes(self) -> int:
        arrays = [self.values, self.scales, self.zeros, *self.index]
        return sum(a.nbytes for a in arrays if a is not None)

    def unpack(self) -> torch.Tensor:
        """The float32 weights this stored form holds."""
        out, width = self.shape
        mask = self._mask()
        kept = out * width if mask is None else int(mask.sum())
        if self.bits == 16:
            dense = torch.zeros(out * width)
            values = torch.from_numpy(self.values.astype(np.float32))
            dense[mask.reshape(-1) if mask is not None else slice(None)] = values
            return dense.reshape(out, width)
        groups = self.scales.size // out
        size = width if groups == 1 else self.group_size
        scales = torch.from_numpy(self.scales.astype(np.float32)).reshape(out, groups)
        if self.symmetric:
            zeros = torch.full((out, groups), 2.0 ** (self.bits - 1))
        else:
            zeros = unpack_bits(self.zeros, self.bits, out * groups).float().reshape(out, groups)
        expand = lambda t: t.repeat_interleave(size, dim=1)[:, :width]  # noqa: E731
        codes = expand(zeros).reshape(-1).clone()  # pruned weights hold the zero point: exactly 0
        kept_codes = unpack_bits(self.values, self.bits, kept).float()
        codes[mask.reshape(-1) if mask is not None else slice(None)] = kept_codes
        return (codes.reshape(out, width) - expand(zeros)) * expand(scales)

    def _mask(self) -> torch.Tensor | None:
        out, width = self.shape
        if self.format == "dense":
            return None
        if self.format == "bitmask":
            return torch.from_numpy(np.unpackbits(self.index[0])[: out * width].astype(bool)).reshape(out, width)
        mask = torch.zeros(out * width, dtype=torch.bool)
        if self.format == "csr":
            columns, row_pointers = self.index
            rows = np.repeat(np.arange(out), np.diff(row_pointers))
            mask[torch.from_numpy(rows * width + columns.astype(np.int64))] = True
        else:  # n:m: each group of M inputs keeps N values, each with its position in the group
            n, m = nm_pair(self.pattern)
            positions = unpack_bits(self.index[0], math.ceil(math.log2(m)), out * width // m * n).long()
            group = torch.arange(positions.numel()) // n
            mask[group * m + positions] = True
        return mask.reshape(out, width)


def pack_layer(
    weight: torch.Tensor,
    quantized: QuantizedWeight | None,
    mask: torch.Tensor | None,
    precision: LayerPrecision,
    sparsity: LayerSparsity,
) -> PackedWeight:
    """Lay out one compressed layer in the form (dense, bitmask, CSR or N:M) the cost model chose."""
    out, width = weight.shape
    layout = tensor_bytes(out, width, precision, sparsity)
    keep = None if layout.format == "dense" else mask.reshape(-1)
    if quantized is None:
        flat = weight.reshape(-1) if keep is None else weight.reshape(-1)[keep]
        values, scales, zeros = flat.half().numpy(), None, None
    else:
        codes = quantized.codes.reshape(-1)
        values = pack_bits(codes if keep is None else codes[keep], precision.bits)
        scales = quantized.scales.numpy().reshape(-1)
        zeros = None if precision.symmetric else pack_bits(quantized.zeros, precision.bits)
    index: list[np.ndarray] = []
    if layout.format == "bitmask":
        index = [np.packbits(keep.numpy())]
    elif layout.format == "csr":
        rows_kept = mask.sum(dim=1).numpy()
        columns = mask.nonzero()[:, 1].numpy().astype(np.uint16 if width <= 65536 else np.int32)
        index = [columns, np.concatenate([[0], np.cumsum(rows_kept)]).astype(np.int32)]
    elif layout.format == "n:m":
        m = sparsity.nm[1]
        positions = torch.from_numpy((keep.nonzero()[:, 0] % m).numpy().astype(np.uint8))
        index = [pack_bits(positions, math.ceil(math.log2(m)))]
    group_size = quantized.group_size if quantized is not None else 0
    return PackedWeight(layout.format, (out, width), precision.bits, group_size, precision.symmetric,
                        sparsity.pattern, values, scales, zeros, index)
