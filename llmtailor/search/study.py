"""The Optuna study: validate everything cheaply, then sample, price, evaluate and store plans.

Order of work in a trial, cheap before dear: sample a plan (microseconds), price it
with the cost model (milliseconds) and record the budget as an Optuna constraint; only
a plan that fits is applied to the teacher and measured (seconds). A trial that
raises or produces NaN is recorded as failed with its reason, and the study goes on.

Constraints are set with ``trial.set_constraint`` (Optuna 5's API; the issue's
``constraints_func`` is deprecated there and the samplers read these values).

Several processes (and machines) may share one study. Each draws its own plans: the
process that creates the study samples with the user's seed (a new study run by one
process is reproducible), every other one with that seed mixed with the host, the
process and the study's size when it joined, so a resumed run does not replay the
first run's draws (``process_seed``); a plan
already measured in the study is not measured again (its result is copied, see
``status``), nor one another process is measuring: of trials drawing the same plan at
once, the lowest-numbered measures it (``TrialEvaluator._reuse_or_skip``); and a process
stops measuring once the study holds the asked total, so the total is overshot by at
most the trials already running when it was reached.
``--workers N`` starts such processes on one machine (``search.workers``); storages
and their heartbeats are in ``search.storage``. After each measured trial the
hypervolume of the feasible front so far is stored on the study (``search.hypervolume``).

Every finished trial carries a ``status`` user attribute:
``evaluated`` (measured), ``failed`` (an error in a method; ``fail_reason`` says which),
``over_budget`` (rejected by the cost model), ``duplicate`` (the same plan as trial
``duplicate_of``, whose result it copies; under NSGA-II it is pruned instead, with no values,
so that a generation holds distinct plans), ``skipped`` (pruned: the same plan is being
measured by another process, or the asked total was reached), ``interrupted`` (Ctrl-C, or the
disk ran full: ``DiskFull`` stops the sweep)
and ``died`` (its process was killed; failed by heartbeat). Only ``evaluated`` and
``failed`` count toward ``--trials``; interrupted and dead trials are redone.

A quality floor (``--max-kl``, default ``DEFAULT_MAX_KL`` nats/token of KL to the
teacher) is a second constraint, ``kl_over_floor_nats``: a measured plan beyond it is
kept in the study but is not on the front, and the constrained samplers learn to
leave its region. Without it the third objective, latency, made every plan with the
fewest blocks Pareto-optimal however broken: in the tenth session's grid 70% of TPE's
measured trials were beyond 1 nat/token (bench_search.py's hypervolume box's own bound),
and the demo's sampled front points were plans at KL 1.7-3.4 with perplexity 92-491. A plan whose
KL on the first slice is already ``1 + SLICE_MARGIN`` times the floor stops there.
Every trial carries both constraints (GPSampler needs the same ones on every trial): a
plan not measured (over budget) is given 0 for the floor, not known to exceed it. A
study made before the floor existed runs without one (its trials have no such
constraint).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import gc
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from llmtailor import files, hw_profiles, models, spaces, text
from llmtailor.arch import Architecture
from llmtailor.compression import calibration as calibration_mod
from llmtailor.compression import layer_cache
from llmtailor.errors import UserError
from llmtailor.evaluators import cost, quality
from llmtailor.evaluators import tasks as lm_tasks
from llmtailor.hw_profiles import DeviceProfile, format_size, host
from llmtailor.search import hypervolume
from llmtailor.search import interrupts as interrupts_mod
from llmtailor.search import objectives as objectives_mod
from llmtailor.search import storage as storage_mod
from llmtailor.search.objectives import Objective
from llmtailor.search.samplers import BREEDS_A_POPULATION, SAMPLERS

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
COUNTED = ("evaluated", "failed")  # statuses that count toward --trials
STUDY_ATTR = "llmtailor"
MAX_REJECTIONS_PER_TRIAL = 100
# Attributes a duplicate trial copies from the measured trial of the same plan.
MEASURED_ATTRS = ("kl", "perplexity", "eval_tokens", "accuracy", "accuracy_ci95", "accuracy_vs_teacher",
                  "accuracy_vs_teacher_ci95", "fidelity", "distill_steps",
                  "train_seconds", "train_loss", "plan", "kl_by_text", "perplexity_by_text", "stage")
# Distillation fidelity: a student is first trained for 1/FIDELITY_DIVISOR of its budget; it gets the whole budget
# unless a measured trial at no higher predicted cost is already better than it by more than FIDELITY_MARGIN on
# every measured objective to minimize (KL, perplexity: its value times 1 + margin still below the short run's).
# A 4x longer KD run lowered KL by 26-41% in bench_distill.py (25 -> 100 steps), so a short run twice as bad as a
# front point would stay dominated after its full budget.
FIDELITY_DIVISOR = 4
FIDELITY_MARGIN = 1.0
# Evaluation fidelity: KL on the first 1/SLICE_SHARE of the evaluation windows (at least one) first; a plan whose
# slice KL is 1 + SLICE_MARGIN times that of a measured trial at no higher cost stops there. Per-window KL of one
# plan varies by tens of percent across windows, so the margin leaves what noise could explain to the full
# measurement.
SLICE_SHARE = 4
SLICE_MARGIN = 0.5
# The quality floor's default: 1 nat/token of KL to the teacher. On the default model and pydoc's evaluation text
# (the tenth session's demo) a plan at KL 1.14 has perplexity 42.9 and plans at 1.7-3.4 have 92-491, where 8-bit
# plans are at about 17.5 (bench_allocator.py), 4-bit RTN at KL 0.38 (perplexity 22.1) and 4-bit GPTQ at 0.08-0.13.
DEFAULT_MAX_KL = 1.0
KL_CONSTRAINT = "kl_over_floor_nats"


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
    sampler: str = "tpe"  # chosen by benchmarks/bench_search.py (BENCHMARKS.md)
    objectives: tuple[str, ...] = objectives_mod.DEFAULT_OBJECTIVES
    tasks: tuple[str, ...] = ("pydoc_cloze",)  # empty: no lm-eval accuracy
    task_items: int = 100  # per built-in task; see bench_accuracy_ci.py for what 24 and 100 items can separate
    eval_windows: int = 4
    window_tokens: int = 256
    text: str = text.DEFAULT_SOURCE
    workload: cost.Workload = field(default_factory=cost.Workload)
    seed: int = 0
    trust_remote_code: bool = False
    torch_device: str = "cpu"  # where the teacher runs: calibration, GPTQ and evaluation
    calibration: str | None = None  # text source whose calibration split calibrates GPTQ (None: the --text source)
    calibration_windows: int = calibration_mod.CalibrationSpec.windows
    eval_texts: tuple[str, ...] = ()  # sources whose evaluation splits KL and perplexity are measured on (): --text
    quality_text: str | None = None  # the one of them the kl/perplexity objectives use (None: their mean)
    stop_early: bool = True  # cheap before dear: stop a plan far behind the front at the slice or short training
    max_kl: float | None = DEFAULT_MAX_KL  # the quality floor (nats/token); None: none

    def evaluation_sources(self) -> tuple[str, ...]:
        """Where KL and perplexity are measured: the --eval-text sources, or the --text source."""
        return self.eval_texts or (self.text,)

    def calibration_spec(self) -> calibration_mod.CalibrationSpec:
        """The calibration of calibrated spaces (GPTQ): the default recipe on the chosen text."""
        return calibration_mod.CalibrationSpec(source=self.calibration or self.text, windows=self.calibration_windows)


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
    splits: text.TextSplits
    evaluation: dict[str, tuple[str, ...]] = field(default_factory=dict)  # evaluation documents by source

    def fingerprint(self) -> dict[str, Any]:
        """What a study was made for; a resumed study must match it."""
        c = self.config
        made_for = {"model": c.model or "default", "model_name": self.model_name, "device": self.profile.to_dict(),
                    "workload": asdict(c.workload), "space": c.space, "objectives": list(c.objectives),
                    "tasks": list(c.tasks), "task_items": c.task_items, "text": c.text,
                    "eval_tokens": c.eval_windows * c.window_tokens, "eval_windows": c.eval_windows,
                    "window_tokens": c.window_tokens, "arch": self.arch.to_dict()}
        choices = spaces.describe(self.space)
        if choices is not None:
            made_for["space_choices"] = choices
        made_for["max_kl"] = c.max_kl
        if c.eval_texts:  # (studies made before several evaluation texts keep their fingerprint)
            made_for["eval_texts"], made_for["quality_text"] = list(c.eval_texts), c.quality_text
        if self.space.calibrated:
            made_for["calibration"] = asdict(c.calibration_spec())
            made_for["calibration_text"] = c.calibration_spec().describe()
        return made_for


def slug(text_: str) -> str:
    """A name safe for folders and study names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text_).strip("-").lower() or "study"


