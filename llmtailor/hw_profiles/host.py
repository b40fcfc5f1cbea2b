"""The host profile: this machine's speeds, measured (`llmtailor devices --calibrate`), for PyTorch on its CPU.

- **Read bandwidth** with a read-only probe (summing a buffer much larger than the
  caches), not a copy: decoding reads weights and writes almost nothing, and a copy
  benchmark counts write traffic too (published llama.cpp measurements decode at
  84–91% of the read-only figure; a copy benchmark reports about half of it).
- **The runtime itself, fitted**: random LLaMA decoder stacks of widths 512 to 2048 (each
  larger than the caches) run through transformers' own code in float32 and bfloat16,
  prefill at a 128-token prompt and decode with the KV cache; a least-squares fit of
  the cost model's own form gives the decode read rate (weights and KV cache, as a
  share of the probe: on this kind of machine about half, where llama.cpp's kernels
  reach 84–91%), the fixed cost per block per forward pass (dispatch, attention, norms,
  cache updates), and per dtype the rate prefill's matmuls reach and the time per value
  of its elementwise work (norms, activation, residual adds, casts: tokens x (hidden +
  MLP width) per block; it matters on narrow models). Bare matmul rates are measured
  too (recorded in a comment), and int8 as PyTorch's dynamically quantized linear layer
  reaches it (int8 weights, activations quantized per call), and the fused weight-only
  int8/int4 kernels on a prompt's rows, each scaled by what prefill reaches of the bare
  bfloat16 rate. A fit is a fit: the validation benchmark
  (benchmarks/bench_cost_validation.py) checks it on a real model.
- **The prompt's head**: transformers computes the logits of a prompt's last position
  only, from a one-row slice of the hidden states; in bfloat16 PyTorch's CPU matmul then
  copies the whole transposed head first (a decode step does not). That costs more than
  the rest of a small model's prefill and its rate varies fivefold with the head's shape,
  so it is measured at the head shapes of common small models (``HEAD_SHAPES``) and a
  model is priced at the nearest. The copy is resident during prefill too (``cost.memory``).
- **Weights held twice while loading**: PyTorch's dynamically quantized int8 layers pack
  the int8 weights they load into their kernel's layout, so a loading model holds both.
- **Usable memory**: what the OS reports available now; **runtime memory**: the peak
  resident memory of a fresh process that imports PyTorch and a transformers model class.

Power is not measurable here without RAPL counters; the profile says so and assumes
``ASSUMED_WATTS``. The profile is written to the cache folder as ``host/profile.yaml`` and
loaded by ``--device host``; ``--memory SIZE`` alone uses it once it exists. A study
never calibrates by itself: its fingerprint holds the profile, and a figure measured
again would differ and refuse to resume the study.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmtailor import files, models

NAME = "host"
ASSUMED_WATTS = 45.0
PROBE_BYTES = 1 << 30  # the read probe: far above any cache


def profile_path() -> Path:
    from llmtailor.cache import cache_dir

    return cache_dir() / "host" / "profile.yaml"


def llama_cpp_profile_path() -> Path:
    """Where `llmtailor devices --calibrate --runtime llama.cpp` writes this machine's llama.cpp profile."""
    return profile_path().parent / "llama.cpp.yaml"


