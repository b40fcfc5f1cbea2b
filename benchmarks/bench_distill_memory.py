"""Resident memory of a search process while it trains a student, and after (issue 18's 3x bound).

A sweep holds the float32 teacher, its runtime and the teacher's top-64 targets; a trial
that distills adds a cut student and its training: gradients, AdamW's two moments and
the activations of a batch (4 windows of 128 tokens, as ``compression.trained`` trains).
Each variant runs in a fresh process (a peak is per process) on the default model with
the student the joint space cuts most often on a CPU, the MLP cut by 25% (which
channels does not matter for memory; the first are kept), and reports:
- resident memory before the student exists (teacher, runtime, targets), after the cut,
  the peak of the first step and of the whole run, after training with the student alive, after
  ``host.release_freed_memory`` (what the search now calls), and once the student is freed;
- the seconds of the steps.
Training recomputes each block's activations in the backward pass, forms the logits
128 tokens at a time and takes a step's windows one at a time (``compression.distill``
and ``compression.trained.CPU_WINDOWS_PER_PASS``, since the fourteenth session). Variants:
``kd`` (KD to the top-64 at T=2, AdamW, every weight trains: a plan whose recipe has no
``lora_rank``, applied outside the search), ``lora`` (rank-16 adapters only,
``Distillation.lora_rank``, on a cut that copies every tensor), ``search`` (the
search's recipe: the same adapters on a cut that shares every tensor it leaves whole
with the teacher, ``structure.cut(share=True)``, merged into the tensors the search restores
after the trial, with the heap kept small as the search trains, ``trained.heap_kept_small``),
``search-heap-as-before`` (the same without that: glibc's heap as before the seventeenth
session) and ``search-whole-batch`` (a step's 4 windows in one pass: what taking them one
at a time saves).

    python benchmarks/bench_distill_memory.py [--steps 3]
        [--variants kd lora search search-heap-as-before search-whole-batch]

Writes benchmarks/results/bench_distill_memory.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "bench_distill_memory.json"
MLP_KEPT = 0.75


def one(variant: str, steps: int) -> dict:
    """Run one variant in this process and return its figures (MB, s)."""
    import torch

    from llmtailor import models
    from llmtailor.compression import distill, structure, trained
    from llmtailor.compression.calibration import CalibrationSpec
    from llmtailor.compression.layer_cache import model_fingerprint
    from llmtailor.hw_profiles import host
    from llmtailor.plan import Distillation, Student

    def mb() -> float:
        return host.resident_bytes() / 1e6

    torch.set_num_threads(os.cpu_count() or 1)
    host.return_large_blocks_to_the_os()  # as a sweep does
    teacher = models.load(None)
    arch = teacher.arch
    spec = CalibrationSpec()
    key = spec.key(model_fingerprint(teacher.model))
    pieces = spec.make_windows(teacher.model, teacher.tokenizer).reshape(-1, trained.WINDOW_TOKENS)
    targets = distill.load_or_compute_targets(teacher.model, pieces, 2.0, 64, f"{key}-w{trained.WINDOW_TOKENS}",
                                              models.cache_dir(), "cpu")
    figures = {"variant": variant, "steps": steps, "teacher_float32_mb": 4 * sum(p.numel() for p in
                                                                                teacher.model.parameters()) / 1e6}
    figures["before_student_mb"] = mb()
    width = int(arch.intermediate_size * MLP_KEPT) // 8 * 8
    order = [torch.arange(arch.intermediate_size, 0, -1).float()] * arch.num_layers
    scores = structure.Importance([0.0] * arch.num_layers, [torch.ones(arch.num_kv_heads)] * arch.num_layers, order)
    student = structure.cut(teacher.model, arch, structure.choose(arch, Student(mlp_width={
        b: width for b in range(arch.num_layers)}), scores), share=variant.startswith("search"))
    host.release_freed_memory()
    figures["student_params_m"] = sum(p.numel() for p in student.parameters()) / 1e6
    figures["after_cut_mb"] = mb()
    adapters = variant in ("lora", "search", "search-heap-as-before", "search-whole-batch")
    per_pass = None if variant == "search-whole-batch" else trained.CPU_WINDOWS_PER_PASS
    recipe = Distillation(steps=steps, learning_rate=1e-3 if adapters else 2e-4, lora_rank=16 if adapters else 0)
    figures["predicted_rise_mb"] = distill.training_bytes(  # the guard's prediction (trained.TrainedStudents)
        student, recipe, (per_pass or trained.BATCH_SIZE) * trained.WINDOW_TOKENS,
        {p.data_ptr() for p in teacher.model.parameters()}) / 1e6
    search = variant in ("search", "search-heap-as-before")
    first_step_peak = []

    def progress(step: int, loss: float) -> None:
        after_step()
        if step == 1:
            first_step_peak.append(host.resident_bytes(peak=True) / 1e6)

    started = time.perf_counter()
    with trained.heap_kept_small("cpu") if variant == "search" else contextlib.nullcontext(lambda: None) as after_step:
        # The search merges the adapters into the tensors it restores after the trial (here: the discarded teacher's).
        distill.distill(student, targets, recipe, batch_size=trained.BATCH_SIZE, windows_per_pass=per_pass,
                        progress=progress, merge_into=(lambda p: True) if search else None)
    figures["train_seconds"] = time.perf_counter() - started
    figures["peak_first_step_mb"] = first_step_peak[0]
    figures["peak_mb"] = host.resident_bytes(peak=True) / 1e6
    figures["after_training_mb"] = mb()
    figures["released"] = host.release_freed_memory()
    figures["after_release_mb"] = mb()
    del student
    host.release_freed_memory()
    figures["student_freed_mb"] = mb()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps")
    parser.add_argument("--variants", nargs="+", default=["kd", "lora", "search", "search-heap-as-before",
                                                              "search-whole-batch"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant here and print its figures as JSON
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps)))
        return
    rows = []
    for variant in args.variants:
        done = subprocess.run([sys.executable, __file__, "--one", variant, "--steps", str(args.steps)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "model": "SmolLM2-135M-Instruct", "student": f"MLP cut to {MLP_KEPT:.0%} of its channels",
              "batch": "4 windows of 128 tokens, one at a time", "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| variant | student params (M) | before the student (MB) | after the cut | peak of step 1 | peak training (MB) | "
          "peak / fp32 teacher | rise over the cut: measured / predicted | after training | after release | "
          "student freed | s per step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['student_params_m']:.1f} | {r['before_student_mb']:.0f} | "
              f"{r['after_cut_mb']:.0f} | {r['peak_first_step_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_mb'] / r['teacher_float32_mb']:.2f}x | "
              f"{r['peak_mb'] - r['after_cut_mb']:.0f} / {r['predicted_rise_mb']:.0f} | {r['after_training_mb']:.0f} | "
              f"{r['after_release_mb']:.0f} | {r['student_freed_mb']:.0f} | {r['train_seconds'] / r['steps']:.1f} |")


if __name__ == "__main__":
    main()
