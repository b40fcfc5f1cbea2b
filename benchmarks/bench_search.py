"""Samplers, cheap before dear, and guided against direct precision, on the default model (issue 18).

Each run is one `llmtailor fit` study in its own process (so its peak memory is its
own): `--memory 160MB`, the joint space of benchmarks/spaces/search-{direct,guided,joint}.yaml
(GPTQ per group of layers or by a guided weight budget, Wanda pruning, depth cuts; why
narrower than the `joint` preset: that file) or search-default.yaml (the sweep's default,
`joint-guided`, whole), `--trials N` measured plans, objectives
KL, memory and latency, no lm-eval (accuracy is no objective here and would only add
seconds to plans on the front), with cheap before dear on (`early`) or off (`full`,
`--no-stop-early`), and the tool's default quality floor (`--max-kl 1`, the box's KL side; studies made
before the floor existed have none). Runs are resumable: a study already at N measured trials is read,
not rerun, so the grid can be filled over several sessions.

From the studies, over each study's first N measured trials:
- hypervolume in a stated box: KL / 1 nat (a plan at 1 nat/token or worse is no use),
  memory / the budget, decode latency / (1.1 x the uncompressed model's), from 0;
- whether each uniform baseline (the enqueued trials) is dominated by a sampled plan,
  and whether the front holds a sampled plan that no baseline dominates;
- median seconds per measured trial and per stage, and the share stopped per stage, over every measured plan;
- the share of measured plans at or beyond the box's KL side (they add nothing to the hypervolume);
- a trial's time against one teacher forward pass over the same evaluation tokens,
  for trials whose layers all came from the warm per-layer cache;
- peak resident memory of each sweep against the teacher's float32 size;
- cheap before dear at equal seconds: each pair of runs (stop early on and off, same
  space, sampler and seed) compared at the trial seconds the quicker one spent;
- students (the `joint` space: search-guided.yaml's space plus KV-group and MLP cuts and
  40-step distillation; the `default` space): the front's plans with a structured cut and with a distilled
  student, the seconds spent training, and each such run against the guided run of the
  same sampler, mode and seed at the seconds the quicker one spent.

    python benchmarks/bench_search.py [--trials 60] [--seeds 0 1 2] [--samplers tpe nsga2 gp random]
        [--spaces direct guided joint default] [--modes early full] [--report-only]

Writes benchmarks/results/bench_search.json, benchmarks/results/bench_search_front.svg
and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna  # noqa: E402
import torch  # noqa: E402

from llmtailor import models, text  # noqa: E402
from llmtailor.evaluators import quality  # noqa: E402
from llmtailor.report import svg  # noqa: E402
from llmtailor.search import hypervolume  # noqa: E402
from llmtailor.search.objectives import get as get_objectives  # noqa: E402
from llmtailor.search.pareto import _dominates  # noqa: E402
from llmtailor.search.study import device_profile, status  # noqa: E402

HERE = Path(__file__).parent
OUT = HERE / "results" / "bench_search.json"
MEMORY = "160MB"
KL_BOUND = 1.0  # nats/token: the hypervolume box's KL side
SPACES_WITH_STUDENTS = ("joint", "default")  # compared against the guided space (students against none)
EVAL_WINDOWS, WINDOW_TOKENS = 4, 256


def study_name(space: str, sampler: str, mode: str, seed: int) -> str:
    return f"{space}-{sampler}-{mode}-s{seed}"


def run_one(folder: Path, space: str, sampler: str, mode: str, seed: int, trials: int,
            torch_device: str = "cpu") -> float:
    """Run (or resume) one study in a fresh process; its wall seconds. `torch_device` is where its tensor work
    (calibration, GPTQ, evaluation, distillation) runs; the cost model's profile stays what `fit --memory` alone
    gives (no --device: the typical laptop CPU unless `devices --calibrate` measured the machine), so the box's
    latency side, and so the hypervolumes, compare with runs on the CPU."""
    command = [str(Path(sys.executable).parent / "llmtailor"), "fit", "--memory", MEMORY, "--trials", str(trials),
               "--study", study_name(space, sampler, mode, seed), "--results", str(folder),
               "--space", str(HERE / "spaces" / f"search-{space}.yaml"), "--sampler", sampler, "--seed", str(seed),
               "--tasks", "none", "--eval-windows", str(EVAL_WINDOWS), "--window-tokens", str(WINDOW_TOKENS),
               "--torch-device", torch_device, "--no-progress"]
    if mode == "full":
        command.append("--no-stop-early")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def load(folder: Path, name: str) -> optuna.Study | None:
    database = folder / name / "study.db"
    if not database.is_file():
        return None
    return optuna.load_study(study_name=name, storage=f"sqlite:///{database}")


def first_measured(study: optuna.Study, trials: int) -> list[optuna.trial.FrozenTrial]:
    """The study's first `trials` measured trials (evaluated or failed), by number."""
    counted = [t for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
               if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
               and status(t) in ("evaluated", "failed")]
    return counted[:trials]


