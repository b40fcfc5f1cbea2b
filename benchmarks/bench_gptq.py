"""GPTQ on the default model: llmtailor's against the reference code and round-to-nearest, in both calibration modes.

    python benchmarks/bench_gptq.py [--reference DIR] [--windows 64] [--eval-windows 16] [--items 70]
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

Writes benchmarks/results/bench_gptq.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
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


def reference_solver(reference_dir: Path):
    """A quantizer with our signature that runs the reference GPTQ on the given H."""
    sys.path.insert(0, str(reference_dir))
    import gptq as reference_gptq  # noqa: PLC0415
    import quant as reference_quant  # noqa: PLC0415

    torch.cuda.synchronize = lambda *a, **k: None  # the reference times itself with CUDA; this is a CPU run

    def solve(weight: torch.Tensor, precision: LayerPrecision, hessian: torch.Tensor | None = None, mask=None):
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = weight.clone().float()
        solver = reference_gptq.GPTQ(layer)
        solver.H = 2 * hessian.clone().float()  # the reference keeps 2·XᵀX/n; the scale does not change the solve
        solver.nsamples = 1
        solver.quantizer = reference_quant.Quantizer()
        solver.quantizer.configure(precision.bits, perchannel=True, sym=precision.symmetric, mse=False)
        group = precision.group_size if 0 < precision.group_size < weight.shape[1] else -1
        with open(os.devnull, "w") as quiet, _redirect(quiet):
            solver.fasterquant(blocksize=128, percdamp=precision.damp, groupsize=group, actorder=precision.act_order,
                               static_groups=precision.act_order and group != -1)
        return _Dequantized(layer.weight.data.clone())

    return solve


class _redirect:
    def __init__(self, stream) -> None:
        self.stream, self.saved = stream, None

    def __enter__(self):
        self.saved, sys.stdout = sys.stdout, self.stream

    def __exit__(self, *exc):
        sys.stdout = self.saved


def plan_for(arch, method: str, bits: int, group: int, act_order: bool) -> CompressionPlan:
    return CompressionPlan(precision={x.name: LayerPrecision(bits, group, method=method, act_order=act_order)
                                      for x in arch.linears})


def licence_documents() -> list[str]:
    seen, docs = set(), []
    for path in sorted(LICENCES.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        docs += [p.strip() for p in real.read_text(errors="replace").split("\n\n") if p.strip()]
    return docs


def tables(results: dict) -> str:
    """Markdown tables of a run: whole-model quality per plan and mode, then per-layer errors."""
    lines = ["| plan | calibration mode | KL pydoc | perplexity pydoc | KL licences | perplexity licences | "
             "accuracy pydoc_cloze | seconds to compress |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        accuracy = f"{r['accuracy_pydoc_cloze']:.3f}" if "accuracy_pydoc_cloze" in r else "–"
        lines.append(f"| {r['plan']} | {r['mode']} | {r['kl_pydoc']:.4f} | {r['perplexity_pydoc']:.3f} | "
                     f"{r['kl_licences']:.4f} | {r['perplexity_licences']:.3f} | {accuracy} | {r['compress_s']:.1f} |")
    solvers = [k.removeprefix("error_") for k in results["layers"][0] if k.startswith("error_")]
    lines += ["", "| layer | setting | " + " | ".join(f"‖WX − QX‖² {s}" for s in solvers) + " |",
              "|---|---|" + "---:|" * len(solvers)]
    for r in results["layers"]:
        lines.append(f"| {r['layer']} | {r['setting']} | " + " | ".join(f"{r['error_' + s]:.4g}" for s in solvers) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", action="store_true", help="print the Markdown tables of the last run and stop")
    parser.add_argument("--reference", type=Path, help="checkout of the reference GPTQ code (IST-DASLab/gptq)")
    parser.add_argument("--reference-commit", help="its commit, where DIR is an export without .git")
    parser.add_argument("--windows", type=int, default=64, help="512-token calibration windows")
    parser.add_argument("--eval-windows", type=int, default=16, help="256-token evaluation windows per domain")
    parser.add_argument("--items", type=int, default=70, help="pydoc_cloze items for accuracy")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(OUT.read_text())))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                     f"torch {torch.__version__}, {torch.get_num_threads()} threads", "rows": []}

    teacher = models.load(None)
    arch, tok = teacher.arch, teacher.tokenizer
    splits = text.split("pydoc")
    windows = calibration.calibration_windows(tok, splits.calibration, args.windows, 512, seed=0)
    started = time.perf_counter()
    stats = calibration.collect(teacher.model, arch, windows, progress=True)
    results["calibration"] = {"text": "pydoc calibration split", "windows": args.windows, "window_tokens": 512,
                              "tokens": stats.tokens, "statistics_s": time.perf_counter() - started}
    domains = {"pydoc": quality.Reference(teacher.model, tok, splits.evaluation, args.eval_windows, 256),
               "licences": quality.Reference(teacher.model, tok, licence_documents(), args.eval_windows, 256)}
    results["evaluation"] = {"pydoc": "pydoc evaluation split (held out from calibration)",
                             "licences": f"{LICENCES} (Debian's licence texts; no calibration set uses them)",
                             "tokens_per_domain": domains["pydoc"].tokens}
    task = tasks.resolve_tasks(["pydoc_cloze"], splits.task, args.items, models.cache_dir())

    solvers = ["gptq"]
    if args.reference:
        quantize.QUANTIZERS["gptq-reference"] = reference_solver(args.reference)
        quantize.CALIBRATED.add("gptq-reference")
        solvers.append("gptq-reference")
        commit = subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"], capture_output=True, text=True)
        results["reference"] = {"repository": "IST-DASLab/gptq",
                                "commit": commit.stdout.strip() or args.reference_commit or "unknown (not a git checkout)"}

    def measure(label: str, mode: str, model, seconds: float, accuracy: bool) -> dict:
        row = {"plan": label, "mode": mode, "compress_s": seconds}
        for name, ref in domains.items():
            q = quality.measure(model, ref)
            row[f"kl_{name}"], row[f"perplexity_{name}"] = q.kl, q.perplexity
        if accuracy:
            row["accuracy_pydoc_cloze"] = tasks.accuracy(model, tok, task)["pydoc_cloze"]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        return row

    measure("dense", "-", teacher.model, 0.0, True)
    for setting, (bits, group, act_order) in SETTINGS.items():
        if not act_order:
            started = time.perf_counter()
            model = compression.apply(plan_for(arch, "rtn", bits, group, False), teacher.model, arch)
            measure(f"RTN {setting}", "-", model, time.perf_counter() - started, True)
        for solver in solvers:
            plan = plan_for(arch, solver, bits, group, act_order)
            started = time.perf_counter()
            model = compression.apply(plan, teacher.model, arch, stats)
            measure(f"{solver} {setting}", "teacher inputs", model, time.perf_counter() - started, solver == "gptq")
            started = time.perf_counter()
            model = compress_sequential(plan, teacher.model, arch, windows)
            measure(f"{solver} {setting}", "sequential", model, time.perf_counter() - started, False)
            del model

    # One layer at a time, on the same H: the reconstruction error of each solver.
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.14.mlp.down_proj", "model.layers.29.self_attn.o_proj"]
    results["layers"] = []
    for name in layers:
        weight, hessian = teacher.model.get_submodule(name).weight.data, stats.hessian(name)
        for setting, (bits, group, act_order) in SETTINGS.items():
            row = {"layer": name, "setting": setting}
            for solver in ["rtn", *solvers]:
                precision = LayerPrecision(bits, group, method=solver, act_order=act_order and solver != "rtn")
                approx = quantize.QUANTIZERS[solver](weight, precision, hessian=hessian).dequantize()
                # summed over the calibration tokens: n · trace((W − Q) H (W − Q)ᵀ)
                row[f"error_{solver}"] = calibration.output_error(weight, approx, hessian) * stats.tokens
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
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("rows", "layers")}, indent=1))
    print(tables(results))


if __name__ == "__main__":
    main()
