"""The budget allocator's seconds per plan on the default model's guided space, against HiGHS on the whole problem.

A guided trial's plan is one allocation: the budget its `weight_budget` names, spent over
the 211 layers (six options each) by their measured sensitivities. This script takes the
sensitivities a sweep built (the newest file in the cache's ``sensitivity/`` folder, or
``--sensitivity``) and solves the allocation at evenly spaced budgets across the space,
with ``allocator.allocate`` (relaxation, fixing, dynamic program, branching) and with
``allocator.solve_exactly`` on the whole problem unscaled (what ``allocate`` was until the
sixteenth session: one 0/1 program for HiGHS). It reports seconds per budget and where
the two allocations' summed predicted damage differs (the bytes of both are checked
against the budget).

    python benchmarks/bench_allocator_speed.py [--budgets 101] [--sensitivity PATH]

Writes benchmarks/results/bench_allocator_speed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmtailor import cache, models  # noqa: E402
from llmtailor.search.sensitivity import Sensitivity  # noqa: E402
from llmtailor.spaces import allocator  # noqa: E402
from llmtailor.spaces.guided import GuidedSpace, _byte_range  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_allocator_speed.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=int, default=101)
    parser.add_argument("--sensitivity", type=Path, help="a sensitivity file (default: the newest in the cache)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    path = args.sensitivity or max((cache.cache_dir() / "sensitivity").glob("*.json"), key=lambda p: p.stat().st_mtime)
    arch, _ = models.load_architecture(None)
    space = GuidedSpace(Sensitivity.from_json(path.read_text()))
    choices = space.choices(arch)
    low, high = _byte_range(arch)
    rows = []
    for i in range(args.budgets):
        budget = low + round(i / (args.budgets - 1) * (high - low))
        started = time.perf_counter()
        ours = allocator.allocate(choices, budget)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        whole = allocator.solve_exactly(choices, budget)
        whole_s = time.perf_counter() - started
        for chosen in (ours, whole):
            assert sum(o.bytes for o in chosen.values()) <= budget
        rows.append({"budget_bytes": budget, "allocate_s": ours_s, "whole_program_s": whole_s,
                     "allocate_damage": allocator.damage(ours), "whole_program_damage": allocator.damage(whole)})
    relative = [(r["allocate_damage"] - r["whole_program_damage"]) / max(r["whole_program_damage"], 1e-300) for r in rows]
    summary = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sensitivity_file": path.name, "layers": len(choices), "options": sum(len(v) for v in choices.values()),
        "budgets": len(rows),
        "allocate_median_s": statistics.median(r["allocate_s"] for r in rows),
        "allocate_mean_s": statistics.mean(r["allocate_s"] for r in rows),
        "allocate_max_s": max(r["allocate_s"] for r in rows),
        "whole_program_median_s": statistics.median(r["whole_program_s"] for r in rows),
        "whole_program_mean_s": statistics.mean(r["whole_program_s"] for r in rows),
        "whole_program_max_s": max(r["whole_program_s"] for r in rows),
        "allocate_less_damage": sum(x < -1e-9 for x in relative),
        "allocate_more_damage": sum(x > 1e-9 for x in relative),
        "largest_relative_saving": -min(relative),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print("| solver | median s | mean s | max s |\n|---|---:|---:|---:|")
    for name, key in (("allocate", "allocate"), ("HiGHS, whole problem", "whole_program")):
        print(f"| {name} | {summary[key + '_median_s']:.4f} | {summary[key + '_mean_s']:.4f} | {summary[key + '_max_s']:.3f} |")
    print(f"\n{len(rows)} budgets; allocate found less damage at {summary['allocate_less_damage']}, more at "
          f"{summary['allocate_more_damage']} (largest relative saving {summary['largest_relative_saving']:.2e})")


if __name__ == "__main__":
    main()
