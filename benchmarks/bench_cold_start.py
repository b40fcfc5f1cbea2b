"""Peak resident memory of a guided sweep's first run on an empty cache, per preparation step (issue 18).

    python benchmarks/bench_cold_start.py [--space benchmarks/spaces/search-guided.yaml] [--convert] [--load-only]

A sweep's first run makes, in its own process, what later runs read from the cache:
the calibration statistics (``calibration.collect``), the layer sensitivities
(``sensitivity.build``, which also fills the per-layer cache with its GPTQ solves) and
the structured-cut importance (``structure.importance``). This script runs
`llmtailor fit --memory 160MB --trials 1` with that space in this process, on a fresh
cache folder (the converted default model is linked in from the user's cache, so
loading is the same as in any run), and samples this process's resident memory every
20 ms, labelled by the step running. The bound is 3x the teacher's float32 size.
``--convert``: the GGUF file is converted in this run too, as on a new machine (the
conversion's child process is reported apart: its own peak, and this process's
resident memory while it ran), and the process tree's resident memory summed at each
sample (this process and its children at one moment). ``--load-only``: the conversion
and the load alone.

Writes benchmarks/results/bench_cold_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "bench_cold_start.json"


def resident_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the process ended between listing and reading
        pass
    return 0


def descendants_resident_bytes(pid: int) -> int:
    """Resident memory of all of a process's descendants at one moment (the conversion's child)."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    return sum(resident_bytes(c) + descendants_resident_bytes(c) for c in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(HERE / "spaces" / "search-guided.yaml"))
    parser.add_argument("--convert", action="store_true", help="convert the GGUF file in this run (a new machine)")
    parser.add_argument("--load-only", action="store_true",
                        help="only load (and with --convert, convert) the teacher")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    user_cache = Path(os.environ.get("LLMTAILOR_CACHE") or Path.home() / ".cache" / "llmtailor")
    cache = Path(tempfile.mkdtemp(prefix="llmtailor-cold-"))
    for kept in ("host",) if args.convert else ("gguf", "host"):  # the converted model and the host profile
        if (user_cache / kept).exists():
            (cache / kept).symlink_to(user_cache / kept)
    os.environ["LLMTAILOR_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    step, peaks, seconds, tree_peak = ["start"], {}, {}, [0, 0]

    def sample() -> None:
        while True:
            own = resident_bytes()
            peaks[step[0]] = max(peaks.get(step[0], 0), own)
            tree = own + descendants_resident_bytes(os.getpid())
            if tree > tree_peak[0]:
                tree_peak[:] = [tree, own]  # and this process's share of it
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    from llmtailor import cli, models
    from llmtailor.compression import calibration, structure
    from llmtailor.search import sensitivity

    def labelled(module, name: str, label: str) -> None:
        function = getattr(module, name)

        def run(*a, **k):
            before, started = step[0], time.perf_counter()
            step[0] = label
            try:
                return function(*a, **k)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - started
                step[0] = before

        setattr(module, name, run)

    labelled(models, "load", "load the teacher")
    labelled(models, "_convert_gguf", "convert the GGUF file (this process, beside its child)")
    labelled(calibration, "collect", "calibration statistics")
    labelled(sensitivity, "build", "sensitivities")
    labelled(structure, "importance", "importance")
    step[0] = "other (windows, references, the trial)"
    started = time.perf_counter()
    if args.load_only:  # the conversion and the teacher's load alone, after the imports a sweep makes
        models.load(None)
        float32_bytes = 4 * models.load_architecture(None)[0].total_params
        result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
                                                               f"{os.cpu_count()} cores",
                  "converted_here": args.convert, "teacher_float32_bytes": float32_bytes,
                  "seconds": round(time.perf_counter() - started, 1), "process_peak_rss_bytes": max(peaks.values()),
                  "process_tree_peak_rss_bytes": tree_peak[0], "this_process_at_tree_peak_rss_bytes": tree_peak[1],
                  "process_tree_peak_over_teacher_float32": round(tree_peak[0] / float32_bytes, 3)}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"this process's peak {result['process_peak_rss_bytes'] / 1e6:.0f} MB; with its children at one moment "
              f"{tree_peak[0] / 1e6:.0f} MB = {result['process_tree_peak_over_teacher_float32']:.2f}x the float32 "
              f"teacher ({tree_peak[1] / 1e6:.0f} MB of it this process's); {result['seconds']:.0f} s")
        return
    code = cli.main(["fit", "--memory", "160MB", "--trials", "1", "--study", "cold", "--results", str(cache / "results"),
                     "--space", args.space, "--tasks", "none", "--eval-windows", "4", "--window-tokens", "256",
                     "--no-progress"])
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"llmtailor fit failed ({code})")
    float32_bytes = 4 * models.load_architecture(None)[0].total_params  # (from the config: no second teacher)
    result = {
        "date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
                                                     f"{os.cpu_count()} cores",
        "space": Path(args.space).name, "teacher_float32_bytes": float32_bytes, "wall_seconds": round(wall, 1),
        "steps": {label: {"peak_rss_bytes": peaks.get(label, 0), "peak_over_teacher_float32":
                          round(peaks.get(label, 0) / float32_bytes, 3), "seconds": round(seconds.get(label, 0.0), 1)}
                  for label in peaks if label != "start"},
    }
    result["peak_rss_bytes"] = max(s["peak_rss_bytes"] for s in result["steps"].values())
    result["peak_over_teacher_float32"] = round(result["peak_rss_bytes"] / float32_bytes, 3)
    import resource

    result["converted_here"] = args.convert
    result["process_tree_peak_rss_bytes"] = tree_peak[0]  # this process and its children, summed at each sample
    result["process_tree_peak_over_teacher_float32"] = round(tree_peak[0] / float32_bytes, 3)
    result["children_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| step | seconds | peak resident MB | x float32 teacher |\n|---|---:|---:|---:|")
    for label, s in result["steps"].items():
        print(f"| {label} | {s['seconds']:.0f} | {s['peak_rss_bytes'] / 1e6:.0f} | {s['peak_over_teacher_float32']:.2f} |")
    print(f"\npeak {result['peak_rss_bytes'] / 1e6:.0f} MB = {result['peak_over_teacher_float32']:.2f}x the float32 "
          f"teacher ({float32_bytes / 1e6:.0f} MB); {wall:.0f} s; cache folder {cache}; the largest child process's "
          f"peak {result['children_peak_rss_bytes'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
