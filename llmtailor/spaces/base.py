"""The one small base class every search space implements."""

from __future__ import annotations

from typing import Any

from llmtailor.arch import Architecture
from llmtailor.plan import CompressionPlan


class SearchSpace:
    """How an Optuna trial becomes a plan."""

    name: str = ""

    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        """The plan of this trial."""
        raise NotImplementedError

    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        """The plan that a set of trial parameters stands for."""
        raise NotImplementedError

    def smallest(self, arch: Architecture) -> CompressionPlan:
        """The plan of fewest weight bytes this space can reach."""
        raise NotImplementedError

    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """Trial parameters of the uniform baselines, enqueued first in a new study."""
        raise NotImplementedError
