"""The one small base class every search space implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from llmtailor.arch import Architecture
from llmtailor.plan import CompressionPlan


class SearchSpace(ABC):
    """How an Optuna trial becomes a plan."""

    name: str = ""

    @abstractmethod
    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        """The plan of this trial."""

    @abstractmethod
    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        """The plan that a set of trial parameters stands for."""

    @abstractmethod
    def smallest(self, arch: Architecture) -> CompressionPlan:
        """The plan of fewest weight bytes this space can reach."""

    @abstractmethod
    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """Trial parameters of the uniform baselines, enqueued first in a new study."""
