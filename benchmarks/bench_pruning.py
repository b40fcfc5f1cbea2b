"""Pruning on the default model: magnitude, Wanda and SparseGPT, the authors' code beside ours, and OWL layer ratios.

    python benchmarks/bench_pruning.py [--wanda-reference DIR] [--sparsegpt-reference DIR]
        [--parts methods,reference,owl] [--reference-windows 64] [--eval-windows 64] [--items 70]
    python benchmarks/bench_pruning.py --tables

Parts (each writes its rows to benchmarks/results/bench_pruning.json as it goes):
- ``methods``: every block linear pruned by magnitude, Wanda and SparseGPT at 50%
  unstructured, 2:4 and 4:8, SparseGPT joint with 4-bit g128 GPTQ, and Wanda then
  4-bit g128 GPTQ, in teacher-input mode (the search's) with the default calibration
  (128 windows of 512 tokens of the pydoc calibration split).
- ``reference``: the authors' code beside ours, both in sequential mode (each block
  on the pruned blocks' outputs, as the authors' drivers run) on the same windows
  (``--reference-windows`` of the pydoc calibration split): Wanda by locuslab/wanda's
  own ``prune_wanda`` driver, SparseGPT by IST-DASLab/sparsegpt's ``SparseGPT`` solver
  run by locuslab/wanda's ``prune_sparsegpt`` driver (the same loop as the authors'
  llama.py). Their code is imported from DIR (``git archive`` of each repository),
  never copied here; a small adapter lets their 2023 drivers call this transformers'
  decoder blocks (it supplies the rotary position embeddings the blocks now take as
  an argument). Per layer, how many keep-mask entries differ from ours.
- ``owl``: Wanda and SparseGPT at 50% and 60%, uniform against OWL ratios
  (``compression.outliers``).
- ``structure``: structured cuts (``compression.structure``; 25% of the MLP width, a
  third of the heads, 6 of 30 blocks, and all three), each a real smaller model: its
  parameter count, its folder's size on disk once saved (float32, as loaded), and its
  CPU prefill (256-token prompt) and greedy decode (64 tokens) speed against the
  original's, the median of repeats in this process (2 threads); and its quality with no
  recovery (distillation is a later step).

Evaluation: the pydoc evaluation split (held out from calibration) and Debian's licence
texts (a domain no calibration uses): KL to the dense teacher, perplexity, and
accuracy on pydoc_cloze (lm-eval; the ``methods`` part only, as it is the dear part on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from llmtailor import compression, models, text  # noqa: E402
from llmtailor.compression import calibration, outliers, structure  # noqa: E402
from llmtailor.compression.blocks import decoder_blocks  # noqa: E402
from llmtailor.compression.calibration import CalibrationSpec  # noqa: E402
from llmtailor.compression.layer_cache import model_fingerprint  # noqa: E402
from llmtailor.compression.sequential import compress_sequential  # noqa: E402
from llmtailor.evaluators import quality, tasks  # noqa: E402
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, Student  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_pruning.json"
LICENCES = "/usr/share/common-licenses"
PATTERNS = {"50% unstructured": (0.5, "unstructured"), "2:4": (0.5, "2:4"), "4:8": (0.5, "4:8")}


def plan_for(arch, method: str, ratio: float | dict[int, float], pattern: str = "unstructured",
             precision: LayerPrecision | None = None) -> CompressionPlan:
    """Every block linear pruned (a ratio per block when `ratio` is a dict), optionally quantized too."""
    def share(lin) -> float:
        return ratio[lin.block] if isinstance(ratio, dict) else ratio
    return CompressionPlan(sparsity={x.name: LayerSparsity(share(x), pattern, method) for x in arch.linears},
                           precision={x.name: precision for x in arch.linears} if precision else {})


class _BlockAdapter(torch.nn.Module):
    """A decoder block as the authors' 2023 drivers call it: block(x, attention_mask=, position_ids=)[0]."""

    def __init__(self, block: torch.nn.Module, rotary: torch.nn.Module) -> None:
        super().__init__()
        self.block = block
        self.rotary = [rotary]  # a list, so the rotary module is not a child (their find_layers walks children)

    def forward(self, hidden, attention_mask=None, position_ids=None, **_):
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        out = self.block(hidden, attention_mask=attention_mask, position_ids=position_ids,
                         position_embeddings=self.rotary[0](hidden, position_ids))
        return out if isinstance(out, tuple) else (out,)


