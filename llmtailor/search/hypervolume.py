"""The hypervolume history of a study: how much of a fixed box the feasible front dominates after each measured trial.

Scale-free: each objective is divided by a bound fixed when the study is first run
(stored on it as ``hypervolume_reference``), so the reference point is 1 on every axis
and the hypervolume is the share of the box from 0 to the bounds that the front
dominates, between 0 and 1. The bounds are known before any trial:
- kl: the study's quality floor (``--max-kl``), beyond which a plan is infeasible;
  without one, ln(vocabulary size): KL(teacher || uniform) = ln V - H(teacher) <= ln V,
  so a plan at that bound predicts no better than uniform guessing would;
- perplexity: compared as ln(perplexity) (cross-entropy, nats/token), with the same
  bound ln V, a uniform predictor's;
- accuracy: compared as 1 - accuracy, bound 1 (accuracy 0);
- memory: the device's memory budget (a feasible plan is within it);
- latency and energy: the uncompressed model's predicted decode time and energy per
  token times 1.1 (a compressed plan is predicted no slower; the margin is for any
  that is);
- train_steps and train_seconds: stated constants, TRAIN_STEPS_BOUND (above any
  budget the built-in spaces sample) and TRAIN_SECONDS_BOUND (no bound on training
  time is known before a student is trained).
A point beyond a bound on any axis dominates nothing inside the box and adds nothing.
The hypervolume is computed by ``optuna._hypervolume.compute_hypervolume`` (exact,
any number of objectives): Optuna 5 has no public function for it
(``optuna.visualization.plot_hypervolume_history`` needs plotly and draws).

Each point is its own study attribute, ``hypervolume:<trial number>`` = [measured, hv],
written once, after Optuna recorded that trial, by the process that ran it. One list
attribute would be read, extended and written back by each worker, and two workers
finishing together would lose a point; one key per trial cannot collide. A point is
taken over the trials finished when it is written (``measured`` counts them as
``--trials`` does); that set only grows, so ordered by ``measured`` the history never
decreases. With several workers two trials that finish together may give two points
of the same count and none of the count before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna._hypervolume import compute_hypervolume

from llmtailor.arch import Architecture
from llmtailor.evaluators import cost
from llmtailor.hw_profiles import DeviceProfile
from llmtailor.plan import CompressionPlan
from llmtailor.search.objectives import Objective

REFERENCE_ATTR = "hypervolume_reference"
POINT_PREFIX = "hypervolume:"
COST_MARGIN = 1.1
TRAIN_STEPS_BOUND = 1000.0  # distillation steps; the built-in spaces sample at most 160
TRAIN_SECONDS_BOUND = 3600.0  # an hour of distillation per student
# Objectives compared on another scale than their value, so that the bound means the same thing for them.
SCALES = {"perplexity": math.log, "accuracy": lambda accuracy: 1.0 - accuracy}


def reference(objectives: list[Objective], arch: Architecture, profile: DeviceProfile,
              workload: cost.Workload, max_kl: float | None = None) -> dict[str, float]:
    """The bound of each objective (see the module docstring), by objective name."""
    dense = cost.estimate(CompressionPlan(), arch, profile, workload).latency
    bounds = {"kl": max_kl or math.log(arch.vocab_size), "perplexity": math.log(arch.vocab_size), "accuracy": 1.0,
              "memory": float(profile.usable_memory_bytes), "latency": COST_MARGIN * dense.decode_s_per_token,
              "energy": COST_MARGIN * dense.energy_j_per_token, "train_steps": TRAIN_STEPS_BOUND,
              "train_seconds": TRAIN_SECONDS_BOUND}
    return {o.name: bounds[o.name] for o in objectives}


def fixed_reference(study: optuna.Study, objectives: list[Objective], arch: Architecture, profile: DeviceProfile,
                    workload: cost.Workload, max_kl: float | None = None) -> dict[str, float]:
    """The study's bounds: the stored ones, or these, stored now (every process computes the same)."""
    stored = study.user_attrs.get(REFERENCE_ATTR)
    if stored is None:
        stored = reference(objectives, arch, profile, workload, max_kl)
        study.set_user_attr(REFERENCE_ATTR, stored)
    return stored


def of(trials: Iterable[optuna.trial.FrozenTrial], objectives: list[Objective], bounds: dict[str, float]) -> float:
    """The hypervolume of the feasible measured trials among these, in the box of the bounds."""
    points = []
    for t in trials:
        if not _feasible_measured(t):
            continue
        point = [SCALES.get(o.name, float)(v) / bounds[o.name] for o, v in zip(objectives, t.values, strict=True)]
        if all(math.isfinite(x) and x <= 1.0 for x in point):
            points.append(point)
    if not points:
        return 0.0
    return float(compute_hypervolume(np.array(points), np.ones(len(objectives))))


def _feasible_measured(trial: optuna.trial.FrozenTrial) -> bool:
    return (trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs.get("status") == "evaluated"
            and all(v <= 0 for v in trial.constraints.values()))


def record(study: optuna.Study, trial_number: int, measured: int, trials: list[optuna.trial.FrozenTrial],
           objectives: list[Objective], bounds: dict[str, float]) -> None:
    """Store the point of a finished trial: the measured count and hypervolume over these finished trials."""
    study.set_user_attr(f"{POINT_PREFIX}{trial_number}", [measured, of(trials, objectives, bounds)])


def history(study: optuna.Study) -> pd.DataFrame:
    """The stored points as a table (measured, hypervolume, trial), in the order of the measured count."""
    rows: list[dict[str, Any]] = [
        {"measured": value[0], "hypervolume": value[1], "trial": int(key[len(POINT_PREFIX):])}
        for key, value in study.user_attrs.items() if key.startswith(POINT_PREFIX)]
    table = pd.DataFrame(rows, columns=["measured", "hypervolume", "trial"])
    return table.sort_values(["measured", "trial"], ignore_index=True)