def device_profile(device: str | None, memory: str | None) -> DeviceProfile:
    """The target: a named or YAML device, an ad-hoc memory budget, or a device limited to a budget."""
    if device is None and memory is None:
        raise UserError("give a target: --device NAME (see `llmtailor devices`) or --memory SIZE such as 8GB")
    base = hw_profiles.load(device) if device else None
    return hw_profiles.from_memory(memory, base) if memory else base


def prepare(config: SearchConfig) -> Setup:
    """Check every input (target, model, budget, text, tasks, results folder, storage) before anything is written."""
    if config.trials < 1:
        raise UserError(f"--trials must be at least 1, got {config.trials}")
    if config.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {config.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if config.task_items < 4 or config.eval_windows < 1 or config.window_tokens < 16:
        raise UserError("need at least 4 task items, 1 evaluation window and 16 tokens per window")
    if config.calibration_windows < 1:
        raise UserError(f"--calibration-windows must be at least 1, got {config.calibration_windows}")
    if config.max_kl is not None and not (math.isfinite(config.max_kl) and config.max_kl > 0):
        raise UserError(f"--max-kl must be a positive number of nats per token, or none, got {config.max_kl}")
    models.torch_device(config.torch_device)
    layer_cache.max_bytes_from_env()  # a malformed bound fails here, before anything loads
    profile = device_profile(config.device, config.memory)
    space = spaces.get(config.space)
    objectives = objectives_mod.get(config.objectives)
    if not config.tasks and any(o.name == "accuracy" for o in objectives):
        raise UserError("the accuracy objective needs lm-eval tasks: give --tasks, or drop accuracy from --objectives")
    if config.storage is not None:
        storage_mod.check_url(config.storage)
    study_name = config.study
    if study_name is not None and slug(study_name) != study_name:
        raise UserError(f"study name {study_name!r} may hold only lowercase letters, digits, '.', '_' and '-'")
    files.check_writable_folder(config.results_dir, "results folder")
    splits = text.split(config.text)
    lm_tasks.check_tasks(list(config.tasks), splits.task, config.task_items)
    sources = config.evaluation_sources()
    if len(set(sources)) != len(sources):
        raise UserError(f"--eval-text names a source twice: {list(sources)}")
    if config.quality_text is not None and config.quality_text not in sources:
        raise UserError(f"--quality-text {config.quality_text!r} is not among the evaluation texts {list(sources)}")
    evaluation = {source: text.split(source).evaluation for source in sources}
    arch, model_name = models.load_architecture(config.model, trust_remote_code=config.trust_remote_code)
    tokenizer = models.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    for documents in evaluation.values():
        quality.evaluation_ids(tokenizer, documents, config.window_tokens)
    if space.calibrated:  # the calibration text exists and fills a window (the evaluation text never calibrates)
        spec = config.calibration_spec()
        calibrating = text.split(spec.source).calibration
        calibration_mod.calibration_windows(tokenizer, calibrating, 1, spec.window_tokens)
        text.check_disjoint(calibrating, spec.source, evaluation)
    smallest = cost.estimate(space.smallest(arch), arch, profile, config.workload)
    if not smallest.fits:
        m = smallest.memory
        raise UserError(
            f"cannot fit {model_name} in {format_size(profile.usable_memory_bytes)} ({profile.name}): the smallest "
            f"plan of the '{space.name}' space needs {format_size(m.total)} (weights {format_size(m.weights + m.embedding)}, "
            f"KV cache {format_size(m.kv_cache)} at context {config.workload.context_length}, runtime "
            f"{format_size(m.overhead)}); give more memory, a shorter --context, or a larger device"
        )
    study_name = study_name or slug(f"{model_name}-{profile.name}")
    results_path = Path(config.results_dir) / study_name
    storage_url = config.storage or f"sqlite:///{(results_path / 'study.db').resolve()}"
    if config.storage is not None:
        storage_mod.check_opens(storage_url)  # a database server is reachable, an existing journal is one
    return Setup(config, profile, arch, model_name, space, objectives, study_name, results_path, storage_url, splits,
                 evaluation)


def _load_existing(setup: Setup) -> optuna.Study | None:
    """The study if the storage already holds it; creates no file when it does not."""
    database = storage_mod.local_file(setup.storage_url)
    if database is not None and not database.is_file():
        return None
    storage = storage_mod.open_storage(setup.storage_url)
    if setup.study_name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=setup.study_name, storage=storage)