def spent_seconds(study: optuna.Study, measured: list[optuna.trial.FrozenTrial]) -> dict[int, float]:
    """Per measured trial, the trial seconds the study had spent when it finished: the summed durations of every
    finished trial up to it (skipped, duplicate and rejected ones included; a resumed run's pause is not)."""
    last = measured[-1].number if measured else -1
    spent, out, wanted = 0.0, {}, {t.number for t in measured}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.number > last:
            break
        if t.datetime_start and t.datetime_complete:
            spent += (t.datetime_complete - t.datetime_start).total_seconds()
        if t.number in wanted:
            out[t.number] = spent
    return out


def analyse(study: optuna.Study, trials: int, objectives, bounds, guided: bool = False) -> dict:
    """Figures of one study's first `trials` measured trials. In the guided space the enqueued trials are the
    allocator's mixed plans at the bytes of uniform plans, not uniform plans: `mixed_points` counts them in."""
    measured = first_measured(study, trials)
    spent = spent_seconds(study, measured)
    # Every measured plan (all fit the budget), and those of them that are feasible: within the quality floor too,
    # where the study has one. Times, stages and memory are over all measured plans; fronts over the feasible.
    evaluated = [t for t in measured if t.state == optuna.trial.TrialState.COMPLETE and status(t) == "evaluated"]
    points = [t for t in evaluated if all(v <= 0 for v in t.constraints.values())]
    signs = [1.0 if o.direction == "minimize" else -1.0 for o in objectives]
    baselines = [t for t in points if "fixed_params" in t.system_attrs]
    sampled = [t for t in points if "fixed_params" not in t.system_attrs]
    dominated = [any(_dominates(s.values, b.values, signs) for s in sampled) for b in baselines]
    mixed = [s for s in sampled if not any(_dominates(b.values, s.values, signs) for b in baselines)]
    front = [t for t in points if not any(_dominates(o.values, t.values, signs) for o in points)]
    stages = [t.user_attrs.get("stage", "kl") for t in evaluated]
    stage_seconds: dict[str, list[float]] = {}
    for t in evaluated:
        for stage, seconds in t.user_attrs.get("stage_seconds", {}).items():
            stage_seconds.setdefault(stage, []).append(seconds)
    warm = [t.user_attrs["seconds"] for t in evaluated if t.user_attrs.get("layer_cache_misses", 1) == 0]
    return {
        "measured": len(measured), "evaluated": len(evaluated), "feasible_measured": len(points),
        "hypervolume": hypervolume.of(points, objectives, bounds),
        "baselines": len(baselines), "baselines_dominated_by_sampled": sum(dominated),
        "sampled_not_dominated_by_a_baseline": len(mixed),
        "sampled_on_front_not_dominated_by_a_baseline": sum(1 for s in mixed if s in front),
        "share_stopped_at_kl_slice": stages.count("kl_slice") / max(1, len(stages)),
        # Measured plans that add nothing to the box (KL at or beyond its bound; the default quality floor too).
        "share_measured_beyond_kl_bound": sum(1 for t in evaluated if t.user_attrs["kl"] >= bounds["kl"])
        / max(1, len(evaluated)),
        "median_trial_seconds": statistics.median(t.user_attrs["seconds"] for t in evaluated) if evaluated else None,
        "median_warm_trial_seconds": statistics.median(warm) if warm else None, "warm_trials": len(warm),
        "median_stage_seconds": {k: statistics.median(v) for k, v in stage_seconds.items()},
        "peak_rss_bytes": max((t.user_attrs.get("peak_rss_bytes", 0) for t in evaluated), default=0),
        # Per measured plan: memory after it, its own peak (studies from the fifteenth session on) and the process's
        # peak so far, and whether it trained its student now (seconds) or read a kept one.
        "memory_by_trial": [{"trial": t.number, "distill_steps": t.user_attrs.get("distill_steps", 0),
                             "train_seconds_spent": t.user_attrs.get("train_seconds_spent", 0.0),
                             "rss_bytes": t.user_attrs.get("rss_bytes"),
                             "trial_peak_rss_bytes": t.user_attrs.get("trial_peak_rss_bytes"),
                             "peak_rss_bytes": t.user_attrs.get("peak_rss_bytes")} for t in evaluated],
        "spent_seconds": max(spent.values(), default=0.0),
        "hypervolume_by_seconds": [[spent[t.number], hypervolume.of([p for p in points if spent[p.number] <= spent[t.number]],
                                                                    objectives, bounds)] for t in points],
        "front": [[t.values, t.number, "fixed_params" in t.system_attrs] for t in front],
        "front_with_a_cut": sum(1 for t in front if _cut(t)),
        "front_distilled": sum(1 for t in front if t.user_attrs.get("distill_steps", 0) > 0),
        "measured_distilled": sum(1 for t in evaluated if t.user_attrs.get("distill_steps", 0) > 0),
        "stopped_at_short_training": sum(1 for t in evaluated if t.user_attrs.get("fidelity") == "short"),
        # Seconds this study spent training students (a student another study trained first is read, not trained).
        "train_seconds": sum(t.user_attrs.get("train_seconds_spent", 0.0) for t in evaluated),
        "baseline_points": [[b.values, b.number] for b in baselines],
        "mixed_points": [t.values for t in sampled] + ([b.values for b in baselines] if guided else []),
    }


