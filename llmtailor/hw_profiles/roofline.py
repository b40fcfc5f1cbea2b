"""Roofline timing: an operation takes as long as its memory traffic or its arithmetic, whichever is longer."""

from __future__ import annotations

from dataclasses import dataclass

from llmtailor.hw_profiles import DeviceProfile


@dataclass(frozen=True)
class Operation:
    """One unit of work in a forward pass: arithmetic, bytes moved, and the precision it computes in."""

    flops: float
    bytes: float
    precision: str  # fp32 | fp16 | int8
    tflops: float | None = None  # the kernel's own peak rate where it is not the precision's (weight-only kernels)
    read_gbps: float | None = None  # a reached read rate where the runtime's path is not the usual one


def compute_precision(profile: DeviceProfile, int8_activations: bool, dense_dtype: str = "float16") -> str:
    """The precision a matmul runs in on this device: int8 where the layer and the device do int8
    activations, float32 where the runtime holds float32, else the half precision where the device has one."""
    if int8_activations and "int8_activations" in profile.kernels and "int8" in profile.peak_tflops:
        return "int8"
    return "fp16" if dense_dtype != "float32" and "fp16" in profile.peak_tflops else "fp32"


def seconds(op: Operation, profile: DeviceProfile) -> float:
    """Time of one operation on the device: max(bytes / bandwidth, flops / compute), both derated (an operation's
    own read rate is a reached one, not derated)."""
    efficiency = profile.bandwidth_efficiency_by_precision.get(op.precision, profile.bandwidth_efficiency)
    bandwidth = op.read_gbps * 1e9 if op.read_gbps else profile.memory_bandwidth_gbps * 1e9 * efficiency
    compute = (op.tflops or profile.peak_tflops[op.precision]) * 1e12 * profile.compute_efficiency
    return max(op.bytes / bandwidth, op.flops / compute)


def total_seconds(ops: list[Operation], profile: DeviceProfile, blocks: int) -> float:
    """Time of a forward pass: its operations in sequence plus a fixed overhead per block."""
    return sum(seconds(op, profile) for op in ops) + blocks * profile.layer_overhead_us * 1e-6
