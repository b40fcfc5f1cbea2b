"""Students cut from the default model, before and after distillation, on held-out pydoc text and another domain.

    python benchmarks/bench_distill.py [--budgets 25,100] [--window-tokens 128] [--batch 4]

Students (Minitron-style cuts of the teacher, chosen by the importance the pruning issue
measures on the default calibration): 24 and 18 of 30 blocks (by block influence), and
75% MLP width (1,152 of 1,536 channels per block, by activation). Each is measured cut
and untrained, then after knowledge distillation (`compression.distill`: KL to the
teacher's top-64 at temperature 2, the plan's default recipe) at each step budget, and
the first student also after plain next-token cross-entropy fine-tuning at the largest
budget. Training text: the default calibration windows (pydoc calibration split, 128 ×
512 tokens) cut into `--window-tokens` pieces; never the evaluation text. Evaluation:
KL to the teacher and perplexity on the pydoc evaluation split and on Debian's licence
texts (/usr/share/common-licenses, a domain no calibration or training text comes from),
`--eval-windows` windows of 256 tokens each. Writes benchmarks/results/bench_distill.json
after every row. `--trainings lora` adds LoRA-only recovery (adapters on every block linear,
merged at the end) of the first student at the largest budget; `full` the same KD with the
teacher's whole distribution computed online (what keeping top-64 costs); `hidden` KD plus
final-hidden-state matching (weight 1); `qat` a 4-bit (g128) quantization-aware KD run,
measured after RTN and after GPTQ 4-bit g128, against the plain KD student quantized the
same two ways (GPTQ statistics collected on each student over the calibration windows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from llmtailor import arch as arch_mod
from llmtailor import compression, models, text
from llmtailor.compression import calibration, distill, structure
from llmtailor.compression.calibration import CalibrationSpec
from llmtailor.compression.layer_cache import model_fingerprint
from llmtailor.evaluators import cost, quality, tasks
from llmtailor.plan import CompressionPlan, Distillation, LayerPrecision, Student
from llmtailor.spaces.base import layer_precision

LICENCES = "/usr/share/common-licenses"
OUT = Path(__file__).resolve().parent / "results" / "bench_distill.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="25,100", help="comma-separated step budgets")
    parser.add_argument("--window-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--students", default="24 of 30 blocks,18 of 30 blocks,MLP 75%")
    parser.add_argument("--trainings", default="kd,ce", help="kd (every budget), ce and lora (the first student, "
                        "largest budget)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-learning-rate", type=float, default=1e-3, help="adapters train at a higher rate")
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--model", default=None, help="the teacher (default: the default model)")
    parser.add_argument("--licences", default=LICENCES, help="folder of the other-domain evaluation text")
    parser.add_argument("--items", type=int, default=0, help="pydoc_cloze items for accuracy (0: no accuracy)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    budgets = [int(b) for b in args.budgets.split(",")]
    teacher = models.load(args.model)
    teacher.model.to(args.torch_device)
    arch, tok = teacher.arch, teacher.tokenizer
    spec = CalibrationSpec()
    key = spec.key(model_fingerprint(teacher.model))
    windows = spec.make_windows(teacher.model, tok)
    stats = calibration.load_or_collect(teacher.model, arch, windows, key, models.cache_dir(), args.torch_device)
    scores = structure.load_or_measure(teacher.model, arch, stats, windows, key, models.cache_dir())
    pieces = windows.reshape(-1, args.window_tokens)
    results = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
               f"{torch.__version__}, {torch.get_num_threads()} threads, device {args.torch_device}",
               "training_text": f"{spec.describe()}, cut into {len(pieces)} windows of {args.window_tokens} tokens",
               "evaluation": {"pydoc": "pydoc evaluation split (held out)", "licences": "Debian's licences (/usr/share/common-licenses)"},
               "batch": args.batch, "learning_rate": args.learning_rate, "rows": []}
    recipe = Distillation(steps=1, learning_rate=args.learning_rate)
    started = time.perf_counter()
    targets = distill.load_or_compute_targets(teacher.model, pieces, recipe.temperature, recipe.top_k,
                                              f"{key}-w{args.window_tokens}", models.cache_dir(), args.torch_device)
    results["teacher_targets_s"] = time.perf_counter() - started
    hidden_targets = None
    if "hidden" in args.trainings.split(","):
        hidden_targets = distill.load_or_compute_targets(teacher.model, pieces, recipe.temperature, recipe.top_k,
                                                         f"{key}-w{args.window_tokens}", models.cache_dir(),
                                                         args.torch_device, hidden=True)
    splits = text.split("pydoc")
    domains = {"pydoc": quality.Reference(teacher.model, tok, splits.evaluation, args.eval_windows, 256),
               "licences": quality.Reference(teacher.model, tok, text.load_documents(args.licences), args.eval_windows, 256)}

    task = tasks.resolve_tasks(["pydoc_cloze"], splits.task, args.items, models.cache_dir()) if args.items else None

    def measure(student_name: str, training: str, steps: int, model, trained=None, bits: int = 16) -> None:
        small = arch_mod.from_model(model)
        stored = CompressionPlan(precision={lin.name: LayerPrecision(bits, 128) for lin in small.linears
                                            if lin.block is not None and bits < 16})
        row = {"student": student_name, "training": training, "steps": steps,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "weight_mb": cost.weight_bytes(stored, small) / 1e6,  # stored bytes, float16 where not quantized
               "train_s": trained.seconds if trained else 0.0,
               "first_loss": trained.losses[0] if trained else None, "last_loss": trained.losses[-1] if trained else None}
        for name, ref in domains.items():
            q = quality.measure(model, ref)
            row[f"kl_{name}"], row[f"perplexity_{name}"] = q.kl, q.perplexity
        if task:
            row["accuracy_pydoc_cloze"] = tasks.accuracy(model, tok, task)["pydoc_cloze"]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    measure("teacher", "-", 0, teacher.model)
    if "qat" in args.trainings.split(","):  # the uniformly quantized teacher, for the same-bytes comparison
        for method in ("rtn", "gptq"):
            measure("teacher", f"4-bit g128 {method.upper()}", 0,
                    quantized(teacher.model, arch, method, windows, args.torch_device, stats), bits=4)
    shapes = {"24 of 30 blocks": Student(layers=structure.blocks_to_keep(scores.blocks, 24)),
              "18 of 30 blocks": Student(layers=structure.blocks_to_keep(scores.blocks, 18)),
              "MLP 75%": Student(mlp_width={b: arch.intermediate_size * 3 // 4 for b in range(arch.num_layers)})}
    chosen = [name for name in args.students.split(",") if name]
    labels = {"kd": "KD (KL to the teacher's top-64, T=2)", "ce": "cross-entropy fine-tuning",
              "lora": f"KD, LoRA rank {args.lora_rank} only (lr {args.lora_learning_rate:g}), merged",
              "full": "KD, the teacher's full distribution (online)", "hidden": "KD + final hidden states (weight 1)",
              "qat": "KD with 4-bit g128 QAT"}
    for index, name in enumerate(chosen):
        cut = structure.choose(arch, shapes[name], scores)
        measure(name, "none (cut only)", 0, structure.cut(teacher.model, arch, cut))
        wanted = args.trainings.split(",")
        trainings = [("kd", b) for b in budgets if "kd" in wanted]
        trainings += [(kind, budgets[-1]) for kind in ("ce", "lora", "full", "hidden", "qat")
                      if kind in wanted and index == 0]
        for kind, steps in trainings:
            student = structure.cut(teacher.model, arch, cut)
            run = Distillation(steps=steps, learning_rate=args.lora_learning_rate if kind == "lora" else args.learning_rate,
                               loss="ce" if kind == "ce" else "kl", lora_rank=args.lora_rank if kind == "lora" else 0,
                               hidden_weight=1.0 if kind == "hidden" else 0.0, qat=kind == "qat")
            small = arch_mod.from_model(student)
            four_bit = {lin.name: LayerPrecision(4, 128) for lin in small.linears if lin.block is not None}
            trained = distill.distill(student, hidden_targets if kind == "hidden" else targets, run,
                                      device=args.torch_device, batch_size=args.batch,
                                      qat_precision=four_bit if kind == "qat" else None,
                                      teacher=teacher.model if kind == "full" else None)
            measure(name, labels[kind], steps, student, trained)
            if "qat" in wanted and index == 0 and kind in ("kd", "qat") and steps == budgets[-1]:
                for method in ("rtn", "gptq"):
                    measure(name, f"{labels[kind]}, then 4-bit g128 {method.upper()}", steps,
                            quantized(student, small, method, windows, args.torch_device), trained, bits=4)
    print(table(results))


def quantized(student, small, method: str, windows, device: str, stats=None):
    """The student with every block linear at 4 bits, group 128, by RTN or GPTQ (statistics of its own inputs)."""
    plan = CompressionPlan(precision={lin.name: layer_precision(4, 128, method, lin, small)
                                      for lin in small.linears if lin.block is not None})
    if method == "gptq" and stats is None:
        stats = calibration.collect(student, small, windows, device)
    return compression.apply(plan, student, small, stats)


def table(results: dict) -> str:
    lines = [f"Machine: {results['machine']}. Date: {results['date']}. Training text: {results['training_text']}; "
             f"batch {results['batch']}, peak learning rate {results['learning_rate']}.", "",
             "| student | training | steps | params (M) | weights MB | train s | KL pydoc | ppl pydoc | KL licences "
             "| ppl licences | accuracy pydoc_cloze |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        accuracy = f"{r['accuracy_pydoc_cloze']:.3f}" if "accuracy_pydoc_cloze" in r else "–"
        weights = f"{r['weight_mb']:.0f}" if "weight_mb" in r else "–"
        lines.append(f"| {r['student']} | {r['training']} | {r['steps']} | {r['params_m']:.1f} | {weights} | "
                     f"{r['train_s']:.0f} | {r['kl_pydoc']:.3f} | {r['perplexity_pydoc']:.2f} | {r['kl_licences']:.3f} | "
                     f"{r['perplexity_licences']:.2f} | {accuracy} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
