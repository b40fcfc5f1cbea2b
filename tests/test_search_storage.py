"""Journal storage, --workers, the front as data and the hypervolume history."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from bad_inputs import run_case

from llmtailor import cli, search
from llmtailor.errors import UserError
from llmtailor.search import hypervolume, pareto
from llmtailor.search import storage as storage_mod
from llmtailor.search import study as study_mod

FAST = ["--context", "256", "--prompt", "64", "--eval-windows", "2", "--window-tokens", "64", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]


def argv(model_dir, results, study, trials, *extra):
    return ["sweep", str(model_dir), "--memory", "500kB", "--trials", str(trials), "--study", study,
            "--results", str(results), "--tasks", "none", "--space", "coarse", *FAST, *extra]


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_mod.open_storage(url))


def workers_of(url: str, name: str) -> set[str]:
    """The processes (host:pid) that have finished a trial of the study so far."""
    if not storage_mod.journal_path(url).is_file() or name not in optuna.get_all_study_names(
            storage_mod.open_storage(url)):
        return set()
    return {t.user_attrs["worker"] for t in load(url, name).trials if "worker" in t.user_attrs}


def wait_for(condition, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_workers(tiny_model_dir, tmp_path_factory):
    """A sweep of 12 measured plans by `--workers 2` on a journal file: (exit code, study, journal URL)."""
    from llmtailor.evaluators import quality

    folder = tmp_path_factory.mktemp("two-workers")
    url = f"journal://{folder / 'journal' / 'study.log'}"
    me = f"{socket.gethostname()}:{os.getpid()}"
    real = quality.measure

    def measure_once_the_child_measures(*args, **kwargs):
        # The child needs seconds to import and load; without this the parent (already loaded) would measure
        # every plan before the child joins, and the test would not test sharing.
        wait_for(lambda: workers_of(url, "shared") - {me})
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quality, "measure", measure_once_the_child_measures)
        code = cli.main(argv(tiny_model_dir, folder / "results", "shared", 12, "--storage", url, "--workers", "2"))
    return code, load(url, "shared"), url


def test_two_workers_on_a_journal_reach_the_total_without_repeating_a_plan(two_workers):
    code, study, url = two_workers
    assert code == 0
    assert storage_mod.journal_path(url).is_file()
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))), "trial numbers repeat or skip"
    keys = [t.user_attrs["plan_key"] for t in study.trials if study_mod.status(t) == "evaluated"]
    assert len(keys) == len(set(keys)), "a plan was measured twice"
    assert 12 <= study_mod.measured(study) <= 13  # overshoot: at most one trial per other worker
    measured_by = {t.user_attrs["worker"] for t in study.trials if study_mod.status(t) == "evaluated"}
    assert len(measured_by) == 2, "the two processes did not share the study"


def test_front_reads_the_objectives_from_the_study(two_workers):
    _, study, _ = two_workers
    table = search.front(study)
    objectives = pareto.objectives_of(study)
    assert [o.name for o in objectives] == ["kl", "memory", "latency"]
    attrs = [o.attr for o in objectives]
    assert list(table.columns[:4]) == ["trial", *attrs]
    assert len(table) >= 1 and table["kl"].is_monotonic_increasing  # best first objective first
    by_number = {t.number: t for t in study.trials}
    for _, r in table.iterrows():
        assert [r[a] for a in attrs] == by_number[r["trial"]].values
    assert table["trial"].tolist() == search.front(study, objectives)["trial"].tolist()


def test_front_of_a_study_not_made_by_llmtailor_is_a_user_error():
    study = optuna.create_study(directions=["minimize", "minimize"])
    with pytest.raises(UserError, match="not made by llmtailor"):
        search.front(study)


def test_the_hypervolume_history_has_one_point_per_measured_trial_and_never_decreases(two_workers, tiny_model_dir):
    _, study, _ = two_workers
    history = search.hypervolume_history(study)
    assert list(history.columns) == ["measured", "hypervolume", "trial"]
    assert len(history) == study_mod.measured(study)
    assert history["hypervolume"].is_monotonic_increasing and history["measured"].is_monotonic_increasing
    assert 0 < history["hypervolume"].iloc[-1] <= 1

    # The reference is fixed when the study starts, from what is known before any trial.
    bounds = study.user_attrs[hypervolume.REFERENCE_ATTR]
    assert bounds["memory"] == 500_000 and bounds["kl"] == study_mod.DEFAULT_MAX_KL  # the budget; the quality floor
    without_floor = hypervolume.reference(pareto.objectives_of(study), study_mod.models.load_architecture(
        str(tiny_model_dir))[0], study_mod.device_profile(None, "500kB"), study_mod.cost.Workload())
    assert without_floor["kl"] == pytest.approx(math.log(512))  # ln(vocabulary)
    assert bounds["latency"] > 0
    objectives = pareto.objectives_of(study)
    assert history["hypervolume"].iloc[-1] == pytest.approx(hypervolume.of(study.trials, objectives, bounds))


def test_the_hypervolume_is_the_share_of_the_box_the_front_dominates():
    from llmtailor.search.objectives import OBJECTIVES

    def trial(kl, memory, status="evaluated"):
        return optuna.trial.create_trial(values=[kl, memory], user_attrs={"status": status})

    objectives = [OBJECTIVES["kl"], OBJECTIVES["memory"]]
    bounds = {"kl": 2.0, "memory": 100.0}
    # (0.5, 0.5) and (0.25, 0.75) normalized: 0.5*0.5 + 0.25*0.25; a point beyond the box and one not measured add
    # nothing.
    trials = [trial(1.0, 50.0), trial(0.5, 75.0), trial(3.0, 1.0), trial(0.0, 0.0, status="over_budget")]
    assert hypervolume.of(trials, objectives, bounds) == pytest.approx(0.25 + 0.0625)


@pytest.mark.parametrize("url, message", [
    ("journal://study.log", r"malformed journal storage URL 'journal://study.log': write journal:///absolute/path"),
    ("journal:///", r"malformed journal storage URL"),
    ("journal:///proc/forbidden/study.log", r"cannot write the folder of the journal storage /proc/forbidden"),
    ("journal:///etc/hostname/study.log", r"cannot create the folder of the journal storage .*/etc/hostname is a file"),
    ("journal://{tmp}", r"journal storage .* is a folder: name a file in it"),
    ("journal://{tmp}/not-a-journal.txt", r"is not an Optuna journal file"),
], ids=["relative", "no-file", "folder-not-writable", "under-a-file", "a-folder", "not-a-journal"])
def test_a_bad_journal_url_is_a_one_line_error(url, message, tiny_model_dir, tmp_path):
    given = tmp_path / "given"
    given.mkdir()
    (given / "not-a-journal.txt").write_text("just some text\n")
    work = tmp_path / "work"
    work.mkdir()
    url = url.replace("{tmp}", str(given))
    code, _, err = run_case(["sweep", "{model}", "--memory", "8GB", "--storage", url], tiny_model_dir, given, work)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("llmtailor: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not list(work.iterdir()) and sorted(p.name for p in given.iterdir()) == ["not-a-journal.txt"]
    assert (given / "not-a-journal.txt").read_text() == "just some text\n"


def test_zero_workers_is_a_one_line_error(tiny_model_dir, tmp_path):
    code, _, err = run_case(["sweep", "{model}", "--memory", "8GB", "--workers", "0"], tiny_model_dir, tmp_path, tmp_path)
    assert code == 2 and err.strip() == "llmtailor: error: --workers must be at least 1, got 0"
    assert not list(tmp_path.iterdir())


def test_redact_leaves_a_journal_path_as_it_is():
    assert storage_mod.redact("journal:///data/a:b@c/study.log") == "journal:///data/a:b@c/study.log"
    assert storage_mod.redact("postgresql+psycopg2://alice:s3cret@host/db") == "postgresql+psycopg2://alice:***@host/db"


def test_looking_for_a_study_creates_no_journal_file(tiny_model_dir, tmp_path):
    url = f"journal://{tmp_path / 'missing.log'}"
    setup = study_mod.prepare(cli._config(cli.build_parser().parse_args(argv(tiny_model_dir, tmp_path, "s", 2,
                                                                                "--storage", url))))
    assert study_mod._load_existing(setup) is None
    assert cli.main(["report", "s", "--results", str(tmp_path), "--storage", url]) == 2
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_ctrl_c_during_a_journal_write_comes_after_the_lock_is_given_back(tmp_path, monkeypatch, ctrl_c_raises,
                                                                            number):
    from optuna.storages.journal import JournalFileSymlinkLock

    storage = storage_mod.open_storage(f"journal://{tmp_path / 'study.log'}")
    study = optuna.create_study(storage=storage, study_name="s")
    trial_id = storage.create_new_trial(study._study_id)
    release = JournalFileSymlinkLock.release

    def interrupted_release(self):
        signal.raise_signal(number)  # in this thread (os.kill lets the kernel pick any of the process's)
        time.sleep(0.05)  # with the lock still held
        return release(self)

    monkeypatch.setattr(JournalFileSymlinkLock, "release", interrupted_release)
    with pytest.raises(KeyboardInterrupt):
        storage.set_trial_user_attr(trial_id, "status", "interrupted")
    monkeypatch.undo()
    assert not (tmp_path / "study.log.lock").exists(), "the lock was not given back"
    assert storage.get_trial(trial_id).user_attrs["status"] == "interrupted"


def test_a_ctrl_c_while_optuna_records_a_trial_stays_an_interrupt(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import optuna.study._optimize as optuna_optimize

    tell = optuna_optimize._tell_with_warning

    def interrupted_tell(*args, **kwargs):
        tell(*args, **kwargs)
        raise KeyboardInterrupt  # as a Ctrl-C inside it would

    monkeypatch.setattr(optuna_optimize, "_tell_with_warning", interrupted_tell)
    assert cli.main(argv(tiny_model_dir, tmp_path, "told", 3)) == 130
    assert "interrupted; finished trials are saved" in capsys.readouterr().err


def worker_process(args: list[str], prelude: str = "") -> subprocess.Popen:
    code = textwrap.dedent(prelude) + "\nimport sys\nfrom llmtailor import cli\nsys.exit(cli.main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # Ctrl-C as in a terminal: a test run in a script's background would hand the process SIGINT ignored, and a
    # sweep keeps ignoring a signal it was started ignoring.
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_a_killed_process_on_a_journal_leaves_a_trial_failed_by_heartbeat(tiny_model_dir, tmp_path, monkeypatch):
    url = f"journal://{tmp_path / 'study.log'}"
    args = argv(tiny_model_dir, tmp_path / "results", "killed", 5, "--storage", url)
    proc = worker_process(args, """
        import os, signal
        from llmtailor.search import storage
        from llmtailor.evaluators import quality
        storage.HEARTBEAT_INTERVAL_S = 1
        real, calls = quality.measure, []
        def measure(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        quality.measure = measure
    """)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    running = [t for t in load(url, "killed").trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1 and storage_mod.HEARTBEAT_ATTR in running[0].system_attrs
    monkeypatch.setattr(storage_mod, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(storage_mod, "STALE_AFTER_S", 2)
    time.sleep(3)
    study = study_mod.run(study_mod.prepare(cli._config(cli.build_parser().parse_args(args))), progress=False,
                          log=lambda m: None)
    died = [t for t in study.trials if study_mod.status(t) == "died"]
    assert [t.number for t in died] == [running[0].number] and died[0].state == optuna.trial.TrialState.FAIL
    assert died[0].user_attrs["fail_reason"].startswith("process died: no heartbeat for over 2 s")
    assert study_mod.measured(study) == 5


def test_a_failed_worker_is_reported_and_the_finished_trials_stay(tiny_model_dir, tmp_path, monkeypatch, capsys):
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, sys
        if "--worker-child" in sys.argv:
            print("simulated crash of a child worker", file=sys.stderr, flush=True)
            os._exit(3)
    """))
    monkeypatch.setenv("PYTHONPATH", str(crash))
    url = f"journal://{tmp_path / 'study.log'}"
    code = cli.main(argv(tiny_model_dir, tmp_path / "results", "crashed", 3, "--storage", url, "--workers", "2"))
    err = capsys.readouterr().err
    assert code == 1
    assert "llmtailor: error: worker 2 (pid " in err and "failed with exit code 3: simulated crash of a child worker" in err
    assert study_mod.measured(load(url, "crashed")) == 3


