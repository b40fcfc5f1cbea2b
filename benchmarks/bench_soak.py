"""A soak: 200 measured trials of the tiny model with 2 workers, memory per worker at trial 20 and at trial 200.

A sweep that runs overnight must not grow. This runs `llmtailor sweep TINY --workers 2
--trials 200 --space prune --memory 500kB` (the tiny random LLaMA of the tests; the
prune space calibrates, caches layers, cuts and prunes, so every path a trial takes is
exercised) and reads from each trial what its process recorded: resident memory after
the trial (VmRSS) and the process's peak so far (VmHWM). For each worker it reports
both at the first trial at or after the study's 20th measured trial and at its last.

    python benchmarks/bench_soak.py [--trials 200] [--workers 2]

Writes benchmarks/results/bench_soak.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_model import save_tiny_model  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_soak.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--early", type=int, default=20, help="the trial count memory is first read at")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp) / "tiny-model")
        command = [str(Path(sys.executable).parent / "llmtailor"), "sweep", str(model), "--memory", "500kB",
                   "--trials", str(args.trials), "--study", "soak", "--results", tmp, "--tasks", "none",
                   "--space", "prune", "--workers", str(args.workers), "--context", "256", "--prompt", "64",
                   "--eval-windows", "2", "--window-tokens", "64", "--calibration-windows", "8", "--no-progress"]
        env = {**os.environ, "LLMTAILOR_CACHE": str(Path(tmp) / "cache")}
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        seconds = time.perf_counter() - started
        study = optuna.load_study(study_name="soak", storage=f"sqlite:///{Path(tmp) / 'soak' / 'study.db'}")
        trials = sorted((t for t in study.trials if t.user_attrs.get("status") in ("evaluated", "failed")),
                        key=lambda t: t.datetime_complete)
    workers: dict[str, dict] = {}
    for count, trial in enumerate(trials, start=1):
        attrs = trial.user_attrs
        entry = workers.setdefault(attrs["worker"], {"trials": 0})
        entry["trials"] += 1
        point = {"study_measured": count, "rss_bytes": attrs["rss_bytes"], "peak_rss_bytes": attrs["peak_rss_bytes"]}
        if count >= args.early and "early" not in entry:
            entry["early"] = point
        entry["last"] = point
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "command": " ".join(command[1:]).replace(tmp, "TMP"), "measured": len(trials),
              "failed": sum(1 for t in trials if t.user_attrs.get("status") == "failed"),
              "seconds": seconds, "workers": workers}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(trials)} measured trials in {seconds:.0f} s")
    print("| worker | its trials | RSS at study trial ~20 | RSS at the end | peak at ~20 | peak at the end |")
    print("|---|---|---|---|---|---|")
    for name, w in workers.items():
        e, last = w.get("early", w["last"]), w["last"]
        print(f"| {name} | {w['trials']} | {e['rss_bytes'] / 2**20:.0f} MiB (trial {e['study_measured']}) | "
              f"{last['rss_bytes'] / 2**20:.0f} MiB (trial {last['study_measured']}) | "
              f"{e['peak_rss_bytes'] / 2**20:.0f} MiB | {last['peak_rss_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
