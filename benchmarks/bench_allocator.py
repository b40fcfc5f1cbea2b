"""Sensitivity-guided allocation on the default model: the sensitivities checked, the allocator against uniform bits.

    python benchmarks/bench_allocator.py [--pairs 40] [--eval-windows 32] [--torch-device cpu] [--keep-cache]
    python benchmarks/bench_allocator.py --tables

1. Calibration statistics and the guided space's sensitivities are built (in a fresh
   cache folder unless --keep-cache, so their times are build times) and timed.
2. The sensitivities (KL measured at the anchor option on calibration-split text,
   carried to the other options by the GPTQ output error) are checked against the KL
   measured on held-out pydoc text for --pairs (layer, option) pairs drawn at random
   among the non-anchor options: Kendall's τ.
3. At the bytes of three uniform GPTQ plans, the allocator's plan and the uniform one
   are measured on the pydoc evaluation split and on Debian's licence texts; the sum
   of the per-layer predicted damage is set beside each plan's measured KL.
4. Seconds per trial (assemble the model, measure it) with the warm per-layer cache
   against solving every layer with GPTQ again.
Writes benchmarks/results/bench_allocator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from llmtailor import compression, models, spaces, text  # noqa: E402
from llmtailor.compression.calibration import CalibrationSpec  # noqa: E402
from llmtailor.evaluators import quality  # noqa: E402
from llmtailor.evaluators.cost import weight_bytes  # noqa: E402
from llmtailor.plan import CompressionPlan, LayerPrecision  # noqa: E402
from llmtailor.search import calibrated, sensitivity  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_allocator.json"
LICENCES = "/usr/share/common-licenses"
BUDGETS = {  # name -> (bits, group size, embedding bits) of the uniform GPTQ plan whose bytes are the budget
    "uniform 3-bit g128, embedding 8-bit": (3, 128, 8),
    "uniform 4-bit g128, embedding 16-bit": (4, 128, 16),
    "uniform 8-bit per-channel": (8, 0, 8),
}


def tables(results: dict) -> str:
    """Markdown: the allocator against uniform plans, and the sensitivity checks."""
    lines = [f"Machine: {results['machine']}. Date: {results['date']}. Calibration: {results['calibration']}.", "",
             "| budget | plan | weight MB | KL pydoc | ppl pydoc | KL licences | ppl licences | predicted KL (sum) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["plans"]:
        lines.append(f"| {r['budget']} | {r['plan']} | {r['weight_bytes'] / 1e6:.2f} | {r['kl_pydoc']:.4f} | "
                     f"{r['perplexity_pydoc']:.3f} | {r['kl_licences']:.4f} | {r['perplexity_licences']:.3f} | "
                     f"{'–' if r['predicted_kl'] is None else format(r['predicted_kl'], '.4f')} |")
    v, t = results["validation"], results["trial_seconds"]
    lines += ["", f"Sensitivity check: Kendall τ = {v['kendall_tau']:.3f} between predicted and measured single-layer "
              f"KL on {v['pairs']} (layer, option) pairs (measured on {v['tokens']} held-out pydoc tokens); within one "
              f"option across layers: " + ", ".join(f"{k} {x:.3f}" for k, x in v["tau_within_option"].items()) + ".",
              f"Build times: statistics {results['seconds']['statistics']:.0f} s, sensitivities "
              f"{results['seconds']['sensitivity']:.0f} s. Seconds per trial (assemble + measure on "
              f"{t['eval_tokens']} tokens), median of {t['count']}: warm cache {t['warm_median_s']:.2f} s, solving "
              f"GPTQ again {t['cold_median_s']:.2f} s."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", action="store_true", help="print the Markdown of the last run and stop")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--eval-windows", type=int, default=32, help="256-token windows per domain for whole plans")
    parser.add_argument("--validation-windows", type=int, default=8, help="256-token windows for single-layer KL")
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--windows", type=int, default=CalibrationSpec.windows, help="512-token calibration windows")
    parser.add_argument("--keep-cache", action="store_true", help="use the user's cache (times are then load times)")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(OUT.read_text())))
        return
    if not args.keep_cache:
        os.environ["LLMTAILOR_CACHE"] = tempfile.mkdtemp(prefix="bench-allocator-")
    device = models.torch_device(args.torch_device)
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = models.load(args.model)  # the converted default model lives in the cache too: loaded before timing anything
    model, tok, arch = teacher.model.to(device), teacher.tokenizer, teacher.arch
    spec = CalibrationSpec(windows=args.windows)
    results: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                     f"torch {torch.__version__}, {torch.get_num_threads()} threads, ran on {device}",
                     "calibration": spec.describe()}
    made = calibrated.prepare(spaces.get("guided"), model, tok, arch, spec, device, progress=True)
    results["seconds"] = made.seconds
    guided, sens = made.space, made.space.sensitivity
    print("built:", made.seconds, flush=True)

    splits = text.split("pydoc")
    validation = quality.Reference(model, tok, splits.evaluation, args.validation_windows, 256)
    candidates = [(lin.name, p) for lin in guided.layers(arch) for p in guided.options(lin, arch)
                  if sensitivity.option_name(p) != sens.anchor]
    pairs = random.Random(0).sample(candidates, args.pairs)
    predicted, measured = [], []
    for name, precision in pairs:
        predicted.append(sens.damage(name, sensitivity.option_name(precision)))
        measured.append(sensitivity.single_layer_kl(model, arch, name, precision, made.stats, validation, made.cache))
    by_option: dict[str, tuple[list, list]] = {}
    for (_, precision), p, m in zip(pairs, predicted, measured, strict=True):
        by_option.setdefault(sensitivity.option_name(precision), ([], []))[0].append(p)
        by_option[sensitivity.option_name(precision)][1].append(m)
    results["validation"] = {
        "pairs": len(pairs), "tokens": validation.tokens, "kendall_tau": sensitivity.kendall_tau(predicted, measured),
        "tau_within_option": {k: sensitivity.kendall_tau(*v) for k, v in by_option.items() if len(v[0]) >= 5},
        "rows": [{"layer": n, "option": sensitivity.option_name(p), "predicted_kl": a, "measured_kl": b}
                 for (n, p), a, b in zip(pairs, predicted, measured, strict=True)]}
    print("validation tau:", results["validation"]["kendall_tau"], flush=True)

    domains = {"pydoc": quality.Reference(model, tok, splits.evaluation, args.eval_windows, 256),
               "licences": quality.Reference(model, tok, text.load_documents(LICENCES), args.eval_windows, 256)}
    results["evaluation"] = {k: f"{v.tokens} tokens" for k, v in domains.items()}
    results["plans"] = []

    def measure(budget: str, label: str, plan: CompressionPlan) -> None:
        compressed = compression.apply(plan, model, arch, made.stats, made.cache)
        row = {"budget": budget, "plan": label, "weight_bytes": weight_bytes(plan, arch),
               "predicted_kl": sum(sens.damage(n, sensitivity.option_name(p)) for n, p in plan.precision.items())
               if label != "uniform RTN" else None}
        for name, reference in domains.items():
            q = quality.measure(compressed, reference)
            row[f"kl_{name}"], row[f"perplexity_{name}"] = q.kl, q.perplexity
        results["plans"].append(row)
        print(json.dumps(row), flush=True)
        OUT.write_text(json.dumps(results, indent=1))

    for budget, (bits, group, embed_bits) in BUDGETS.items():
        uniform = guided.uniform(arch, bits, group, embed_bits)
        share = guided.budget_share(arch, guided.uniform_bytes(arch, bits, group, embed_bits))
        allocated = guided.plan({"weight_budget": share}, arch)
        measure(budget, "uniform GPTQ", uniform)
        measure(budget, "allocator", allocated)
        if (bits, group, embed_bits) == (4, 128, 16):
            rtn = CompressionPlan(precision={lin.name: LayerPrecision(4, 128) for lin in arch.linears})
            measure(budget, "uniform RTN", rtn)

    timed = [guided.plan({"weight_budget": s}, arch) for s in (0.05, 0.15, 0.3)]
    warm, cold = [], []
    for plan in timed:
        started = time.perf_counter()
        quality.measure(compression.apply(plan, model, arch, made.stats, made.cache), validation)
        warm.append(time.perf_counter() - started)
        started = time.perf_counter()
        quality.measure(compression.apply(plan, model, arch, made.stats, None), validation)
        cold.append(time.perf_counter() - started)
    results["trial_seconds"] = {"count": len(timed), "eval_tokens": validation.tokens, "warm": warm, "cold": cold,
                                "warm_median_s": statistics.median(warm), "cold_median_s": statistics.median(cold),
                                "cache_size_bytes": made.cache.size_bytes()}
    OUT.write_text(json.dumps(results, indent=1))
    print(tables(results))


if __name__ == "__main__":
    main()
