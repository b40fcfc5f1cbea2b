"""Shared and resumed studies lose and repeat nothing; faults are recorded and the sweep goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from llmtailor import cli
from llmtailor.search import storage as storage_mod
from llmtailor.search import study as study_mod

FAST = ["--context", "256", "--prompt", "64", "--eval-windows", "2", "--window-tokens", "64", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]


def argv(model_dir, results, study, trials, *extra):
    return ["sweep", str(model_dir), "--memory", "500kB", "--trials", str(trials), "--study", study,
            "--results", str(results), "--tasks", "none", "--space", "coarse", *FAST, *extra]


def setup_for(args: list[str]) -> study_mod.Setup:
    return study_mod.prepare(cli._config(cli.build_parser().parse_args(args)))


def run(args: list[str]) -> optuna.Study:
    return study_mod.run(setup_for(args), progress=False, log=lambda m: None)


def evaluated_keys(study: optuna.Study) -> list[str]:
    return [t.user_attrs["plan_key"] for t in study.trials if study_mod.status(t) == "evaluated"]


def sampled_params(study: optuna.Study) -> list[dict]:
    """Parameters of the trials the sampler drew (not the enqueued baselines)."""
    return [t.params for t in study.trials if "fixed_params" not in t.system_attrs]


def worker_process(args: list[str], prelude: str = "") -> subprocess.Popen:
    code = textwrap.dedent(prelude) + "\nimport sys\nfrom llmtailor import cli\nsys.exit(cli.main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_share_a_study_without_repeating_plans_or_overshooting(backend, tiny_model_dir, tmp_path, request):
    total, workers = 24, 3
    extra = []
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        extra = ["--storage", url]
    else:
        extra = ["--storage", f"sqlite:///{tmp_path / 'shared.db'}"]
    name = f"shared-{backend}-{time.time_ns()}"
    # Each worker imports everything, then waits for the others, and each measurement takes at least 0.2 s: so the
    # workers really overlap, instead of the quickest to start measuring the whole study alone.
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    together = f"""
        import os, pathlib, time
        import torch, transformers, optuna, lm_eval
        from llmtailor.search import study
        from llmtailor.evaluators import quality
        barrier = pathlib.Path({str(barrier)!r})
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < {workers}:
            time.sleep(0.05)
        real = quality.measure
        def measure(model, reference, windows=slice(None)):
            time.sleep(0.2)
            return real(model, reference, windows)
        quality.measure = measure
    """
    procs = [worker_process(argv(tiny_model_dir, tmp_path / "results", name, total, *extra), together)
             for _ in range(workers)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    study = optuna.load_study(study_name=name, storage=storage_mod.open_storage(extra[1]))
    keys = evaluated_keys(study)
    assert len(keys) == len(set(keys)), "a plan was measured twice"
    done = study_mod.measured(study)
    assert total <= done <= total + workers - 1, done
    measured_by = {t.user_attrs["worker"] for t in study.trials if study_mod.status(t) == "evaluated"}
    assert len(measured_by) >= 2, "the workers did not share the study"
    draws = {}
    for t in study.trials:
        if "fixed_params" not in t.system_attrs:
            draws.setdefault(t.user_attrs.get("worker"), []).append(tuple(sorted(t.params.items())))
    firsts = [d[:3] for d in draws.values() if len(d) >= 3]
    assert len(firsts) == len(set(map(tuple, firsts))), "two workers drew the same plans"


def test_a_new_study_run_by_one_process_draws_the_same_plans_for_the_same_seed(tiny_model_dir, tmp_path):
    # The creator samples with --seed itself, so that two runs differing in one option are paired draw for draw;
    # only processes that join or resume a study mix in who they are (the workers' test above, the resumed run's below).
    # Each run in its own process: a seed mixed with the process id would differ between them.
    draws = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        process = worker_process(argv(tiny_model_dir, tmp_path / name, name, 12, "--seed", seed))
        assert process.wait(timeout=300) == 0, process.stderr.read()
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / name / 'study.db'}")
        draws[name] = sampled_params(study)
    assert len(draws["a"]) >= 3 and draws["a"] == draws["b"]
    assert draws["c"][:3] != draws["a"][:3]


def test_a_resumed_run_draws_new_plans_and_reuses_measured_ones(tiny_model_dir, tmp_path):
    first = run(argv(tiny_model_dir, tmp_path, "resume", 10))
    first_draws = sampled_params(first)
    study = run(argv(tiny_model_dir, tmp_path, "resume", 20))
    second_draws = sampled_params(study)[len(first_draws):]
    assert second_draws[:3] != first_draws[:3], "the resumed run replayed the first run's draws"
    keys = evaluated_keys(study)
    assert len(keys) == len(set(keys)) and study_mod.measured(study) == 20

    # A plan the study has measured is not measured again: its result is copied, and it does not count.
    twin = next(t for t in study.trials if study_mod.status(t) == "evaluated" and "fixed_params" not in t.system_attrs)
    study.enqueue_trial(twin.params)
    study = run(argv(tiny_model_dir, tmp_path, "resume", 21))
    copies = [t for t in study.trials if t.user_attrs.get("duplicate_of") == twin.number]
    assert copies and study_mod.status(copies[0]) == "duplicate"
    assert copies[0].values == twin.values and copies[0].user_attrs["kl"] == twin.user_attrs["kl"]
    assert study_mod.measured(study) == 21


def test_under_nsga2_a_repeated_plan_is_pruned_so_a_generation_holds_distinct_plans(tiny_model_dir, tmp_path):
    study = run(argv(tiny_model_dir, tmp_path, "nsga", 8, "--sampler", "nsga2"))
    twin = next(t for t in study.trials if study_mod.status(t) == "evaluated")
    study.enqueue_trial(twin.params)
    study = run(argv(tiny_model_dir, tmp_path, "nsga", 9, "--sampler", "nsga2"))
    copies = [t for t in study.trials if t.user_attrs.get("duplicate_of") == twin.number]
    assert copies and all(study_mod.status(c) == "duplicate" for c in copies)
    assert all(c.state == optuna.trial.TrialState.PRUNED and c.values is None for c in copies)
    # Optuna's NSGA-II breeds from COMPLETE trials: no plan is in them twice, and the total is still reached.
    complete = [t.user_attrs["plan_key"] for t in study.trials
                if t.state == optuna.trial.TrialState.COMPLETE and "plan_key" in t.user_attrs]
    assert len(complete) == len(set(complete))
    assert study_mod.measured(study) == 9


def test_a_killed_process_leaves_a_trial_failed_with_its_reason(tiny_model_dir, tmp_path, monkeypatch):
    args = argv(tiny_model_dir, tmp_path, "killed", 6)
    dies_on_third_measurement = """
        import os, signal
        from llmtailor.search import storage
        from llmtailor.evaluators import quality
        storage.HEARTBEAT_INTERVAL_S = 1
        real, calls = quality.measure, []
        def measure(model, reference, windows=slice(None)):
            if windows.start in (None, 0):  # once a trial (a trial measures a first slice, then the rest)
                calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(model, reference, windows)
        quality.measure = measure
    """
    proc = worker_process(args, dies_on_third_measurement)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    monkeypatch.setattr(storage_mod, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(storage_mod, "STALE_AFTER_S", 2)
    time.sleep(3)
    study = run(args)
    died = [t for t in study.trials if study_mod.status(t) == "died"]
    assert len(died) == 1 and died[0].state == optuna.trial.TrialState.FAIL
    assert died[0].user_attrs["fail_reason"].startswith("process died: no heartbeat for over 2 s")
    assert study_mod.measured(study) == 6


def _nan_model(apply, *args, **kwargs):
    import torch

    model = apply(*args, **kwargs)
    norm = model.model.norm  # a new parameter: the search's model shares the ones it leaves alone with the teacher
    norm.weight = torch.nn.Parameter(torch.full_like(norm.weight, float("nan")))
    return model


def _raises(apply, *args, **kwargs):
    raise RuntimeError("a method broke")


def _out_of_memory(apply, *args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("fault, reason", [(_nan_model, "not finite"), (_raises, "RuntimeError: a method broke"),
                                           (_out_of_memory, "OutOfMemoryError: CUDA out of memory")],
                         ids=["nan", "exception", "out-of-memory"])
def test_a_fault_in_a_trial_is_recorded_and_the_sweep_goes_on(fault, reason, tiny_model_dir, tmp_path, monkeypatch):
    from llmtailor import compression

    real, calls = compression.apply, []

    def once(*args, **kwargs):
        calls.append(1)
        return fault(real, *args, **kwargs) if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(compression, "apply", once)
    study = run(argv(tiny_model_dir, tmp_path, "faults", 4))
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and reason in failed[0].user_attrs["fail_reason"]
    assert study_mod.status(failed[0]) == "failed"
    assert study_mod.measured(study) == 4 and sum(study_mod.status(t) == "evaluated" for t in study.trials) == 3


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("finished")
    code = cli.main(["fit", str(tiny_model_dir), "--memory", "500kB", "--trials", "4", "--study", "done",
                     "--results", str(results), "--tasks", "none", *FAST])
    assert code == 0
    return results / "done"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != "study.db"}


@pytest.mark.parametrize("breaks", ["plans", "front.csv", "report.html"])
def test_a_crash_while_writing_results_leaves_the_previous_files_intact(breaks, finished, monkeypatch):
    from llmtailor import files, report

    before = _snapshot(finished)
    study = optuna.load_study(study_name="done", storage=f"sqlite:///{finished / 'study.db'}")
    real_fdopen = os.fdopen

    class DiskFull:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            raise OSError(28, "No space left on device")

    def fdopen(fd, *a, **k):
        handle = real_fdopen(fd, *a, **k)
        path = os.readlink(f"/proc/self/fd/{fd}")
        hit = f"/.{breaks}." in path  # the staging file (or, for plans, the staging folder) beside the target
        return DiskFull(handle) if hit else handle

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    with pytest.raises(OSError, match="No space left"):
        report.write(study, finished)
    monkeypatch.undo()
    after = _snapshot(finished)
    assert {k: v for k, v in after.items() if k in before} == before, "a previous result file changed"
    assert not [p for p in finished.rglob(".*") if p.name != "study.db"], "temporary files were left behind"


def test_a_cached_file_is_made_once_and_made_again_when_damaged(tmp_path):
    from llmtailor import files

    made = []

    def make() -> dict:
        made.append(1)
        return {"value": len(made)}

    def load() -> dict:
        return files.load_or_make(tmp_path / "cache" / "entry.json", lambda p: json.loads(p.read_text()), make,
                                  lambda value, p: files.write_text(p, json.dumps(value)))

    assert load() == {"value": 1} and load() == {"value": 1} and len(made) == 1  # the second call reads the file
    (tmp_path / "cache" / "entry.json").write_text('{"val')  # a half-written file
    assert load() == {"value": 2} and json.loads((tmp_path / "cache" / "entry.json").read_text()) == {"value": 2}
    assert files.load_or_make(tmp_path / "other.json", lambda p: "read back", lambda: "made",
                              lambda value, p: files.write_text(p, value), reread=True) == "read back"


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_result_files_honor_the_umask(mask, file_mode, folder_mode, finished):
    from llmtailor import report

    study = optuna.load_study(study_name="done", storage=f"sqlite:///{finished / 'study.db'}")
    old = os.umask(mask)
    try:
        report.write(study, finished)
    finally:
        os.umask(old)
    for name in ("front.csv", "trials.csv", "report.html"):
        assert (finished / name).stat().st_mode & 0o777 == file_mode, name
    assert (finished / "plans").stat().st_mode & 0o777 == folder_mode
    for plan in (finished / "plans").iterdir():
        assert plan.stat().st_mode & 0o777 == file_mode


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_cache_files_written_by_safetensors_honor_the_umask(mask, file_mode, folder_mode, tmp_path):
    # safetensors 0.8 replaces the staged file with a 0600 one of its own: the layer, calibration and student caches
    # are shared by the workers of other users, so the mode is set again after it saved
    import torch
    from safetensors.torch import save_file

    from llmtailor import files

    old = os.umask(mask)
    try:
        files.write_with(tmp_path / "layer.safetensors", lambda staging: save_file({"w": torch.ones(2)}, staging))
        (tmp_path / "folder" / "inner").mkdir(parents=True)
        save_file({"w": torch.ones(2)}, tmp_path / "folder" / "inner" / "model.safetensors")
        files.usual_modes(tmp_path / "folder")
    finally:
        os.umask(old)
    assert (tmp_path / "layer.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "folder" / "inner" / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "folder" / "inner").stat().st_mode & 0o777 == folder_mode


def test_a_run_that_fails_before_its_first_trial_leaves_no_study_behind(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from llmtailor.errors import UserError

    args = argv(tiny_model_dir, tmp_path / "results", "first", 2)

    def unloadable(*a, **k):
        raise UserError("could not load model: simulated failure while loading the weights")

    monkeypatch.setattr(study_mod.models, "load", unloadable)
    assert cli.main(args) == 2
    assert not (tmp_path / "results").exists()

    # A failure after the study was created, before any trial ran, removes it too.
    monkeypatch.undo()

    def broken(*a, **k):
        raise RuntimeError("the storage went away")

    monkeypatch.setattr(study_mod, "_optimize", broken)
    with pytest.raises(RuntimeError):
        run(args)
    assert not (tmp_path / "results").exists()

    monkeypatch.undo()
    assert cli.main(args) == 0, capsys.readouterr().err  # the corrected command is not refused
    assert study_mod.measured(run(args)) == 2


def test_a_worker_that_finds_the_study_just_created_waits_for_its_creator_instead_of_enqueuing_baselines_too(
        tiny_model_dir, tmp_path, monkeypatch):
    setup = setup_for(argv(tiny_model_dir, tmp_path / "results", "raced", 4))
    storage_mod.local_file(setup.storage_url).parent.mkdir(parents=True)
    storage = storage_mod.open_storage(setup.storage_url)
    directions = [o.direction for o in setup.objectives]
    optuna.create_study(study_name="raced", storage=storage, directions=directions)  # made, not yet fingerprinted
    baselines = setup.space.baselines(setup.arch)
    slept = []

    def creator_finishes(seconds):  # while this worker waits, the creator writes its fingerprint and baselines
        if not slept:
            made = optuna.load_study(study_name="raced", storage=storage)
            made.set_user_attr(study_mod.STUDY_ATTR, setup.fingerprint())
            for params in baselines:
                made.enqueue_trial(params)
        slept.append(seconds)

    monkeypatch.setattr(study_mod.time, "sleep", creator_finishes)
    study, made = study_mod._create(setup)
    assert not made and slept and len(study.trials) == len(baselines) > 0


def _checker(trials: int = 10) -> study_mod.TrialEvaluator:
    """A TrialEvaluator holding only what _reuse_or_skip reads (the twin checks need no model)."""
    from types import SimpleNamespace

    evaluator = study_mod.TrialEvaluator.__new__(study_mod.TrialEvaluator)
    evaluator.setup = SimpleNamespace(config=SimpleNamespace(trials=trials, sampler="tpe"))
    evaluator.stop = False
    return evaluator


def test_a_trial_waits_for_a_lower_numbered_trial_still_choosing_its_plan_and_leaves_the_plan_to_it(monkeypatch):
    """The race two workers had: trial 1 checked for twins before trial 0, which drew the same plan, had written
    its key, so both measured it. Now trial 1 waits for trial 0's key, sees the twin, and skips."""
    study = optuna.create_study()
    lower, higher = study.ask(), study.ask()  # both running; the lower one has not written its plan key yet
    higher.set_user_attr("plan_key", "same")
    slept = []

    def lower_writes_its_key(seconds):
        if not slept:
            lower.set_user_attr("plan_key", "same")
        slept.append(seconds)

    monkeypatch.setattr(study_mod.time, "sleep", lower_writes_its_key)
    with pytest.raises(optuna.TrialPruned, match="being measured by trial 0"):
        _checker()._reuse_or_skip(higher, {"plan_key": "same"})
    assert slept and higher.study.trials[1].user_attrs["status"] == "skipped"