def _cut(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial's plan removes blocks, KV groups or MLP channels."""
    return any(trial.params.get(name, 0.0) > 0 for name in ("cut_blocks", "cut_heads", "cut_mlp"))


def at_equal_seconds(a: dict, b: dict) -> tuple[float, float, float]:
    """Two runs' hypervolumes at the trial seconds the quicker of the two spent on its N measured trials."""
    budget = min(a["spent_seconds"], b["spent_seconds"])
    first, second = (max((hv for seconds, hv in r["hypervolume_by_seconds"] if seconds <= budget), default=0.0)
                     for r in (a, b))
    return budget, first, second


def teacher_facts() -> dict:
    """One forward pass of the teacher over the evaluation tokens (median of 3) and its float32 size."""
    teacher = models.load(None)
    torch.set_num_threads(os.cpu_count() or 1)
    reference = quality.Reference(teacher.model, teacher.tokenizer, text.split("pydoc").evaluation, EVAL_WINDOWS,
                                  WINDOW_TOKENS)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for window in reference.input_ids:
            quality.log_probs(teacher.model, window[None])
        times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in teacher.model.parameters())
    return {"forward_seconds": statistics.median(times), "eval_tokens": reference.tokens,
            "teacher_float32_bytes": 4 * params, "arch": teacher.arch}


