"""How many task items separate plans: accuracy's own interval against the interval of its difference to the teacher.

    python benchmarks/bench_accuracy_ci.py [--items 24 104]

The default model and uniform round-to-nearest plans of falling precision (no calibration
needed: the point is the statistics, not the quantizer), each scored item by item on the
built-in pydoc_cloze task (items from the pydoc evaluation split, which has 104 usable
passages). For each plan and item count: accuracy with its 95% half-width (normal
approximation, as the search reports it), and the paired difference to the teacher on the
same items with its 95% half-width (``tasks.paired_difference``, what the search records as
``accuracy_vs_teacher``). Whether a plan is separated from the teacher: the paired interval
excludes 0. Writes benchmarks/results/bench_accuracy_ci.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from llmtailor import compression, models, text  # noqa: E402
from llmtailor.evaluators import tasks  # noqa: E402
from llmtailor.evaluators.cost import stored_layers  # noqa: E402
from llmtailor.plan import CompressionPlan, LayerPrecision  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_accuracy_ci.json"
PLANS = {"8-bit per row": (8, 0), "4-bit g128": (4, 128), "3-bit g128": (3, 128), "2-bit g128": (2, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[24, 104])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = models.load(None)
    documents = text.split("pydoc").evaluation
    entries = tasks.resolve_tasks(["pydoc_cloze"], documents, max(args.items), models.cache_dir())
    started = time.perf_counter()
    reference = tasks.item_scores(teacher.model, teacher.tokenizer, entries)["pydoc_cloze"]
    seconds_per_item = (time.perf_counter() - started) / len(reference)
    rows = []
    for name, (bits, group) in PLANS.items():
        plan = CompressionPlan(precision={lin.name: LayerPrecision(bits, group)
                                          for lin in stored_layers(teacher.arch)})
        model = compression.apply(plan, teacher.model, teacher.arch)
        scores = tasks.item_scores(model, teacher.tokenizer, entries)["pydoc_cloze"]
        del model
        for n in sorted(set(min(k, len(scores)) for k in args.items)):
            accuracy = sum(scores[:n]) / n
            gap, paired = tasks.paired_difference(scores[:n], reference[:n])
            rows.append({"plan": f"uniform RTN {name}, embedding included", "items": n, "accuracy": accuracy,
                         "accuracy_ci95": 1.96 * math.sqrt(accuracy * (1 - accuracy) / n),
                         "teacher_accuracy": sum(reference[:n]) / n, "difference_to_teacher": gap,
                         "difference_ci95": paired, "separated_from_teacher": abs(gap) > paired,
                         "items_answered_differently": sum(a != b for a, b in zip(scores[:n], reference[:n],
                                                                                  strict=True))})
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "model": "SmolLM2-135M-Instruct", "task": "pydoc_cloze (pydoc evaluation split; calibration: none)",
              "items_available": len(reference), "teacher_seconds_per_item": seconds_per_item, "rows": rows}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"teacher {sum(reference) / len(reference):.3f} on {len(reference)} items; "
          f"{seconds_per_item:.2f} s per item")
    print("| plan | items | accuracy ± 95% | difference to the teacher ± 95% (paired) | items answered differently |"
          " separated |")
    print("|---|---:|---|---|---:|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['items']} | {r['accuracy']:.3f} ± {r['accuracy_ci95']:.3f} | "
              f"{r['difference_to_teacher']:+.3f} ± {r['difference_ci95']:.3f} | {r['items_answered_differently']} | "
              f"{'yes' if r['separated_from_teacher'] else 'no'} |")


if __name__ == "__main__":
    main()
