"""Benchmark of the first slice on the default model (SmolLM2-135M-Instruct).

Measures, for uniform plans (dense, int8, int4-g128 RTN, and two mixes): KL to the
teacher and perplexity on held-out pydoc text, lm-eval accuracy on pydoc_cloze, the
cost model's weight bytes next to the bytes actually held by the packed tensors;
then runs a real `fit` study and reports the median seconds per trial.

    python benchmarks/bench_slice.py [--items 80] [--windows 8] [--trials 16]

Writes benchmarks/results/bench_slice.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from llmtailor import compression, models, text  # noqa: E402
from llmtailor.evaluators import cost, quality, tasks  # noqa: E402
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity  # noqa: E402
from llmtailor.search import SearchConfig, front, prepare, run  # noqa: E402
from llmtailor.search.study import measured  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_slice.json"


def uniform(arch, bits: int, group: int, embed_bits: int | None = None, sparsity: float = 0.0) -> CompressionPlan:
    """Every linear at `bits` (embedding at embed_bits), optionally magnitude-pruned."""
    precision = {x.name: LayerPrecision(bits, group) for x in arch.linears} if bits < 16 else {}
    if (embed_bits or bits) < 16:
        precision[arch.embedding.name] = LayerPrecision(embed_bits or bits, group)
    prune = {x.name: LayerSparsity(sparsity) for x in arch.linears} if sparsity else {}
    return CompressionPlan(precision=precision, sparsity=prune)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=80, help="pydoc_cloze items per plan")
    parser.add_argument("--windows", type=int, default=8, help="256-token evaluation windows per plan")
    parser.add_argument("--trials", type=int, default=16, help="trials of the timed fit study")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    started = time.perf_counter()
    teacher = models.load(None)
    load_s = time.perf_counter() - started
    arch = teacher.arch
    splits = text.split("pydoc")
    reference = quality.Reference(teacher.model, teacher.tokenizer, splits.evaluation, args.windows, 256)
    entries = tasks.resolve_tasks(["pydoc_cloze"], splits.task, args.items, models.cache_dir())
    items = len(Path(entries[0]["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines())
    workload = cost.Workload()

    plans = {
        "dense (16-bit plan; evaluated fp32, stored fp16)": CompressionPlan(),
        "int8 per-channel RTN": uniform(arch, 8, 0),
        "int4 g128 RTN": uniform(arch, 4, 128),
        "int4 g128 RTN, int8 embedding": uniform(arch, 4, 128, embed_bits=8),
        "int8 per-channel RTN + 50% magnitude": uniform(arch, 8, 0, sparsity=0.5),
    }
    rows = []
    for name, plan in plans.items():
        t0 = time.perf_counter()
        model = compression.apply(plan, teacher.model, arch)
        apply_s = time.perf_counter() - t0
        q = quality.measure(model, reference)
        accuracy = tasks.accuracy(model, teacher.tokenizer, entries)["pydoc_cloze"]
        packed = compression.pack(plan, teacher.model, arch)
        rows.append({
            "plan": name,
            "kl_nats_per_token": q.kl,
            "perplexity": q.perplexity,
            "accuracy_pydoc_cloze": accuracy,
            "weight_bytes_cost_model": cost.weight_bytes(plan, arch),
            "weight_bytes_packed": sum(p.nbytes for p in packed.values()),
            "memory_bytes_total_ctx2048": cost.memory(plan, arch, workload).total,
            "bits_per_weight": cost.bits_per_weight(plan, arch),
            "apply_s": apply_s,
        })
        print(f"{name}: {rows[-1]}", flush=True)
        del model, packed

    with tempfile.TemporaryDirectory() as results:
        setup = prepare(SearchConfig(memory="160MB", trials=args.trials, study="bench", results_dir=results))
        t0 = time.perf_counter()
        study = run(setup, progress=False)
        fit_s = time.perf_counter() - t0
        seconds = [t.user_attrs["seconds"] for t in study.trials if "seconds" in t.user_attrs]
        evaluated = [t.user_attrs["seconds"] for t in study.trials if t.user_attrs.get("status") == "evaluated"]
        over = [t.user_attrs["seconds"] for t in study.trials if t.user_attrs.get("status") == "over_budget"]
        trials_done = measured(study)
        trials_sampled = len(study.trials)
        front_size = len(front(study, setup.objectives))

    figures = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model_load_s": load_s,
        "eval_tokens": reference.tokens,
        "task_items": items,
        "plans": rows,
        "fit_trials_measured": trials_done,
        "fit_trials_sampled": trials_sampled,
        "fit_pareto_points": front_size,
        "fit_wall_s": fit_s,
        "median_s_per_trial_all": statistics.median(seconds),
        "median_s_per_trial_evaluated": statistics.median(evaluated) if evaluated else None,
        "median_s_per_trial_over_budget": statistics.median(over) if over else None,
        "trials_evaluated": len(evaluated),
        "trials_over_budget": len(over),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=1) + "\n")

    print("\n| plan | KL (nats/token) | perplexity | accuracy | weight bytes (cost model) | weight bytes (packed) | bits/weight |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['plan']} | {r['kl_nats_per_token']:.4f} | {r['perplexity']:.2f} | {r['accuracy_pydoc_cloze']:.3f} | "
              f"{r['weight_bytes_cost_model']:,} | {r['weight_bytes_packed']:,} | {r['bits_per_weight']:.2f} |")
    print(f"\nfit: {trials_done} measured of {trials_sampled} sampled trials in {fit_s:.0f} s, {front_size} Pareto points; "
          f"median s/trial: all {figures['median_s_per_trial_all']:.2f}, "
          f"evaluated {figures['median_s_per_trial_evaluated']}, over budget {figures['median_s_per_trial_over_budget']}")


if __name__ == "__main__":
    main()
