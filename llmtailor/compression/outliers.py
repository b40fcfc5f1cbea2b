"""Per-block pruning ratios from outliers (OWL, Yin et al., 2023): one global ratio, spent unevenly.

Blocks whose Wanda scores |W_ij|·‖X_j‖ hold more outliers (scores above ``m`` times
their layer's mean) lose more when pruned, so they are pruned less. ``outlier_shares``
measures each block's share of such scores once per (model, calibration);
``layer_ratios`` turns a global ratio into per-block ratios that spread ``2·spread``
around it, in order of the blocks' outlier shares, with the same mean: the blocks of
a decoder are the same size, so the model keeps the same number of weights as at the
uniform ratio, and the byte count is unchanged up to rounding per row.
The defaults (m 5, spread 0.08) are the paper's for LLaMA models.
"""

from __future__ import annotations

from typing import Any

import torch

from llmtailor.arch import Architecture
from llmtailor.compression.calibration import CalibrationStats

OUTLIER_MULTIPLE = 5.0
RATIO_SPREAD = 0.08


@torch.no_grad()
def outlier_shares(model: Any, arch: Architecture, stats: CalibrationStats, multiple: float = OUTLIER_MULTIPLE
                   ) -> dict[int, float]:
    """Per decoder block, the share of its Wanda scores above `multiple` times their layer's mean score."""
    above, total = [0] * arch.num_layers, [0] * arch.num_layers
    for lin in arch.linears:
        if lin.block is None:
            continue
        weight = model.get_submodule(lin.name).weight.float()
        score = weight.abs() * torch.diagonal(stats.hessian(lin.name)).to(weight.device).clamp(min=0).sqrt()[None, :]
        above[lin.block] += int((score > multiple * score.mean()).sum())
        total[lin.block] += score.numel()
    return {block: above[block] / total[block] for block in range(arch.num_layers)}


def layer_ratios(shares: dict[int, float], ratio: float, spread: float = RATIO_SPREAD) -> dict[int, float]:
    """Per-block pruning ratios with mean `ratio`: the block of most outliers gets ratio − spread, the fewest
    ratio + spread (before centring), linearly between. Ratios are clipped to [0, 0.99]."""
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return dict.fromkeys(shares, 0.0)
    low, high = min(shares.values()), max(shares.values())
    scaled = {b: 0.0 if high == low else 2 * spread * (s - low) / (high - low) for b, s in shares.items()}
    mean = sum(scaled.values()) / len(scaled)
    return {b: min(max(ratio - (s - mean), 0.0), 0.99) for b, s in scaled.items()}