def plot(best: dict, objectives) -> str:
    """Memory against KL: the best study's front, its other points, and the baselines marked."""
    kl, memory = [o.name for o in objectives].index("kl"), [o.name for o in objectives].index("memory")
    front = [(v[memory] / 1e6, v[kl], f"trial {n}{' (baseline)' if base else ''}") for v, n, base in best["front"]]
    baselines = [(v[memory] / 1e6, v[kl], f"baseline, trial {n}") for v, n in best["baseline_points"]]
    body = svg.scatter(baselines, sorted(front), x_label="predicted memory (MB)", y_label="KL to the teacher (nats/token)",
                       title=f"{best['study']}: front (blue; KL, memory, latency) and uniform baselines (grey)")
    style = ("<style>text{font:11px sans-serif}.axis{stroke:#333}.trial{fill:#999}.front{fill:#1f77b4}"
             ".front-line{stroke:#1f77b4;fill:none}</style>")
    return body.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1).replace(">", ">" + style, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "gp", "random"])
    parser.add_argument("--spaces", nargs="+", default=["direct", "guided"])
    parser.add_argument("--modes", nargs="+", default=["early", "full"])
    parser.add_argument("--folder", default=str(models.cache_dir() / "bench_search"), help="where the studies live")
    parser.add_argument("--report-only", action="store_true", help="analyse the studies there, run nothing")
    parser.add_argument("--earlier", type=Path, nargs="*", default=[], help="results JSON of earlier runs: a run of "
                        "the grid whose study is not in --folder (made on another machine) is read from them")
    parser.add_argument("--torch-device", default="cpu", help="where the runs' tensor work goes (cuda on a GPU "
                        "machine); the cost profile stays --memory's, so hypervolumes compare across devices")
    parser.add_argument("--out", type=Path, default=OUT, help="the figures' JSON (the plot is written beside it, "
                        "named <stem>_front.svg): a partial grid on another machine goes to a file of its own")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(args.folder)
    wall = {}
    # By space and mode, then seed: a grid stopped part-way has every sampler at every seed of the first settings.
    grid = [(space, sampler, mode, seed) for space in args.spaces for mode in args.modes for seed in args.seeds
            for sampler in args.samplers]
    if not args.report_only:
        for space, sampler, mode, seed in grid:
            name = study_name(space, sampler, mode, seed)
            wall[name] = run_one(folder, space, sampler, mode, seed, args.trials, args.torch_device)
            print(f"{name}: {wall[name]:.0f} s", flush=True)
    facts = teacher_facts()
    arch = facts.pop("arch")
    objectives = get_objectives(("kl", "memory", "latency"))
    profile = device_profile(None, MEMORY)
    from llmtailor.evaluators.cost import Workload

    bounds = {**hypervolume.reference(objectives, arch, profile, Workload()), "kl": KL_BOUND}
    runs = {}
    for space, sampler, mode, seed in grid:
        name = study_name(space, sampler, mode, seed)
        study = load(folder, name)
        if study is None or len(first_measured(study, args.trials)) < args.trials:
            continue
        runs[name] = {"space": space, "sampler": sampler, "mode": mode, "seed": seed,
                      **analyse(study, args.trials, objectives, bounds, guided=space != "direct")}
        if name in wall:
            runs[name]["wall_seconds_this_call"] = wall[name]
    # Runs made on another machine (their folder gone) enter the report from the figures they left; the same box
    # (stated in every file) is checked, so their hypervolumes compare.
    for earlier in args.earlier:
        figures = json.loads(earlier.read_text())
        box = {"kl_nats": KL_BOUND, "memory_bytes": bounds["memory"], "latency_s_per_token": bounds["latency"]}
        if any(abs(figures["hypervolume_box"][k] - v) > 1e-9 * max(1.0, abs(v)) for k, v in box.items()):
            raise SystemExit(f"{earlier}: its hypervolume box {figures['hypervolume_box']} is not this one {box}")
        for name in (study_name(*settings) for settings in grid):
            if name not in runs and name in figures["runs"] and figures["runs"][name]["measured"] == args.trials:
                runs[name] = {**figures["runs"][name], "from": str(earlier)}
    # The uniform baselines are the direct space's enqueued plans (int8, 4-bit g128 GPTQ, 4-bit + 50% Wanda, 2:4, a
    # depth cut: the same plans and measurements in every direct run). A run weakly dominates one when one of its
    # mixed plans is no worse on every objective.
    uniform = {tuple(v): n for r in runs.values() if r["space"] == "direct" for v, n in r["baseline_points"]}
    for run in runs.values():
        run["uniform_baselines_weakly_dominated"] = sum(
            1 for u in uniform if any(all(a <= b for a, b in zip(p, u, strict=True)) for p in run["mixed_points"]))
        run["uniform_baselines"] = len(uniform)
    groups: dict[tuple, list[dict]] = {}
    for run in runs.values():
        groups.setdefault((run["space"], run["sampler"], run["mode"]), []).append(run)
    summary = []
    for (space, sampler, mode), members in sorted(groups.items()):
        hvs = [m["hypervolume"] for m in members]
        random_hvs = [m["hypervolume"] for m in groups.get((space, "random", mode), [])]
        summary.append({
            "space": space, "sampler": sampler, "mode": mode, "seeds": len(members),
            "hypervolume_mean": statistics.mean(hvs), "hypervolume_sd": statistics.stdev(hvs) if len(hvs) > 1 else 0.0,
            "vs_random": statistics.mean(hvs) / statistics.mean(random_hvs) if random_hvs else None,
            "baselines_dominated_by_sampled_mean": statistics.mean(m["baselines_dominated_by_sampled"] for m in members),
            "uniform_baselines_weakly_dominated_mean": statistics.mean(m["uniform_baselines_weakly_dominated"]
                                                                       for m in members),
            "uniform_baselines": members[0]["uniform_baselines"],
            "baselines": members[0]["baselines"],
            "runs_with_a_mixed_plan_no_baseline_dominates": sum(1 for m in members
                                                                if m["sampled_on_front_not_dominated_by_a_baseline"]),
            "median_trial_seconds": statistics.median(m["median_trial_seconds"] for m in members),
            "share_stopped_at_kl_slice": statistics.mean(m["share_stopped_at_kl_slice"] for m in members),
            "share_measured_beyond_kl_bound": statistics.mean(m["share_measured_beyond_kl_bound"] for m in members),
            "peak_rss_bytes_max": max(m["peak_rss_bytes"] for m in members)})
    # Cheap before dear at equal seconds: each (space, sampler, seed) pair of runs compared at the trial seconds the
    # quicker of the two spent on its N measured trials.
    equal_seconds = []
    for run in runs.values():
        if run["mode"] != "early":
            continue
        full = runs.get(study_name(run["space"], run["sampler"], "full", run["seed"]))
        if full is None:
            continue
        budget, early, late = at_equal_seconds(run, full)
        equal_seconds.append({"space": run["space"], "sampler": run["sampler"], "seed": run["seed"],
                              "seconds": budget, "hypervolume_early": early, "hypervolume_full": late,
                              "spent_seconds_early": run["spent_seconds"], "spent_seconds_full": full["spent_seconds"]})
    # Students against none: each run of a space with students (`joint`, the sweep's `default`) against the guided
    # run of the same sampler, mode and seed (the `*_joint` keys hold the space with students, named by `space`).
    students_vs_none = []
    for run in runs.values():
        guided = runs.get(study_name("guided", run["sampler"], run["mode"], run["seed"]))
        if run["space"] not in SPACES_WITH_STUDENTS or guided is None:
            continue
        budget, joint_hv, guided_hv = at_equal_seconds(run, guided)
        students_vs_none.append({
            "space": run["space"], "sampler": run["sampler"], "mode": run["mode"], "seed": run["seed"],
            "hypervolume_joint": run["hypervolume"], "hypervolume_guided": guided["hypervolume"],
            "seconds": budget, "hypervolume_joint_at_seconds": joint_hv, "hypervolume_guided_at_seconds": guided_hv,
            "spent_seconds_joint": run["spent_seconds"], "spent_seconds_guided": guided["spent_seconds"],
            "train_seconds_joint": run["train_seconds"], "front_distilled_joint": run["front_distilled"],
            "front_with_a_cut_joint": run["front_with_a_cut"]})
    warm = [m["median_warm_trial_seconds"] for m in runs.values() if m["median_warm_trial_seconds"] is not None]
    result = {
        "date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
        "model": "SmolLM2-135M-Instruct", "budget": MEMORY, "trials_per_run": args.trials,
        "evaluation": f"pydoc evaluation split, {EVAL_WINDOWS} x {WINDOW_TOKENS} tokens",
        "calibration": "pydoc calibration split, 128 x 512 tokens",
        "hypervolume_box": {"kl_nats": KL_BOUND, "memory_bytes": bounds["memory"],
                            "latency_s_per_token": bounds["latency"]},
        "cost_profile": profile.description,  # a calibrated host's or the typical laptop CPU's: what the box is on
        "teacher_forward_seconds_over_eval_tokens": facts["forward_seconds"],
        "teacher_float32_bytes": facts["teacher_float32_bytes"],
        "median_warm_trial_seconds": statistics.median(warm) if warm else None,
        "warm_trial_over_forward": statistics.median(warm) / facts["forward_seconds"] if warm else None,
        "peak_rss_over_teacher_float32": max((r["peak_rss_bytes"] for r in runs.values()), default=0)
        / facts["teacher_float32_bytes"],
        "summary": summary, "equal_seconds": equal_seconds, "students_vs_none": students_vs_none, "runs": runs}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if runs:
        best = max(runs.items(), key=lambda item: item[1]["hypervolume"])
        args.out.with_name(f"{args.out.stem}_front.svg").write_text(plot({**best[1], "study": best[0]}, objectives))
    print(f"teacher forward over {facts['eval_tokens']} tokens: {facts['forward_seconds']:.2f} s; "
          f"median warm trial {result['median_warm_trial_seconds']} s; peak RSS / fp32 teacher "
          f"{result['peak_rss_over_teacher_float32']:.2f}")
    print("| space | sampler | stop early | seeds | hypervolume | x random | enqueued dominated | uniform baselines "
          "weakly dominated | runs with a mixed plan no baseline dominates | median s/trial | stopped at slice | "
          "beyond the KL bound | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        ratio = "" if s["vs_random"] is None else f"{s['vs_random']:.2f}"
        print(f"| {s['space']} | {s['sampler']} | {s['mode'] == 'early'} | {s['seeds']} | "
              f"{s['hypervolume_mean']:.4f} ± {s['hypervolume_sd']:.4f} | {ratio} | "
              f"{s['baselines_dominated_by_sampled_mean']:.1f} of {s['baselines']} | "
              f"{s['uniform_baselines_weakly_dominated_mean']:.1f} of {s['uniform_baselines']} | "
              f"{s['runs_with_a_mixed_plan_no_baseline_dominates']} of {s['seeds']} | {s['median_trial_seconds']:.1f} | "
              f"{s['share_stopped_at_kl_slice']:.0%} | {s['share_measured_beyond_kl_bound']:.0%} | "
              f"{s['peak_rss_bytes_max'] / 1e6:.0f} MB |")
    print("\nCheap before dear at equal trial seconds (the quicker run's total):\n")
    print("| space | sampler | seed | seconds | hypervolume, stop early | hypervolume, full | early / full |")
    print("|---|---|---|---:|---:|---:|---:|")
    for e in sorted(equal_seconds, key=lambda e: (e["space"], e["sampler"], e["seed"])):
        ratio = e["hypervolume_early"] / e["hypervolume_full"] if e["hypervolume_full"] else float("nan")
        print(f"| {e['space']} | {e['sampler']} | {e['seed']} | {e['seconds']:.0f} | {e['hypervolume_early']:.4f} | "
              f"{e['hypervolume_full']:.4f} | {ratio:.2f} |")
    if students_vs_none:
        print("\nStudents against none: each run with students against the guided run of the same sampler, mode and "
              "seed, after 60 measured trials and at the seconds the quicker one spent:\n")
        print("| space | sampler | stop early | seed | with students | guided | seconds | with students at them | guided at them | "
              "front: distilled / cut | seconds training |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|---|---:|")
        for e in sorted(students_vs_none, key=lambda e: (e["space"], e["sampler"], e["mode"], e["seed"])):
            print(f"| {e['space']} | {e['sampler']} | {e['mode'] == 'early'} | {e['seed']} | {e['hypervolume_joint']:.4f} | "
                  f"{e['hypervolume_guided']:.4f} | {e['seconds']:.0f} | {e['hypervolume_joint_at_seconds']:.4f} | "
                  f"{e['hypervolume_guided_at_seconds']:.4f} | {e['front_distilled_joint']} / "
                  f"{e['front_with_a_cut_joint']} | {e['train_seconds_joint']:.0f} |")


if __name__ == "__main__":
    main()
