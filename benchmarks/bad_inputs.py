"""Every bad input the tests hold (tests/bad_inputs.py), run once, with what the user gets.

    python benchmarks/bad_inputs.py

Runs each case on the tiny random model of the tests, records the exit code, the
message and whether anything was written, writes benchmarks/results/bad_inputs.json
and rewrites the "bad inputs" section of benchmarks/BENCHMARKS.md from it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bad_inputs import CASES, make_inputs, run_case  # noqa: E402
from tiny_model import save_tiny_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bad_inputs.json"
BENCHMARKS = ROOT / "benchmarks" / "BENCHMARKS.md"
START, END = "<!-- bad_inputs.py: start -->", "<!-- bad_inputs.py: end -->"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LLMTAILOR_CACHE"] = str(tmp / "cache")
        model = save_tiny_model(tmp / "tiny-model")
        inputs = make_inputs(tmp / "in", model)
        rows = []
        for name, argv, _ in CASES:
            work = tmp / "work"
            work.mkdir()
            code, _, err = run_case(argv, model, inputs, work)
            written = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
            shown = shlex.join(a.replace("{model}", "MODEL").replace("{in}", "IN") for a in argv)
            message = err.strip().replace(str(inputs), "IN").replace(str(model), "MODEL").replace(str(work), "WORK")
            rows.append({"case": name, "command": f"llmtailor {shown}", "exit_code": code,
                         "stderr_lines": len(err.strip().splitlines()), "message": message, "files_written": len(written)})
            for p in sorted(work.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            work.rmdir()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.machine(), "cases": rows}, indent=1))
    table = ["| bad input | command | exit | files written | what the user reads (stderr) |", "|---|---|---:|---:|---|"]
    for r in rows:
        cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        table.append(f"| {r['case']} | `{cell(r['command'])}` | {r['exit_code']} | {r['files_written']} | {cell(r['message'])} |")
    section = "\n".join([
        START,
        "## bad_inputs.py: every bad input the tests hold, and what each gets",
        "",
        f"Command: `python benchmarks/bad_inputs.py` (generated from `tests/bad_inputs.py`, the table "
        f"`tests/test_errors.py` holds). Date: {date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU. "
        "MODEL is the tests' tiny random LLaMA folder, "
        "IN the folder of bad input files the script makes, WORK the working folder; results go to WORK/results "
        f"unless the case names a folder. {len(rows)} cases; figures: `benchmarks/results/bad_inputs.json`.",
        "",
        *table,
        END,
    ])
    current = BENCHMARKS.read_text()
    if START in current:
        before, rest = current.split(START, 1)
        current = before + section + rest.split(END, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + section + "\n"
    BENCHMARKS.write_text(current)
    bad = [r["case"] for r in rows if r["exit_code"] != 2 or r["stderr_lines"] != 1 or r["files_written"]]
    print(f"{len(rows)} bad inputs; {len(bad)} not answered with one line, exit 2 and nothing written: {bad}")


if __name__ == "__main__":
    main()