def test_ctrl_c_in_the_parent_stops_its_workers(tiny_model_dir, tmp_path):
    url = f"journal://{tmp_path / 'study.log'}"
    parent = worker_process(argv(tiny_model_dir, tmp_path / "results", "stopped", 500, "--storage", url,
                                 "--workers", "2"))
    try:
        wait_for(lambda: len(workers_of(url, "stopped")) == 2)
        workers = workers_of(url, "stopped")
        assert len(workers) == 2, "the two processes did not both finish a trial"
        parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=120)
    finally:
        parent.kill()
    assert parent.returncode == 130, err
    child = int(next(w for w in workers if w != f"{socket.gethostname()}:{parent.pid}").split(":")[1])
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert study_mod.measured(load(url, "stopped")) < 500


def test_sigterm_stops_a_workers_sweep_like_ctrl_c_and_the_same_command_resumes(tiny_model_dir, tmp_path):
    url = f"journal://{tmp_path / 'study.log'}"
    # Enough trials that the sweep cannot finish before the second worker's first trial: the parent measures from
    # the start while the child still imports (a tiny trial takes a fraction of a second since the sweep stopped
    # walking the teacher's objects after each: 100 were once all done before the child's first).
    command = [sys.executable, "-m", "llmtailor.cli", *argv(tiny_model_dir, tmp_path / "results", "term", 250,
                                                            "--storage", url, "--workers", "2")]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_for(lambda: len(workers_of(url, "term")) == 2)  # both processes are measuring
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 130 and "interrupted" in err, err
    wait_for(lambda: not any(t.state == optuna.trial.TrialState.RUNNING for t in load(url, "term").trials), 60)
    study = load(url, "term")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING], "a child was left running"
    assert 0 < study_mod.measured(study) < 250
    assert cli.main(argv(tiny_model_dir, tmp_path / "results", "term", 250, "--storage", url)) == 0
    assert study_mod.measured(load(url, "term")) == 250


def test_workers_on_an_in_memory_database_are_refused(tiny_model_dir, tmp_path, capsys):
    code = cli.main(argv(tiny_model_dir, tmp_path, "mem", 4, "--storage", "sqlite://", "--workers", "2"))
    assert code == 2 and "in one process's memory" in capsys.readouterr().err


def test_workers_racing_to_create_sqlite_tables_retry_instead_of_failing(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    real, calls = storage_mod.Storage, []

    def racing(url, **kwargs):  # the first open loses the race another worker's CREATE TABLE won
        calls.append(url)
        if len(calls) == 1:
            raise OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(url, **kwargs)

    monkeypatch.setattr(storage_mod, "Storage", racing)
    monkeypatch.setattr(storage_mod.time, "sleep", lambda seconds: None)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    assert isinstance(storage_mod.open_storage(url), real) and len(calls) == 2
    calls.clear()

    def unreachable(url, **kwargs):  # any other operational error (a server not there) still fails at once
        calls.append(url)
        raise OperationalError("connect", {}, Exception("could not connect to server"))

    monkeypatch.setattr(storage_mod, "Storage", unreachable)
    with pytest.raises(UserError, match="cannot open storage .*could not connect"):
        storage_mod.open_storage(url)
    assert len(calls) == 1
