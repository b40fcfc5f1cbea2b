"""Pruning masks: which weights of a layer to set to zero.

A pruner maps a weight matrix and a ``LayerSparsity`` to a boolean keep-mask;
``PRUNERS`` finds it by the plan's method name. Every pruner keeps the same number of
weights in each row (``kept_per_row``), which is what the cost model counts.
Magnitude pruning is here; Wanda and SparseGPT are one function each that also take
the layer's calibration inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmtailor.evaluators.cost import kept_per_row
from llmtailor.plan import LayerSparsity


def keep_largest(score: torch.Tensor, sparsity: LayerSparsity) -> torch.Tensor:
    """Keep-mask of the highest-scoring weights: per row, or per group of M inputs for N:M."""
    out, width = score.shape
    if sparsity.pattern == "unstructured":
        rows, keep = score, kept_per_row(width, sparsity)
    else:
        n, m = (int(x) for x in sparsity.pattern.split(":"))
        rows, keep = score.reshape(-1, m), n
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, rows.topk(keep, dim=1).indices, True)
    return mask.reshape(out, width)


def magnitude(weight: torch.Tensor, sparsity: LayerSparsity) -> torch.Tensor:
    """Keep the weights of largest absolute value."""
    return keep_largest(weight.abs(), sparsity)


Pruner = Callable[[torch.Tensor, LayerSparsity], torch.Tensor]
PRUNERS: dict[str, Pruner] = {"magnitude": magnitude}
