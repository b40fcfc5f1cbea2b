"""Task accuracy's seconds: lm-eval's own HF model against scoring each context once (the search's accuracy stage).

    python benchmarks/bench_task_scoring.py [--items 100] [--torch-device cpu]

The default model, the teacher and a uniform 4-bit g128 round-to-nearest plan, each scored
on the built-in pydoc_cloze task as the search makes it (items from the pydoc task split,
up to ``--items``): with lm-eval's HF model (every choice runs with its context; 8 choices a batch, as the
search scored before, and 32) and with ``tasks.item_scores``'s shared-context model
(contexts once, their choices from the KV cache; 32 choices a batch, its default).
Reports seconds per item, the speed-ups, whether every item's
score (acc and acc_norm) is the same, and the largest difference in a choice's
log-likelihood. Writes benchmarks/results/bench_task_scoring.json.
"""

from __future__ import annotations

import argparse
import json
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

OUT = Path(__file__).parent / "results" / "bench_task_scoring.json"


def timed_samples(model, tokenizer, entries, shared_context: bool, batch_size: int) -> tuple[list[dict], float]:
    started = time.perf_counter()
    samples = tasks.evaluated_samples(model, tokenizer, entries, batch_size=batch_size,
                                      shared_context=shared_context)["pydoc_cloze"]
    return samples, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = models.torch_device(args.torch_device)
    teacher = models.load(None)
    teacher.model.to(device)
    entries = tasks.resolve_tasks(["pydoc_cloze"], text.split("pydoc").task, args.items, models.cache_dir())
    plan = CompressionPlan(precision={lin.name: LayerPrecision(4, 128) for lin in stored_layers(teacher.arch)})
    rows = []
    for name, model in (("teacher", teacher.model), ("4-bit g128 RTN", None)):
        if model is None:
            model = compression.apply(plan, teacher.model, teacher.arch)
        timed_samples(model, teacher.tokenizer, entries, True, 32)  # warm-up: lm-eval's first call builds its task
        theirs, their_seconds = timed_samples(model, teacher.tokenizer, entries, False, 8)  # the search's before
        _, their_seconds_32 = timed_samples(model, teacher.tokenizer, entries, False, 32)
        ours, our_seconds = timed_samples(model, teacher.tokenizer, entries, True, 32)
        differences = [abs(a[0] - b[0]) for x, y in zip(theirs, ours, strict=True)
                       for a, b in zip(x["filtered_resps"], y["filtered_resps"], strict=True)]
        same = all(x["acc"] == y["acc"] and x["acc_norm"] == y["acc_norm"] for x, y in zip(theirs, ours, strict=True))
        row = {"model": name, "items": len(ours), "lm_eval_batch8_seconds": round(their_seconds, 2),
               "lm_eval_batch32_seconds": round(their_seconds_32, 2),
               "shared_context_batch32_seconds": round(our_seconds, 2),
               "lm_eval_batch8_seconds_per_item": round(their_seconds / len(ours), 4),
               "shared_context_batch32_seconds_per_item": round(our_seconds / len(ours), 4),
               "speedup_over_lm_eval_batch8": round(their_seconds / our_seconds, 2),
               "speedup_over_lm_eval_batch32": round(their_seconds_32 / our_seconds, 2),
               "same_item_scores": same, "max_log_likelihood_difference": max(differences),
               "accuracy": sum(s["acc"] for s in ours) / len(ours)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "device": str(device), "date": date.today().isoformat(), "task": "pydoc_cloze (pydoc task split)",
        "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
