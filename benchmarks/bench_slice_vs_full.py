"""Does the slice stop lose plans? Each plan of a finished bench_search.py study, KL on the slice and on every window.

Cheap before dear stops a plan on its KL over the first of the evaluation windows (the
slice): when a measured plan at no higher cost is ahead of it by SLICE_MARGIN, or when
it is beyond the quality floor by that margin. That is sound only if a plan's slice KL
is close to its KL over all windows. This script takes a study run with stopping early
off (every plan measured in full), applies each measured plan again and measures it on
the slice and on the other windows, so the two are paired plan by plan.

    python benchmarks/bench_slice_vs_full.py --folder /tmp/bs11 --study direct-tpe-full-s0 --space direct

Writes benchmarks/results/bench_slice_vs_full_<study>.json and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optuna  # noqa: E402

from llmtailor.evaluators import quality  # noqa: E402
from llmtailor.plan import CompressionPlan  # noqa: E402
from llmtailor.search import study as study_mod  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="where bench_search.py's studies live")
    parser.add_argument("--study", required=True, help="a study run with --no-stop-early (mode `full`)")
    parser.add_argument("--space", choices=["direct", "guided"], required=True)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The same settings as bench_search.py's runs, so the references and windows are the study's own.
    config = study_mod.SearchConfig(memory="160MB", trials=60, study=args.study, results_dir="/tmp/bench_slice_vs_full",
                                    space=str(HERE / "spaces" / f"search-{args.space}.yaml"), tasks=(),
                                    eval_windows=4, window_tokens=256)
    setup = study_mod.prepare(config)
    evaluator = study_mod.TrialEvaluator(setup, log=lambda message: None)
    reference = next(iter(evaluator.references.values()))
    first = study_mod.slice_windows(config.eval_windows)
    study = optuna.load_study(study_name=args.study, storage=f"sqlite:///{Path(args.folder) / args.study / 'study.db'}")
    pairs = []
    for trial in study.trials:
        if trial.user_attrs.get("status") != "evaluated":
            continue
        plan = CompressionPlan.from_json(trial.user_attrs["plan"])
        with evaluator.applied(plan) as model:
            on_slice = quality.measure(model, reference, slice(0, first))
            rest = quality.measure(model, reference, slice(first, None))
        full = quality.combined([on_slice, rest])
        pairs.append({"trial": trial.number, "kl_slice_nats": on_slice.kl, "kl_full_nats": full.kl,
                      "kl_recorded_nats": trial.user_attrs["kl"]})
    floor, margin = study_mod.DEFAULT_MAX_KL, study_mod.SLICE_MARGIN
    ratios = [p["kl_slice_nats"] / p["kl_full_nats"] for p in pairs]
    within = [p for p in pairs if p["kl_full_nats"] < floor]
    summary = {
        "plans": len(pairs), "slice_over_full_min": min(ratios), "slice_over_full_max": max(ratios),
        "plans_within_floor": len(within),
        "largest_slice_kl_of_a_plan_within_floor_nats": max((p["kl_slice_nats"] for p in within), default=None),
        "plans_stopped_over_floor_on_the_slice": sum(1 for p in pairs if p["kl_slice_nats"] > floor * (1 + margin)),
        "of_them_within_floor_in_full": sum(1 for p in within if p["kl_slice_nats"] > floor * (1 + margin)),
        "slice_margin": margin, "floor_nats": floor,
        "largest_difference_from_recorded_kl_nats": max(abs(p["kl_full_nats"] - p["kl_recorded_nats"]) for p in pairs)}
    out = HERE / "results" / f"bench_slice_vs_full_{args.study}.json"
    out.write_text(json.dumps({"date": str(date.today()), "study": args.study, "space": args.space,
                               "evaluation": f"pydoc evaluation split, {config.eval_windows} x {config.window_tokens} "
                               f"tokens, slice: the first {first}", "summary": summary, "pairs": pairs}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
