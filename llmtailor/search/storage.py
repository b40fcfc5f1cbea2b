"""Optuna storage for a study: URL checks before anything is written, heartbeats, and why a dead trial failed.

A study lives in any SQLAlchemy URL Optuna accepts: SQLite (the default, one file in
the study's results folder) or PostgreSQL / MySQL for several machines; or in Optuna's
journal file, ``journal:///absolute/path/study.log`` (three slashes, then the file's
absolute path), an append-only log that several processes, or machines sharing a
network file system, write through a lock file beside it (``study.log.lock``). A URL is
checked before the run writes anything: it must parse, name a known database, and its
driver package must be installed (the message names the package to install); a journal
URL must name a file (not a folder) whose folder exists and is writable, or can be
created. A journal path holds no password, so ``redact`` leaves it as it is.

Heartbeats: Optuna fails the running trials of a dead process by their heartbeat, but
only on its RDB storage. ``JournalStorage`` adds them to the journal: a heartbeat is a
trial system attribute holding the writer's clock (seconds since the epoch), so the
processes sharing a journal across machines need clocks that agree within
STALE_AFTER_S - HEARTBEAT_INTERVAL_S (90 s); a database server uses its own clock.
Each beat is one line in the journal (about 150 bytes every HEARTBEAT_INTERVAL_S per
running trial).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat

from llmtailor import files
from llmtailor.errors import UserError, first_line
from llmtailor.search import interrupts

HEARTBEAT_INTERVAL_S = 30
STALE_AFTER_S = 120  # a running trial with no heartbeat for this long belongs to a dead process
SCHEMA_RACE_RETRIES = 5
EXAMPLES = "use sqlite:///path/study.db, journal:///absolute/path/study.log or postgresql+psycopg2://user@host/db"
JOURNAL_SCHEME = "journal:"
JOURNAL_FORM = "journal:///absolute/path/study.log (three slashes, then the file's absolute path)"
HEARTBEAT_ATTR = "llmtailor:heartbeat"  # trial system attribute of a journal trial: its last beat, epoch seconds
# Python module a SQLAlchemy dialect imports -> the PyPI package that provides it.
DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pg8000": "pg8000", "asyncpg": "asyncpg",
    "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "mariadb": "mariadb",
    "oracledb": "oracledb", "pyodbc": "pyodbc",
}


def redact(url: str) -> str:
    """A storage URL with any password hidden."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def is_journal(url: str) -> bool:
    """Whether the URL names a journal file storage."""
    return url.startswith(JOURNAL_SCHEME)


def journal_path(url: str) -> Path:
    """The log file of a journal URL; UserError unless it has the form journal:///absolute/path."""
    rest = url[len(JOURNAL_SCHEME):]
    if not rest.startswith("///") or rest.endswith("/") or not rest.strip("/"):
        raise UserError(f"malformed journal storage URL {url!r}: write {JOURNAL_FORM}")
    return Path(rest[2:])