def _with_later_fields(key: str, stored: Any) -> Any:
    """A stored workload or device as this version writes it: fields added since it was stored had their
    defaults then (the runtime's dense width, per-precision bandwidth shares), so a study resumes across versions."""
    import dataclasses

    kinds = {"workload": cost.Workload, "device": DeviceProfile}
    if key not in kinds or not isinstance(stored, dict):
        return stored
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(kinds[key])
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {**{k: v for k, v in defaults.items() if k != "kernels"}, **stored}


def _check_made_for(setup: Setup, study: optuna.Study) -> None:
    made_for = study.user_attrs.get(STUDY_ATTR)
    if made_for is None:
        raise UserError(f"study {setup.study_name!r} in {storage_mod.redact(setup.storage_url)} was not made by "
                        "llmtailor: choose another --study name")
    wanted = setup.fingerprint()
    # A joint space is what it offers, not how it was named: the same YAML file moved, or given by another
    # path, resumes; a file whose choices changed does not. (Other spaces, and studies made before choices were
    # stored, resume by the space's name.)
    by_choices = "space_choices" in made_for and wanted.get("space_choices") is not None
    keys = ("model", "device", "workload", *(() if by_choices else ("space",)), "objectives", "tasks", "text",
            "calibration")
    differs = [k for k in keys if _with_later_fields(k, made_for.get(k)) != wanted.get(k)]
    if "space_choices" in made_for and made_for["space_choices"] != wanted.get("space_choices"):
        differs.append("space choices")
    for key in ("eval_texts", "quality_text"):
        if made_for.get(key) != wanted.get(key):
            differs.append(key.replace("_", " "))
    if "max_kl" in made_for and quality_floor(made_for) != wanted["max_kl"]:  # (an older study runs without)
        differs.append("quality floor (--max-kl)")
    if differs:
        hint = ""
        if "device" in differs and (made_for.get("device") or {}).get("name") == wanted["device"]["name"]:
            hint = (" (the same device with other figures: `llmtailor devices --calibrate` changes the host "
                    "profile, which --memory alone runs at)")
        raise UserError(f"study {setup.study_name!r} was made with another {', '.join(differs)}{hint}: "
                        "use the same options to resume it, or --study NEW_NAME for a new one")


CREATOR_WAIT_S = 30.0  # how long a worker waits for the process that created the study to enqueue its baselines
KEY_WAIT_S = 30.0  # how long a trial waits for a lower-numbered running trial to write its plan key (see _reuse_or_skip)
TWIN_WAIT_S = 900.0  # how long it waits for a higher-numbered trial measuring the same plan, to copy its result
TWIN_POLL_S = 0.2
RUNNING = optuna.trial.TrialState.RUNNING


