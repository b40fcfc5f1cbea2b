"""Fixtures: a tiny random LLaMA with a small BPE tokenizer, saved as a local model folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep converted models and task files of the tests out of the user's cache."""
    os.environ["LLMTAILOR_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a random 4-block LLaMA (hidden 64, 4 heads, 2 KV heads) and its tokenizer."""
    from tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    """The tiny model, loaded through llmtailor.models.load."""
    from llmtailor import models

    return models.load(str(tiny_model_dir))


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server for the session; its URL (psycopg2 driver, trust login, any password).

    Skipped where PostgreSQL is not installed, unless LLMTAILOR_REQUIRE_POSTGRES=1 (set by CI), where it fails.
    """
    import shutil
    import socket
    import subprocess
    import tempfile

    binaries = _postgres_bin()
    if binaries is None:
        if os.environ.get("LLMTAILOR_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required (LLMTAILOR_REQUIRE_POSTGRES=1) but /usr/lib/postgresql/*/bin is missing")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # The server refuses to run as root, and its folder must not sit under a mode-700 parent such as pytest's.
    folder = Path(tempfile.mkdtemp(prefix="llmtailor-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_user, binaries / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, binaries / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, binaries / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C as in a terminal (a test run started in a script's background inherits SIGINT ignored, and then no
    Ctrl-C a test sends itself would arrive), and SIGTERM as the CLI takes it: a Ctrl-C."""
    import signal

    previous = {number: signal.signal(number, signal.default_int_handler) for number in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)
