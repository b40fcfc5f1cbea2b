"""The search: an Optuna study over compression plans, its Pareto front and hypervolume history."""

from llmtailor.search.hypervolume import history as hypervolume_history
from llmtailor.search.pareto import front
from llmtailor.search.study import SearchConfig, Setup, prepare, run

__all__ = ["SearchConfig", "Setup", "front", "hypervolume_history", "prepare", "run"]
