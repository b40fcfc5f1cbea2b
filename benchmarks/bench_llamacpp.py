"""The cost model against llama.cpp on this CPU: a llama.cpp profile fitted on a random model, checked on the default one.

    python benchmarks/bench_llamacpp.py [--prompt 256] [--decode 64] [--repeats 3] [--rounds 3]

Optional: needs llama-cpp-python (built with the flags in ../shared/MACHINE.md) and the
host profile (`llmtailor devices --calibrate`, for the probe's read bandwidth).

1. Calibration: random models of other shapes than the default model's (hidden 768 and
   384, MLP 2048 and 1024; 6 and 24 blocks; the default model's tokenizer) are
   written as GGUF and converted by llama.cpp's own quantizer to F16, Q8_0, Q4_0 and
   Q4_1; llama.cpp's prefill and decode are measured on each, and
   `hw_profiles.llamacpp.fit_profile` fits per format the share of read bandwidth a
   decode step reaches and the rate a prompt's matmuls reach, plus a cost per block
   and a prompt's elementwise time per value.
2. Validation: the default model's own Q4_1 file, cut to 30, 20 and 10 blocks, each
   converted to the four formats (12 variants that run at different speeds), measured
   the same way and predicted by the fitted profile from each file's tensor types and
   header alone: per phase the mean absolute percentage error and Kendall's tau.

Both sets are measured in the same rounds, one file of each in turn, and the median over
rounds is kept (this virtual machine's speed drifts by a fifth over minutes). Threads: 2 (the
machine's cores). Memory is not checked here: llama.cpp's own buffers are not modelled.
Writes benchmarks/results/bench_llamacpp.json and the fitted profile next to the host
profile (`host/llama.cpp.yaml`: `--device host-llama.cpp`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VALIDATION_BLOCKS = (30, 20, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_llamacpp.json")
    args = parser.parse_args()

    import llama_cpp

    from llmtailor import hw_profiles, models
    from llmtailor.evaluators import cost
    from llmtailor.hw_profiles import host, llamacpp, validation
    from llmtailor.search.sensitivity import kendall_tau

    host_profile = hw_profiles.load("host")
    folder = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    files: dict[str, tuple[str, Path, object]] = {}  # name -> (set, file, architecture)
    started = time.perf_counter()
    for name, (path, arch) in llamacpp.calibration_files(folder, models.default_model_path()).items():
        files[name] = ("calibration", path, arch)
    for blocks in VALIDATION_BLOCKS:
        cut = llamacpp.write(models.default_model_path(), folder / f"smollm2-{blocks}.gguf", blocks=blocks)
        arch = llamacpp.architecture(cut)
        for fmt in llamacpp.FORMATS:
            files[f"default {blocks} blocks {fmt}"] = ("validation", llamacpp.quantize(cut, folder / f"s{blocks}-{fmt}.gguf", fmt),
                                                       arch)
        cut.unlink()
    print(f"made {len(files)} files in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    passes: dict[str, list] = {name: [] for name in files}
    # Calibration and validation files alternate, so a drift of this machine's speed within a round falls on both.
    calibration_names = [n for n, (kind, _, _) in files.items() if kind == "calibration"]
    validation_names = [n for n, (kind, _, _) in files.items() if kind == "validation"]
    order = [n for pair in itertools.zip_longest(calibration_names, validation_names) for n in pair if n]
    for round_ in range(args.rounds):
        for name in order:
            path = files[name][1]
            speed = llamacpp.measure(path, prompt=args.prompt, decode=args.decode, repeats=args.repeats)
            passes[name].append(speed)
            print(f"round {round_ + 1} {name}: prefill {speed.prefill_s * 1e3:.0f} ms, "
                  f"decode {speed.decode_s_per_token * 1e3:.2f} ms/token", file=sys.stderr)
    measured = {name: llamacpp.median_speed(passes[name]) for name in files}
    described = {name: (arch, *llamacpp.plan_of(path, arch)) for name, (_, path, arch) in files.items()}
    calibration = [(*described[n], measured[n]) for n in calibration_names]
    profile = llamacpp.fit_profile(host_profile, calibration)

    rows = []
    for name, (kind, path, _) in files.items():
        arch, plan, dense = described[name]
        predicted = cost.latency(plan, arch, profile, llamacpp.workload(measured[name], dense))
        rows.append({"variant": name, "set": kind, "file_bytes": path.stat().st_size,
                     "measured_prefill_s": measured[name].prefill_s,
                     "measured_decode_s_per_token": measured[name].decode_s_per_token,
                     "predicted_prefill_s": predicted.prefill_s,
                     "predicted_decode_s_per_token": predicted.decode_s_per_token,
                     "measured_decode_s_per_token_rounds": [s.decode_s_per_token for s in passes[name]],
                     "measured_prefill_s_rounds": [s.prefill_s for s in passes[name]]})
    summary = {}
    for kind in ("calibration", "validation"):
        chosen = [r for r in rows if r["set"] == kind]
        for phase, key in (("prefill", "prefill_s"), ("decode", "decode_s_per_token")):
            p = [r[f"predicted_{key}"] for r in chosen]
            m = [r[f"measured_{key}"] for r in chosen]
            summary[f"{kind}_{phase}_mape_percent"] = 100 * statistics.mean(abs(a - b) / b for a, b in zip(p, m, strict=True))
            summary[f"{kind}_{phase}_kendall_tau"] = kendall_tau(p, m)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, llama-cpp-python "
               f"{llama_cpp.__version__}, 2 threads", "prompt_tokens": args.prompt, "decode_steps": args.decode,
               "repeats": args.repeats, "rounds": args.rounds, "host_read_gbps": host_profile.memory_bandwidth_gbps,
               "fitted_profile": profile.to_dict(), **summary, "rows": rows}
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    saved = llamacpp.write_profile(profile, host.llama_cpp_profile_path())
    validation.llama_cpp_validation_path().write_text(json.dumps(
        {"date": results["date"], "variants": len(validation_names),
         **{k.removeprefix("validation_"): v for k, v in summary.items() if k.startswith("validation_")}}, indent=1))
    shutil.rmtree(folder)
    print(table(results))
    print(f"\nfitted profile: {saved}")


def table(results: dict) -> str:
    p = results["fitted_profile"]
    lines = [f"Machine: {results['machine']}. Date: {results['date']}. Prompt {results['prompt_tokens']} tokens in one "
             f"batch; decode: mean of {results['decode_steps']} steps after it; median of {results['repeats']} runs, "
             f"median of {results['rounds']} rounds.", "",
             f"Fitted on the random models (probe read bandwidth {results['host_read_gbps']:.1f} GB/s): decode reaches "
             + ", ".join(f"{k} {v:.0%}" for k, v in {**p['bandwidth_efficiency_by_precision'],
                                                      **p['weight_only_bandwidth_efficiency']}.items())
             + " of it; prompt matmuls " + ", ".join(f"{k} {v * 1e3:.0f} GFLOPS" for k, v in
                                                     {**p['peak_tflops'], **p['weight_only_tflops']}.items())
             + f"; {p['layer_overhead_us']:.0f} us per block; {p['prefill_ns_per_value'].get('fp16', 0):.2f} ns per "
             "elementwise value of a prompt.", "",
             "| variant | set | file MB | prefill ms (predicted, error) | decode ms/token (predicted, error) |",
             "|---|---|---:|---:|---:|"]
    for r in results["rows"]:
        pe = 100 * (r["predicted_prefill_s"] / r["measured_prefill_s"] - 1)
        de = 100 * (r["predicted_decode_s_per_token"] / r["measured_decode_s_per_token"] - 1)
        lines.append(f"| {r['variant']} | {r['set']} | {r['file_bytes'] / 1e6:.0f} | {r['measured_prefill_s'] * 1e3:.0f} "
                     f"({r['predicted_prefill_s'] * 1e3:.0f}, {pe:+.0f}%) | {r['measured_decode_s_per_token'] * 1e3:.2f} "
                     f"({r['predicted_decode_s_per_token'] * 1e3:.2f}, {de:+.0f}%) |")
    lines += ["", "| set | prefill MAPE % | prefill tau | decode MAPE % | decode tau |", "|---|---:|---:|---:|---:|"]
    for kind in ("calibration", "validation"):
        lines.append(f"| {kind} | {results[f'{kind}_prefill_mape_percent']:.1f} | "
                     f"{results[f'{kind}_prefill_kendall_tau']:.2f} | {results[f'{kind}_decode_mape_percent']:.1f} | "
                     f"{results[f'{kind}_decode_kendall_tau']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