def reference_prune(kind: str, teacher, arch, windows: torch.Tensor, sparsity: LayerSparsity, wanda_dir: Path,
                    sparsegpt_dir: Path | None):
    """A copy of the teacher pruned by the authors' driver (locuslab/wanda's prune_wanda or prune_sparsegpt)."""
    import copy

    sys.path.insert(0, str(wanda_dir))
    from lib import prune as wanda_prune  # noqa: PLC0415

    if sparsegpt_dir is not None:
        sys.path.insert(0, str(sparsegpt_dir))
        import sparsegpt as ist  # noqa: PLC0415

        class Solver(ist.SparseGPT):  # their solver, under the argument names the wanda driver uses
            def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                    super().fasterprune(sparsity, prunen=prune_n, prunem=prune_m, blocksize=blocksize, percdamp=percdamp)

        wanda_prune.SparseGPT = Solver
    wanda_prune.get_loaders = lambda *a, **k: ([(w[None], None) for w in windows], None)
    if not torch.cuda.is_available():  # their solvers time themselves with CUDA calls; this is a CPU run
        torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    model = copy.deepcopy(teacher)
    blocks = decoder_blocks(model, arch)
    rotary = model.model.rotary_emb
    for i in range(len(blocks)):
        blocks[i] = _BlockAdapter(blocks[i], rotary)
    model.seqlen, model.hf_device_map = windows.shape[1], {}
    args = types.SimpleNamespace(nsamples=len(windows), seed=0, sparsity_ratio=sparsity.ratio, use_variant=False)
    n, m = (0, 0) if sparsity.pattern == "unstructured" else (int(x) for x in sparsity.pattern.split(":"))
    prune_n = m - n if m else 0  # their N is the count pruned of every M
    run = wanda_prune.prune_wanda if kind == "wanda" else wanda_prune.prune_sparsegpt
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        run(args, model, None, torch.device("cpu"), prune_n=prune_n, prune_m=m)
    for i in range(len(blocks)):
        blocks[i] = blocks[i].block
    return model


