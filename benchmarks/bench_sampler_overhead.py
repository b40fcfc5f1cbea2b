"""A sampler's own seconds per trial as a study grows: TPE against GP (issue 18, the default sampler).

bench_search.py measures samplers over 60 trials on the default model, where a trial's
seconds are mostly the model's. An overnight sweep runs hundreds of trials, and a
model-based sampler's work grows with the trials it models: this script measures
that work alone. It runs the tool's samplers (``llmtailor.search.samplers.SAMPLERS``)
on a synthetic objective shaped like the guided space of bench_search.py (a weight
budget, a depth cut, a pruning pattern with its conditional ratio; three objectives
to minimize, the memory and quality-floor constraints set on every trial as the
search sets them) and times each trial's ask and suggestions, which is where Optuna
runs the sampler. The objective takes no time, so the figures are the sampler's.

    python benchmarks/bench_sampler_overhead.py [--trials 300] [--samplers tpe gp] [--limit-seconds 600]

Writes benchmarks/results/bench_sampler_overhead.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import optuna

from llmtailor.search.samplers import SAMPLERS

OUT = Path(__file__).parent / "results" / "bench_sampler_overhead.json"
WINDOW = 10  # trials per reported window: the median of the sampler seconds over the 10 trials ending at n


def suggest_and_score(trial: optuna.Trial) -> tuple[list[float], dict[str, float]]:
    """A plan of the guided space's shape and smooth stand-in objectives (KL, MB, ms/token) and constraints."""
    budget = trial.suggest_float("weight_budget", 0.0, 1.0)
    cut = trial.suggest_categorical("cut_blocks", [0.0, 0.1, 0.2])
    pattern = trial.suggest_categorical("prune_pattern", ["dense", "unstructured", "2:4"])
    ratio = trial.suggest_categorical("prune_ratio", [0.3, 0.5]) if pattern == "unstructured" else 0.0
    sparse = {"dense": 0.0, "unstructured": ratio, "2:4": 0.5}[pattern]
    megabytes = (60 + 140 * budget) * (1 - cut) * (1 - 0.3 * sparse)
    kl = 0.04 + 2.0 * math.exp(-6 * budget) + 4 * cut**2 + 1.5 * sparse**2
    latency = 10 + 0.1 * megabytes
    return [kl, megabytes, latency], {"memory_over_budget_mb": megabytes - 160, "kl_over_floor_nats": kl - 1.0}


def run(sampler_name: str, trials: int, limit_seconds: float, seed: int) -> dict:
    study = optuna.create_study(directions=["minimize"] * 3, sampler=SAMPLERS[sampler_name](seed))
    seconds = []
    start = time.perf_counter()
    while len(seconds) < trials and time.perf_counter() - start < limit_seconds:
        t0 = time.perf_counter()
        trial = study.ask()
        values, constraints = suggest_and_score(trial)
        seconds.append(time.perf_counter() - t0)
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        study.tell(trial, values)
    windows = {n: statistics.median(seconds[n - WINDOW:n]) for n in range(WINDOW, len(seconds) + 1, WINDOW)}
    return {"trials_run": len(seconds), "total_sampler_seconds": sum(seconds),
            "median_sampler_seconds_by_trial": windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--samplers", nargs="+", default=["tpe", "gp"])
    parser.add_argument("--limit-seconds", type=float, default=600.0, help="stop a sampler's study after this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = {name: run(name, args.trials, args.limit_seconds, args.seed) for name in args.samplers}
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "optuna": optuna.__version__, "trials_asked": args.trials, "window_trials": WINDOW, "runs": runs}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    marks = [n for n in (10, 20, 60, 100, 150, 200, 250, 300, 400, 500) if n <= args.trials]
    print("| sampler | trials run | " + " | ".join(f"s/trial at {n}" for n in marks) + " | total s |")
    print("|---|---|" + "---|" * len(marks) + "---|")
    for name, r in runs.items():
        cells = [f"{r['median_sampler_seconds_by_trial'][n]:.3f}" if n in r["median_sampler_seconds_by_trial"] else ""
                 for n in marks]
        print(f"| {name} | {r['trials_run']} | " + " | ".join(cells) + f" | {r['total_sampler_seconds']:.0f} |")


if __name__ == "__main__":
    main()
