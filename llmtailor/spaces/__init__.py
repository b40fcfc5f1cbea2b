"""Search spaces: how an Optuna trial becomes a CompressionPlan.

A space samples a plan from a trial, names the smallest plan it can reach (so an
impossible budget is refused before any work), and gives the uniform baselines that
every study tries first. ``SPACES`` finds a space by name:
- ``coarse`` and ``per-layer``: bits and sparsity per group of layers, RTN;
- ``direct``: the coarse groups, quantized with GPTQ (calibrated);
- ``guided``: one sampled weight budget, spent per layer by the allocator on the
  measured layer sensitivities (GPTQ, calibrated);
- ``prune``: the ``direct`` precision groups with a structured cut (blocks, heads, MLP
  width) and Wanda or SparseGPT pruning (unstructured with OWL ratios, 2:4, 4:8);
- ``distill``: the ``direct`` precision groups with a structured cut whose student is
  distilled for a sampled step budget (``compression.trained`` keeps trained students).
"""

from __future__ import annotations

from llmtailor.errors import UserError
from llmtailor.spaces.base import SearchSpace
from llmtailor.spaces.distill import DistillSpace
from llmtailor.spaces.grouped import GroupedSpace, by_depth_segment, by_layer, by_part
from llmtailor.spaces.guided import GuidedSpace
from llmtailor.spaces.pruning import PruningSpace

SPACES: dict[str, SearchSpace] = {
    "coarse": GroupedSpace("coarse", by_depth_segment(3), by_part),
    "per-layer": GroupedSpace("per-layer", by_layer, by_layer),
    "direct": GroupedSpace("direct", by_depth_segment(3), by_part, method="gptq"),
    "guided": GuidedSpace(),
    "prune": PruningSpace(),
    "distill": DistillSpace(),
}


def get(name: str) -> SearchSpace:
    """A search space by name."""
    if name not in SPACES:
        raise UserError(f"unknown search space {name!r}: choose one of {', '.join(SPACES)}")
    return SPACES[name]


__all__ = ["SPACES", "SearchSpace", "get"]
