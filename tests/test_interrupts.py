"""A Ctrl-C between two trials is held to the trial boundary: no trial is left RUNNING, none finished is lost."""

from __future__ import annotations

import signal
import time

import optuna
import pytest
from test_search_storage import argv

from llmtailor import cli
from llmtailor.search import interrupts
from llmtailor.search import study as study_mod


@pytest.fixture(autouse=True)
def _ctrl_c_as_in_a_terminal(ctrl_c_raises):
    yield


def ctrl_c_here() -> None:
    signal.raise_signal(signal.SIGINT)  # in this thread (os.kill lets the kernel pick any of the process's threads)
    time.sleep(0.05)  # the handler has run by here, inside Optuna's code


def test_a_ctrl_c_inside_a_trial_raises_at_once_and_one_between_trials_waits_for_the_next():
    boundary = interrupts.TrialBoundary()
    with boundary.installed():
        with pytest.raises(KeyboardInterrupt), boundary.trial():
            ctrl_c_here()
        assert not boundary.held and not boundary.inside
        ctrl_c_here()  # between trials: held, nothing raised
        assert boundary.held
        ran = []
        with pytest.raises(KeyboardInterrupt), boundary.trial():
            ran.append(True)
        assert not ran, "the next trial started although a Ctrl-C was waiting"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_while_one_is_held_raises_at_once():
    boundary = interrupts.TrialBoundary()
    with boundary.installed():
        ctrl_c_here()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c_here()


def test_a_process_started_with_ctrl_c_ignored_keeps_ignoring_it():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    boundary = interrupts.TrialBoundary()
    with boundary.installed():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        with boundary.trial():
            ctrl_c_here()  # nothing raised
        assert not boundary.held
        signal.raise_signal(signal.SIGTERM)  # a stop request still stops it (a --workers parent sends this)
        assert boundary.held


def test_a_stop_request_is_held_between_trials_like_a_ctrl_c():
    boundary = interrupts.TrialBoundary()
    before = signal.getsignal(signal.SIGTERM)
    with boundary.installed():
        signal.raise_signal(signal.SIGTERM)
        assert boundary.held
        with pytest.raises(KeyboardInterrupt), boundary.trial():
            pass
    assert signal.getsignal(signal.SIGTERM) == before


def running(study: optuna.Study) -> list[int]:
    return [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def started(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials begun (the enqueued baselines wait in the study from its start)."""
    return [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]


def study_at(results, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'study.db'}")


def test_a_ctrl_c_while_optuna_records_a_trial_ends_the_sweep_with_that_trial_saved(tiny_model_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    import optuna.study._optimize as optuna_optimize

    tell, told = optuna_optimize._tell_with_warning, []

    def tell_then_ctrl_c(*args, **kwargs):
        told.append(args)
        if len(told) == 2:
            ctrl_c_here()  # before the result is written: raised here, it would leave the trial RUNNING
        return tell(*args, **kwargs)

    monkeypatch.setattr(optuna_optimize, "_tell_with_warning", tell_then_ctrl_c)
    assert cli.main(argv(tiny_model_dir, tmp_path, "told", 6)) == 130
    assert "interrupted; finished trials are saved" in capsys.readouterr().err
    study = study_at(tmp_path, "told")
    assert len(told) == 2 and len(started(study)) == 2, "the sweep went on past the trial boundary"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in started(study))
    monkeypatch.undo()
    assert cli.main(argv(tiny_model_dir, tmp_path, "told", 6)) == 0
    assert study_mod.measured(study_at(tmp_path, "told")) == 6


def test_a_ctrl_c_after_optuna_asks_for_a_trial_fails_that_trial_as_interrupted(tiny_model_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    ask, asked = optuna.Study.ask, []

    def ask_then_ctrl_c(self, *args, **kwargs):
        trial = ask(self, *args, **kwargs)  # the trial is RUNNING in the storage from here on
        asked.append(trial.number)
        if len(asked) == 3:
            ctrl_c_here()
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask_then_ctrl_c)
    assert cli.main(argv(tiny_model_dir, tmp_path, "asked", 6)) == 130
    study = study_at(tmp_path, "asked")
    assert not running(study), "an interrupted trial was left RUNNING"
    last = started(study)[-1]
    assert len(started(study)) == 3 and last.state == optuna.trial.TrialState.FAIL
    assert last.user_attrs["status"] == "interrupted" and "plan" not in last.user_attrs  # it never started
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in started(study)[:2])
