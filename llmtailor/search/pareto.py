"""The Pareto front of a study: feasible finished trials that no other feasible trial dominates."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pandas as pd

from llmtailor.errors import UserError
from llmtailor.search import objectives as objectives_mod
from llmtailor.search.objectives import Objective
from llmtailor.search.study import STUDY_ATTR, status

COLUMNS = ["trial", "origin", "kl", "perplexity", "accuracy", "memory_mb", "budget_mb", "fits", "params_m",
           "bits_per_weight", "sparsity", "distill_steps", "train_s", "fidelity", "kl_by_text", "ppl_by_text", "prefill_s",
           "decode_ms_per_token",
           "energy_mj_per_token", "seconds", "status"]
DISTILLATION_COLUMNS = ("distill_steps", "train_s", "fidelity")  # shown only for studies that distill
BY_TEXT_COLUMNS = ("kl_by_text", "ppl_by_text")  # shown only for studies measured on several texts


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == optuna.trial.TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


def _dominates(a: list[float], b: list[float], signs: list[float]) -> bool:
    better_or_equal = all(s * x <= s * y for x, y, s in zip(a, b, signs, strict=True))
    return better_or_equal and any(s * x < s * y for x, y, s in zip(a, b, signs, strict=True))


def front_trials(study: optuna.Study, objectives: list[Objective]) -> list[optuna.trial.FrozenTrial]:
    """Feasible, evaluated trials not dominated by another (ties: the earliest of equals is kept)."""
    signs = [1.0 if o.direction == "minimize" else -1.0 for o in objectives]
    pool = [t for t in study.get_trials(deepcopy=False) if _feasible(t) and status(t) == "evaluated"]
    front = []
    for t in pool:
        if any(_dominates(o.values, t.values, signs) or (o.values == t.values and o.number < t.number) for o in pool):
            continue
        front.append(t)
    return front


def row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One table row of a trial's scores."""
    a = trial.user_attrs
    mb = lambda key: a[key] / 1e6 if key in a else None  # noqa: E731
    return {
        "trial": trial.number,
        "origin": origin(trial),
        "kl": a.get("kl"),
        "perplexity": a.get("perplexity"),
        "accuracy": a.get("accuracy"),
        "memory_mb": mb("memory_bytes"),
        "budget_mb": mb("budget_bytes"),
        "fits": a.get("fits"),
        "params_m": a["params"] / 1e6 if "params" in a else None,  # of the (cut) model
        "bits_per_weight": a.get("bits_per_weight"),
        "sparsity": a.get("sparsity"),
        "distill_steps": a.get("distill_steps"),  # of the measured plan (fewer than sampled when stopped short)
        "train_s": a.get("train_seconds"),  # what training the student took when it was made
        "fidelity": a.get("fidelity"),
        "kl_by_text": _by_text(a.get("kl_by_text"), 4),
        "ppl_by_text": _by_text(a.get("perplexity_by_text"), 2),
        "prefill_s": a.get("prefill_s"),
        "decode_ms_per_token": a["decode_s_per_token"] * 1e3 if "decode_s_per_token" in a else None,
        "energy_mj_per_token": a["energy_j_per_token"] * 1e3 if "energy_j_per_token" in a else None,
        "seconds": a.get("seconds"),
        "status": status(trial),
    }


def origin(trial: optuna.trial.FrozenTrial) -> str:
    """'baseline' for a uniform plan the study enqueued before sampling, 'sampled' for a plan the sampler chose."""
    return "baseline" if "fixed_params" in trial.system_attrs else "sampled"


def objectives_of(study: optuna.Study) -> list[Objective]:
    """The objectives a study was made for, as its stored fingerprint names them."""
    made_for = study.user_attrs.get(STUDY_ATTR)
    if made_for is None:
        raise UserError(f"study {study.study_name!r} was not made by llmtailor (it has no '{STUDY_ATTR}' attribute)")
    return objectives_mod.get(made_for["objectives"])


def _by_text(values: dict[str, float] | None, digits: int) -> str | None:
    """Per-source values as one cell, such as 'pydoc 0.0123; /usr/share/common-licenses 0.0456'."""
    return "; ".join(f"{source} {value:.{digits}f}" for source, value in values.items()) if values else None


def front(study: optuna.Study, objectives: list[Objective] | None = None) -> pd.DataFrame:
    """The Pareto front as a table, best first objective first (objectives: the study's own by default).

    Its first columns after ``trial`` are the objectives, each named by the trial
    attribute that holds it (kl, memory_bytes, decode_s_per_token, ...) and holding the
    value Optuna optimized; the columns of ``COLUMNS`` follow.
    """
    objectives = objectives or objectives_of(study)
    attrs = [o.attr for o in objectives]
    rows = [{**row(t), **dict(zip(attrs, t.values, strict=True))} for t in front_trials(study, objectives)]
    table = pd.DataFrame(rows, columns=["trial", *attrs, *[c for c in COLUMNS[1:] if c not in attrs]])
    first = objectives[0]
    return table.sort_values(first.attr, ascending=first.direction == "minimize", ignore_index=True)


def trials(study: optuna.Study) -> pd.DataFrame:
    """Every trial of the study as a table, failures with their reason."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        r = row(t)
        r["state"] = t.state.name
        r["fail_reason"] = t.user_attrs.get("fail_reason", "")
        r["skip_reason"] = t.user_attrs.get("skip_reason", "")
        r["duplicate_of"] = t.user_attrs.get("duplicate_of")
        r["worker"] = t.user_attrs.get("worker", "")
        r["stage"] = t.user_attrs.get("stage")  # how far cheap-before-dear measured it
        r["stage_seconds"] = json.dumps(t.user_attrs["stage_seconds"]) if "stage_seconds" in t.user_attrs else None
        for key in ("accuracy_ci95", "accuracy_vs_teacher", "accuracy_vs_teacher_ci95"):
            r[key] = t.user_attrs.get(key)
        rows.append(r)
    return pd.DataFrame(rows, columns=[*COLUMNS, "state", "fail_reason", "skip_reason", "duplicate_of", "worker",
                                       "stage", "stage_seconds", "accuracy_ci95", "accuracy_vs_teacher",
                                       "accuracy_vs_teacher_ci95"])


def plan_json(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The plan stored on a trial, as plain data."""
    return json.loads(trial.user_attrs["plan"])
