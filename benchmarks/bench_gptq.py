"""GPTQ on the default model: llmtailor's against the reference code and round-to-nearest, in both calibration modes.

    python benchmarks/bench_gptq.py [--reference DIR] [--windows 64] [--eval-windows 16] [--items 70]
        [--settings "3-bit g128,..."] [--seeds 0,1,2] [--recipe paper|default] [--torch-device cuda] [--out FILE]
    python benchmarks/bench_gptq.py --tables     # the Markdown tables of the last run's JSON

DIR is a checkout of the reference GPTQ code (IST-DASLab/gptq; its gptq.py and
quant.py are imported from there, never copied here). Its solver is run on the same
statistics H, the same layers and the same settings as ours: per layer (the error
sum‖WX − QX‖² over the calibration tokens) and for the whole model, in teacher-input
mode (every layer calibrated on the teacher's activations) and in sequential mode
(blocks in order, each on the compressed blocks' outputs; the same driver for both
solvers). The block linears are quantized, the embedding/head is left at 16 bits, as
in the GPTQ paper. Calibration: windows of the pydoc calibration split. Evaluation:
the pydoc evaluation split (held out from calibration) and, as another domain no
calibration set uses, the licence texts Debian installs in /usr/share/common-licenses.

Solver-against-solver differences of a few tenths of a percent per layer compound
through 30 blocks into whole-model differences of a few percent either way, so
``--seeds 0,1,2`` repeats the comparison on calibration windows drawn with other
seeds and ``--tables`` then adds the perplexity ratio of ours to the reference per
seed. ``--recipe default`` runs GPTQ with the default recipe of the search spaces
(act-order, damp 0.01, H shrunk halfway to its diagonal; ``calibration.GPTQ_*``)
instead of the paper's. ``--items 0`` skips accuracy (lm-eval).

Writes benchmarks/results/bench_gptq.json (or --out) after every row, and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from llmtailor import compression, models, text  # noqa: E402
from llmtailor.compression import calibration, quantize  # noqa: E402
from llmtailor.compression.layer_cache import LayerCache, model_fingerprint  # noqa: E402
from llmtailor.compression.sequential import compress_sequential  # noqa: E402
from llmtailor.evaluators import quality, tasks  # noqa: E402
from llmtailor.plan import CompressionPlan, LayerPrecision  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_gptq.json"
LICENCES = Path("/usr/share/common-licenses")
SETTINGS = {  # name -> (bits, group size, act-order)
    "8-bit per-channel": (8, 0, False),
    "4-bit g128": (4, 128, False),
    "4-bit g128 act-order": (4, 128, True),
    "4-bit per-channel": (4, 0, False),
    "3-bit g128": (3, 128, False),
}


class _Dequantized:
    """What the reference solver returns: weights on its grid, already dequantized (enough for apply)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def dequantize(self) -> torch.Tensor:
        return self.weight


def reference_solver(reference_dir: Path, float16_scales: bool = False):
    """A quantizer with our signature that runs the reference GPTQ on the given H.

    ``float16_scales`` rounds the reference's grid scales to float16, as ours are stored: then the two solvers
    should give the same codes, which the per-layer table checks (the difference left is the storage, not the
    algorithm)."""
    sys.path.insert(0, str(reference_dir))
    import gptq as reference_gptq  # noqa: PLC0415
    import quant as reference_quant  # noqa: PLC0415

    class Float16ScaleQuantizer(reference_quant.Quantizer):
        def find_params(self, x, weight=False):
            super().find_params(x, weight)
            self.scale = self.scale.half().float()

    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference times itself with CUDA; this is a CPU run

    def solve(weight: torch.Tensor, precision: LayerPrecision, hessian: torch.Tensor | None = None, mask=None):
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = weight.clone().float()
        solver = reference_gptq.GPTQ(layer)
        solver.H = 2 * hessian.to(weight.device, torch.float32)  # the reference keeps 2·XᵀX/n; the scale does not change the solve
        solver.nsamples = 1
        solver.quantizer = (Float16ScaleQuantizer if float16_scales else reference_quant.Quantizer)()
        solver.quantizer.configure(precision.bits, perchannel=True, sym=precision.symmetric, mse=False)
        group = precision.group_size if 0 < precision.group_size < weight.shape[1] else -1
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            solver.fasterquant(blocksize=128, percdamp=precision.damp, groupsize=group, actorder=precision.act_order,
                               static_groups=precision.act_order and group != -1)
        return _Dequantized(layer.weight.data.clone())

    return solve


