"""Objectives by name: which measured or predicted score a study optimizes, and in which direction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmtailor.errors import UserError


@dataclass(frozen=True)
class Objective:
    """One axis of the Pareto front: a trial attribute and whether lower or higher is better."""

    name: str
    attr: str  # trial user attribute that holds the score
    direction: str  # minimize | maximize
    measured: bool  # True: needs the compressed model; False: predicted by the cost model
    label: str

    @property
    def worst(self) -> float:
        """The value reported for a trial that was not evaluated (over budget)."""
        return math.inf if self.direction == "minimize" else -math.inf


OBJECTIVES: dict[str, Objective] = {
    "kl": Objective("kl", "kl", "minimize", True, "KL to teacher (nats/token)"),
    "perplexity": Objective("perplexity", "perplexity", "minimize", True, "perplexity"),
    "accuracy": Objective("accuracy", "accuracy", "maximize", True, "accuracy"),
    "memory": Objective("memory", "memory_bytes", "minimize", False, "memory (bytes)"),
    "latency": Objective("latency", "decode_s_per_token", "minimize", False, "decode latency (s/token)"),
    "energy": Objective("energy", "energy_j_per_token", "minimize", False, "energy (J/token)"),
    # What distilling the plan's student costs: steps (known from the plan) and seconds (measured when it was
    # trained, kept with the trained student, so a trial that reuses it reports the same).
    "train_steps": Objective("train_steps", "distill_steps", "minimize", False, "distillation steps"),
    "train_seconds": Objective("train_seconds", "train_seconds", "minimize", True, "distillation time (s)"),
}
DEFAULT_OBJECTIVES = ("kl", "memory", "latency")


def get(names: tuple[str, ...] | list[str]) -> list[Objective]:
    """Objectives by name, in order."""
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names:
        raise UserError(f"unknown objective(s) {unknown}: choose from {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise UserError(f"objectives must not repeat: {list(names)}")
    return [OBJECTIVES[n] for n in names]


def values(objectives: list[Objective], attrs: dict[str, Any]) -> list[float]:
    """A trial's objective values from its attributes (worst values where it was not measured)."""
    return [float(attrs[o.attr]) if o.attr in attrs else o.worst for o in objectives]
