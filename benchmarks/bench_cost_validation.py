"""The cost model against measurement on this CPU: prefill, decode and memory of real variants of the default model.

    python benchmarks/bench_cost_validation.py [--prompt 128] [--steps 32] [--rounds 3] [--bursts 5]

Needs the host profile (`llmtailor devices --calibrate`, on an idle machine); the
predictions are the host profile's, made from each variant's plan and the architecture
alone, exactly as a search makes them.

Each variant is built once in this process (structured cuts of depth, KV groups and MLP
width by `compression.structure.cut`, a dtype, PyTorch's dynamically quantized int8 linear
layers, or int8 weight-only linears over `aten._weight_int8pack_mm`) and pickled whole;
then one process per variant loads it and stays, with two threads pinned to two cores,
and the variants' processes take turns: a burst each, in a shuffled order, `--bursts`
times per round. A burst: prefill = one forward of a `--prompt`-token prompt keeping the
last position's logits (median of `--prefills`, after an untimed one), decode = the median
of `--steps` greedy steps with the KV cache. A variant's figure is the median over all its
bursts. Measuring each variant in one window of its own (a fresh process per pass, as
this script did before) let a slow stretch of this VM's speed land on one variant: a
15-block model once measured as slow as the 30-block one. Memory = each process's peak
resident set (VmHWM) at the end, which includes the Python, PyTorch and transformers
runtime the profile's `runtime_overhead` stands for. Which blocks, groups and channels a
cut keeps does not change speed, so cuts keep the first ones (no calibration needed).

Per phase: mean absolute percentage error and Kendall's tau-b between predicted and
measured, twice: from the stored host profile (as a user's search predicts), and with each
burst predicted from a host profile measured at the start of its round (`host.measure`),
which separates the cost model's own error from the drift of this virtual machine's speed
(a fifth over minutes) between a calibration and a measurement.
Writes benchmarks/results/bench_cost_validation.json, and the errors into the host
profile's folder (`host/validation.json`), where reports read them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str  # float32 | bfloat16
    blocks: int | None = None  # first blocks kept
    kv_groups: int | None = None  # KV groups kept per block
    width: int | None = None  # MLP channels kept per block
    int8: str | None = None  # None | dynamic (int8 weights and activations) | weight_only


VARIANTS = (
    Variant("fp32", "float32"),
    Variant("bf16", "bfloat16"),
    Variant("int8 dynamic", "float32", int8="dynamic"),
    Variant("int8 weight-only, bf16", "bfloat16", int8="weight_only"),
    Variant("fp32, 20 of 30 blocks", "float32", blocks=20),
    Variant("fp32, 10 of 30 blocks", "float32", blocks=10),
    Variant("fp32, MLP 768 of 1536", "float32", width=768),
    Variant("fp32, 2 of 3 KV groups, MLP 1152", "float32", kv_groups=2, width=1152),
    Variant("bf16, 15 of 30 blocks", "bfloat16", blocks=15),
    Variant("bf16, 2 of 3 KV groups, MLP 768", "bfloat16", kv_groups=2, width=768),
    Variant("int8 dynamic, 20 of 30 blocks", "float32", blocks=20, int8="dynamic"),
    Variant("int8 dynamic, MLP 768", "float32", width=768, int8="dynamic"),
)


def plan_of(v: Variant, arch):
    """The CompressionPlan a variant is: its cut as the student, its int8 layers as precision."""
    from llmtailor.plan import CompressionPlan, LayerPrecision, Student

    kept = None if v.blocks is None else tuple(range(v.blocks))
    blocks = range(arch.num_layers) if kept is None else kept
    per_group = arch.num_heads // arch.num_kv_heads
    heads = {b: v.kv_groups * per_group for b in blocks} if v.kv_groups else {}
    width = {b: v.width for b in blocks} if v.width else {}
    precision = {}
    if v.int8:
        act_bits = 8 if v.int8 == "dynamic" else None
        precision = {lin.name: LayerPrecision(8, 0, symmetric=True, act_bits=act_bits) for lin in arch.linears}
    return CompressionPlan(precision=precision, student=Student(layers=kept, heads=heads, mlp_width=width))


class Int8WeightOnlyLinear(torch.nn.Module):
    """A linear layer holding int8 weights with one scale per output row, multiplied by PyTorch's fused CPU kernel
    (at module level so that a pickled variant finds it again in the measuring process)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("codes", torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scales).reshape(*x.shape[:-1], -1)


