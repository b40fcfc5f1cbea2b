"""A kept student on disk: LoRA adapters against the whole model, bytes and seconds to load (twenty-first session).

The search keeps every student it trains (``compression.trained``) so that each trains
once per machine. A LoRA student used to be kept as the whole model (``save_pretrained``,
float32); it is now kept as its adapters, merged into the cut of the teacher when loaded.
On the default model this script trains one student the way a search does (the teacher's
top-64 targets on the calibration windows, rank-16 adapters, the cut sharing the teacher's
tensors) into a temporary cache, then measures:
- the entry's bytes as adapters, and as the whole model (the same student saved the old way);
- the seconds a trial takes to get the kept student in each form (``compression.apply`` with
  ``share=True``, as a trial does), against the same cut without a student (the cut's own seconds);
- whether the two forms give the same weights (largest difference) and logits.
The cut is the joint space's commonest on a CPU, the MLP cut to 75% of its channels in every
block (which channels does not matter for bytes or seconds: the first are kept).

    python benchmarks/bench_student_store.py [--steps 4] [--rank 16] [--repeats 5]

Writes benchmarks/results/bench_student_store.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmtailor import compression, models  # noqa: E402
from llmtailor.compression import structure, trained  # noqa: E402
from llmtailor.compression.calibration import CalibrationSpec  # noqa: E402
from llmtailor.compression.layer_cache import model_fingerprint  # noqa: E402
from llmtailor.plan import CompressionPlan, Distillation, Student  # noqa: E402

HERE = Path(__file__).parent
OUT = HERE / "results" / "bench_student_store.json"
MLP_KEPT = 0.75


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def seconds_to_apply(plan, teacher, scores, students, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` applications of the plan (a kept student is loaded each time), and the last model."""
    times, model = [], None
    for _ in range(repeats):
        model = None
        started = time.perf_counter()
        model = compression.apply(plan, teacher.model, teacher.arch, importance=scores, students=students, share=True)
        times.append(time.perf_counter() - started)
        if students is not None:
            assert not students.last.trained_now
    return statistics.median(times), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps (bytes and load seconds do not depend on them)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (the search's default: 16)")
    parser.add_argument("--repeats", type=int, default=5, help="loads timed per form (median)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = models.load(None)
    arch = teacher.arch
    spec = CalibrationSpec()
    key = spec.key(model_fingerprint(teacher.model))
    width = int(arch.intermediate_size * MLP_KEPT) // 8 * 8
    order = [torch.arange(arch.intermediate_size, 0, -1).float()] * arch.num_layers
    scores = structure.Importance([0.0] * arch.num_layers, [torch.ones(arch.num_kv_heads)] * arch.num_layers, order)
    cut = Student(mlp_width=dict.fromkeys(range(arch.num_layers), width))
    recipe = Distillation(steps=args.steps, learning_rate=1e-3, lora_rank=args.rank)
    plan = CompressionPlan(student=Student(mlp_width=cut.mlp_width, distillation=recipe))
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch)
        (models.cache_dir() / "teacher").mkdir(parents=True, exist_ok=True)
        (cache / "teacher").symlink_to(models.cache_dir() / "teacher")  # the teacher's targets, made once per machine

        def kept_by() -> trained.TrainedStudents:
            return trained.TrainedStudents(teacher.model, lambda: spec.make_windows(teacher.model, teacher.tokenizer),
                                           key, cache)

        students = kept_by()
        started = time.perf_counter()
        first = compression.apply(plan, teacher.model, arch, importance=scores, students=students, share=True)
        train_seconds = time.perf_counter() - started
        assert students.last.trained_now
        entry = cache / "students" / students.key(plan, arch)
        adapters_bytes = folder_bytes(entry)
        window = spec.make_windows(teacher.model, teacher.tokenizer)[:1, :256]
        with torch.no_grad():
            expected = first(window).logits
        whole = cache / "whole"
        first.save_pretrained(whole)  # the form every LoRA student was kept in before
        shutil.copy(entry / "training.json", whole / "training.json")
        whole_bytes = folder_bytes(whole)
        del first

        cut_seconds, _ = seconds_to_apply(CompressionPlan(student=cut), teacher, scores, None, args.repeats)
        adapters_seconds, from_adapters = seconds_to_apply(plan, teacher, scores, kept_by(), args.repeats)
        shutil.rmtree(entry)
        shutil.copytree(whole, entry)
        whole_seconds, from_whole = seconds_to_apply(plan, teacher, scores, kept_by(), args.repeats)
        largest = max((p - q).abs().max().item() for p, q in zip(from_adapters.parameters(), from_whole.parameters(),
                                                                   strict=True))
        with torch.no_grad():
            same_logits = torch.equal(from_adapters(window).logits, expected)
            logits_diff = (from_whole(window).logits - from_adapters(window).logits).abs().max().item()

    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "model": "SmolLM2-135M-Instruct", "student": f"MLP cut to {MLP_KEPT:.0%} of its channels, every block",
              "lora_rank": args.rank, "steps": args.steps, "train_seconds": train_seconds,
              "entry_adapters_bytes": adapters_bytes, "entry_whole_model_bytes": whole_bytes,
              "whole_over_adapters": whole_bytes / adapters_bytes,
              "cut_alone_seconds": cut_seconds, "load_adapters_seconds": adapters_seconds,
              "load_whole_model_seconds": whole_seconds,
              "largest_weight_difference_adapters_vs_whole": largest,
              "adapters_logits_equal_to_trained": same_logits, "largest_logit_difference_adapters_vs_whole": logits_diff}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| kept as | entry (MB) | trial's apply with the kept student (s, median) | of which beyond the cut alone (s) |")
    print("|---|---:|---:|---:|")
    for name, size, seconds in (("adapters (now)", adapters_bytes, adapters_seconds),
                                ("whole model (before)", whole_bytes, whole_seconds)):
        print(f"| {name} | {size / 1e6:,.1f} | {seconds:.2f} | {seconds - cut_seconds:.2f} |")
    print(f"\ncut alone {cut_seconds:.2f} s; whole / adapters bytes {whole_bytes / adapters_bytes:.1f}x; largest weight "
          f"difference {largest:.2e}; logits from adapters equal to the trained student's: {same_logits}; "
          f"largest logit difference adapters vs whole {logits_diff:.2e}; training {train_seconds:.0f} s")


if __name__ == "__main__":
    main()