def plan_for(arch, method: str, bits: int, group: int, act_order: bool, shrink: float = 0.0) -> CompressionPlan:
    return CompressionPlan(precision={x.name: LayerPrecision(bits, group, method=method, act_order=act_order,
                                                             shrink=shrink) for x in arch.linears})


def licence_documents(folder: Path = LICENCES) -> list[str]:
    seen, docs = set(), []
    for path in sorted(folder.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        docs += [p.strip() for p in real.read_text(errors="replace").split("\n\n") if p.strip()]
    return docs


def tables(results: dict) -> str:
    """Markdown tables of a run: whole-model quality per plan and mode, the ratio to the reference per seed where
    there are several seeds, then per-layer errors."""
    seeded = len({r.get("seed", 0) for r in results["rows"]}) > 1
    lines = ["| plan | calibration mode |" + (" seed |" if seeded else "") + " KL pydoc | perplexity pydoc | KL licences"
             " | perplexity licences | accuracy pydoc_cloze | seconds to compress |",
             "|---|---|" + ("---:|" if seeded else "") + "---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        accuracy = f"{r['accuracy_pydoc_cloze']:.3f}" if "accuracy_pydoc_cloze" in r else "–"
        seed = f" {r.get('seed', 0)} |" if seeded else ""
        lines.append(f"| {r['plan']} | {r['mode']} |{seed} {r['kl_pydoc']:.4f} | {r['perplexity_pydoc']:.3f} | "
                     f"{r['kl_licences']:.4f} | {r['perplexity_licences']:.3f} | {accuracy} | {r['compress_s']:.1f} |")
    if any(r["plan"].startswith("gptq-reference") for r in results["rows"]):
        lines += ["", *ratio_table(results["rows"])]
    if results.get("layers"):
        solvers = [k.removeprefix("error_") for k in results["layers"][0] if k.startswith("error_")]
        same = "weights_differing_from_reference_fp16_scales" in results["layers"][0]
        lines += ["", "| layer | setting | " + " | ".join(f"‖WX − QX‖² {s}" for s in solvers) + " |"
                  + (" weights ours ≠ reference with float16 scales |" if same else ""),
                  "|---|---|" + "---:|" * (len(solvers) + same)]
        for r in results["layers"]:
            differing = f" {r['weights_differing_from_reference_fp16_scales']:.3%} |" if same else ""
            lines.append(f"| {r['layer']} | {r['setting']} | " + " | ".join(f"{r['error_' + s]:.4g}" for s in solvers)
                         + " |" + differing)
    return "\n".join(lines)


def ratio_table(rows: list[dict]) -> list[str]:
    """Perplexity of ours over each reference solver's, per setting, mode and seed (– where a seed was not run),
    and the geometric mean over the seeds measured."""
    by_key = {(r["plan"], r["mode"], r.get("seed", 0)): r for r in rows}
    seeds = sorted({r.get("seed", 0) for r in rows})
    lines = ["| setting | against | calibration mode | domain | " + " | ".join(f"seed {s}" for s in seeds)
             + " | geometric mean (seeds) |", "|---|---|---|---|" + "---:|" * (len(seeds) + 1)]
    done = set()
    for plan, mode, _ in by_key:
        if not plan.startswith("gptq ") or (plan, mode) in done:
            continue
        done.add((plan, mode))
        setting = plan.removeprefix("gptq ")
        for reference in ("gptq-reference", "gptq-reference-fp16-scales"):
            for domain in ("pydoc", "licences"):
                ratios = {s: by_key[plan, mode, s][f"perplexity_{domain}"]
                          / by_key[f"{reference} {setting}", mode, s][f"perplexity_{domain}"]
                          for s in seeds if (f"{reference} {setting}", mode, s) in by_key and (plan, mode, s) in by_key}
                if ratios:
                    mean = statistics.geometric_mean(ratios.values())
                    lines.append(f"| {setting} | {reference} | {mode} | {domain} | "
                                 + " | ".join(f"{ratios[s] - 1:+.1%}" if s in ratios else "–" for s in seeds)
                                 + f" | {mean - 1:+.1%} ({len(ratios)}) |")
    return lines



def reference_commit(args) -> str:
    """The reference's commit: as given, else its own git HEAD. `git -C DIR` inside another repository (an export
    placed in this project's tree) would answer that repository's HEAD, so DIR must be the top of its checkout."""
    if args.reference_commit:
        return args.reference_commit
    git = ["git", "-C", str(args.reference), "rev-parse"]
    top = subprocess.run(git + ["--show-toplevel"], capture_output=True, text=True).stdout.strip()
    if not top or Path(top).resolve() != args.reference.resolve():
        return "unknown (not a git checkout; pass --reference-commit)"
    return subprocess.run(git + ["HEAD"], capture_output=True, text=True).stdout.strip()

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", action="store_true", help="print the Markdown tables of the last run and stop")
    parser.add_argument("--reference", type=Path, help="checkout of the reference GPTQ code (IST-DASLab/gptq)")
    parser.add_argument("--reference-commit", help="its commit, where DIR is an export without .git")
    parser.add_argument("--windows", type=int, default=64, help="512-token calibration windows")
    parser.add_argument("--eval-windows", type=int, default=16, help="256-token evaluation windows per domain")
    parser.add_argument("--items", type=int, default=70, help="pydoc_cloze items for accuracy (0: no accuracy)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the calibration windows")
    parser.add_argument("--recipe", choices=["paper", "default"], default="paper",
                        help="paper: GPTQ as published; default: the search spaces' recipe (calibration.GPTQ_*)")
    parser.add_argument("--solvers", help="whole-model solvers: gptq, gptq-reference, gptq-reference-fp16-scales "
                        "(the reference with its scales rounded to float16, as ours are stored); default: gptq, and "
                        "gptq-reference with --reference")
    parser.add_argument("--modes", default="teacher,sequential", help="calibration modes of the GPTQ rows")
    parser.add_argument("--whole-model-only", action="store_true", help="skip the per-layer errors and cache timing")
    parser.add_argument("--layers-only", action="store_true", help="only the per-layer errors and cache timing")
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--licences", type=Path, default=LICENCES, help="the other-domain text (a copy, on another machine)")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(args.out.read_text())))
        return
    device = models.torch_device(args.torch_device)
    torch.set_num_threads(os.cpu_count() or 1)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", no GPU"
    results: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                     f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}, ran on {device}",
                     "recipe": args.recipe, "rows": []}

    teacher = models.load(args.model)
    arch, tok = teacher.arch, teacher.tokenizer
    teacher.model.to(device)
    splits = text.split("pydoc")
    domains = {"pydoc": quality.Reference(teacher.model, tok, splits.evaluation, args.eval_windows, 256),
               "licences": quality.Reference(teacher.model, tok, licence_documents(args.licences), args.eval_windows, 256)}
    results["evaluation"] = {"pydoc": "pydoc evaluation split (held out from calibration)",
                             "licences": f"{LICENCES} (Debian's licence texts; no calibration set uses them)",
                             "tokens_per_domain": domains["pydoc"].tokens}
    task = tasks.resolve_tasks(["pydoc_cloze"], splits.task, args.items, models.cache_dir()) if args.items else None

    solvers = args.solvers.split(",") if args.solvers else ["gptq", "gptq-reference"] if args.reference else ["gptq"]
    if args.reference:
        quantize.QUANTIZERS["gptq-reference"] = reference_solver(args.reference)
        quantize.QUANTIZERS["gptq-reference-fp16-scales"] = reference_solver(args.reference, float16_scales=True)
        quantize.CALIBRATED.update({"gptq-reference", "gptq-reference-fp16-scales"})
    elif solvers != ["gptq"]:
        parser.error("--solvers: the reference's solvers need --reference DIR")
    if unknown := set(solvers) - {"gptq", "gptq-reference", "gptq-reference-fp16-scales"}:
        parser.error(f"--solvers: unknown {sorted(unknown)}")
    if args.reference:
        results["reference"] = {"repository": "IST-DASLab/gptq", "commit": reference_commit(args)}

    def measure(label: str, mode: str, model, seconds: float, accuracy: bool, seed: int) -> dict:
        row = {"plan": label, "mode": mode, "seed": seed, "compress_s": seconds}
        for name, ref in domains.items():
            q = quality.measure(model, ref)
            row[f"kl_{name}"], row[f"perplexity_{name}"] = q.kl, q.perplexity
        if accuracy and task:
            row["accuracy_pydoc_cloze"] = tasks.accuracy(model, tok, task)["pydoc_cloze"]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))  # after each row, so a cut-off run keeps what it measured
        return row

    default = args.recipe == "default"
    shrink = calibration.GPTQ_SHRINK if default else 0.0
    settings = {k: SETTINGS[k] for k in args.settings.split(",")}
    seeds = [int(x) for x in args.seeds.split(",")]
    modes = set(args.modes.split(","))
    if not modes <= {"teacher", "sequential"}:
        parser.error(f"--modes: teacher and/or sequential, not {args.modes!r}")
    if not args.layers_only:
        measure("dense", "-", teacher.model, 0.0, True, seeds[0])
    for setting, (bits, group, act_order) in settings.items():
        if not act_order and not args.layers_only:
            started = time.perf_counter()
            model = compression.apply(plan_for(arch, "rtn", bits, group, False), teacher.model, arch)
            measure(f"RTN {setting}", "-", model, time.perf_counter() - started, True, seeds[0])
    for seed in seeds:
        windows = calibration.calibration_windows(tok, splits.calibration, args.windows, 512, seed=seed)
        started = time.perf_counter()
        stats = calibration.collect(teacher.model, arch, windows, device, progress=True)
        results.setdefault("calibration", {"text": "pydoc calibration split", "windows": args.windows,
                                           "window_tokens": 512, "tokens": stats.tokens, "statistics_s": {}})
        results["calibration"]["statistics_s"][str(seed)] = time.perf_counter() - started
        for setting, (bits, group, act_order) in settings.items() if not args.layers_only else ():
            if default and not act_order and f"{setting} act-order" in settings:
                continue  # the default recipe always orders by activation: the same plan as the act-order setting
            label = setting + (" act-order" if default and not act_order else "")
            for solver in solvers:
                plan = plan_for(arch, solver, bits, group, act_order or default, shrink if solver == "gptq" else 0.0)
                name = f"{solver}{' (default recipe)' if default and solver == 'gptq' else ''} {label}"
                if "teacher" in modes:
                    started = time.perf_counter()
                    model = compression.apply(plan, teacher.model, arch, stats)
                    measure(name, "teacher inputs", model, time.perf_counter() - started, solver == "gptq", seed)
                    del model
                if "sequential" in modes:
                    started = time.perf_counter()
                    model = compress_sequential(plan, teacher.model, arch, windows, device)
                    measure(name, "sequential", model, time.perf_counter() - started, solver == "gptq", seed)
                    del model
    if not args.whole_model_only:
        per_layer_and_cache(results, teacher, arch, stats, settings,
                            list(dict.fromkeys(solvers + (["gptq-reference-fp16-scales"] if args.reference else []))))
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("rows", "layers")}, indent=1))
    print(tables(results))


