"""The column sweep that GPTQ and SparseGPT share (optimal brain surgeon, one input column at a time).

Both methods walk the input columns of a weight matrix in order. Each column is
replaced by what the compressed layer will hold (its quantized value, or 0 where
the weight is pruned), and the error is spread over the columns not yet visited,
weighted by the inverse of H = XᵀX/n, so that ‖WX − ŴX‖² stays small. GPTQ rounds
every column to a grid; SparseGPT also chooses which weights to prune as it goes,
from the weights as updated so far: per block of ``block_size`` columns
(unstructured) or per group of M columns (N:M), the weights of least w² / [H⁻¹]ᵢᵢ
(the cost of removing them, with [H⁻¹]ᵢᵢ read from the Cholesky factor) are pruned.
With both, a sparse and quantized layer is one solve.

The sweep runs lazily in blocks (errors of a block are applied to the later columns
in one matrix product), dampens H (``damp`` times the mean of its diagonal), may
shrink it toward its diagonal (``shrink``) and may visit columns in order of
decreasing diag H (``act_order``; grids are then fitted up front, see
``quantize.gptq``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmtailor.plan import LayerSparsity


@dataclass(frozen=True)
class Grid:
    """How the sweep quantizes: bits, group width, symmetry, and whether grids are fitted up front."""

    bits: int
    size: int  # group width (the row width when one group per row)
    symmetric: bool
    static: bool


@dataclass
class Swept:
    """A sweep's result, in the layer's own column order."""

    values: torch.Tensor  # codes when quantized, else the updated weights (pruned ones exactly 0)
    scales: torch.Tensor | None  # float16-rounded, [out, groups], when quantized
    zeros: torch.Tensor | None
    keep: torch.Tensor | None  # bool keep-mask, when pruned


def prune_counts(out: int, width: int, ratio: float, block_size: int) -> list[int]:
    """Weights SparseGPT prunes in each block of columns: out · floor(ratio · width) in all, as the cost model counts."""
    total = out * int(ratio * width)
    bounds = list(range(0, width, block_size)) + [width]
    return [round(total * end / width) - round(total * start / width) for start, end in zip(bounds, bounds[1:], strict=False)]


def _prune_least(cost: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of a block that prunes the `count` entries of least cost (ties: the earlier entry goes first)."""
    keep = torch.ones(cost.numel(), dtype=torch.bool, device=cost.device)
    keep[torch.sort(cost.reshape(-1), stable=True).indices[:count]] = False
    return keep.reshape(cost.shape)


@torch.no_grad()
def sweep(weight: torch.Tensor, hessian: torch.Tensor, *, damp: float, shrink: float = 0.0, act_order: bool = False,
          grid: Grid | None = None, keep: torch.Tensor | None = None, select: LayerSparsity | None = None,
          block_size: int = 128) -> Swept:
    """Compress `weight` column by column under H: round to `grid` (if any), keep only `keep` (a fixed mask) or
    prune as `select` asks (SparseGPT's mask, chosen during the sweep)."""
    from llmtailor.compression.quantize import _grouped, _round  # one grid definition for RTN and the sweep
    from llmtailor.compression.quantize import grid as grid_of

    out, width = weight.shape
    w = weight.float().clone()
    h = hessian.to(w.device, torch.float32).clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: nothing to weigh them by
    h[dead, dead] = 1
    w[:, dead] = 0
    if shrink:  # trust the calibration's cross-correlations less (see LayerPrecision.shrink)
        h = (1 - shrink) * h + shrink * torch.diag(torch.diagonal(h))
    scales = zeros = None
    if grid is not None:  # refitted below per group unless static
        scales, zeros = grid_of(_grouped(w, grid.size), grid.bits, grid.symmetric)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(width, device=w.device)
    columns = order.tolist()  # read per column below; one transfer instead of one GPU sync per column
    w, h = w[:, order], h[order][:, order]
    keep = None if keep is None else keep.to(w.device)[:, order]
    if select is not None:
        keep = torch.ones(out, width, dtype=torch.bool, device=w.device)
        nm = select.nm
        counts = prune_counts(out, width, select.ratio, block_size) if nm is None else None
    h += damp * torch.diagonal(h).mean() * torch.eye(width, device=w.device)
    # Rows of the upper Cholesky factor of H⁻¹ hold the weights that spread each column's error.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    d = torch.diagonal(u)
    values = torch.zeros_like(w)
    for number, start in enumerate(range(0, width, block_size)):
        end = min(start + block_size, width)
        block, errors = w[:, start:end].clone(), torch.zeros(out, end - start, device=w.device)
        if select is not None and nm is None:
            keep[:, start:end] = _prune_least(block**2 / d[start:end] ** 2, counts[number])
        for i in range(end - start):
            j = start + i
            if select is not None and nm is not None and i % nm[1] == 0:  # N:M: keep the N dearest of M columns
                cost = block[:, i : i + nm[1]] ** 2 / d[j : j + nm[1]] ** 2
                group = torch.zeros_like(cost, dtype=torch.bool)
                keep[:, j : j + nm[1]] = group.scatter_(1, cost.topk(nm[0], dim=1).indices, True)
            if grid is None:
                approx = block[:, i] if keep is None else torch.where(keep[:, j], block[:, i], 0.0)
                values[:, j] = approx
            else:
                column = columns[j]
                g = column // grid.size
                if not grid.static and column % grid.size == 0:  # fit the group's grid to the weights as updated
                    rest = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, : min(grid.size, width - column)]
                    scales[:, g], zeros[:, g] = grid_of(rest, grid.bits, grid.symmetric)
                q = _round(block[:, i], scales[:, g], zeros[:, g], grid.bits)
                if keep is not None:
                    q = torch.where(keep[:, j], q, zeros[:, g])  # a pruned weight holds the zero point: exactly 0
                values[:, j] = q
                approx = (q - zeros[:, g]) * scales[:, g]
            error = (block[:, i] - approx) / u[j, j]
            block[:, i:] -= error[:, None] * u[j, j:end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    back = torch.argsort(order)
    return Swept(values[:, back], scales, zeros, None if keep is None else keep[:, back])