def _timed(run, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run`, after one call to warm up (page faults, thread pool)."""
    run()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        out.append(time.perf_counter() - started)
    return out


def read_bandwidth_gbps(probe_bytes: int = PROBE_BYTES, repeats: int = 7) -> float:
    """GB/s of a read-only pass over a buffer: the maximum of float32 words, every thread reading its share (an
    int32 sum would measure its widening to int64, about 25 times slower here, not the memory)."""
    import torch

    buffer = torch.ones(probe_bytes // 4, dtype=torch.float32)
    seconds = statistics.median(_timed(lambda: buffer.amax(), repeats))
    return probe_bytes / seconds / 1e9


def matmul_tflops(dtype: Any, tokens: int = 512, inputs: int = 1024, outputs: int = 4096, repeats: int = 7) -> float:
    """TFLOPS reached by a (tokens × inputs) @ (inputs × outputs) matmul in this dtype."""
    import torch

    a, b = torch.randn(tokens, inputs).to(dtype), torch.randn(inputs, outputs).to(dtype)
    seconds = statistics.median(_timed(lambda: a @ b, repeats))
    return 2 * tokens * inputs * outputs / seconds / 1e12


def int8_dynamic_tflops(tokens: int = 128, inputs: int = 1024, outputs: int = 4096, repeats: int = 7) -> float:
    """TFLOPS reached by PyTorch's dynamically quantized int8 linear layer on a prompt's rows (quantizing them on
    each call included), or 0 where this build has no quantized engine."""
    import torch

    if not set(torch.backends.quantized.supported_engines) & {"x86", "fbgemm", "onednn", "qnnpack"}:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        layer = torch.ao.nn.quantized.dynamic.Linear(inputs, outputs, dtype=torch.qint8)
        layer.set_weight_bias(torch.quantize_per_tensor(torch.randn(outputs, inputs), 0.02, 0, torch.qint8), None)
    x = torch.randn(tokens, inputs)
    with torch.no_grad():
        seconds = statistics.median(_timed(lambda: layer(x), repeats))
    return 2 * tokens * inputs * outputs / seconds / 1e12


# Layer shapes (inputs, outputs) the int8 dynamic layer is timed at: wide and narrow, so that its per-call work per
# value (quantizing inputs, dequantizing outputs) separates from its matmul rate.
INT8_SHAPES = ((1024, 4096), (4096, 1024), (1024, 256), (256, 1024), (576, 576), (576, 1536), (1536, 576))


def int8_dynamic_rates(tokens: int = 128, repeats: int = 9) -> tuple[float, float]:
    """The dynamically quantized int8 layer's matmul rate (TFLOPS) and its per-call work per input and output value
    (ns: quantizing the input, dequantizing the output), fitted over layers of several shapes (``INT8_SHAPES``;
    least squares on relative error, both terms non-negative): at small widths the per-value work is a large share
    of the time. (0, 0) where this build has no quantized engine."""
    import numpy as np

    timed = [(i, o, int8_dynamic_tflops(tokens, i, o, repeats)) for i, o in INT8_SHAPES]
    if any(tf <= 0 for _, _, tf in timed):
        return 0.0, 0.0
    flops = np.array([2.0 * tokens * i * o for i, o, _ in timed])
    values = np.array([float(tokens * (i + o)) for i, o, _ in timed])
    seconds = flops / (np.array([tf for _, _, tf in timed]) * 1e12)
    per_flop, per_value = _non_negative_least_squares(np.stack([flops, values], axis=1) / seconds[:, None],
                                                      np.ones(len(timed)))
    if per_flop <= 0:  # the per-value term explains everything: keep the plain rate instead
        return float(np.median(flops / seconds)) / 1e12, 0.0
    return float(1 / per_flop / 1e12), float(per_value * 1e9)


def weight_only_tflops(bits: int, tokens: int = 128, inputs: int = 1024, outputs: int = 4096, group: int = 128,
                       repeats: int = 7) -> float:
    """TFLOPS of PyTorch's fused CPU weight-only kernel (int8 per row: aten._weight_int8pack_mm; int4 in groups:
    aten._weight_int4pack_mm_for_cpu) multiplying a prompt's rows in bfloat16, or 0 where this build lacks it."""
    import torch

    x = torch.randn(tokens, inputs).to(torch.bfloat16)
    try:
        if bits == 8:
            codes = torch.randint(-128, 128, (outputs, inputs), dtype=torch.int8)
            scales = torch.rand(outputs).to(torch.bfloat16)
            run = lambda: torch.ops.aten._weight_int8pack_mm(x, codes, scales)  # noqa: E731
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (outputs, inputs), dtype=torch.int32), 1)
            scales_and_zeros = torch.rand(inputs // group, outputs, 2).to(torch.bfloat16)
            run = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)  # noqa: E731
        seconds = statistics.median(_timed(run, repeats))
    except (AttributeError, RuntimeError, NotImplementedError):
        return 0.0
    return 2 * tokens * inputs * outputs / seconds / 1e12


# Head shapes (vocabulary, width) of common small models, where the prompt head's rate is measured: it varies
# fivefold with the shape here (0.3-1.5 GB/s in bfloat16), so a model whose shape is listed is priced at its own
# measured rate and any other at the nearest. SmolLM2 135M/360M/1.7B, Qwen2.5 0.5B/1.5B, Llama-3.2 1B/3B,
# Gemma-3 270M/1B, TinyLlama 1.1B.
HEAD_SHAPES = ((49152, 576), (49152, 960), (49152, 2048), (151936, 896), (151936, 1536), (128256, 2048),
               (128256, 3072), (262144, 640), (262144, 1152), (32000, 2048))


def prompt_head_read_gbps(dtype: Any, vocab: int = 32768, width: int = 1024, prompt: int = 128,
                          repeats: int = 7) -> float:
    """GB/s at which transformers' head reads its weight for the last position of a prompt (`logits_to_keep=1`:
    a one-row slice of the prompt's hidden states, `F.linear` on it, as generation runs it). In bfloat16 on a CPU
    this copies the transposed head first; in float32 it is the matrix-vector rate."""
    import torch

    head = torch.randn(vocab, width).to(dtype)
    hidden = torch.randn(1, prompt, width).to(dtype)
    with torch.no_grad():
        seconds = statistics.median(_timed(lambda: torch.nn.functional.linear(hidden[:, -1:, :], head), repeats))
    return head.numel() * head.element_size() / seconds / 1e9


# Six widths: fewer left the fitted time per elementwise value unstable (float32's varied 0.1-4.8 ns between runs).
FIT_WIDTHS = (384, 512, 768, 1024, 1536, 2048)  # decoders of 0.1B to 1.5B parameters; the MLP is 8/3 as wide, heads 64 wide


@dataclass(frozen=True)
class DecoderTiming:
    """One synthetic decoder stack run through transformers' own LLaMA code: what it holds and how long it took."""

    dtype: str
    blocks: int
    decode_bytes: int  # weights and KV cache read per generated token
    prefill_flops: float
    prefill_s: float
    decode_s: float
    prefill_values: float = 0.0  # blocks x prompt tokens x (hidden + MLP width): the elementwise work's size


def time_decoders(total_bytes: int = 256 << 20, prompt: int = 128, steps: int = 16, repeats: int = 3,
                  widths: tuple[int, ...] = FIT_WIDTHS, rounds: int = 3) -> list[DecoderTiming]:
    """Prefill (one `prompt`-token forward) and decode (median step with the KV cache) of random LLaMA decoder stacks
    of each width, in float32 and bfloat16, each stack at least `total_bytes` so its weights stream from memory.

    Each stack is timed in `rounds` passes over all of them, and the median pass kept: a
    virtual machine's speed drifts by a fifth over minutes, and one pass would fit whichever
    phase it fell in."""
    import torch

    passes: dict[tuple[str, int], list[DecoderTiming]] = {}
    for _ in range(rounds):
        for dtype in (torch.float32, torch.bfloat16):
            for width in widths:
                passes.setdefault((str(dtype), width), []).append(_time_decoder(dtype, width, total_bytes, prompt,
                                                                                steps, repeats))
    return [replace(runs[0], prefill_s=statistics.median(t.prefill_s for t in runs),
                    decode_s=statistics.median(t.decode_s for t in runs)) for runs in passes.values()]


def _time_decoder(dtype: Any, width: int, total_bytes: int, prompt: int, steps: int, repeats: int) -> DecoderTiming:
    import torch
    from transformers import LlamaConfig, LlamaModel

    heads = max(1, width // 64)
    config = LlamaConfig(hidden_size=width, intermediate_size=(width * 8 // 3 + 63) // 64 * 64, vocab_size=256,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), num_hidden_layers=1)
    per_block = sum(p.numel() for p in LlamaModel(config).layers.parameters())
    config.num_hidden_layers = max(1, total_bytes // (per_block * dtype.itemsize))
    model = LlamaModel(config).to(dtype).eval()
    linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    ids = torch.randint(0, 256, (1, prompt))
    prefill, decode = [], []
    with torch.no_grad():
        for run in range(repeats + 1):
            started = time.perf_counter()
            cache = models.with_cache(model, ids)[1]
            if run:  # the first run warms up
                prefill.append(time.perf_counter() - started)
            step = []
            for _ in range(steps):
                started = time.perf_counter()
                cache = models.with_cache(model, ids[:, :1], cache)[1]
                step.append(time.perf_counter() - started)
            if run:
                decode.append(statistics.median(step))
    kv_width = config.num_key_value_heads * width // heads
    kv = 2 * config.num_hidden_layers * kv_width * (prompt + steps // 2) * dtype.itemsize
    attention = 4.0 * width * prompt * (prompt + 1) / 2 * config.num_hidden_layers
    return DecoderTiming(str(dtype).removeprefix("torch."), config.num_hidden_layers, linear * dtype.itemsize + kv,
                         2.0 * prompt * linear + attention, statistics.median(prefill), statistics.median(decode),
                         float(config.num_hidden_layers * prompt * (width + config.intermediate_size)))


def fit_decoders(timings: list[DecoderTiming]) -> dict[str, float]:
    """The roofline-plus-overhead model that best explains the timings (least squares).

    Decode: seconds = bytes / read rate of its dtype + blocks * overhead: one read rate per
    dtype (PyTorch's float32 matrix-vector product reaches less of the bandwidth than its
    bfloat16 one here) and one per-block overhead. Prefill: seconds = FLOPs / rate + values *
    time per value + blocks * overhead, the same overhead; per dtype a rate (attention in) and a
    time per value of the prompt's activations (tokens x (hidden + MLP width) per block: norms,
    activation function, residual adds, dtype casts; bfloat16's cost more than float32's here,
    which only shows on narrow models, where this work is a larger share).
    """
    import numpy as np

    dtypes = sorted({t.dtype for t in timings})
    design = np.array([[t.decode_bytes * (t.dtype == d) for d in dtypes] + [t.blocks] for t in timings], dtype=float)
    coefficients = _non_negative_least_squares(design, np.array([t.decode_s for t in timings]))
    per_byte, overhead = dict(zip(dtypes, coefficients[:-1], strict=True)), float(coefficients[-1])
    figures = {"block_overhead_us": overhead * 1e6,
               "decode_read_gbps": sum(t.decode_bytes for t in timings) /
               sum(max(t.decode_s - t.blocks * overhead, 1e-9) for t in timings) / 1e9}
    for d in dtypes:
        rows = [t for t in timings if t.dtype == d]
        beyond = np.array([max(t.prefill_s - t.blocks * overhead, 0.1 * t.prefill_s) for t in rows])
        per_flop, per_value = _non_negative_least_squares(
            np.array([[t.prefill_flops, t.prefill_values] for t in rows]), beyond)
        if per_flop <= 0:  # the values explained everything: price the work by FLOPs alone instead
            per_flop, per_value = float(beyond.sum()) / sum(t.prefill_flops for t in rows), 0.0
        short = "fp32" if d == "float32" else "bf16"
        figures[f"{short}_prefill_tflops"] = 1 / per_flop / 1e12
        figures[f"{short}_prefill_ns_per_value"] = per_value * 1e9
        figures[f"{short}_decode_read_gbps"] = 1 / per_byte[d] / 1e9 if per_byte[d] > 0 else math.inf
    return figures


def _non_negative_least_squares(design: Any, target: Any) -> Any:
    """Least squares with every coefficient >= 0, by elimination: a coefficient the data would make negative (the
    bytes explain none of the time when a stack sits in cache) is fixed at zero and the rest refitted."""
    import numpy as np

    active = list(range(design.shape[1]))
    while True:
        solved = np.linalg.lstsq(design[:, active], target, rcond=None)[0]
        if solved.min() >= 0 or len(active) == 1:
            break
        active.pop(int(solved.argmin()))
    coefficients = np.zeros(design.shape[1])
    coefficients[active] = np.maximum(solved, 0)
    return coefficients


def _proc_kib(path: str, key: str) -> int | None:
    """Bytes of a 'Key:  N kB' line of a /proc file, or None where the file or the line is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_resident_bytes() -> int:
    """This process's peak resident memory since it started (VmHWM). Not ru_maxrss: on Linux that survives fork
    and exec, so a child started by a large process reports the parent's size."""
    peak = resident_bytes(peak=True)
    if peak is None:
        raise OSError("no VmHWM in /proc/self/status")
    return peak


LARGE_BLOCK_BYTES = 16 << 20


def return_large_blocks_to_the_os() -> bool:
    """Make glibc serve every allocation of LARGE_BLOCK_BYTES or more by its own mapping, returned to the OS when
    freed. By default glibc raises that threshold after large blocks are freed and then keeps later ones in its heap,
    so a sweep's resident memory would stay at the largest temporaries it ever made (a 262k-token window's logits,
    a dequantized embedding). Activations of a forward pass stay smaller than this and are unaffected. False where
    the C library has no mallopt (not glibc)."""
    return _map_blocks_from(LARGE_BLOCK_BYTES)


@contextlib.contextmanager
def blocks_mapped_from(size: int) -> Iterator[bool]:
    """Within the block, glibc serves every allocation of `size` bytes or more by its own mapping (yields whether
    it could); afterwards LARGE_BLOCK_BYTES again, as `return_large_blocks_to_the_os` sets it (a process that had
    left glibc's own moving threshold gets the fixed one from then on). For work whose freed temporaries of a few
    hundred kilobytes would otherwise leave holes in the heap that later, other sizes cannot reuse (see
    ``compression.trained``)."""
    mapped = _map_blocks_from(size)
    try:
        yield mapped
    finally:
        if mapped:
            _map_blocks_from(LARGE_BLOCK_BYTES)


def _map_blocks_from(size: int) -> bool:
    try:
        return bool(_libc().mallopt(-3, size))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _libc():
    """The C library of this process (glibc's memory calls; OSError or AttributeError where there is none)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_freed_memory() -> bool:
    """Hand the heap pages this process has freed back to the OS (glibc's ``malloc_trim``). Blocks below
    LARGE_BLOCK_BYTES stay in glibc's heap when freed, interleaved with live ones, so after a distillation run (its
    gradients, optimizer moments and activations, most of them smaller blocks) a sweep kept 4.1 GB resident where it
    holds 1.0 GB: memory no other worker on the machine could use. False where the C library has no malloc_trim."""
    try:
        _libc().malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def resident_bytes(peak: bool = False) -> int | None:
    """This process's resident memory now (VmRSS), or its peak so far (VmHWM); None where /proc is not readable."""
    return _proc_kib("/proc/self/status", "VmHWM" if peak else "VmRSS")


def restart_peak() -> bool:
    """Start this process's peak resident memory (VmHWM) over from what it holds now (Linux's ``clear_refs``), so
    that a later peak is that of what ran since; False where the kernel refuses it (the peak is then kept)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def in_a_fresh_process(code: str) -> float:
    """The number a fresh Python process running `code` prints last: memory figures need a process whose heap and
    peak nothing else has touched."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def runtime_bytes() -> int:
    """Peak resident memory of a fresh Python process that imports PyTorch and a transformers model class (which
    loads transformers' modeling code, about half of it): the runtime's own memory before any weights load."""
    return int(in_a_fresh_process("from llmtailor.hw_profiles import host; import torch; "
                                   "from transformers import LlamaForCausalLM; print(host.peak_resident_bytes())"))


def int8_dynamic_weight_copies(inputs: int = 2048, outputs: int = 2048, layers: int = 8) -> float:
    """Copies of their int8 weights that PyTorch's dynamically quantized linear layers hold while a model loads: the
    loaded int8 tensors (as a state dict holds them) and the packed form each layer makes of them, measured as the
    resident growth of packing over the int8 bytes, in a fresh process (a used heap would hide the growth); 1.0
    where this build has no quantized engine."""
    code = ("import torch, sys; from llmtailor.hw_profiles import host; torch.set_num_threads(1)\n"
            "if not set(torch.backends.quantized.supported_engines) & {'x86', 'fbgemm', 'onednn', 'qnnpack'}:\n"
            "    print(0); sys.exit()\n"
            f"i, o, n = {inputs}, {outputs}, {layers}\n"
            "loaded = [torch._make_per_tensor_quantized_tensor(torch.randint(-128, 128, (o, i), dtype=torch.int8), "
            "0.02, 0) for _ in range(n)]\n"
            "before = host.resident_bytes()\n"
            "packed = [torch.ops.quantized.linear_prepack(w, None) for w in loaded]\n"
            "print((host.resident_bytes() - before) / (n * i * o))")
    return 1.0 + max(0.0, in_a_fresh_process(code))


def available_memory_bytes() -> int:
    """What the OS reports available (MemAvailable), or physical memory where that is not readable."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(probe_bytes: int = PROBE_BYTES) -> dict[str, Any]:
    """The host's figures, measured now."""
    import torch

    available = available_memory_bytes()
    probe_bytes = min(probe_bytes, available // 4)
    # The int8 layer's rate swings most from probe to probe (0.53-0.85 TOPS between calibrations on a shared VM),
    # so it is probed at the start, middle and end of the calibration and the median kept.
    int8_probes = [int8_dynamic_rates()]
    figures = {
        "read_bandwidth_gbps": read_bandwidth_gbps(probe_bytes), "probe_bytes": probe_bytes,
        **fit_decoders(time_decoders(min(256 << 20, probe_bytes // 2), widths=FIT_WIDTHS)),
    }
    int8_probes.append(int8_dynamic_rates())
    figures |= {"fp32_tflops": matmul_tflops(torch.float32), "bf16_tflops": matmul_tflops(torch.bfloat16)}
    int8_probes.append(int8_dynamic_rates())
    return {
        **figures,
        "int8_dynamic_tflops": statistics.median(rate for rate, _ in int8_probes),
        "int8_dynamic_ns_per_value": statistics.median(per_value for _, per_value in int8_probes),
        "int8_dynamic_tflops_probes": [rate for rate, _ in int8_probes],
        "int8_dynamic_weight_copies": int8_dynamic_weight_copies(),
        "int8_weight_only_tflops": weight_only_tflops(8), "int4_weight_only_tflops": weight_only_tflops(4),
        # float32 reads the head at its matrix-vector rate (measured at one shape to show it); bfloat16 per shape.
        "fp32_prompt_head_read_gbps": {"49152x576": prompt_head_read_gbps(torch.float32, 49152, 576, repeats=3)},
        "bf16_prompt_head_read_gbps": {f"{v}x{w}": prompt_head_read_gbps(torch.bfloat16, v, w, repeats=3)
                                       for v, w in HEAD_SHAPES},
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "available_bytes": available, "runtime_bytes": runtime_bytes(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def write_profile(figures: dict[str, Any], path: Path | None = None) -> Path:
    """Write the measured figures as a device profile YAML (the loader's format) and return its path."""
    path = path or profile_path()
    fp32, bf16 = figures["fp32_prefill_tflops"], figures["bf16_prefill_tflops"]
    # int8 and the weight-only kernels are bare matmul rates; scale them by what prefill reaches of the bfloat16 one.
    reached = min(1.0, bf16 / figures["bf16_tflops"])
    int8 = figures.get("int8_dynamic_tflops", 0.0) * reached
    rates = f"fp32: {fp32:.4g}, fp16: {bf16:.4g}" + (f", int8: {int8:.4g}" if int8 > 0 else "")
    weight_only = ", ".join(f"{bits}: {figures[f'{bits}_weight_only_tflops'] * reached:.4g}" for bits in ("int8", "int4")
                            if figures.get(f"{bits}_weight_only_tflops", 0) > 0)
    # Figures a measurement may lack (older callers, builds without a kernel) are left out, not guessed.
    bf16_heads = ", ".join(f"{shape}: {gbps:.4g}" for shape, gbps in figures.get("bf16_prompt_head_read_gbps", {}).items())
    fp32_heads = ", ".join(f"{shape} {gbps:.1f}" for shape, gbps in figures.get("fp32_prompt_head_read_gbps", {}).items())
    per_value = ", ".join(f"{name}: {figures[f'{short}_prefill_ns_per_value']:.4g}" for name, short
                          in (("fp32", "fp32"), ("fp16", "bf16")) if f"{short}_prefill_ns_per_value" in figures)
    kernels = ["int8_weight_only", "int4_weight_only"] + (["int8_activations"] if int8 > 0 else [])
    copies = figures.get("int8_dynamic_weight_copies", 1.0) if int8 > 0 else 1.0
    probes = ", ".join(f"{rate:.3g}" for rate in figures.get("int8_dynamic_tflops_probes", []))
    text = f"""# This machine, measured by `llmtailor devices --calibrate` ({time.strftime('%Y-%m-%d %H:%M')}).
name: {NAME}
description: this machine ({figures['cpu']}, {figures['threads']} threads, measured)
memory: {figures['memory_bytes']}
# MemAvailable at calibration time.
usable_memory: {min(figures['available_bytes'], figures['memory_bytes'])}
# Read-only probe (maximum over a {figures['probe_bytes'] >> 20} MiB float32 buffer), median of 7.
memory_bandwidth_gbps: {figures['read_bandwidth_gbps']:.2f}
# What prefill's matmuls reach (FLOPs over the time beyond the per-block overhead and elementwise work, below),
# fitted over random LLaMA decoders of width {'/'.join(map(str, FIT_WIDTHS))} at a 128-token prompt: fp32, bf16 as
# the half precision (bare matmuls: {figures['fp32_tflops'] * 1e3:.0f} and {figures['bf16_tflops'] * 1e3:.0f} GFLOPS), and
# int8 as PyTorch's dynamically quantized linear layer reaches it, scaled alike (absent without a quantized engine;
# the median of three probes taken through the calibration: {probes} TOPS bare).
peak_tflops: {{{rates}}}
# Not measured (no power counters read): an assumed laptop-class package power.
power_watts: {ASSUMED_WATTS}
# PyTorch's CPU weight-only matmuls (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu) read 8- and 4-bit
# weights directly (fast with bfloat16 activations; with float32 ones the int8 path is far slower on x86);
# int8 activations through the dynamically quantized linear layer where measured above; no sparse kernels.
kernels: [{", ".join(kernels)}]
# Elementwise work of a prompt beyond its matmuls, per token x (hidden + MLP width) per block, from the same fit.
prefill_ns_per_value: {{{per_value}}}
# The weight-only kernels multiplying a 128-row prompt in bfloat16 (bare: int8 {figures.get('int8_weight_only_tflops', 0) * 1e3:.0f},
# int4 {figures.get('int4_weight_only_tflops', 0) * 1e3:.0f} GFLOPS), scaled like int8 above.
weight_only_tflops: {{{weight_only}}}
# The dense head over a prompt's last position, as transformers runs it (F.linear on a one-row slice): GB/s read
# in bfloat16, per head shape VOCABxWIDTH (float32 reads it at its matrix-vector rate: {fp32_heads} GB/s).
prompt_head_read_gbps: {{{f"fp16: {{{bf16_heads}}}" if bf16_heads else ""}}}
# The dynamically quantized int8 layers pack the int8 weights they load into their kernel's layout: while a model
# loads, both are resident (growth of packing over the int8 bytes, measured in a fresh process).
weight_copies_at_load: {{{f"int8_activations: {copies:.3g}" if copies > 1 else ""}}}
# The same layers quantize their input and dequantize their output on every call: ns per value, beyond the matmul
# (fitted with the int8 rate above over layers of seven shapes, wide and narrow).
int8_activation_ns_per_value: {figures.get("int8_dynamic_ns_per_value", 0.0) if int8 > 0 else 0.0:.4g}
# Peak resident memory of a fresh process that imports PyTorch and a transformers model class.
runtime_overhead: {figures['runtime_bytes']}
# Decoding those decoders reads weights and KV cache at {figures['decode_read_gbps']:.1f} GB/s beyond a fixed cost per
# block (least squares): this share of the read probe; per compute precision, float32 at
# {figures['fp32_decode_read_gbps']:.1f} GB/s and bfloat16 at {figures['bf16_decode_read_gbps']:.1f}. The rates above are reached rates.
bandwidth_efficiency: {min(1.0, figures['decode_read_gbps'] / figures['read_bandwidth_gbps']):.4g}
bandwidth_efficiency_by_precision: {{fp32: {min(1.0, figures['fp32_decode_read_gbps'] / figures['read_bandwidth_gbps']):.4g}, \
fp16: {min(1.0, figures['bf16_decode_read_gbps'] / figures['read_bandwidth_gbps']):.4g}}}
compute_efficiency: 1.0
# The fixed cost per decoder block per forward pass, from the same fit.
layer_overhead_us: {figures['block_overhead_us']:.1f}
runtime: PyTorch eager (CPU)
"""
    files.write_text(path, text)
    return path
