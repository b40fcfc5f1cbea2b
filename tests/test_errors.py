"""Every bad input gets one line, exit 2, and nothing written (the cases live in bad_inputs.py)."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from bad_inputs import CASES, make_inputs

from llmtailor import cli


@pytest.fixture(scope="module")
def inputs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs"), tiny_model_dir)


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def run_case(argv: list[str], model_dir: Path, inputs: Path, workdir: Path) -> tuple[int, str, str]:
    """Run one bad command in workdir (results go to workdir/results unless the case names a folder)."""
    argv = [a.replace("{model}", str(model_dir)).replace("{in}", str(inputs)) for a in argv]
    if "--results" not in argv:
        argv += ["--results", str(workdir / "results")]
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tiny_model_dir, inputs, tmp_path):
    from llmtailor.cache import cache_dir

    inputs_before, cache_before = _tree(inputs), _tree(cache_dir())
    code, out, err = run_case(argv, tiny_model_dir, inputs, tmp_path)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("llmtailor: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert "s3cret" not in out + err
    assert _tree(tmp_path) == set(), "a failed command wrote into the working folder"
    assert _tree(inputs) == inputs_before and not (inputs / "pwned").exists()
    assert _tree(cache_dir()) - cache_before <= {"tasks"} | {p for p in _tree(cache_dir()) if p.startswith("tasks/")}


def test_there_are_at_least_twenty_kinds_of_bad_input():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20