def build(v: Variant, teacher, arch, path: Path) -> None:
    from llmtailor.compression import structure

    blocks = tuple(range(v.blocks or arch.num_layers))
    per_group = arch.num_heads // arch.num_kv_heads
    groups = {b: torch.arange(v.kv_groups) for b in blocks} if v.kv_groups else {}
    channels = {b: torch.arange(v.width) for b in blocks} if v.width else {}
    heads = v.kv_groups * per_group if v.kv_groups else arch.num_heads
    chosen = structure.Cut(blocks, groups, channels, heads, v.width or arch.intermediate_size)
    model = structure.cut(teacher, arch, chosen).to(getattr(torch, v.dtype))
    decoder = model.model.layers
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if v.int8 == "dynamic":
        import warnings

        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        for block in decoder:
            for parent in (block.self_attn, block.mlp):
                for name in names:
                    if hasattr(parent, name):
                        layer = getattr(parent, name)
                        qlayer = torch.ao.nn.quantized.dynamic.Linear.from_float(_with_qconfig(layer))
                        setattr(parent, name, qlayer)
    elif v.int8 == "weight_only":
        for block in decoder:
            for parent in (block.self_attn, block.mlp):
                for name in names:
                    if hasattr(parent, name):
                        setattr(parent, name, Int8WeightOnlyLinear(getattr(parent, name)))
    torch.save(model, path)


def _with_qconfig(layer):
    layer.qconfig = torch.ao.quantization.default_dynamic_qconfig
    return layer


def serve(path: Path, prompt: int, steps: int, prefills: int) -> None:
    """The measuring process of one variant: load it once, then answer each line `burst` on stdin with one burst's
    timings and `memory` with the process's peak resident set (JSON lines on stdout).

    A burst: one untimed prefill (wakes the thread pool and brings this variant's weights back after the others'
    bursts), `prefills` timed prefills of the prompt keeping the last position's logits, then `steps` greedy
    decode steps with the KV cache; it reports the median prefill and the median decode step."""
    from llmtailor import models
    from llmtailor.hw_profiles import host

    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
    torch.set_num_threads(2)
    model = torch.load(path, weights_only=False).eval()
    ids = torch.randint(100, 40000, (1, prompt), generator=torch.Generator().manual_seed(0))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "memory":
            print(json.dumps({"peak_rss_bytes": host.peak_resident_bytes()}), flush=True)
            continue
        prefill, per_step = [], []
        with torch.no_grad():
            for run in range(prefills + 1):
                started = time.perf_counter()
                out, cache = models.with_cache(model, ids, logits_to_keep=1)
                if run:
                    prefill.append(time.perf_counter() - started)
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                started = time.perf_counter()
                out, cache = models.with_cache(model, token, cache)
                token = out.logits[:, -1:].argmax(-1)
                per_step.append(time.perf_counter() - started)
        print(json.dumps({"prefill_s": statistics.median(prefill), "decode_s_per_token": statistics.median(per_step)}),
              flush=True)