def _create(setup: Setup) -> tuple[optuna.Study, bool]:
    """Create the study with its fingerprint and baselines, or load it if another process just made it;
    say whether this call made it."""
    database = storage_mod.local_file(setup.storage_url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    storage = storage_mod.open_storage(setup.storage_url)
    directions = [o.direction for o in setup.objectives]
    try:
        study = optuna.create_study(study_name=setup.study_name, storage=storage, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=setup.study_name, storage=storage)
        # Workers started together: only the one that created the study enqueues the baselines (two enqueuing at
        # once both passed `skip_if_exists`, and a baseline was measured twice); the others wait for its fingerprint.
        waited = time.monotonic()
        while STUDY_ATTR not in study.user_attrs and time.monotonic() - waited < CREATOR_WAIT_S:
            time.sleep(0.1)
        if STUDY_ATTR in study.user_attrs:
            _check_made_for(setup, study)
            return study, False
    # (A study whose creator died before writing its fingerprint is adopted here, after CREATOR_WAIT_S.) Another
    # worker may start sampling before the baselines below are enqueued: they are measured all the same.
    study.set_user_attr(STUDY_ATTR, setup.fingerprint())
    for params in setup.space.baselines(setup.arch):
        study.enqueue_trial(params, skip_if_exists=True)
    return study, True


def process_seed(seed: int, trials_in_study: int, created: bool) -> int:
    """The sampler seed of this process: the user's own seed in the process that created the study, so that a new
    study run by one process draws the same plans for the same ``--seed`` (and two runs that differ in one option,
    such as stopping early, are paired draw for draw); in a process that joins or resumes a study, the seed mixed
    with the host, the process and the study's size, so that concurrent workers and a resumed run do not replay
    the creator's draws. (Until the eighteenth session every process mixed: runs with the same ``--seed`` were
    independent draws, and the benchmarks' "same seed" pairs were not paired.)"""
    if created:
        return seed
    salt = f"{seed}|{trials_in_study}|{socket.gethostname()}|{os.getpid()}"
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little")


def plan_key(plan_json: str) -> str:
    """A short digest that is equal for equal plans."""
    return hashlib.sha256(plan_json.encode()).hexdigest()[:20]


def status(trial: optuna.trial.FrozenTrial) -> str:
    """What became of a trial (see the module docstring); trials of older studies get one by their state."""
    attrs = trial.user_attrs
    if "status" in attrs:
        return attrs["status"]
    return "failed" if "fail_reason" in attrs else trial.state.name.lower()


def _counts(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state in FINISHED and status(trial) in COUNTED


def measured(study: optuna.Study) -> int:
    """Trials that were measured, or failed with a reason; rejections (over budget), duplicates, skipped,
    interrupted and dead trials are not counted, so a resumed study redoes what was lost."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if _counts(t))


class RepeatedFailure(Exception):
    """A plan that already failed in this study; it is failed again without being measured."""


class TrialEvaluator:
    """The objective function: the teacher, its reference outputs and the tasks, loaded once."""

    def __init__(self, setup: Setup, log: Any = print, progress: bool = False) -> None:
        c = setup.config
        self.setup = setup
        host.return_large_blocks_to_the_os()  # (a sweep's memory is then what it holds, not its largest temporaries)
        log(f"loading {setup.model_name} ...")
        self.teacher = models.load(c.model, trust_remote_code=c.trust_remote_code, log=log)
        self.teacher.model.to(models.torch_device(c.torch_device))
        self.space, self.calibration, self.layer_cache, self.importance = setup.space, None, None, None
        self.students = None  # compression.trained.TrainedStudents, for spaces that distill
        if setup.space.calibrated:
            from llmtailor.search import calibrated

            device = models.torch_device(c.torch_device)
            made = calibrated.prepare(setup.space, self.teacher.model, self.teacher.tokenizer, setup.arch,
                                      c.calibration_spec(), device, progress, log)
            self.space, self.calibration, self.layer_cache = made.space, made.stats, made.cache
            self.importance = made.importance
            if setup.space.distills:
                from llmtailor.compression import trained

                spec, teacher = c.calibration_spec(), self.teacher
                self.students = trained.TrainedStudents(
                    teacher.model, lambda: spec.make_windows(teacher.model, teacher.tokenizer, device, progress),
                    made.key, models.cache_dir(), device, progress=progress)
        from llmtailor.compression import originals

        fingerprint = self.layer_cache.model if self.layer_cache else layer_cache.model_fingerprint(self.teacher.model)
        self.originals = originals.Originals(self.teacher.model, models.cache_dir() / "teacher_weights", fingerprint,
                                             self.teacher.weight_files)
        log(f"measuring the teacher on {c.eval_windows} x {c.window_tokens} held-out tokens of "
            f"{', '.join(c.evaluation_sources())} ...")
        evaluation = setup.evaluation or {c.text: setup.splits.evaluation}
        self.references = {source: quality.Reference(self.teacher.model, self.teacher.tokenizer, documents,
                                                     c.eval_windows, c.window_tokens, quality.SEARCH_TOP_K)
                           for source, documents in evaluation.items()}
        self.tasks = lm_tasks.resolve_tasks(list(c.tasks), setup.splits.task, c.task_items, models.cache_dir())
        self.teacher_items: dict[str, list[float]] = {}
        if self.tasks:
            lm_tasks.task_manager()
            self.teacher_items = self._teacher_item_scores(fingerprint, log)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.stop = False  # set when the asked total is reached while this process was sampling
        self.fatal: Exception | None = None  # an error after which this process must not measure again
        self.interrupts = interrupts_mod.TrialBoundary()  # takes Ctrl-C and SIGTERM while a sweep runs
        self.max_kl = c.max_kl  # the quality floor; the study's own once it is known (``_optimize``)
        self.process_peak = 0  # bytes: this process's peak resident memory, over the trials' restarted peaks

    def _teacher_item_scores(self, fingerprint: str, log: Any) -> dict[str, list[float]]:
        """The teacher's score on each task item, which front plans' accuracy is paired against: measured once per
        model and task set and kept in the cache folder (all workers share it), before any trial changes the
        teacher's weights."""
        key = hashlib.sha256(json.dumps([fingerprint, self.tasks, lm_tasks.SCORER], sort_keys=True,
                                         default=str).encode()).hexdigest()

        def measure() -> dict[str, list[float]]:
            log("measuring the teacher on the tasks ...")
            return lm_tasks.item_scores(self.teacher.model, self.teacher.tokenizer, self.tasks)

        return files.load_or_make(models.cache_dir() / "tasks" / f"teacher-{key[:20]}.json",
                                  lambda p: json.loads(p.read_text()), measure,
                                  lambda scores, p: files.write_text(p, json.dumps(scores)))

    def __call__(self, trial: optuna.Trial) -> list[float]:
        started = time.perf_counter()
        storage_mod.beat_now(trial)
        try:
            with self.interrupts.trial():
                return self._evaluate(trial, started)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("status", "interrupted")
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); a resumed run redoes it")
            raise
        except Exception as exc:
            from llmtailor.compression.originals import TeacherChanged

            if isinstance(exc, TeacherChanged):  # every later trial would measure a wrong teacher
                self.fatal, self.stop = exc, True
            elif _disk_full(exc):  # every later trial would fail the same way, and the study's own writes with it
                self.stop = True
                self.fatal = DiskFull(f"no space left on the disk ({type(exc).__name__}: {exc}"[:300] + "): the sweep "
                                      "stopped; free some space and run the same command again to continue")
            # A trial the disk stopped is redone on resume, as an interrupted one is: the plan did not fail.
            kind = "duplicate" if isinstance(exc, RepeatedFailure) else "interrupted" if isinstance(self.fatal, DiskFull) else "failed"
            trial.set_user_attr("status", kind)
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise

    def _evaluate(self, trial: optuna.Trial, started: float) -> list[float]:
        s = self.setup
        # The process's peak so far (its preparation, earlier trials), then the peak restarted for this trial's own.
        self.process_peak = max(self.process_peak, host.resident_bytes(peak=True) or 0)
        own_peak = host.restart_peak()
        plan = self.space.sample(trial, s.arch)
        estimate = cost.estimate(plan, s.arch, s.profile, s.config.workload)
        m, lat = estimate.memory, estimate.latency
        plan_json = plan.to_json()
        attrs: dict[str, Any] = {
            "plan": plan_json, "plan_key": plan_key(plan_json), "memory_bytes": m.total,
            "budget_bytes": estimate.budget_bytes, "weight_bytes": m.weights + m.embedding, "kv_cache_bytes": m.kv_cache,
            "fits": estimate.fits, "prefill_s": lat.prefill_s, "decode_s_per_token": lat.decode_s_per_token,
            "energy_j_per_token": lat.energy_j_per_token, "bits_per_weight": cost.bits_per_weight(plan, s.arch),
            "sparsity": _mean_sparsity(plan, s.arch), "params": cost.structured(plan, s.arch)[1].total_params,
            "worker": self.worker, "distill_steps": plan.student.distillation.steps, "train_seconds": 0.0,
        }
        trial.set_constraint("memory_over_budget_bytes", m.total - estimate.budget_bytes)
        if not estimate.fits:
            attrs["status"] = "over_budget"
        else:
            # Written before measuring, so other processes see which plan this trial is measuring.
            trial.set_user_attr("plan_key", attrs["plan_key"])
            self._reuse_or_skip(trial, attrs)
            if attrs.get("status") != "duplicate":
                attrs.update(self._measure_with_fidelity(trial, plan, attrs), status="evaluated")
        if self.max_kl is not None:
            trial.set_constraint(KL_CONSTRAINT, attrs["kl"] - self.max_kl if "kl" in attrs else 0.0)
        # What the trial freed (a student it loaded or trained, a cut's tensors, the measurement's temporaries) would
        # stay in glibc's heap: resident memory crept 1,180 -> 1,362 MB over 30 trials without a student when only
        # trials with one were trimmed. Trimmed after every trial, inside its seconds (`trim_seconds`).
        trimmed = time.perf_counter()
        host.release_freed_memory()
        attrs["trim_seconds"] = time.perf_counter() - trimmed
        attrs["seconds"] = time.perf_counter() - started
        # This process's memory after the trial (it should not grow over a long sweep), the trial's own peak, and
        # the process's peak so far.
        attrs["rss_bytes"] = host.resident_bytes()
        peak = host.resident_bytes(peak=True)
        if own_peak and peak is not None:
            attrs["trial_peak_rss_bytes"] = peak
        self.process_peak = max(self.process_peak, peak or 0)
        attrs["peak_rss_bytes"] = self.process_peak or None
        for key, value in attrs.items():
            if value is not None:
                trial.set_user_attr(key, value)
        return objectives_mod.values(s.objectives, attrs)

    def _measure(self, plan: Any, trial: optuna.Trial, attrs: dict[str, Any]) -> dict[str, Any]:
        """Apply the plan (training its student if it distills one) and measure it, cheap before dear: KL and
        perplexity on the first SLICE_SHARE of the evaluation windows; a plan far behind the front there (a
        measured trial at no higher cost beats it by SLICE_MARGIN) stops at ``stage: kl_slice``; the others are
        measured on every window (``stage: kl``), and lm-eval accuracy runs only for a plan that is then on the
        front of the measured trials (``stage: accuracy``). Seconds per stage in ``stage_seconds``."""
        clock = time.perf_counter()
        seconds: dict[str, float] = {}

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[stage] = seconds.get(stage, 0.0) + now - clock
            clock = now

        misses = self.layer_cache.misses if self.layer_cache is not None else 0
        with self.applied(plan) as model:
            lap("apply")
            measured = self._measure_applied(model, plan, trial, attrs, lap)
        lap("restore")
        measured.update(stage_seconds={k: round(v, 3) for k, v in seconds.items()})
        if self.layer_cache is not None:  # layers solved now (GPTQ, SparseGPT): 0 when the cache was warm for it
            measured["layer_cache_misses"] = self.layer_cache.misses - misses
        return measured

    def applied(self, plan: Any) -> Any:
        """The teacher with the plan applied from the warm caches (calibration, layers, importance, students), as
        a context manager that restores the teacher's own weights on exit."""
        from llmtailor.compression import originals

        return originals.applied(plan, self.teacher.model, self.setup.arch, self.originals, calibration=self.calibration,
                                 cache=self.layer_cache, importance=self.importance, students=self.students)

    def _measure_applied(self, model: Any, plan: Any, trial: optuna.Trial, attrs: dict[str, Any],
                         lap: Any) -> dict[str, Any]:
        """The stages after the plan is applied (see ``_measure``)."""
        first = slice_windows(self.setup.config.eval_windows)
        parts = {source: [quality.measure(model, reference, slice(0, first))]
                 for source, reference in self.references.items()}
        measured = self._quality(parts, plan)
        lap("kl_slice")
        stage, behind = "kl_slice", None
        if self.setup.config.stop_early and any(len(r.input_ids) > first for r in self.references.values()):
            behind = self._stop_reason(trial, {**attrs, **measured}, SLICE_MARGIN)
        if behind is None:
            for source, reference in self.references.items():
                if len(reference.input_ids) > first:
                    parts[source].append(quality.measure(model, reference, slice(first, None)))
            measured, stage = self._quality(parts, plan), "kl"
            lap("kl")
            if self.tasks and self._within_floor(measured) and self._on_front(
                    trial, objectives_mod.values(self.setup.objectives, {**attrs, **measured})):
                measured.update(self._accuracy(model))
                stage = "accuracy"
                lap("accuracy")
        measured["stage"] = stage
        return {**measured, **(behind or {})}

    def _accuracy(self, model: Any) -> dict[str, Any]:
        """Task accuracy (the mean over tasks) with its 95% half-width, and the difference to the teacher on the same
        items with the paired half-width, which separates plans that one accuracy's interval cannot."""
        scores = lm_tasks.item_scores(model, self.teacher.tokenizer, self.tasks)
        measured = lm_tasks.accuracy_summary(scores)
        ours = [x for name in sorted(scores) for x in scores[name]]
        theirs = [x for name in sorted(scores) for x in self.teacher_items.get(name, [])]
        if len(ours) == len(theirs):
            gap, half_width = lm_tasks.paired_difference(ours, theirs)
            measured.update(accuracy_vs_teacher=gap, accuracy_vs_teacher_ci95=half_width)
        return measured

    def _quality(self, parts: dict[str, list], plan: Any) -> dict[str, Any]:
        """KL and perplexity (the named text's, or the mean over the texts) from measured window slices."""
        by_text = {source: quality.combined(qs) for source, qs in parts.items()}
        measured = quality_figures(by_text, self.setup.config.quality_text)
        if plan.student.distillation.steps:
            record = self.students.last
            measured.update(distill_steps=record.steps, train_seconds=record.seconds, train_loss=record.losses[-1],
                            train_seconds_spent=record.seconds if record.trained_now else 0.0)
        return measured

    def _on_front(self, trial: optuna.Trial, values: list[float]) -> bool:
        """Whether no measured trial dominates these values on the objectives other than accuracy."""
        from llmtailor.search.pareto import _dominates  # pareto imports this module

        objectives = self.setup.objectives
        kept = [i for i, o in enumerate(objectives) if o.name != "accuracy"]
        signs = [1.0 if objectives[i].direction == "minimize" else -1.0 for i in kept]
        ours = [values[i] for i in kept]
        return not any(_dominates([theirs[i] for i in kept], ours, signs) for _, theirs in _measured_values(trial))

    def _measure_with_fidelity(self, trial: optuna.Trial, plan: Any, attrs: dict[str, Any]) -> dict[str, Any]:
        """Measure the plan; a student not yet trained is first trained for a fraction of its budget and stops
        there when it is far behind the front (FIDELITY_DIVISOR, FIDELITY_MARGIN): the trial then records the
        shorter plan it measured (``plan``, ``distill_steps``) and ``fidelity: short``."""
        recipe = plan.student.distillation
        if not recipe.steps:
            return self._measure(plan, trial, attrs)
        spent = 0.0
        short_steps = max(1, recipe.steps // FIDELITY_DIVISOR)
        if self.setup.config.stop_early and short_steps < recipe.steps and not self.students.has(plan, self.setup.arch):
            short = dataclasses.replace(plan, student=dataclasses.replace(
                plan.student, distillation=dataclasses.replace(recipe, steps=short_steps)))
            measured = self._measure(short, trial, attrs)
            spent = measured["train_seconds_spent"]
            behind = self._stop_reason(trial, {**attrs, **measured}, FIDELITY_MARGIN)
            if behind is not None:
                return {**measured, "fidelity": "short", "plan": short.to_json(), **behind}
        measured = self._measure(plan, trial, attrs)
        return {**measured, "fidelity": "full", "train_seconds_spent": spent + measured["train_seconds_spent"]}

    def _within_floor(self, measured: dict[str, Any], margin: float = 0.0) -> bool:
        return self.max_kl is None or measured["kl"] <= self.max_kl * (1 + margin)

    def _stop_reason(self, trial: optuna.Trial, measured: dict[str, Any], margin: float) -> dict[str, Any] | None:
        """Why a cheaply measured plan need not be measured further: ``stopped_by`` a measured trial far ahead of it,
        or ``stopped_over_floor`` (its KL is beyond the quality floor by the margin); None: measure it in full."""
        ahead = self._far_behind(trial, objectives_mod.values(self.setup.objectives, measured), margin)
        if ahead is not None:
            return {"stopped_by": ahead}
        if not self._within_floor(measured, margin):
            return {"stopped_over_floor": self.max_kl}
        return None

    def _far_behind(self, trial: optuna.Trial, values: list[float], margin: float) -> int | None:
        """The number of a measured trial at no higher predicted cost that beats `values` by `margin` on every
        measured objective to minimize (and is no worse on the others), or None. Trials stopped early count too:
        their values are real measurements of a real plan."""
        objectives = self.setup.objectives
        for number, measured in _measured_values(trial):
            if all(_beats(o, theirs, ours, margin) for o, theirs, ours in zip(objectives, measured, values,
                                                                              strict=True)):
                return number
        return None

    def _reuse_or_skip(self, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
        """Copy the result of an earlier measurement of the same plan, or skip a plan that need not be measured.

        Of trials holding the same plan, the one with the lowest number measures it (its plan key is written
        before this check). So that a trial cannot miss a lower-numbered twin whose key is not written yet, it
        first waits (up to KEY_WAIT_S) for every lower-numbered trial that started running within KEY_WAIT_S to
        write its key or finish; a twin numbered higher and still running (an enqueued trial popped after a
        sampled one had checked) is waited for (up to TWIN_WAIT_S) and its result copied. A storage that could
        claim a key atomically would need none of this; Optuna's storages write attributes last-writer-wins."""
        total = self.setup.config.trials
        waited = time.monotonic()
        while True:
            others = [t for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, RUNNING))
                      if t.number != trial.number]
            twins = [t for t in others if t.user_attrs.get("plan_key") == attrs["plan_key"]]
            for twin in twins:
                if twin.state == optuna.trial.TrialState.COMPLETE and status(twin) == "evaluated":
                    if self.setup.config.sampler in BREEDS_A_POPULATION:
                        trial.set_user_attr("duplicate_of", twin.number)
                        self._skip(trial, f"the same plan as trial {twin.number}: a generation holds distinct plans",
                                   "duplicate")
                    attrs.update({k: twin.user_attrs[k] for k in twin.user_attrs
                                  if k in MEASURED_ATTRS or k.startswith("accuracy_")})
                    attrs.update(status="duplicate", duplicate_of=twin.number)
                    return
                if twin.state == optuna.trial.TrialState.FAIL and status(twin) == "failed":
                    trial.set_user_attr("duplicate_of", twin.number)
                    raise RepeatedFailure(f"the same plan as trial {twin.number}, which failed: {twin.user_attrs['fail_reason']}")
            running = [t for t in twins if t.state == RUNNING]
            if any(t.number < trial.number for t in running):
                self._skip(trial, f"the same plan is being measured by trial {min(t.number for t in running)}")
            if sum(1 for t in others if _counts(t)) >= total:
                self.stop = True
                self._skip(trial, f"the study reached the asked {total} measured trials")
            spent = time.monotonic() - waited
            unwritten = spent < KEY_WAIT_S and any(_may_be_writing_its_key(t, trial.number) for t in others)
            if not unwritten and not (running and spent < TWIN_WAIT_S):
                return
            time.sleep(TWIN_POLL_S)  # (the heartbeat thread keeps beating meanwhile)

    @staticmethod
    def _skip(trial: optuna.Trial, reason: str, why: str = "skipped") -> None:
        trial.set_user_attr("status", why)
        trial.set_user_attr("skip_reason", reason)
        raise optuna.TrialPruned(reason)


def quality_figures(by_text: dict[str, quality.Quality], named: str | None) -> dict[str, Any]:
    """KL and perplexity of the `named` text, or their mean over the texts, the tokens measured, and (several texts)
    each text's: what a trial records, and what an export measures again."""
    kl = by_text[named].kl if named else sum(q.kl for q in by_text.values()) / len(by_text)
    perplexity = by_text[named].perplexity if named else sum(q.perplexity for q in by_text.values()) / len(by_text)
    measured = {"kl": kl, "perplexity": perplexity, "eval_tokens": sum(q.tokens for q in by_text.values())}
    if len(by_text) > 1:
        measured["kl_by_text"] = {source: q.kl for source, q in by_text.items()}
        measured["perplexity_by_text"] = {source: q.perplexity for source, q in by_text.items()}
    return measured


class DiskFull(UserError):
    """A trial ran out of disk space (a cache entry, a student, the study itself): the sweep stops, resumable."""


def _may_be_writing_its_key(other: optuna.trial.FrozenTrial, number: int) -> bool:
    """Whether a trial numbered below `number` runs and has not written its plan key yet, having started recently
    enough that it is still choosing its plan (an older one without a key is over budget, or its worker died)."""
    if other.number >= number or other.state != RUNNING or "plan_key" in other.user_attrs:
        return False
    started = other.datetime_start  # (Optuna writes the local clock of the trial's worker)
    return started is not None and abs((datetime.datetime.now() - started).total_seconds()) < KEY_WAIT_S


def _disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is the disk running out of space; safetensors and the storage's driver wrap
    the OS error in exceptions of their own, so their message is read too. A full disk in the thirteenth session's
    grid failed 128 trials in a row in seconds (the study could not even record why) before the sweep's limit."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _measured_values(trial: optuna.Trial) -> Iterator[tuple[int, list[float]]]:
    """(number, objective values) of every measured trial of the study so far (duplicates copy a measurement)."""
    for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if status(other) in ("evaluated", "duplicate") and other.values is not None:
            yield other.number, other.values


def _beats(objective: Objective, theirs: float, ours: float, margin: float) -> bool:
    """Whether a value is at least as good as ours, by `margin` (relative) for measured objectives to minimize."""
    if objective.direction == "maximize":
        return theirs >= ours
    return theirs * (1 + margin) <= ours if objective.measured else theirs <= ours


def _mean_sparsity(plan: Any, arch: Architecture) -> float:
    params = sum(lin.params for lin in arch.linears)
    return sum(plan.sparsity_of(lin.name).ratio * lin.params for lin in arch.linears) / params


def run(setup: Setup, *, progress: bool = True, log: Any = None) -> optuna.Study:
    """Run the study until it holds the asked number of measured trials; resumable.

    ``--trials`` counts plans that were measured (or failed), because a plan over
    budget costs milliseconds: a study keeps sampling until that many plans that fit
    were evaluated, or until it has rejected MAX_REJECTIONS_PER_TRIAL times as many.
    A new study is created only once the teacher, the text and the tasks have loaded,
    so a run that fails before its first trial leaves no study behind.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    total = setup.config.trials
    study = _load_existing(setup)
    if study is not None:
        _check_made_for(setup, study)
        optuna.storages.fail_stale_trials(study)
        done = measured(study)
        if done >= total:
            log(f"study {setup.study_name} already has {done} measured trials (asked {total})")
            return study
    evaluator = TrialEvaluator(setup, log, progress)
    # What this run creates, so that a failure before the first trial can remove it again.
    database = storage_mod.local_file(setup.storage_url)
    new_paths = [p for p in (files.first_missing(setup.results_path), files.first_missing(database)) if p is not None]
    created_study = False
    if study is None:
        study, created_study = _create(setup)
    try:
        study = _optimize(study, evaluator, setup, progress, log, created_study)
        cache = evaluator.layer_cache
        if cache is not None and cache.hits + cache.misses:
            log(f"per-layer cache: {cache.hits} of {cache.hits + cache.misses} layers read from it "
                f"({cache.hit_rate:.0%}), {format_size(cache.size_bytes())} on disk in {cache.root}"
                + (f" (bound {format_size(cache.max_bytes)}: {cache.evicted} least recently read deleted)"
                   if cache.evicted else ""))
        return study
    except BaseException:
        if created_study:
            _remove_if_untouched(study, setup, new_paths)
        raise


def slice_windows(eval_windows: int) -> int:
    """How many of the evaluation windows, from the first, make the slice a plan is measured on first."""
    return max(1, eval_windows // SLICE_SHARE)


def quality_floor(made_for: dict[str, Any]) -> float | None:
    """A study's quality floor in nats/token of KL, from its fingerprint; None where it has none
    (``--max-kl none``, or a study made before the floor existed, which resumes without one)."""
    return made_for.get("max_kl")


def _optimize(study: optuna.Study, evaluator: TrialEvaluator, setup: Setup, progress: bool, log: Any,
              created: bool) -> optuna.Study:
    from tqdm.auto import tqdm

    total = setup.config.trials
    seed = process_seed(setup.config.seed, len(study.trials), created)
    study.sampler = SAMPLERS[setup.config.sampler](seed)
    evaluator.max_kl = quality_floor(study.user_attrs[STUDY_ATTR])
    done = measured(study)
    bar = tqdm(total=total, initial=done, desc="measured plans", unit="plan", disable=not progress, file=sys.stderr)
    limit = len(study.trials) + MAX_REJECTIONS_PER_TRIAL * total
    bounds = hypervolume.fixed_reference(study, setup.objectives, setup.arch, setup.profile, setup.config.workload,
                                         evaluator.max_kl)

    def stop_when_done(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal done
        # Recount from storage (other processes may share the study) only after a measured trial:
        # a rejection takes milliseconds, and reading every trial after each would dominate it.
        if status(trial) in COUNTED:
            finished = study_.get_trials(deepcopy=False, states=FINISHED)
            done = sum(1 for t in finished if _counts(t))
            hypervolume.record(study_, trial.number, done, finished, setup.objectives, bounds)
        elif status(trial) == "skipped":
            done = measured(study_)
        bar.n = done
        bar.set_postfix_str(f"{trial.number + 1} sampled")
        if done >= total or evaluator.stop or trial.number + 1 >= limit or evaluator.interrupts.held:
            study_.stop()

    # Everything made so far (the teacher, its references, the statistics) lives as long as the sweep: frozen, it is
    # left out of the collection Optuna runs after each trial, which walked the whole teacher (0.28 s a trial).
    gc.collect()
    gc.freeze()
    try:
        with evaluator.interrupts.installed():
            _optimize_until_done(study, evaluator, stop_when_done)
    finally:
        gc.unfreeze()
        bar.close()
    if evaluator.fatal is not None:
        raise evaluator.fatal
    done = measured(study)
    if done < total:
        log(f"only {done} of {len(study.trials)} sampled plans were measured (the rest were over budget or "
            "repeated plans); stopped sampling")
    return study


def _optimize_until_done(study: optuna.Study, evaluator: TrialEvaluator, stop_when_done: Any) -> None:
    """Optuna's optimize, gone on with after another process's claim of the same enqueued trial; a Ctrl-C held
    between two trials is raised here, once Optuna has stopped."""
    total = evaluator.setup.config.trials
    while True:
        try:
            study.optimize(evaluator, catch=(Exception,), callbacks=[stop_when_done], gc_after_trial=True)
            break
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as exc:
            # SQLite has no row locks, so two processes can claim the same enqueued trial; the one that
            # finishes second cannot record it ("Cannot tell a COMPLETE trial"). Its result is already in
            # the study: go on with the next trial.
            if "Cannot tell a" not in str(exc) and not isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                raise
            done = measured(study)
            if done >= total or evaluator.stop:
                break
        except UnboundLocalError as exc:
            # Optuna 5.0's _run_trial turns a second Ctrl-C (the first is held to the trial boundary) while it
            # records a finished trial into this (its `finally` reads a result the interrupted call never set):
            # give the interrupt back. The trial, if left RUNNING, is failed by heartbeat and redone.
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise
    evaluator.interrupts.raise_if_held()  # (only after a normal stop: an error on the way out is not masked)


def _remove_if_untouched(study: optuna.Study, setup: Setup, new_paths: list[Path]) -> None:
    """Delete the study this run created if the run failed before any trial ran (so the same command can start over)."""
    if any(t.state != optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        return
    optuna.delete_study(study_name=setup.study_name, storage=storage_mod.open_storage(setup.storage_url))
    for path in new_paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
