"""Which calibration generalizes: GPTQ calibrated on pydoc, on text sampled from the teacher, or a mix, and the damping.

    python benchmarks/bench_calibration.py [--sources pydoc,mix] [--recipes 0.01:0,0.1:0,0.01:0.2] [--torch-device cuda]
    python benchmarks/bench_calibration.py --tables [--out FILE]

For each calibration source and GPTQ recipe (dampening ``damp`` and shrinkage of H
toward its diagonal ``shrink``, written damp:shrink), GPTQ (teacher-input mode, every block
linear, embedding/head at 16 bits) at 4-bit g128 with act-order and at 3-bit g128 is
measured on the pydoc evaluation split (held out from calibration) and on Debian's
licence texts (a domain no calibration source uses), next to RTN at the same settings
and the dense teacher. Sources: ``pydoc`` (the pydoc calibration split), ``generated``
(windows sampled from the teacher: a random first token, 4 greedy tokens, then
temperature 1), ``nucleus`` (the same at temperature 0.8 within top-p 0.95) and
``mix`` (half pydoc, half nucleus). Writes benchmarks/results/bench_calibration.json
(or --out).
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

RESULTS = Path(__file__).parent / "results"
LICENCES = "/usr/share/common-licenses"
SETTINGS = {"4-bit g128 act-order": (4, 128, True), "3-bit g128": (3, 128, False)}


def tables(results: dict) -> str:
    """Markdown: KL and perplexity per calibration and dampening on both domains, RTN and the teacher beside."""
    lines = [f"Machine: {results['machine']}. Date: {results['date']}.", "",
             "| setting | calibration | damp | shrink | KL pydoc | ppl pydoc | KL licences | ppl licences "
             "| entropy licences | licence windows better than RTN |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        damp = "–" if r["damp"] is None else f"{r['damp']:g}"
        shrink = "–" if r.get("shrink") is None else f"{r['shrink']:g}"
        better = r.get("windows_better_than_rtn_licences")
        lines.append(f"| {r['setting']} | {r['calibration']} | {damp} | {shrink} | {r['kl_pydoc']:.4f} | {r['perplexity_pydoc']:.3f} | "
                     f"{r['kl_licences']:.4f} | {r['perplexity_licences']:.3f} | {r['entropy_licences']:.3f} | "
                     f"{'–' if better is None else f'{better:.0%}'} |")
    return "\n".join(lines)


def sources(names: list[str], teacher, tok, splits, count: int, device, seconds: dict) -> dict[str, torch.Tensor]:
    """The calibration windows of each named source."""
    made: dict[str, torch.Tensor] = {}

    def sampled(temperature: float, top_p: float, windows: int = count) -> torch.Tensor:
        started = time.perf_counter()
        windows = calibration.generated_windows(teacher, tok, windows, 512, seed=0, batch=64 if device.type == "cuda" else 16,
                                                device=device, temperature=temperature, top_p=top_p, progress=True)
        seconds[f"generate_{len(windows)}_windows_{temperature:g}_{top_p:g}"] = time.perf_counter() - started
        return windows

    for name in names:
        if name == "pydoc":
            made[name] = calibration.calibration_windows(tok, splits.calibration, count, 512, seed=0)
        elif name == "generated":
            made[name] = sampled(1.0, 1.0)
        elif name == "nucleus":
            made[name] = sampled(0.8, 0.95)
        elif name == "mix":
            half = count // 2
            pydoc = calibration.calibration_windows(tok, splits.calibration, count - half, 512, seed=0)
            nucleus = made["nucleus"] if "nucleus" in made else sampled(0.8, 0.95, half)
            made[name] = torch.cat([pydoc, nucleus[:half]])
        else:
            raise SystemExit(f"unknown source {name!r}")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", action="store_true", help="print the Markdown table of the last run and stop")
    parser.add_argument("--out", default=str(RESULTS / "bench_calibration.json"))
    parser.add_argument("--sources", default="pydoc,generated,nucleus,mix")
    parser.add_argument("--recipes", default="0.01:0,0.1:0,0.01:0.2,0.01:0.5", help="damp:shrink pairs")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--windows", type=int, default=128, help="512-token calibration windows per source")
    parser.add_argument("--eval-windows", type=int, default=64, help="256-token evaluation windows per domain")
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.tables:
        print(tables(json.loads(out.read_text())))
        return
    device = models.torch_device(args.torch_device)
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = models.load(args.model)
    arch, tok = teacher.arch, teacher.tokenizer
    teacher.model.to(device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", no GPU"
    results: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                     f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}, ran on {device}",
                     "rows": [], "seconds": {}, "calibration_windows": args.windows, "window_tokens": 512}
    splits = text.split("pydoc")
    domains = {"pydoc": quality.Reference(teacher.model, tok, splits.evaluation, args.eval_windows, 256),
               "licences": quality.Reference(teacher.model, tok, text.load_documents(LICENCES), args.eval_windows, 256)}
    results["evaluation"] = {"pydoc": "pydoc evaluation split (held out from calibration)",
                             "licences": f"{LICENCES} (Debian's licence texts)",
                             "tokens_pydoc": domains["pydoc"].tokens, "tokens_licences": domains["licences"].tokens}

    rtn_nll: dict[tuple[str, str], tuple[float, ...]] = {}

    def measure(setting: str, source: str, recipe: tuple[float, float] | None, model) -> None:
        damp, shrink = recipe or (None, None)
        row = {"setting": setting, "calibration": source, "damp": damp, "shrink": shrink}
        for name, ref in domains.items():
            q = quality.measure(model, ref, entropy=True)
            row[f"kl_{name}"], row[f"perplexity_{name}"], row[f"entropy_{name}"] = q.kl, q.perplexity, q.entropy
            if source == "none (RTN)":
                rtn_nll[setting, name] = q.window_nll
            elif (setting, name) in rtn_nll:  # paired: on how many windows this model predicts better than RTN
                row[f"windows_better_than_rtn_{name}"] = sum(
                    a < b for a, b in zip(q.window_nll, rtn_nll[setting, name], strict=True)) / len(q.window_nll)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=1))  # after each row, so a long run keeps what it measured

    measure("dense", "none (teacher)", None, teacher.model)
    settings = {k: SETTINGS[k] for k in args.settings.split(",")}
    for setting, (bits, group, _) in settings.items():
        plan = CompressionPlan(precision={x.name: LayerPrecision(bits, group) for x in arch.linears})
        measure(setting, "none (RTN)", None, compression.apply(plan, teacher.model, arch))
    windows = sources(args.sources.split(","), teacher.model, tok, splits, args.windows, device, results["seconds"])
    results["generated_sample"] = {k: tok.decode(v[-1, :60]) for k, v in windows.items() if k != "pydoc"}
    for source, ids in windows.items():
        started = time.perf_counter()
        stats = calibration.collect(teacher.model, arch, ids, device)
        results["seconds"][f"statistics_{source}"] = time.perf_counter() - started
        for setting, (bits, group, act_order) in settings.items():
            for recipe in args.recipes.split(","):
                damp, shrink = (float(x) for x in recipe.split(":"))
                plan = CompressionPlan(precision={x.name: LayerPrecision(bits, group, method="gptq", act_order=act_order,
                                                                         damp=damp, shrink=shrink) for x in arch.linears})
                measure(setting, source, (damp, shrink), compression.apply(plan, teacher.model, arch, stats))
    print(tables(results))


if __name__ == "__main__":
    main()