class Variants:
    """One long-lived measuring process per variant, asked for bursts in turn: every variant is measured in every
    stretch of this VM's drifting speed, instead of each in a window of its own."""

    def __init__(self, paths: list[Path], prompt: int, steps: int, prefills: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT.parent)}
        self.processes = [subprocess.Popen([sys.executable, __file__, "--serve", str(p), "--prompt", str(prompt),
                                            "--steps", str(steps), "--prefills", str(prefills)],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                          for p in paths]
        for i in range(len(paths)):
            self._expect(i, "ready")

    def ask(self, i: int, command: str) -> dict:
        process = self.processes[i]
        process.stdin.write(command + "\n")
        process.stdin.flush()
        return json.loads(self._expect(i))

    def _expect(self, i: int, word: str | None = None) -> str:
        line = self.processes[i].stdout.readline().strip()
        if not line or (word and line != word):
            self.close()
            raise SystemExit(f"measuring process {i} ended or answered {line!r}")
        return line

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.stdin.close()
                process.wait(timeout=60)


# Per phase: its name, the key of its prediction, how to read it from a cost estimate, the measured figure it is
# checked against.
PHASES = (("prefill", "prefill_s", lambda e: e.latency.prefill_s, "prefill_s"),
          ("decode", "decode_s_per_token", lambda e: e.latency.decode_s_per_token, "decode_s_per_token"),
          ("memory", "memory_bytes", lambda e: e.memory.total, "peak_rss_bytes"))


def mape(predicted: list[float], measured: list[float]) -> float:
    return 100 * statistics.mean(abs(p - m) / m for p, m in zip(predicted, measured, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prefills", type=int, default=3, help="timed prefills per burst (after one untimed)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each begun by a host measurement (the profile "
                        "of the pass) and made of --bursts bursts over every variant")
    parser.add_argument("--bursts", type=int, default=5, help="bursts per round: each variant's process measures one "
                        "burst in turn, in a shuffled order; a figure is the median over all bursts (this VM's speed "
                        "drifts by a fifth over minutes, so every variant is measured in every stretch of it)")
    parser.add_argument("--only", help="variant names separated by ; (default: all)")
    parser.add_argument("--no-calibrate-each-pass", dest="calibrate_each_pass", action="store_false",
                        help="only predict from the stored host profile (by default each round is also predicted from "
                        "a host profile measured right before it, which separates the model's error from the drift "
                        "of this machine's speed between calibration and measurement)")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # a measuring process's entry
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_cost_validation.json")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.prompt, args.steps, args.prefills)
        return
    from llmtailor import hw_profiles, models  # not in the measuring process: its memory is the runtime's alone
    from llmtailor.evaluators import cost
    from llmtailor.hw_profiles import host
    from llmtailor.search.sensitivity import kendall_tau

    profile = hw_profiles.load("host")
    loaded = models.load()
    arch = loaded.arch
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only.split(";")]
    folder = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    for i, v in enumerate(chosen):
        build(v, loaded.model, arch, folder / f"{i}.pt")
    del loaded
    variants = Variants([folder / f"{i}.pt" for i in range(len(chosen))], args.prompt, args.steps, args.prefills)
    passes = {v.name: [] for v in chosen}  # one entry per burst, with the round it belongs to
    window_profiles = []
    order = random.Random(0)
    for round_ in range(args.rounds):
        if args.calibrate_each_pass:  # this VM's speed drifts: a profile measured right before the round it predicts
            path = folder / f"profile-{round_}.yaml"
            host.write_profile(host.measure(), path)
            window_profiles.append(hw_profiles.load(str(path)))
        for _ in range(args.bursts):
            for i in order.sample(range(len(chosen)), len(chosen)):
                passes[chosen[i].name].append({**variants.ask(i, "burst"), "round": round_})
    for i, v in enumerate(chosen):
        memory = variants.ask(i, "memory")
        for burst in passes[v.name]:
            burst.update(memory)
    variants.close()
    rows = []
    for v in chosen:
        measured = {k: statistics.median(p[k] for p in passes[v.name]) for k in passes[v.name][0] if k != "round"}
        workload = cost.Workload(args.prompt + args.steps, 1, args.prompt, v.dtype)
        predicted = cost.estimate(plan_of(v, arch), arch, profile, workload)
        rows.append({"variant": v.name, "dense_dtype": v.dtype, **{f"measured_{k}": x for k, x in measured.items()},
                     **{f"predicted_{key}": read(predicted) for _, key, read, _ in PHASES},
                     "measured_prefill_s_bursts": [p["prefill_s"] for p in passes[v.name]],
                     "measured_decode_s_per_token_bursts": [p["decode_s_per_token"] for p in passes[v.name]]})
        # Each burst against the profile measured at the start of its round; medians over bursts.
        in_window = [cost.estimate(plan_of(v, arch), arch, wp, workload) for wp in window_profiles]
        for _, key, read, measured_key in PHASES if in_window else ():
            predictions = [read(in_window[burst["round"]]) for burst in passes[v.name]]
            rows[-1][f"window_predicted_{key}"] = statistics.median(predictions)
            rows[-1][f"window_error_{key}"] = statistics.median(
                (p - m[measured_key]) / m[measured_key] for p, m in zip(predictions, passes[v.name], strict=True))
        r = rows[-1]
        print(f"{v.name}: prefill {r['measured_prefill_s'] * 1e3:.1f} ms (predicted {r['predicted_prefill_s'] * 1e3:.1f}),"
              f" decode {r['measured_decode_s_per_token'] * 1e3:.2f} ms/token "
              f"(predicted {r['predicted_decode_s_per_token'] * 1e3:.2f}), peak RSS "
              f"{r['measured_peak_rss_bytes'] / 2**20:.0f} MiB (predicted {r['predicted_memory_bytes'] / 2**20:.0f})",
              file=sys.stderr)
    summary = {}
    for phase, predicted_key, _, measured_key in PHASES:
        p = [r[f"predicted_{predicted_key}"] for r in rows]
        m = [r[f"measured_{measured_key}"] for r in rows]
        summary[f"{phase}_mape_percent"] = mape(p, m)
        summary[f"{phase}_kendall_tau"] = kendall_tau(p, m)
        if window_profiles:
            summary[f"{phase}_window_mape_percent"] = 100 * statistics.mean(abs(r[f"window_error_{predicted_key}"])
                                                                            for r in rows)
            summary[f"{phase}_window_kendall_tau"] = kendall_tau([r[f"window_predicted_{predicted_key}"]
                                                                  for r in rows], m)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, torch {torch.__version__}, "
               "2 threads pinned", "host_profile": profile.to_dict(), "prompt_tokens": args.prompt,
               "decode_steps": args.steps, "prefills_per_burst": args.prefills, "rounds": args.rounds,
               "bursts_per_round": args.bursts,
               "window_profiles": [wp.to_dict() for wp in window_profiles], **summary, "rows": rows}
    if not args.only:
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        validation = host.profile_path().parent / "validation.json"
        validation.write_text(json.dumps({"date": results["date"], "variants": len(rows), **summary}, indent=1))
    print(table(results))


def table(results: dict) -> str:
    lines = [f"Machine: {results['machine']}. Date: {results['date']}. Prompt {results['prompt_tokens']} tokens, "
             f"decode median of {results['decode_steps']} steps; per variant the median of "
             f"{results['rounds'] * results['bursts_per_round']} bursts, interleaved across the variants' processes "
             f"({results['prefills_per_burst']} prefills each).", "",
             "| variant | prefill ms (predicted) | decode ms/token (predicted) | peak RSS MiB (predicted) |",
             "|---|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['variant']} | {r['measured_prefill_s'] * 1e3:.1f} ({r['predicted_prefill_s'] * 1e3:.1f}) | "
                     f"{r['measured_decode_s_per_token'] * 1e3:.2f} ({r['predicted_decode_s_per_token'] * 1e3:.2f}) | "
                     f"{r['measured_peak_rss_bytes'] / 2**20:.0f} ({r['predicted_memory_bytes'] / 2**20:.0f}) |")
    window = "prefill_window_mape_percent" in results
    if window:
        lines += ["", "Each burst predicted from the host profile measured at the start of its round (median over "
                  "bursts):", "",
                  "| variant | prefill ms (predicted, error) | decode ms/token (predicted, error) |", "|---|---:|---:|"]
        for r in results["rows"]:
            lines.append(f"| {r['variant']} | {r['measured_prefill_s'] * 1e3:.1f} "
                         f"({r['window_predicted_prefill_s'] * 1e3:.1f}, {100 * r['window_error_prefill_s']:+.0f}%) | "
                         f"{r['measured_decode_s_per_token'] * 1e3:.2f} ({r['window_predicted_decode_s_per_token'] * 1e3:.2f}, "
                         f"{100 * r['window_error_decode_s_per_token']:+.0f}%) |")
    lines += ["", "| phase | MAPE % (stored profile) | Kendall tau | MAPE % (profile of the pass) | Kendall tau |" if window
              else "| phase | MAPE % | Kendall tau |", "|---|---:|---:|---:|---:|" if window else "|---|---:|---:|"]
    for phase in ("prefill", "decode", "memory"):
        extra = f" {results[f'{phase}_window_mape_percent']:.1f} | {results[f'{phase}_window_kendall_tau']:.2f} |" \
            if window else ""
        lines.append(f"| {phase} | {results[f'{phase}_mape_percent']:.1f} | {results[f'{phase}_kendall_tau']:.2f} |"
                     + extra)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
