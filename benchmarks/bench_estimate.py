"""The dry run (`llmtailor estimate`) on the default model, a 7B and a 70B config: its answers and its wall time.

    python benchmarks/bench_estimate.py [--repeats 5]

The 7B and 70B configs are written here from their published shapes (LLaMA-2-7B:
hidden 4096, MLP 11008, 32 blocks, 32 heads, vocabulary 32000; Llama-3-70B: hidden
8192, MLP 28672, 80 blocks, 64 heads with 8 KV heads, vocabulary 128256), as config
folders with no weights: the dry run never needs them. The default model is read from
its GGUF file's header. Wall time is of `dry_run.load_architecture` plus
`dry_run.estimate` in this process (imports excluded: they are paid once per command),
the median of the repeats. Writes benchmarks/results/bench_estimate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIGS = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
PLANS = {"16-bit": dict(bits=16), "8-bit per-channel": dict(bits=8, group_size=0), "4-bit g128": dict(bits=4)}
DEVICES = ("raspberry-pi-5-8gb", "laptop-x86-16gb", "apple-m2-16gb", "rtx-4090-24gb", "h100-80gb")


def main() -> None:
    import torch
    from transformers import LlamaConfig

    from llmtailor import dry_run, hw_profiles
    from llmtailor.evaluators.cost import Workload

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_estimate.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-estimate-"))
    models = {"SmolLM2-135M-Instruct (GGUF header)": None}
    for name, shape in CONFIGS.items():
        LlamaConfig(**shape).save_pretrained(folder / name)
        models[f"{name} (config only)"] = str(folder / name)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads", "workload": "context 2048, prompt 512, batch 1", "rows": []}
    for label, spec in models.items():
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            arch, _ = dry_run.load_architecture(spec)
            dry_run.estimate(dry_run.uniform_plan(arch, 4), arch, hw_profiles.load("laptop-x86-16gb"), Workload())
            seconds.append(time.perf_counter() - started)
        for plan_name, plan_args in PLANS.items():
            plan = dry_run.uniform_plan(arch, **plan_args)
            for device in DEVICES:
                r = dry_run.estimate(plan, arch, hw_profiles.load(device), Workload())
                row = {"model": label, "plan": plan_name, "device": device, "parameters": r["parameters"],
                       "memory_total_bytes": r["memory_bytes"]["total"], "fits": r["fits"],
                       "time_to_first_token_s": r["time_to_first_token_s"],
                       "decode_tokens_per_s": r["decode_tokens_per_s"], "dry_run_wall_s": statistics.median(seconds)}
                results["rows"].append(row)
        print(f"{label}: {statistics.median(seconds):.2f} s per dry run (median of {args.repeats})", file=sys.stderr)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(tables(results))


def tables(results: dict) -> str:
    lines = [f"Machine: {results['machine']}. Date: {results['date']}. Workload: {results['workload']}.", "",
             "| model | plan | device | memory | fits | time to first token (s) | decode tokens/s | dry run wall (s) |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['plan']} | {r['device']} | {r['memory_total_bytes'] / 1e9:.2f} GB | "
                     f"{'yes' if r['fits'] else 'no'} | {r['time_to_first_token_s']:.3g} | "
                     f"{r['decode_tokens_per_s']:.3g} | {r['dry_run_wall_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--tables" in sys.argv:
        print(tables(json.loads((ROOT / "results" / "bench_estimate.json").read_text())))
    else:
        main()
