"""Search spaces: how an Optuna trial becomes a CompressionPlan.

A space samples a plan from a trial, names the smallest plan it can reach (so an
impossible budget is refused before any work), and gives the uniform baselines that
every study tries first. ``SPACES`` finds a space by name:
- ``coarse`` and ``per-layer``: bits and sparsity per group of layers, RTN;
- ``direct``: the coarse groups, quantized with GPTQ (calibrated);
- ``guided``: one sampled weight budget, spent per layer by the allocator on the
  measured layer sensitivities (GPTQ, calibrated);
- the presets of the joint space (``spaces.joint``): ``quant`` (the ``direct``
  precision groups alone), ``prune`` (with a structured cut and Wanda or SparseGPT
  pruning), ``distill`` (with a structured cut whose student is distilled for a sampled
  step budget) and ``joint`` (all of it); ``joint-guided`` is ``joint`` with the
  ``guided`` precision.
A path to a YAML file is a user's joint space (``joint.load_choices``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llmtailor.errors import UserError
from llmtailor.spaces.base import SearchSpace
from llmtailor.spaces.grouped import GroupedSpace, by_depth_segment, by_layer, by_part
from llmtailor.spaces.guided import GuidedSpace
from llmtailor.spaces.joint import PRESETS, JointSpace, load_choices

SPACES: dict[str, SearchSpace] = {
    "coarse": GroupedSpace("coarse", by_depth_segment(3), by_part),
    "per-layer": GroupedSpace("per-layer", by_layer, by_layer),
    "direct": GroupedSpace("direct", by_depth_segment(3), by_part, method="gptq"),
    "guided": GuidedSpace(),
    **{name: JointSpace(name, choices) for name, choices in PRESETS.items()},
    "joint-guided": JointSpace("joint-guided", dataclasses.replace(PRESETS["joint"], precision="guided")),
}


def get(name: str) -> SearchSpace:
    """A search space by name, or a user's joint space from a YAML file."""
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise UserError(f"space file {name} does not exist")
        label, choices = load_choices(name)
        return JointSpace(label, choices)
    if name not in SPACES:
        raise UserError(f"unknown search space {name!r}: choose one of {', '.join(SPACES)}, or a YAML file")
    return SPACES[name]


def describe(space: SearchSpace) -> dict | None:
    """What a study stores of its space beyond the name: a joint space's choices (a YAML file may change)."""
    return space.choices.to_dict() if isinstance(space, JointSpace) else None


__all__ = ["SPACES", "SearchSpace", "describe", "get"]