def test_a_trial_does_not_wait_for_a_keyless_trial_that_started_long_ago(monkeypatch):
    """A running trial with no key that started more than KEY_WAIT_S ago is over budget or its worker died."""
    import datetime

    study = optuna.create_study()
    study.add_trial(optuna.trial.FrozenTrial(
        number=0, state=optuna.trial.TrialState.RUNNING, value=None, params={}, distributions={}, user_attrs={},
        system_attrs={}, intermediate_values={}, trial_id=0, datetime_complete=None,
        datetime_start=datetime.datetime.now() - datetime.timedelta(seconds=study_mod.KEY_WAIT_S + 5)))
    trial = study.ask()
    trial.set_user_attr("plan_key", "alone")
    monkeypatch.setattr(study_mod.time, "sleep", lambda s: pytest.fail("waited for a dead trial"))
    attrs = {"plan_key": "alone"}
    _checker()._reuse_or_skip(trial, attrs)  # returns: measure it
    assert "status" not in attrs


def test_the_lowest_numbered_twin_waits_for_a_higher_one_already_measuring_and_copies_its_result(monkeypatch):
    """An enqueued trial popped after a sampled trial with the same plan had checked and begun measuring: the
    enqueued one (lower number) waits for that measurement and copies it instead of measuring the plan again."""
    study = optuna.create_study()
    lower, higher = study.ask(), study.ask()
    higher.set_user_attr("plan_key", "same")
    lower.set_user_attr("plan_key", "same")
    slept = []

    def higher_finishes(seconds):
        if not slept:
            for key, value in {"status": "evaluated", "kl": 0.25, "perplexity": 9.0, "eval_tokens": 128}.items():
                higher.set_user_attr(key, value)
            study.tell(higher, 1.0)
        slept.append(seconds)

    monkeypatch.setattr(study_mod.time, "sleep", higher_finishes)
    attrs = {"plan_key": "same"}
    _checker()._reuse_or_skip(lower, attrs)
    assert slept and attrs["status"] == "duplicate" and attrs["duplicate_of"] == 1 and attrs["kl"] == 0.25
