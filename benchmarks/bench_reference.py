"""How far the search's top-k KL is from the exact KL, and what each keeps in memory.

The search keeps the teacher's next-token distributions as each position's top K
tokens plus the mass of the rest (``quality.TopK``) instead of whole (50 MB per
256-token window at SmolLM2's 49k vocabulary, 268 MB at a 262k vocabulary). On the
default model, for the uniform baselines of the ``prune`` space and plans sampled from
it at random, this measures exact KL and top-K KL (K = 64, 256, 1024, 4096) from the
same student log-probabilities, on held-out pydoc text and on the licence texts:
relative error per plan (median and worst) and Kendall tau of the plans' order, for
the rest estimated from K draws (what the search uses) and as one "other" bin.

    python benchmarks/bench_reference.py [--samples 10] [--windows 4]

Writes benchmarks/results/bench_reference.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna  # noqa: E402
import torch  # noqa: E402

from llmtailor import compression, models, spaces, text  # noqa: E402
from llmtailor.compression.calibration import CalibrationSpec  # noqa: E402
from llmtailor.evaluators import cost, quality  # noqa: E402
from llmtailor.search import calibrated  # noqa: E402
from llmtailor.search.sensitivity import kendall_tau  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_reference.json"
KS = (64, 256, 1024, 4096)
OTHER = "/usr/share/common-licenses"


def plans(space, arch, samples: int, seed: int):
    """The space's baselines, then `samples` plans drawn at random."""
    for params in space.baselines(arch):
        yield "baseline", space.sample(optuna.trial.FixedTrial(params), arch)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(samples):
        yield "random", space.sample(study.ask(), arch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="random plans of the prune space")
    parser.add_argument("--windows", type=int, default=4, help="256-token windows per text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = models.load(None)
    arch, model, tok = teacher.arch, teacher.model, teacher.tokenizer
    spec = CalibrationSpec(source="pydoc")
    made = calibrated.prepare(spaces.get("prune"), model, tok, arch, spec, "cpu")
    exact = {source: quality.Reference(model, tok, text.split(source).evaluation, args.windows)
             for source in ("pydoc", OTHER)}
    rows = []
    for kind, plan in plans(made.space, arch, args.samples, args.seed):
        student = compression.apply(plan, model, arch, made.stats, made.cache, made.importance, share=True)
        row = {"kind": kind, "bits_per_weight": cost.bits_per_weight(plan, arch),
               "weight_bytes": cost.weight_bytes(plan, arch)}
        for source, reference in exact.items():
            totals = {"exact": 0.0, **{f"top{k}": 0.0 for k in KS}, **{f"top{k}_coarse": 0.0 for k in KS}}
            for window, teacher_lp in zip(reference.input_ids, reference.teacher_logprobs, strict=True):
                ours = quality.log_probs(student, window[None])[0]
                totals["exact"] += float((teacher_lp.exp() * (teacher_lp - ours)).sum())
                for k in KS:
                    totals[f"top{k}"] += quality.TopK.of(teacher_lp, k).kl(ours)
                    totals[f"top{k}_coarse"] += quality.TopK.of(teacher_lp, k, tail_samples=0).kl(ours)
            row[source] = {name: value / reference.tokens for name, value in totals.items()}
        rows.append(row)
        print(row, flush=True)
        del student
    summary = {}
    for source in exact:
        name = "pydoc" if source == "pydoc" else "licences"
        truth = [r[source]["exact"] for r in rows]
        for k in KS:
            for variant in ("", "_coarse"):
                approx = [r[source][f"top{k}{variant}"] for r in rows]
                errors = [(a - t) / t for t, a in zip(truth, approx, strict=True) if t > 0]
                summary[f"{name}_top{k}{variant}"] = {
                    "median_rel_error": statistics.median(errors), "max_abs_rel_error": max(abs(e) for e in errors),
                    "kendall_tau": kendall_tau(truth, approx)}
    tokens = exact["pydoc"].tokens
    memory = {"window_tokens": 256, "whole_bytes_per_window_49k": 256 * arch.vocab_size * 4,
              "whole_bytes_per_window_262k": 256 * 262144 * 4,
              **{f"top{k}_bytes_per_window": 256 * (2 * k * 8 + 4) for k in KS}}
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "plans": len(rows), "eval_tokens_per_text": tokens, "texts": ["pydoc evaluation split",
                                                                           f"{OTHER} evaluation split"],
              "calibration": spec.describe(), "summary": summary, "memory": memory, "rows": rows}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print("| text | K | rest | median rel. error | worst abs. rel. error | Kendall tau |")
    print("|---|---|---|---|---|---|")
    for key, s in summary.items():
        name, k = key.split("_top")
        rest = "one bin" if k.endswith("_coarse") else "K draws"
        print(f"| {name} | {k.removesuffix('_coarse')} | {rest} | {s['median_rel_error']:+.2%} | "
              f"{s['max_abs_rel_error']:.2%} | {s['kendall_tau']:.3f} |")


if __name__ == "__main__":
    main()
