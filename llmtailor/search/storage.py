"""Optuna storage for a study: URL checks before anything is written, heartbeats, and why a dead trial failed.

A study lives in any SQLAlchemy URL Optuna accepts: SQLite (the default, one file in
the study's results folder) or PostgreSQL / MySQL for several machines. A URL is
checked before the run writes anything: it must parse, name a known database, and its
driver package must be installed (the message names the package to install).
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import optuna

from llmtailor.errors import UserError

HEARTBEAT_INTERVAL_S = 30
STALE_AFTER_S = 120  # a running trial with no heartbeat for this long belongs to a dead process
SCHEMA_RACE_RETRIES = 5
EXAMPLES = "use sqlite:///path/study.db or postgresql+psycopg2://user@host/db"
# Python module a SQLAlchemy dialect imports -> the PyPI package that provides it.
DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pg8000": "pg8000", "asyncpg": "asyncpg",
    "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "mariadb": "mariadb",
    "oracledb": "oracledb", "pyodbc": "pyodbc",
}


def redact(url: str) -> str:
    """A storage URL with any password hidden."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def check_url(url: str) -> None:
    """Raise UserError unless the URL parses, names a known database and its driver is installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

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
        for trial_id in stale:
            try:
                self.set_trial_user_attr(trial_id, "status", "died")
                self.set_trial_user_attr(trial_id, "fail_reason", f"process died: no heartbeat for over "
                                         f"{self.grace_period} s, so a later run failed it (it is redone)")
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another process failed it first
        return stale


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


def open_storage(url: str) -> Storage:
    """An Optuna storage for the URL; heartbeats let a later run fail the trials of a dead process.

    Workers started together on an empty database all try to create Optuna's tables;
    all but one then hit a unique-key violation. That race is retried; a server that
    cannot be reached or refuses the login fails at once.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    check_url(url)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            return Storage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=STALE_AFTER_S)
        except Exception as exc:  # SQLAlchemy raises many types for unreachable servers and refused logins
            racing = isinstance(exc, DBAPIError) and not isinstance(exc, OperationalError)
            if racing and attempt < SCHEMA_RACE_RETRIES:
                time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
                continue
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot open storage {redact(url)}: {redact(reason)} ({EXAMPLES})") from None
    raise AssertionError("unreachable")
