"""The host profile: this machine's speeds, measured (`llmtailor devices --calibrate`), for PyTorch on its CPU.

- **Read bandwidth** with a read-only probe (summing a buffer much larger than the
  caches), not a copy: decoding reads weights and writes almost nothing, and a copy
  benchmark counts write traffic too (published llama.cpp measurements decode at
  84–91% of the read-only figure; a copy benchmark reports about half of it).
- **Matmul throughput** per compute precision at the shapes of a small model's
  prefill (fp32, and bf16 as this profile's half precision: PyTorch's CPU fp16 matmul
  has no fast kernels), as reached, so the compute efficiency is 1.
- **Per-block overhead**: the time of one decoder-sized block forward on one token
  beyond its arithmetic and traffic (dispatch, Python, small kernels).
- **Usable memory**: what the OS reports available now; **runtime memory**: the peak
  resident memory of a fresh process that imports PyTorch and transformers.

Power is not measurable here without RAPL counters; the profile says so and assumes
``ASSUMED_WATTS``. The profile is written to the cache folder as ``host/profile.yaml`` and
loaded by ``--device host``; ``--memory SIZE`` alone uses it once it exists. A study
never calibrates by itself: its fingerprint holds the profile, and a figure measured
again would differ and refuse to resume the study.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from llmtailor import files

NAME = "host"
ASSUMED_WATTS = 45.0
PROBE_BYTES = 1 << 30  # the read probe: far above any cache


def profile_path() -> Path:
    from llmtailor.cache import cache_dir

    return cache_dir() / "host" / "profile.yaml"


def _timed(run, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run`, after one call to warm up (page faults, thread pool)."""
    run()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        out.append(time.perf_counter() - started)
    return out


def read_bandwidth_gbps(probe_bytes: int = PROBE_BYTES, repeats: int = 5) -> float:
    """GB/s of a read-only pass over a buffer: the maximum of float32 words, every thread reading its share (an
    int32 sum would measure its widening to int64, about 25 times slower here, not the memory)."""
    import torch

    buffer = torch.ones(probe_bytes // 4, dtype=torch.float32)
    seconds = min(_timed(lambda: buffer.amax(), repeats))
    return probe_bytes / seconds / 1e9


def matmul_tflops(dtype: Any, tokens: int = 512, inputs: int = 1024, outputs: int = 4096, repeats: int = 5) -> float:
    """TFLOPS reached by a (tokens × inputs) @ (inputs × outputs) matmul in this dtype."""
    import torch

    a, b = torch.randn(tokens, inputs).to(dtype), torch.randn(inputs, outputs).to(dtype)
    seconds = min(_timed(lambda: a @ b, repeats))
    return 2 * tokens * inputs * outputs / seconds / 1e12


def block_overhead_us(hidden: int = 64, repeats: int = 50) -> float:
    """Microseconds of one tiny decoder block's forward on one token: nearly all of it overhead, not work."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=1)
    config._attn_implementation = "eager"  # a block built alone has no attention implementation chosen
    block, rotary = LlamaDecoderLayer(config, 0).eval(), LlamaRotaryEmbedding(config)
    x = torch.randn(1, 1, hidden)
    positions = torch.zeros(1, 1, dtype=torch.long)
    embeddings = rotary(x, positions)
    with torch.no_grad():
        seconds = statistics.median(_timed(lambda: block(x, position_embeddings=embeddings), repeats))
    return seconds * 1e6


def runtime_bytes() -> int:
    """Peak resident memory of a fresh Python process that imports PyTorch and transformers: the runtime's own
    memory before any model is loaded."""
    import subprocess
    import sys

    code = "import resource, torch, transformers; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def available_memory_bytes() -> int:
    """What the OS reports available (MemAvailable), or physical memory where that is not readable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(probe_bytes: int = PROBE_BYTES) -> dict[str, Any]:
    """The host's figures, measured now."""
    import torch

    available = available_memory_bytes()
    probe_bytes = min(probe_bytes, available // 4)
    return {
        "read_bandwidth_gbps": read_bandwidth_gbps(probe_bytes), "probe_bytes": probe_bytes,
        "fp32_tflops": matmul_tflops(torch.float32),
        "bf16_tflops": matmul_tflops(torch.bfloat16),
        "block_overhead_us": block_overhead_us(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "available_bytes": available, "runtime_bytes": runtime_bytes(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def write_profile(figures: dict[str, Any], path: Path | None = None) -> Path:
    """Write the measured figures as a device profile YAML (the loader's format) and return its path."""
    path = path or profile_path()
    fp32, bf16 = figures["fp32_tflops"], figures["bf16_tflops"]
    text = f"""# This machine, measured by `llmtailor devices --calibrate` ({time.strftime('%Y-%m-%d %H:%M')}).
name: {NAME}
description: this machine ({figures['cpu']}, {figures['threads']} threads, measured)
memory: {figures['memory_bytes']}
# MemAvailable at calibration time.
usable_memory: {min(figures['available_bytes'], figures['memory_bytes'])}
# Read-only probe (maximum over a {figures['probe_bytes'] >> 20} MiB float32 buffer), best of 5.
memory_bandwidth_gbps: {figures['read_bandwidth_gbps']:.2f}
# Matmul (512 x 1024 @ 1024 x 4096) as reached: fp32, and bf16 as the half precision.
peak_tflops: {{fp32: {fp32:.4f}, fp16: {max(bf16, 1e-4):.4f}}}
# Not measured (no power counters read): an assumed laptop-class package power.
power_watts: {ASSUMED_WATTS}
# PyTorch's CPU weight-only matmuls (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu) read 8- and 4-bit
# weights directly; no int8-activation or sparse kernels are assumed.
kernels: [int8_weight_only, int4_weight_only]
# Peak resident memory of a fresh process that imports PyTorch and transformers.
runtime_overhead: {figures['runtime_bytes']}
# Decoding reaches about this share of the read-only bandwidth; the matmul rates are reached rates.
bandwidth_efficiency: 0.85
compute_efficiency: 1.0
# Median forward of a tiny decoder block on one token.
layer_overhead_us: {figures['block_overhead_us']:.1f}
runtime: PyTorch eager (CPU)
"""
    files.write_text(path, text)
    return path