def tables(results: dict) -> str:
    """Markdown tables of a run."""
    lines = [f"Machine: {results['machine']}. Date: {results['date']}.", "",
             "| part | plan | calibration mode | KL pydoc | ppl pydoc | KL licences | ppl licences | accuracy pydoc_cloze "
             "| kept weights | seconds to compress |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        accuracy = f"{r['accuracy_pydoc_cloze']:.3f}" if "accuracy_pydoc_cloze" in r else "–"
        lines.append(f"| {r['part']} | {r['plan']} | {r['mode']} | {r['kl_pydoc']:.4f} | {r['perplexity_pydoc']:.2f} | "
                     f"{r['kl_licences']:.4f} | {r['perplexity_licences']:.2f} | {accuracy} | {r['kept_share']:.3f} | "
                     f"{r['compress_s']:.0f} |")
    if results.get("structure"):
        base = results["structure"][0]
        lines += ["", "| cut | parameters | saved folder (MB) | prefill tokens/s | decode tokens/s | prefill speed-up "
                  "| decode speed-up |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results["structure"]:
            lines.append(f"| {r['cut']} | {r['parameters'] / 1e6:.1f} M | {r['folder_bytes'] / 1e6:.0f} | "
                         f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                         f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}× | "
                         f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× |")
    if results.get("masks"):
        lines += ["", "| method | pattern | layers | layers with equal masks | blocks with equal masks "
                  "| keep-mask entries that differ |", "|---|---|---:|---:|---|---:|"]
        for r in results["masks"]:
            lines.append(f"| {r['method']} | {r['pattern']} | {r['layers']} | {r['layers_equal']} | "
                         f"{_ranges(r['blocks_with_equal_masks'])} | {r['entries_differing_share']:.2e} |")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    """0, 1, 2, 5 -> '0–2, 5'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}–{b}" if a != b else f"{a}" for a, b in spans) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", action="store_true", help="print the Markdown tables of the last run and stop")
    parser.add_argument("--parts", default="methods,reference,owl,structure")
    parser.add_argument("--wanda-reference", type=Path, help="git archive of locuslab/wanda")
    parser.add_argument("--wanda-commit", default="unknown")
    parser.add_argument("--sparsegpt-reference", type=Path, help="git archive of IST-DASLab/sparsegpt")
    parser.add_argument("--sparsegpt-commit", default="unknown")
    parser.add_argument("--reference-windows", type=int, default=64, help="512-token windows for the sequential rows")
    parser.add_argument("--reference-patterns", default="50% unstructured", help="comma-separated names of PATTERNS")
    parser.add_argument("--eval-windows", type=int, default=64, help="256-token evaluation windows per domain")
    parser.add_argument("--items", type=int, default=70, help="pydoc_cloze items for accuracy (0: no accuracy)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(args.out.read_text())))
        return
    parts = set(args.parts.split(","))
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = models.load(None)
    arch, tok = teacher.arch, teacher.tokenizer
    splits = text.split("pydoc")
    spec = CalibrationSpec()
    results: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                     f"torch {torch.__version__}, {torch.get_num_threads()} threads", "rows": [], "masks": [],
                     "calibration": spec.describe(), "references": {
                         "locuslab/wanda": args.wanda_commit, "IST-DASLab/sparsegpt": args.sparsegpt_commit}}
    domains = {"pydoc": quality.Reference(teacher.model, tok, splits.evaluation, args.eval_windows, 256),
               "licences": quality.Reference(teacher.model, tok, text.load_documents(LICENCES), args.eval_windows, 256)}
    results["evaluation"] = {"pydoc": "pydoc evaluation split (held out from calibration)",
                             "licences": f"{LICENCES} (Debian's licence texts)", "tokens_pydoc": domains["pydoc"].tokens,
                             "tokens_licences": domains["licences"].tokens}
    task = tasks.resolve_tasks(["pydoc_cloze"], splits.task, args.items, models.cache_dir()) if args.items else None
    total = sum(lin.params for lin in arch.linears)

    def measure(part: str, label: str, mode: str, model, seconds: float) -> None:
        """Quality of one model; accuracy (the dear part on a CPU) for the methods part only."""
        kept = sum(int((m.weight != 0).sum()) for n, m in model.named_modules()  # of a cut model too
                   if isinstance(m, torch.nn.Linear) and not (arch.tie_embeddings and n == arch.lm_head_name))
        row = {"part": part, "plan": label, "mode": mode, "compress_s": seconds, "kept_share": kept / total}
        for name, ref in domains.items():
            q = quality.measure(model, ref)
            row[f"kl_{name}"], row[f"perplexity_{name}"] = q.kl, q.perplexity
        if task and part == "methods":
            row["accuracy_pydoc_cloze"] = tasks.accuracy(model, tok, task)["pydoc_cloze"]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    def timed(make, *arguments):
        started = time.perf_counter()
        model = make(*arguments)
        return model, time.perf_counter() - started

    measure("methods", "dense", "-", teacher.model, 0.0)
    if parts & {"methods", "owl", "structure"}:  # the default calibration's statistics (from the cache when a run made them)
        started = time.perf_counter()
        stats = calibration.load_or_collect(teacher.model, arch, lambda: spec.make_windows(teacher.model, tok, progress=True),
                                            spec.key(model_fingerprint(teacher.model)), models.cache_dir(), progress=True)
        results["statistics_s"] = time.perf_counter() - started

    if "methods" in parts:
        for pattern_name, (ratio, pattern) in PATTERNS.items():
            for method in ("magnitude", "wanda", "sparsegpt"):
                model, seconds = timed(compression.apply, plan_for(arch, method, ratio, pattern), teacher.model, arch, stats)
                measure("methods", f"{method} {pattern_name}", "teacher inputs", model, seconds)
        four_bit = LayerPrecision(4, 128, method="gptq")
        for method, label in (("sparsegpt", "sparsegpt + gptq 4-bit g128, one solve"),
                              ("wanda", "wanda, then gptq 4-bit g128")):
            plan = plan_for(arch, method, 0.5, precision=four_bit)
            model, seconds = timed(compression.apply, plan, teacher.model, arch, stats)
            measure("methods", f"{label} (50% unstructured)", "teacher inputs", model, seconds)
        model, seconds = timed(compression.apply, CompressionPlan(precision={x.name: four_bit for x in arch.linears}),
                               teacher.model, arch, stats)
        measure("methods", "gptq 4-bit g128 alone (dense)", "teacher inputs", model, seconds)

    if "reference" in parts and args.wanda_reference:
        windows = calibration.calibration_windows(tok, splits.calibration, args.reference_windows, 512, seed=0)
        for pattern_name in args.reference_patterns.split(","):
            ratio, pattern = PATTERNS[pattern_name]
            for method in ("wanda", "sparsegpt"):
                if method == "sparsegpt" and args.sparsegpt_reference is None:
                    continue
                ours, seconds = timed(compress_sequential, plan_for(arch, method, ratio, pattern), teacher.model, arch,
                                      windows)
                measure("reference", f"{method} {pattern_name} (ours)", "sequential", ours, seconds)
                theirs, seconds = timed(reference_prune, method, teacher.model, arch, windows,
                                        LayerSparsity(ratio, pattern, method), args.wanda_reference, args.sparsegpt_reference)
                measure("reference", f"{method} {pattern_name} (reference)", "sequential", theirs, seconds)
                differing = [int(((ours.get_submodule(x.name).weight != 0) != (theirs.get_submodule(x.name).weight != 0)
                                  ).sum()) for x in arch.linears]
                blocks_equal = [b for b in range(arch.num_layers)
                                if all(d == 0 for d, x in zip(differing, arch.linears, strict=True) if x.block == b)]
                results["masks"].append({"method": method, "pattern": pattern_name, "layers": len(differing),
                                         "layers_equal": sum(d == 0 for d in differing),
                                         "entries_differing_share": sum(differing) / total,
                                         "blocks_with_equal_masks": blocks_equal,
                                         "differing_per_layer": {x.name: d for x, d in zip(arch.linears, differing, strict=True)}})
                print(json.dumps(results["masks"][-1]), flush=True)
                args.out.write_text(json.dumps(results, indent=1))

    if "owl" in parts:
        shares = outliers.outlier_shares(teacher.model, arch, stats)
        results["outlier_shares"] = shares
        for ratio in (0.5, 0.6):
            for method in ("wanda", "sparsegpt"):
                for label, ratios in (("uniform", ratio), ("OWL", outliers.layer_ratios(shares, ratio))):
                    model, seconds = timed(compression.apply, plan_for(arch, method, ratios), teacher.model, arch, stats)
                    measure("owl", f"{method} {ratio:.0%} {label}", "teacher inputs", model, seconds)
    if "structure" in parts:
        started = time.perf_counter()
        windows = spec.make_windows(teacher.model, tok)[:32]
        scores = structure.importance(teacher.model, arch, stats, windows)
        results["importance_s"], results["block_influence"] = time.perf_counter() - started, scores.blocks
        prompt = calibration.calibration_windows(tok, splits.evaluation, 1, 256, seed=1)
        all_blocks = range(arch.num_layers)
        kept = structure.blocks_to_keep(scores.blocks, arch.num_layers - 6)
        heads, width = arch.num_heads * 2 // 3, arch.intermediate_size * 3 // 4
        cuts = {"original": Student(),
                "MLP width -25%": Student(mlp_width={b: width for b in all_blocks}),
                "heads -1/3 (one KV group of three)": Student(heads={b: heads for b in all_blocks}),
                "6 of 30 blocks removed": Student(layers=kept),
                "all three": Student(layers=kept, heads={b: heads for b in kept}, mlp_width={b: width for b in kept})}
        results["structure"] = []
        for label, student in cuts.items():
            plan = CompressionPlan(student=student)
            model, seconds = timed(compression.apply, plan, teacher.model, arch, None, None, scores)
            row = {"cut": label, "parameters": sum(p.numel() for p in model.parameters()), **speed(model, prompt)}
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                row["folder_bytes"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
            results["structure"].append(row)
            print(json.dumps(row), flush=True)
            measure("structure", label, "-", model, seconds)
    print(tables(results))


def speed(model, prompt: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Median prefill tokens/s over a 256-token prompt and greedy decode tokens/s for 64 new tokens."""
    prefill, decode = [], []
    with torch.no_grad():
        model(input_ids=prompt[:, :16])  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model(input_ids=prompt, use_cache=False)
            prefill.append(prompt.shape[1] / (time.perf_counter() - started))
        for _ in range(3):
            started = time.perf_counter()
            out = model.generate(prompt[:, :32], max_new_tokens=64, min_new_tokens=64, do_sample=False)
            decode.append((out.shape[1] - 32) / (time.perf_counter() - started))
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode)}


if __name__ == "__main__":
    main()
