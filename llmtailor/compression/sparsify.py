"""Pruning: which weights of a layer to set to zero, and (SparseGPT) how to update the rest.

A pruner maps a weight matrix, a ``LayerSparsity`` and the layer's input statistics
H = XᵀX/n (``None`` for methods that need none) to the pruned weights and a boolean
keep-mask; ``PRUNERS`` finds it by the plan's method name, and ``CALIBRATED_PRUNERS``
names those that need H.

- ``magnitude``: keep the weights of largest |W| in each row.
- ``wanda`` (Sun et al., 2023): keep the largest |W_ij| · ‖X_j‖ in each output row; ‖X_j‖ is the
  root of H's diagonal (times √n, which does not change the order). No weight update.
- ``sparsegpt`` (Frantar & Alistarh, 2023): choose the mask during a GPTQ-like column sweep from the
  weights as updated so far and spread each pruned weight's error over the later columns
  (``obs.sweep``). Its joint mode with ``gptq`` quantization (``sparsegpt_quantized``) prunes and
  quantizes in one solve.

Counts: magnitude and Wanda keep ``kept_per_row`` weights in every row, N:M patterns
keep N of every M inputs. Unstructured SparseGPT compares the weights of a block of
columns across rows (as its authors do), so rows keep different counts; it prunes
exactly out · floor(ratio · in) weights in all, and every stored form the cost model
prices (bitmask, CSR) depends on that total alone, so its byte count stays exact.
Ties are broken toward pruning the earlier input (a stable sort, as the Wanda reference does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmtailor.compression.obs import Grid, sweep
from llmtailor.compression.quantize import QuantizedWeight, _group_width
from llmtailor.evaluators.cost import kept_per_row
from llmtailor.plan import LayerPrecision, LayerSparsity

SPARSEGPT_DAMP = 0.01  # the authors' default dampening: share of mean(diag H) added to its diagonal


def keep_largest(score: torch.Tensor, sparsity: LayerSparsity) -> torch.Tensor:
    """Keep-mask of the highest-scoring weights: per row, or per group of M inputs for N:M."""
    out, width = score.shape
    if sparsity.pattern == "unstructured":
        rows, pruned = score, width - kept_per_row(width, sparsity)
    else:
        n, m = sparsity.nm
        rows, pruned = score.reshape(-1, m), m - n
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask.scatter_(1, torch.sort(rows, dim=1, stable=True).indices[:, :pruned], False)
    return mask.reshape(out, width)


def magnitude(weight: torch.Tensor, sparsity: LayerSparsity, hessian: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the weights of largest absolute value."""
    mask = keep_largest(weight.abs(), sparsity)
    return weight * mask, mask


def wanda(weight: torch.Tensor, sparsity: LayerSparsity, hessian: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the weights of largest |W| times the input's root mean square, per output row."""
    if hessian is None:
        raise ValueError("wanda needs the layer's calibration statistics (the diagonal of H = XᵀX/n)")
    norms = torch.diagonal(hessian).to(weight.device, torch.float32).clamp(min=0).sqrt()
    mask = keep_largest(weight.float().abs() * norms[None, :], sparsity)
    return weight * mask, mask


def sparsegpt(weight: torch.Tensor, sparsity: LayerSparsity, hessian: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune with SparseGPT's sweep; the kept weights are updated to make up for the pruned ones (float16, as stored)."""
    if hessian is None:
        raise ValueError("sparsegpt needs the layer's calibration statistics (H = XᵀX/n)")
    swept = sweep(weight, hessian, damp=SPARSEGPT_DAMP, select=sparsity)
    return swept.values.half().to(weight.dtype), swept.keep


def sparsegpt_quantized(weight: torch.Tensor, sparsity: LayerSparsity, precision: LayerPrecision,
                        hessian: torch.Tensor) -> tuple[QuantizedWeight, torch.Tensor]:
    """SparseGPT's joint mode: prune and quantize in one sweep; the codes and the keep-mask."""
    size = _group_width(weight.shape[1], precision)
    layout = Grid(precision.bits, size, precision.symmetric, static=size == weight.shape[1])
    swept = sweep(weight, hessian, damp=precision.damp, shrink=precision.shrink, grid=layout, select=sparsity)
    quantized = QuantizedWeight(swept.values.cpu().to(torch.uint8), swept.scales.cpu().half(),
                                swept.zeros.cpu().to(torch.uint8), precision.bits, size, precision.symmetric)
    return quantized, swept.keep


Pruner = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# By the plan's method name: (weight, sparsity, hessian=None) -> (pruned weight, keep-mask).
PRUNERS: dict[str, Pruner] = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}
CALIBRATED_PRUNERS = {"wanda", "sparsegpt"}  # pruners that need calibration statistics


def joint(precision: LayerPrecision, sparsity: LayerSparsity) -> bool:
    """Whether a layer is pruned and quantized in one solve (SparseGPT with GPTQ)."""
    return sparsity.method == "sparsegpt" and not sparsity.is_identity and precision.bits < 16 and precision.method == "gptq"
