"""The Optuna study: validate everything cheaply, then sample, price, evaluate and store plans.

Order of work in a trial, cheap before dear: sample a plan (microseconds), price it
with the cost model (milliseconds) and record the budget as an Optuna constraint; only
a plan that fits is applied to the teacher and measured (seconds). A trial that
raises or produces NaN is recorded as failed with its reason, and the study goes on.

Constraints are set with ``trial.set_constraint`` (Optuna 5's API; the issue's
``constraints_func`` is deprecated there and the samplers read these values).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from llmtailor import hw_profiles, models, spaces, text
from llmtailor.arch import Architecture
from llmtailor.errors import UserError
from llmtailor.evaluators import cost
from llmtailor.evaluators import tasks as lm_tasks
from llmtailor.hw_profiles import DeviceProfile, format_size
from llmtailor.search import objectives as objectives_mod
from llmtailor.search.objectives import Objective

SAMPLERS = {
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=20),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
STUDY_ATTR = "llmtailor"
MAX_REJECTIONS_PER_TRIAL = 100


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search is asked to do, as the user gave it."""

    model: str | None = None
    device: str | None = None
    memory: str | None = None
    trials: int = 16
    study: str | None = None
    results_dir: str = "results"
    storage: str | None = None
    space: str = "coarse"
    sampler: str = "nsga2"
    objectives: tuple[str, ...] = objectives_mod.DEFAULT_OBJECTIVES
    tasks: tuple[str, ...] = ("pydoc_cloze",)
    task_items: int = 24
    eval_windows: int = 4
    window_tokens: int = 256
    text: str = text.DEFAULT_SOURCE
    workload: cost.Workload = field(default_factory=cost.Workload)
    seed: int = 0
    trust_remote_code: bool = False


@dataclass
class Setup:
    """A validated search: every input checked, nothing written yet."""

    config: SearchConfig
    profile: DeviceProfile
    arch: Architecture
    model_name: str
    space: spaces.SearchSpace
    objectives: list[Objective]
    study_name: str
    results_path: Path
    storage_url: str

    def fingerprint(self) -> dict[str, Any]:
        """What a study was made for; a resumed study must match it."""
        c = self.config
        return {"model": c.model or "default", "model_name": self.model_name, "device": self.profile.to_dict(),
                "workload": asdict(c.workload), "space": c.space, "objectives": list(c.objectives),
                "tasks": list(c.tasks), "task_items": c.task_items, "text": c.text,
                "eval_tokens": c.eval_windows * c.window_tokens, "arch": self.arch.to_dict()}


def slug(text_: str) -> str:
    """A name safe for folders and study names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text_).strip("-").lower() or "study"


def redact(url: str) -> str:
    """A storage URL with any password hidden."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def device_profile(device: str | None, memory: str | None) -> DeviceProfile:
    """The target: a named or YAML device, an ad-hoc memory budget, or a device limited to a budget."""
    if device is None and memory is None:
        raise UserError("give a target: --device NAME (see `llmtailor devices`) or --memory SIZE such as 8GB")
    base = hw_profiles.load(device) if device else None
    return hw_profiles.from_memory(memory, base) if memory else base


