"""Every bad input gets one line, exit 2, and nothing written (the cases live in bad_inputs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bad_inputs import CASES, make_inputs, run_case


@pytest.fixture(scope="module")
def inputs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs"), tiny_model_dir)


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


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
    assert _tree(cache_dir()) == cache_before, "a failed command wrote into the cache"


def test_there_are_at_least_twenty_kinds_of_bad_input():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20