def local_file(url: str) -> Path | None:
    """The file a SQLite or journal URL keeps its study in; None for database servers and in-memory SQLite."""
    from sqlalchemy.engine import make_url

    if is_journal(url):
        return journal_path(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _check_journal(url: str) -> None:
    path = journal_path(url)
    if path.is_dir():
        raise UserError(f"journal storage {path} is a folder: name a file in it, such as {JOURNAL_SCHEME}//"
                        f"{path / 'study.log'}")
    files.check_writable_folder(path.parent, "folder of the journal storage")  # Optuna's lock file goes there
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise UserError(f"cannot read and write the journal storage {path}: give it read and write permission, "
                        "or name another file")


def check_url(url: str) -> None:
    """Raise UserError unless the URL parses, names a known database and its driver is installed (or, for a
    journal, names a file it may write)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if is_journal(url):
        _check_journal(url)
        return
    try:
        dialect = make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise UserError(f"malformed storage URL {redact(url)!r}: {EXAMPLES}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = (exc.name or "").split(".")[0]
        package = DRIVER_PACKAGES.get(module, module or "its driver")
        raise UserError(f"storage {redact(url)} needs the Python package {package!r} (module {module!r}), which is "
                        f"not installed: `pip install {package}`, or {EXAMPLES}") from None


def in_memory(url: str) -> bool:
    """Whether the URL names an SQLite database in the process's memory (which no other process can open)."""
    from sqlalchemy.engine import make_url

    if is_journal(url):
        return False
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _record_died(storage: optuna.storages.BaseStorage, trial_ids: list[int], grace_period: int) -> None:
    """Write why each trial is failed, while it is still RUNNING (a finished trial's attributes are frozen)."""
    for trial_id in trial_ids:
        try:
            storage.set_trial_user_attr(trial_id, "status", "died")
            storage.set_trial_user_attr(trial_id, "fail_reason", f"process died: no heartbeat for over "
                                        f"{grace_period} s, so a later run failed it (it is redone)")
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process failed it first


class Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, which also records on a dead process's trial why it was failed.

    Optuna fails a running trial whose heartbeat stopped, but leaves no reason on it,
    and a finished trial's attributes can no longer be written. So the reason is
    written while the trial is still RUNNING, just before Optuna fails it. This relies
    on ``_get_stale_trial_ids``, the one hook Optuna's ``fail_stale_trials`` calls
    first (checked against Optuna 5.0; a test holds it).
    """

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        _record_died(self, stale, self.grace_period)
        return stale


@contextlib.contextmanager
def _interrupts_held_off() -> Iterator[None]:
    """Hold a Ctrl-C or stop request (SIGINT, SIGTERM) in the main thread until the block ends, then deliver it.

    Optuna's journal file lock is not safe against one: interrupted while it waits for
    the lock it gives back the lock of whichever process holds it, and interrupted while
    giving its own back it raises FileNotFoundError instead, which a sweep catches as a
    failed trial and goes on after.
    """
    held: list[tuple[int, Any]] = []
    with interrupts.handling(lambda signum, frame: held.append((signum, frame))) as previous:
        yield
    if held:
        signum, frame = held[0]
        if callable(previous[signum]):
            previous[signum](signum, frame)
        elif previous[signum] == signal.SIG_DFL:
            os.kill(os.getpid(), signum)


class _JournalFile(optuna.storages.journal.JournalFileBackend):
    """Optuna's journal file, whose appends (taking the lock, writing, giving it back) finish before a Ctrl-C."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with _interrupts_held_off():
            super().append_logs(logs)


class JournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's journal file storage with the heartbeats Optuna gives only its RDB storage.

    Optuna's optimize loop and ``fail_stale_trials`` use any storage that is a
    ``BaseHeartbeat`` with an interval (Optuna 5.0): its heartbeat thread calls
    ``record_heartbeat`` while a trial runs, and before each new trial the RUNNING
    trials ``_get_stale_trial_ids`` names are failed. A trial whose process died before
    its first beat is judged by its start time instead, so none stays RUNNING forever.
    """

    def __init__(self, path: Path, heartbeat_interval: int, grace_period: int) -> None:
        super().__init__(_JournalFile(str(path)))
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process judged this one dead and failed its trial; its result is not recorded

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        stale = [t._trial_id for t in running if now - _last_sign_of_life(t) > self.grace_period]
        _record_died(self, stale, self.grace_period)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None


def _last_sign_of_life(trial: optuna.trial.FrozenTrial) -> float:
    """A running journal trial's last heartbeat, or its start (epoch seconds) if it never beat."""
    if HEARTBEAT_ATTR in trial.system_attrs:
        return float(trial.system_attrs[HEARTBEAT_ATTR])
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


def beat_now(trial: optuna.Trial) -> None:
    """Write the trial's first heartbeat now, in this thread.

    Optuna's heartbeat thread writes its first beat concurrently with the objective; on a
    busy machine (a SQLite write lock held by this thread) a process killed in that gap
    leaves a RUNNING trial without a heartbeat, which no later run can ever fail. (Two
    first beats racing is harmless: Optuna ignores the second insert's key violation.)
    """
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = trial.study._storage
    if is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial._trial_id)


def open_storage(url: str) -> Storage | JournalStorage:
    """An Optuna storage for the URL; heartbeats let a later run fail the trials of a dead process.

    A journal file is created if it does not exist. Workers started together on an
    empty database all try to create Optuna's tables; all but one then hit a
    unique-key violation (PostgreSQL) or "table ... already exists" (SQLite, raised as an
    OperationalError). That race is retried; a server that cannot be reached or refuses
    the login fails at once.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    check_url(url)
    if is_journal(url):
        return _open_journal(url)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            return Storage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=STALE_AFTER_S)
        except Exception as exc:  # SQLAlchemy raises many types for unreachable servers and refused logins
            racing = isinstance(exc, DBAPIError) and (not isinstance(exc, OperationalError)
                                                      or "already exists" in str(exc))
            if racing and attempt < SCHEMA_RACE_RETRIES:
                time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
                continue
            raise UserError(f"cannot open storage {redact(url)}: {redact(first_line(exc))} ({EXAMPLES})") from None
    raise AssertionError("unreachable")


def _open_journal(url: str) -> JournalStorage:
    path = journal_path(url)
    not_journal = f"cannot open storage {url}: {path} is not an Optuna journal file; name a new file or a journal"
    try:
        # Optuna skips a bad last line (a write cut short), so a one-line file of anything else would pass for
        # an empty journal and be appended to: its first line must be an operation. (One still being written,
        # with no line end yet, must at least begin as one.)
        first = b""
        if path.is_file():
            with path.open("rb") as f:
                first = f.readline()
        if first.endswith(b"\n"):
            operation = json.loads(first)
            if not (isinstance(operation, dict) and "op_code" in operation):
                raise UserError(not_journal)
        elif first and not first.startswith(b"{"):
            raise UserError(not_journal)
        return JournalStorage(path, HEARTBEAT_INTERVAL_S, STALE_AFTER_S)
    except OSError as exc:
        raise UserError(f"cannot open storage {url}: {first_line(exc)}") from None
    except (ValueError, KeyError, TypeError) as exc:  # a line that is not JSON, or JSON that is not an operation
        raise UserError(f"{not_journal} ({first_line(exc)})") from None


def check_opens(url: str) -> None:
    """Open what can be opened without writing: a database server (reachable, the login works) or an existing
    journal file (it is one). A SQLite file or a new journal is not touched: opening it would write."""
    path = local_file(url)
    if path is None or (is_journal(url) and path.is_file()):
        open_storage(url)
