"""The report of a study: front.csv, trials.csv, plans/<trial>.json and one self-contained report.html."""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from llmtailor import files
from llmtailor.errors import UserError
from llmtailor.hw_profiles import format_size
from llmtailor.report.svg import scatter
from llmtailor.search import objectives as objectives_mod
from llmtailor.search import pareto
from llmtailor.search.study import STUDY_ATTR, quality_floor

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #1d2430; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } .sub { color: #5a6575; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #dde2ea; padding: 4px 10px; text-align: right; }
th { background: #f3f5f9; } tr.best td { background: #eaf4ea; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plot text { font-size: 11px; fill: #3a4452; } .plot .title { font-size: 13px; font-weight: 600; }
.axis { stroke: #8893a2; } .trial { fill: #b8c0cc; } .front { fill: #1f6feb; }
.front-line { fill: none; stroke: #1f6feb; stroke-width: 1.5; } .budget { stroke: #d1242f; stroke-dasharray: 5 4; }
.budget-label { fill: #d1242f; } pre { background: #f6f8fa; padding: 1em; overflow: auto; max-height: 24em; }
"""


def study_info(study: optuna.Study) -> dict[str, Any]:
    """What the study was made for (model, device, workload, objectives), as stored on it."""
    info = study.user_attrs.get(STUDY_ATTR)
    if info is None:
        raise UserError(f"study {study.study_name!r} was not made by llmtailor (it has no '{STUDY_ATTR}' attribute)")
    return info


def write(study: optuna.Study, out_dir: Path) -> dict[str, Path]:
    """Write the report files of a study into out_dir; return their paths by kind."""
    info = study_info(study)
    objectives = objectives_mod.get(info["objectives"])
    front = pareto.front(study, objectives)
    table = pareto.trials(study)
    out_dir = Path(out_dir)
    paths = {"front": out_dir / "front.csv", "trials": out_dir / "trials.csv", "html": out_dir / "report.html"}
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    # Everything is rendered before anything is written, and each file is replaced whole (the plans
    # folder too), so a failure leaves the previous report's files as they were.
    contents = {paths["front"]: front.to_csv(index=False), paths["trials"]: table.to_csv(index=False),
                paths["html"]: html(study.study_name, info, front, table, by_number)}
    plans = {f"{n}.json": json.dumps(pareto.plan_json(by_number[n]), indent=1) for n in front["trial"]}
    files.replace_folder(out_dir / "plans", plans)
    for path, content in contents.items():
        files.write_text(path, content)
    return paths


def _stages(trials: Any) -> str:
    """How far cheap-before-dear measured the trials, and the accuracy's confidence interval."""
    stages = trials["stage"].value_counts().to_dict()
    if not stages:
        return ""
    names = {"kl_slice": ("stopped after KL on a slice of the evaluation windows (far behind the front, or "
                          "beyond the quality floor)"),
             "kl": "measured on every window", "accuracy": "reached the front and got lm-eval accuracy"}
    text = "Measured trials: " + "; ".join(f"{stages[k]} {v}" for k, v in names.items() if k in stages) + "."
    ci = trials["accuracy_ci95"].dropna()
    if len(ci):
        text += f" Accuracy's 95% confidence half-width: ±{ci.median():.3f} (median over the trials that have it)."
    paired = trials["accuracy_vs_teacher_ci95"].dropna() if "accuracy_vs_teacher_ci95" in trials else []
    if len(paired):
        text += (f" Against the teacher on the same items (accuracy_vs_teacher, paired): ±{paired.median():.3f}; a plan "
                 "whose interval excludes 0 answers differently from the teacher beyond chance.")
    return text


def _evaluation_texts(info: dict) -> str:
    """The evaluation texts as the report names them, and which one the objectives use."""
    texts = info.get("eval_texts") or [info["text"]]
    if len(texts) == 1:
        return texts[0]
    used = f"objectives on {info['quality_text']}" if info.get("quality_text") else "objectives on their mean"
    return f"each of {', '.join(texts)} ({used}; per text in kl_by_text and ppl_by_text)"


def _latency_check(device: dict[str, Any]) -> str:
    from llmtailor.hw_profiles import DeviceProfile, validation

    try:
        return validation.note(DeviceProfile.from_dict(device))
    except (TypeError, ValueError, KeyError):  # a study stored by an older version with other profile fields
        return "not known for this study's stored profile"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def _table(frame: pd.DataFrame, columns: list[str], best: int | None = None) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    rows = []
    for _, r in frame.iterrows():
        cls = ' class="best"' if best is not None and r["trial"] == best else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{_cell(r[c])}</td>" for c in columns) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _floor(info: dict[str, Any], evaluated: pd.DataFrame) -> str:
    """How many measured plans the quality floor kept off the front (nothing for a study without a floor)."""
    floor = quality_floor(info)
    if floor is None:
        return ""
    beyond = int((evaluated["kl"].astype(float) > floor).sum())
    return f"{beyond} measured plans beyond the quality floor (KL to the teacher above {floor:g} nats/token: kept, not on the front). "


def html(name: str, info: dict[str, Any], front: pd.DataFrame, trials: pd.DataFrame,
         by_number: dict[int, optuna.trial.FrozenTrial]) -> str:
    """The report page: target, the front as a table, plots, and the best plan."""
    device = info["device"]
    budget_mb = device["usable_memory_bytes"] / 1e6
    evaluated = trials[trials["status"] == "evaluated"]
    label = lambda r: f"trial {r['trial']}: {r['memory_mb']:.1f} MB, KL {r['kl']:.3g}"  # noqa: E731
    points = lambda frame, y: [(r["memory_mb"], r[y], label(r)) for _, r in frame.iterrows() if r[y] is not None]  # noqa: E731
    plots = [
        scatter(points(evaluated, "accuracy"), points(front, "accuracy"), x_label="memory (MB)", y_label="accuracy",
                title="Accuracy vs memory", x_line=budget_mb, x_line_label="budget"),
        scatter(points(evaluated, "kl"), points(front, "kl"), x_label="memory (MB)",
                y_label="KL to teacher (nats/token)", title="Fidelity vs memory", x_line=budget_mb, x_line_label="budget"),
    ]
    counts = trials["state"].value_counts().to_dict()
    statuses = trials["status"].value_counts().to_dict()
    over = statuses.get("over_budget", 0)
    best_html = "<p>No plan was evaluated yet.</p>"
    best = None
    if len(front):
        best = int(front.iloc[0]["trial"])
        plan = json.dumps(pareto.plan_json(by_number[best]), indent=1)
        best_html = f"<h2>Best plan (trial {best})</h2><pre>{escape(plan)}</pre>"
    hidden = ("status", "budget_mb", "fits") + (() if trials["distill_steps"].fillna(0).any()
                                                 else pareto.DISTILLATION_COLUMNS)
    hidden += () if trials["kl_by_text"].notna().any() else pareto.BY_TEXT_COLUMNS
    columns = [c for c in pareto.COLUMNS if c not in hidden]
    workload = info["workload"]
    calibrated = (f"; GPTQ calibrated on {escape(info['calibration_text'])} (held apart from the evaluation text)"
                  if info.get("calibration_text") else "")
    tasks = f'lm-eval tasks {escape(", ".join(info["tasks"]))} ({info["task_items"]} items)' if info["tasks"] else "no lm-eval tasks"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmtailor: {escape(name)}</title><style>{STYLE}</style></head>
<body>
<h1>llmtailor report: {escape(name)}</h1>
<p class="sub">{escape(info["model_name"])} on {escape(device["description"])} — budget {escape(format_size(device["usable_memory_bytes"]))},
context {workload["context_length"]}, batch {workload["batch_size"]}, prompt {workload["prompt_length"]};
objectives: {escape(", ".join(info["objectives"]))}; quality measured on {info["eval_tokens"]} held-out tokens
of {escape(_evaluation_texts(info))}
and {tasks}{calibrated}.</p>
<p>{len(trials)} trials: {statuses.get("evaluated", 0)} measured, {over} over budget (rejected by the cost model before
any weight was touched), {statuses.get("duplicate", 0)} repeated plans (not measured again),
{statuses.get("skipped", 0)} skipped, {counts.get("FAIL", 0)} failed. {escape(_floor(info, evaluated))}Pareto front: {len(front)} plans.
{escape(_stages(trials))}</p>
<div class="plots">{"".join(plots)}</div>
<h2>Pareto front</h2>
<p class="sub">Memory, prefill_s and decode_ms_per_token are the cost model's predictions for this device; how far its
latencies are from measurement: {escape(_latency_check(device))}.</p>
{_table(front, columns, best)}
<p class="sub">Any of these as a model folder transformers loads, measured again: <code>llmtailor export
{escape(name)} --trial N OUT</code> (with <code>--results</code> or <code>--storage</code> as for <code>report</code>).</p>
{best_html}
</body></html>
"""
