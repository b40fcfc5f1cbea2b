"""The search: an Optuna study over compression plans, and its Pareto front."""

from llmtailor.search.pareto import front
from llmtailor.search.study import SearchConfig, Setup, prepare, run

__all__ = ["SearchConfig", "Setup", "front", "prepare", "run"]
