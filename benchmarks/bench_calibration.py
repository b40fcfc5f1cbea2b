"""Which calibration text generalizes: GPTQ calibrated on pydoc, on text sampled from the teacher, or a mix.

    python benchmarks/bench_calibration.py [--windows 64] [--eval-windows 16]
    python benchmarks/bench_calibration.py --tables

For each calibration source and dampening, GPTQ (teacher-input mode, every block
linear, embedding/head at 16 bits) at 4-bit g128 with act-order and at 3-bit g128 is
measured on the pydoc evaluation split (held out from calibration) and on Debian's
licence texts (a domain no calibration source uses), next to RTN at the same
settings. Sources: ``pydoc`` (the pydoc calibration split), ``generated`` (windows
sampled from the teacher itself, ``calibration.generated_windows``) and ``mix`` (half
of each). Writes benchmarks/results/bench_calibration.json.
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
from llmtailor.compression import calibration  # noqa: E402
from llmtailor.evaluators import quality  # noqa: E402
from llmtailor.plan import CompressionPlan, LayerPrecision  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_calibration.json"
LICENCES = "/usr/share/common-licenses"
SETTINGS = {"4-bit g128 act-order": (4, 128, True), "3-bit g128": (3, 128, False)}
DAMPS = (0.01, 0.1)


def tables(results: dict) -> str:
    """Markdown: perplexity per calibration and dampening, both domains, with RTN's for comparison."""
    lines = ["| setting | calibration | damp | KL pydoc | perplexity pydoc | KL licences | perplexity licences |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        damp = "–" if r["damp"] is None else f"{r['damp']:g}"
        lines.append(f"| {r['setting']} | {r['calibration']} | {damp} | {r['kl_pydoc']:.4f} | {r['perplexity_pydoc']:.3f} | "
                     f"{r['kl_licences']:.4f} | {r['perplexity_licences']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", action="store_true", help="print the Markdown table of the last run and stop")
    parser.add_argument("--windows", type=int, default=64, help="512-token calibration windows per source")
    parser.add_argument("--eval-windows", type=int, default=16, help="256-token evaluation windows per domain")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(OUT.read_text())))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = models.load(None)
    arch, tok = teacher.arch, teacher.tokenizer
    splits = text.split("pydoc")
    results: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                     f"torch {torch.__version__}, {torch.get_num_threads()} threads", "rows": [], "seconds": {}}
    domains = {"pydoc": quality.Reference(teacher.model, tok, splits.evaluation, args.eval_windows, 256),
               "licences": quality.Reference(teacher.model, tok, text.load_documents(LICENCES), args.eval_windows, 256)}
    results["evaluation"] = {"pydoc": "pydoc evaluation split (held out from calibration)",
                             "licences": f"{LICENCES} (Debian's licence texts)", "tokens_per_domain": domains["pydoc"].tokens}

    pydoc = calibration.calibration_windows(tok, splits.calibration, args.windows, 512, seed=0)
    started = time.perf_counter()
    generated = calibration.generated_windows(teacher.model, tok, args.windows, 512, seed=0, progress=True)
    results["seconds"]["generate_windows"] = time.perf_counter() - started
    half = args.windows // 2
    sources = {"pydoc": pydoc, "generated": generated, "mix": torch.cat([pydoc[:half], generated[:half]])}
    sample = tok.decode(generated[0, :60])
    results["generated_sample"] = sample
    print("a generated window starts:", repr(sample), flush=True)

    def measure(setting: str, source: str, damp: float | None, model) -> None:
        row = {"setting": setting, "calibration": source, "damp": damp}
        for name, ref in domains.items():
            q = quality.measure(model, ref)
            row[f"kl_{name}"], row[f"perplexity_{name}"] = q.kl, q.perplexity
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    for setting, (bits, group, _) in SETTINGS.items():
        plan = CompressionPlan(precision={x.name: LayerPrecision(bits, group) for x in arch.linears})
        measure(setting, "none (RTN)", None, compression.apply(plan, teacher.model, arch))
    for source, windows in sources.items():
        started = time.perf_counter()
        stats = calibration.collect(teacher.model, arch, windows)
        results["seconds"][f"statistics_{source}"] = time.perf_counter() - started
        for setting, (bits, group, act_order) in SETTINGS.items():
            for damp in DAMPS:
                plan = CompressionPlan(precision={x.name: LayerPrecision(bits, group, method="gptq", act_order=act_order,
                                                                         damp=damp) for x in arch.linears})
                measure(setting, source, damp, compression.apply(plan, teacher.model, arch, stats))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(tables(results))


if __name__ == "__main__":
    main()