def per_layer_and_cache(results: dict, teacher, arch, stats, settings: dict, solvers: list[str]) -> None:
    """Each solver's reconstruction error on three layers with the same H, and trial time from a warm cache."""
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.14.mlp.down_proj", "model.layers.29.self_attn.o_proj"]
    results["layers"] = []
    for name in layers:
        weight, hessian = teacher.model.get_submodule(name).weight.data, stats.hessian(name)
        for setting, (bits, group, act_order) in settings.items():
            row = {"layer": name, "setting": setting}
            approx = {}
            for solver in ["rtn", *solvers]:
                precision = LayerPrecision(bits, group, method=solver, act_order=act_order and solver != "rtn")
                approx[solver] = quantize.QUANTIZERS[solver](weight, precision, hessian=hessian).dequantize().to(weight.device)
                # summed over the calibration tokens: n · trace((W − Q) H (W − Q)ᵀ)
                row[f"error_{solver}"] = calibration.output_error(weight, approx[solver], hessian) * stats.tokens
            if "gptq-reference-fp16-scales" in approx:  # same grid storage: do the solvers give the same weights?
                row["weights_differing_from_reference_fp16_scales"] = float(
                    ((approx["gptq"] - approx["gptq-reference-fp16-scales"]).abs() > 1e-6).float().mean())
            results["layers"].append(row)
            print(json.dumps(row), flush=True)

    # Trial time: assembling a GPTQ model from a warm per-layer cache against solving it again.
    with tempfile.TemporaryDirectory() as folder:
        cache = LayerCache(Path(folder), model_fingerprint(teacher.model), "bench")
        plan = plan_for(arch, "gptq", 4, 128, False)
        timings = {"cold": [], "warm": []}
        for attempt in range(3):
            started = time.perf_counter()
            compression.apply(plan, teacher.model, arch, stats, cache)
            timings["cold" if attempt == 0 else "warm"].append(time.perf_counter() - started)
        results["cache"] = {"solve_and_store_s": timings["cold"][0], "warm_assembly_s": statistics.median(timings["warm"]),
                            "size_on_disk_bytes": cache.size_bytes(), "hit_rate_after_3_assemblies": cache.hit_rate}


if __name__ == "__main__":
    main()