def prepare(config: SearchConfig) -> Setup:
    """Check every input (target, model, budget, tasks, storage) before anything is loaded or written."""
    if config.trials < 1:
        raise UserError(f"--trials must be at least 1, got {config.trials}")
    if config.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {config.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if config.task_items < 4 or config.eval_windows < 1 or config.window_tokens < 16:
        raise UserError("need at least 4 task items, 1 evaluation window and 16 tokens per window")
    profile = device_profile(config.device, config.memory)
    space = spaces.get(config.space)
    objectives = objectives_mod.get(config.objectives)
    arch, model_name = models.load_architecture(config.model, trust_remote_code=config.trust_remote_code)
    smallest = cost.estimate(space.smallest(arch), arch, profile, config.workload)
    if not smallest.fits:
        m = smallest.memory
        raise UserError(
            f"cannot fit {model_name} in {format_size(profile.usable_memory_bytes)} ({profile.name}): the smallest "
            f"plan of the '{space.name}' space needs {format_size(m.total)} (weights {format_size(m.weights + m.embedding)}, "
            f"KV cache {format_size(m.kv_cache)} at context {config.workload.context_length}, runtime "
            f"{format_size(m.overhead)}); give more memory, a shorter --context, or a larger device"
        )
    lm_tasks.check_task_names(list(config.tasks))
    study_name = config.study or slug(f"{model_name}-{profile.name}")
    if slug(study_name) != study_name:
        raise UserError(f"study name {study_name!r} may hold only letters, digits, '.', '_' and '-'")
    results_path = Path(config.results_dir) / study_name
    storage_url = config.storage or f"sqlite:///{(results_path / 'study.db').resolve()}"
    return Setup(config, profile, arch, model_name, space, objectives, study_name, results_path, storage_url)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL; heartbeats let a later run fail the trials of a dead process."""
    try:
        if url.startswith(("sqlite", "postgresql", "mysql")):
            kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120)
        raise ValueError("not a database URL")
    except Exception as exc:  # SQLAlchemy raises many types for bad URLs and unreachable servers
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot open storage {redact(url)}: {redact(reason)} (use sqlite:///path.db or "
                        "postgresql+psycopg2://user@host/db)") from None


def open_study(setup: Setup) -> optuna.Study:
    """Create the study, or load it and check that it was made for the same model and target."""
    if setup.config.storage is None:
        setup.results_path.mkdir(parents=True, exist_ok=True)
    storage = open_storage(setup.storage_url)
    directions = [o.direction for o in setup.objectives]
    study = optuna.create_study(study_name=setup.study_name, storage=storage, directions=directions,
                                sampler=SAMPLERS[setup.config.sampler](setup.config.seed), load_if_exists=True)
    made_for = study.user_attrs.get(STUDY_ATTR)
    wanted = setup.fingerprint()
    if made_for is None:
        study.set_user_attr(STUDY_ATTR, wanted)
        for params in setup.space.baselines(setup.arch):
            study.enqueue_trial(params, skip_if_exists=True)
    else:
        differs = [k for k in ("model", "device", "workload", "space", "objectives", "tasks", "text") if made_for.get(k) != wanted[k]]
        if differs:
            raise UserError(f"study {setup.study_name!r} was made with another {', '.join(differs)}: "
                            "use the same options to resume it, or --study NEW_NAME for a new one")
    optuna.storages.fail_stale_trials(study)
    return study


class TrialEvaluator:
    """The objective function: the teacher, its reference outputs and the tasks, loaded once."""

    def __init__(self, setup: Setup, log: Any = print) -> None:
        from llmtailor.evaluators import quality

        c = setup.config
        self.setup = setup
        log(f"loading {setup.model_name} ...")
        self.teacher = models.load(c.model, trust_remote_code=c.trust_remote_code)
        splits = text.split(c.text)
        log(f"measuring the teacher on {c.eval_windows} x {c.window_tokens} held-out tokens of {c.text} ...")
        self.reference = quality.Reference(self.teacher.model, self.teacher.tokenizer, splits.evaluation,
                                           c.eval_windows, c.window_tokens)
        self.tasks = lm_tasks.resolve_tasks(list(c.tasks), splits.task, c.task_items, models.cache_dir())
        lm_tasks.task_manager()

    def __call__(self, trial: optuna.Trial) -> list[float]:
        started = time.perf_counter()
        try:
            return self._evaluate(trial, started)
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise

    def _evaluate(self, trial: optuna.Trial, started: float) -> list[float]:
        from llmtailor import compression
        from llmtailor.evaluators import quality

        s = self.setup
        plan = s.space.sample(trial, s.arch)
        estimate = cost.estimate(plan, s.arch, s.profile, s.config.workload)
        m, lat = estimate.memory, estimate.latency
        attrs: dict[str, Any] = {
            "plan": plan.to_json(), "memory_bytes": m.total, "budget_bytes": estimate.budget_bytes,
            "weight_bytes": m.weights + m.embedding, "kv_cache_bytes": m.kv_cache, "fits": estimate.fits,
            "prefill_s": lat.prefill_s, "decode_s_per_token": lat.decode_s_per_token,
            "energy_j_per_token": lat.energy_j_per_token, "bits_per_weight": cost.bits_per_weight(plan, s.arch),
            "sparsity": _mean_sparsity(plan, s.arch),
        }
        trial.set_constraint("memory_over_budget_bytes", m.total - estimate.budget_bytes)
        if estimate.fits:
            model = compression.apply(plan, self.teacher.model, s.arch)
            q = quality.measure(model, self.reference)
            accuracy = lm_tasks.accuracy(model, self.teacher.tokenizer, self.tasks)
            del model
            attrs.update(kl=q.kl, perplexity=q.perplexity, eval_tokens=q.tokens, status="evaluated",
                         accuracy=sum(accuracy.values()) / len(accuracy) if accuracy else None,
                         **{f"accuracy_{k}": v for k, v in accuracy.items()})
        else:
            attrs["status"] = "over_budget"
        attrs["seconds"] = time.perf_counter() - started
        for key, value in attrs.items():
            if value is not None:
                trial.set_user_attr(key, value)
        return objectives_mod.values(s.objectives, attrs)


def _mean_sparsity(plan: Any, arch: Architecture) -> float:
    params = sum(lin.params for lin in arch.linears)
    return sum(plan.sparsity_of(lin.name).ratio * lin.params for lin in arch.linears) / params


def _is_measured(trial: optuna.trial.FrozenTrial) -> bool:
    """Measured, or failed with a reason; not a rejection (over budget) nor an interrupted trial."""
    return "fail_reason" in trial.user_attrs or trial.user_attrs.get("status") == "evaluated"


def measured(study: optuna.Study) -> int:
    """Trials that were measured, or failed with a reason; rejections (over budget) and interrupted trials
    (Ctrl-C, or a dead process found by its heartbeat) are not counted, so a resumed study redoes them."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if _is_measured(t))


def run(setup: Setup, *, progress: bool = True, log: Any = None) -> optuna.Study:
    """Run the study until it holds the asked number of measured trials; resumable.

    ``--trials`` counts plans that were measured (or failed), because a plan over
    budget costs milliseconds: a study keeps sampling until that many plans that fit
    were evaluated, or until it has rejected MAX_REJECTIONS_PER_TRIAL times as many.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(setup)
    total = setup.config.trials
    done = measured(study)
    if done >= total:
        log(f"study {setup.study_name} already has {done} measured trials (asked {total})")
        return study
    evaluator = TrialEvaluator(setup, log)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc="measured plans", unit="plan", disable=not progress, file=sys.stderr)
    limit = len(study.trials) + MAX_REJECTIONS_PER_TRIAL * total

    def stop_when_done(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal done
        # Recount from storage (other processes may share the study) only after a measured trial:
        # a rejection takes milliseconds, and reading every trial after each would dominate it.
        if _is_measured(trial):
            done = measured(study_)
        bar.n = done
        bar.set_postfix_str(f"{trial.number + 1} sampled")
        if done >= total or trial.number + 1 >= limit:
            study_.stop()

    try:
        study.optimize(evaluator, catch=(Exception,), callbacks=[stop_when_done], gc_after_trial=True)
    finally:
        bar.close()
    if done < total:
        log(f"only {done} of {len(study.trials)} sampled plans fit the budget; stopped sampling")
    return study
