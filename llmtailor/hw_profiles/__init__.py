"""Device profiles: public facts about a device (memory, bandwidth, compute, kernels, power).

A profile is a YAML file in this folder (found by its name) or anywhere (found by its
path); ``host`` is this machine, measured by ``llmtailor devices --calibrate``
(``hw_profiles.host``). ``--memory 8GB`` alone is an ad-hoc profile: the memory budget
the user gives, with the host's measured speeds, or before any calibration the speed
figures of the ``laptop-x86-16gb`` profile standing in for "a typical CPU" (latencies
are then only comparable with each other, not predictions).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from llmtailor.errors import UserError

PROFILE_DIR = Path(__file__).parent
AD_HOC_BASE = "laptop-x86-16gb"
HOST_LLAMA_CPP = "host-llama.cpp"  # this machine running llama.cpp: `llmtailor devices --calibrate --runtime llama.cpp`
KNOWN_KERNELS = frozenset(
    {"int8_weight_only", "int4_weight_only", "int8_activations", "sparse_2_4", "sparse_unstructured"}
)
PRECISIONS = ("fp32", "fp16", "int8")
# The fused weight-only kernels, by weight width; a format with a minimum (zero point) per group may have rates of its
# own (llama.cpp's Q4_1 runs about a third slower than its Q4_0 on this machine): "int4_zero_point", where given.
WEIGHT_ONLY = ("int8", "int4", "int8_zero_point", "int4_zero_point")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


@dataclass(frozen=True)
class DeviceProfile:
    """What the cost model needs to know about a device."""

    name: str
    description: str
    memory_bytes: int  # physical memory
    usable_memory_bytes: int  # what the OS leaves to a model: the budget
    memory_bandwidth_gbps: float  # GB/s, peak
    peak_tflops: dict[str, float]  # per compute precision: fp32, fp16, int8
    power_watts: float  # under sustained inference load
    kernels: frozenset[str] = field(default_factory=frozenset)
    runtime_overhead_bytes: int = 0  # the inference runtime's own memory
    bandwidth_efficiency: float = 0.7  # share of peak bandwidth reached in practice
    # Where a runtime's kernels reach different shares per compute precision (fp32 | fp16 | int8); others use the above.
    bandwidth_efficiency_by_precision: dict[str, float] = field(default_factory=dict)
    compute_efficiency: float = 0.5  # share of peak compute reached in practice
    layer_overhead_us: float = 0.0  # fixed cost per decoder block per forward pass
    # Seconds (in ns) of a prompt's elementwise work per value, per compute precision: norms, activation function,
    # residual adds and casts over tokens x (hidden + MLP width) per block, beyond the matmuls (prefill only).
    prefill_ns_per_value: dict[str, float] = field(default_factory=dict)
    # Peak TFLOPS of the fused weight-only kernels (int8 | int4) when they multiply many rows (a prompt), where they
    # differ from the dense half precision's: PyTorch's CPU ones reach under half of it. Derated by compute_efficiency.
    weight_only_tflops: dict[str, float] = field(default_factory=dict)
    # Share of peak bandwidth the fused weight-only kernels (int8 | int4) reach streaming their weights one token at a
    # time, where it is not the precision's: a 4-bit kernel unpacks and rescales as it reads, and on a GPU that keeps
    # it below a dense matrix-vector product (gpt-fast on an A100: bf16 69%, int8 52%, int4 42% of 2,039 GB/s).
    weight_only_bandwidth_efficiency: dict[str, float] = field(default_factory=dict)
    # GB/s (reached, not derated) at which the runtime reads the dense output head for a prompt's last position, per
    # compute precision and head shape ("VOCABxWIDTH"), where that differs from its matrix-vector rate: PyTorch's
    # CPU half-precision matmul copies the transposed head before multiplying one row of a longer prompt (a decode
    # step does not), at a rate that varies fivefold with the shape (cache conflicts of a strided copy). A runtime
    # given a rate here holds that copy during prefill too: cost.memory counts the dense head once more.
    prompt_head_read_gbps: dict[str, dict[str, float]] = field(default_factory=dict)
    # Copies of a layer's weights the runtime holds at its peak, per kernel that runs the layer, where more than one:
    # PyTorch's dynamically quantized int8 layers (int8_activations) repack the int8 weights they load into their
    # kernel's layout, so while a model loads it holds both (about 2).
    weight_copies_at_load: dict[str, float] = field(default_factory=dict)
    # ns per input and output value that layers run by int8_activations spend on every call beyond the matmul
    # (quantizing the input, dequantizing the output); it matters at small widths (PyTorch's dynamic int8 layers).
    int8_activation_ns_per_value: float = 0.0
    runtime: str = ""  # the inference runtime the kernels and efficiencies are for (llama.cpp, PyTorch, ...)

    def prompt_head_gbps(self, precision: str, vocab: int, width: int) -> float | None:
        """The prompt head's read rate for this shape: the measured shape nearest to it (in log vocabulary and log
        width), or None where the profile gives none for this precision."""
        by_shape = self.prompt_head_read_gbps.get(precision)
        if not by_shape:
            return None

        def distance(shape: str) -> float:
            v, w = (int(x) for x in shape.split("x"))
            return math.log(v / vocab) ** 2 + math.log(w / width) ** 2

        return by_shape[min(by_shape, key=distance)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["kernels"] = sorted(self.kernels)
        return data

    def to_yaml(self, comment: str = "") -> str:
        """The profile as a YAML file the loader reads back (its field names, sizes in bytes), after a comment."""
        data = self.to_dict()
        for field_name in ("memory", "usable_memory", "runtime_overhead"):
            data[field_name] = data.pop(f"{field_name}_bytes")
        lines = [f"# {line}" for line in comment.splitlines()]
        return "\n".join(lines) + ("\n" if lines else "") + yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """The inverse of to_dict."""
        return cls(**{**data, "kernels": frozenset(data.get("kernels", ()))})


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes from '8GB', '512 MB', '1.5GiB' or a plain number of bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, bool):
        raise UserError(f"malformed {what} {text!r}: use a number with a unit, such as 8GB, 512MB or 1.5GiB")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UserError(f"malformed {what} {text!r}: use a number with a unit, such as 8GB, 512MB or 1.5GiB")
        unit = (match[2] or "").lower().removesuffix("b") if (match[2] or "").lower() != "b" else ""
        value = float(match[1]) * _UNITS[unit]
    if value <= 0:
        raise UserError(f"{what} must be more than zero, got {text!r}")
    return int(value)


def format_size(num_bytes: float) -> str:
    """A byte count for people: '161.3 MB', '7.25 GB' (decimal units, like parse_size)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.{1 if unit != 'GB' else 2}f} {unit}"
    return f"{int(num_bytes)} B"


def available() -> list[str]:
    """Names of the profiles that ship with llmtailor."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load(name_or_path: str) -> DeviceProfile:
    """A profile by its name (see `llmtailor devices`) or by the path of a YAML file."""
    path = Path(name_or_path).expanduser()
    if name_or_path in (HOST_LLAMA_CPP, "host") and not path.is_file():
        from llmtailor.hw_profiles import host

        path, missing = (host.profile_path(), "this machine has no host profile yet: measure it with `llmtailor "
                         "devices --calibrate`") if name_or_path == "host" else \
            (host.llama_cpp_profile_path(), "this machine has no llama.cpp profile yet: measure it with `llmtailor "
             "devices --calibrate --runtime llama.cpp` (needs the optional llama-cpp-python package)")
        if not path.is_file():
            raise UserError(missing)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown device {name_or_path!r}: choose one of {', '.join(available())} "
            "(`llmtailor devices`), give a profile YAML path, or use --memory SIZE"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"device profile {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return _from_yaml(data, str(path))


def from_memory(size: str, base: DeviceProfile | None = None) -> DeviceProfile:
    """An ad-hoc profile: the budget given, on a base device (by default this machine's measured speeds when
    `llmtailor devices --calibrate` has measured them, else a typical laptop CPU's)."""
    budget = parse_size(size, "memory budget")
    if base is None:
        from llmtailor.hw_profiles import host

        measured = host.profile_path().is_file()
        base = replace(load("host" if measured else AD_HOC_BASE), name="memory", runtime_overhead_bytes=0)
        speeds = "this machine's measured speeds" if measured else "speeds of a typical laptop CPU; `llmtailor " \
                                                                   "devices --calibrate` measures this machine's"
        description = f"a {format_size(budget)} memory budget ({speeds})"
    else:
        description = f"{base.description}, limited to {format_size(budget)}"
    return replace(base, name=f"{base.name}-{str(size).replace(' ', '')}", description=description,
                   usable_memory_bytes=budget)


_REQUIRED = {"name": str, "description": str, "memory": "size", "usable_memory": "size",
             "memory_bandwidth_gbps": float, "peak_tflops": dict, "power_watts": float}
_OPTIONAL = {"kernels": list, "runtime_overhead": "size", "bandwidth_efficiency": float,
             "bandwidth_efficiency_by_precision": dict,
             "compute_efficiency": float, "layer_overhead_us": float, "runtime": str,
             "weight_only_tflops": dict, "prompt_head_read_gbps": dict, "prefill_ns_per_value": dict,
             "weight_copies_at_load": dict, "weight_only_bandwidth_efficiency": dict,
             "int8_activation_ns_per_value": float}


def _from_yaml(data: Any, where: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise UserError(f"device profile {where} must be a YAML mapping of fields")
    unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise UserError(f"device profile {where}: unknown field(s) {sorted(unknown)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UserError(f"device profile {where}: missing field(s) {missing}")
    values: dict[str, Any] = {}
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in data:
            continue
        value = data[key]
        if kind == "size":
            value = parse_size(value, f"{key} in {where}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"device profile {where}: {key} must be a non-negative number, got {value!r}")
            value = float(value)
        elif not isinstance(value, kind):
            raise UserError(f"device profile {where}: {key} must be a {kind.__name__}, got {value!r}")
        values[key] = value
    tflops = values["peak_tflops"]
    if "fp32" not in tflops or set(tflops) - set(PRECISIONS):
        raise UserError(f"device profile {where}: peak_tflops needs fp32 and may have only {PRECISIONS}")
    for precision, tf in tflops.items():
        if isinstance(tf, bool) or not isinstance(tf, (int, float)) or tf <= 0:
            raise UserError(f"device profile {where}: peak_tflops.{precision} must be a positive number")
    for key in ("memory_bandwidth_gbps", "power_watts"):
        if values[key] <= 0:
            raise UserError(f"device profile {where}: {key} must be more than zero")
    for key in ("bandwidth_efficiency", "compute_efficiency"):
        if key in values and not 0 < values[key] <= 1:
            raise UserError(f"device profile {where}: {key} must be in (0, 1]")
    by_precision = _shares(values.get("bandwidth_efficiency_by_precision", {}), "bandwidth_efficiency_by_precision",
                           PRECISIONS, where)
    weight_only = _positive_rates(values.get("weight_only_tflops", {}), "weight_only_tflops", WEIGHT_ONLY, where)
    weight_only_reads = _shares(values.get("weight_only_bandwidth_efficiency", {}), "weight_only_bandwidth_efficiency",
                                WEIGHT_ONLY, where)
    per_value = _positive_rates(values.get("prefill_ns_per_value", {}), "prefill_ns_per_value", PRECISIONS, where,
                                zero=True)
    heads = values.get("prompt_head_read_gbps", {})
    if set(heads) - set(PRECISIONS) or not all(isinstance(v, dict) for v in heads.values()):
        raise UserError(f"device profile {where}: prompt_head_read_gbps maps {PRECISIONS} to mappings of head shapes "
                        f"(VOCABxWIDTH) to GB/s, got {heads!r}")
    heads = {precision: _positive_rates(by_shape, f"prompt_head_read_gbps.{precision}", _HEAD_SHAPE, where)
             for precision, by_shape in heads.items()}
    copies = _positive_rates(values.get("weight_copies_at_load", {}), "weight_copies_at_load",
                             tuple(sorted(KNOWN_KERNELS)), where)
    for kernel, n in copies.items():
        if n < 1:
            raise UserError(f"device profile {where}: weight_copies_at_load counts copies, at least 1 each, got "
                            f"{kernel}: {n:g}")
    kernels = frozenset(values.get("kernels", ()))
    if kernels - KNOWN_KERNELS:
        raise UserError(f"device profile {where}: unknown kernels {sorted(kernels - KNOWN_KERNELS)}; "
                        f"known are {sorted(KNOWN_KERNELS)}")
    if values["usable_memory"] > values["memory"]:
        raise UserError(f"device profile {where}: usable_memory is larger than memory")
    return DeviceProfile(
        name=values["name"], description=values["description"], memory_bytes=values["memory"],
        usable_memory_bytes=values["usable_memory"], memory_bandwidth_gbps=values["memory_bandwidth_gbps"],
        peak_tflops={k: float(v) for k, v in tflops.items()}, power_watts=values["power_watts"],
        kernels=kernels, runtime_overhead_bytes=values.get("runtime_overhead", 0),
        bandwidth_efficiency=values.get("bandwidth_efficiency", 0.7),
        bandwidth_efficiency_by_precision={k: float(v) for k, v in by_precision.items()},
        compute_efficiency=values.get("compute_efficiency", 0.5),
        layer_overhead_us=values.get("layer_overhead_us", 0.0), runtime=values.get("runtime", ""),
        weight_only_tflops=weight_only, prompt_head_read_gbps=heads, prefill_ns_per_value=per_value,
        weight_copies_at_load=copies, weight_only_bandwidth_efficiency=weight_only_reads,
        int8_activation_ns_per_value=values.get("int8_activation_ns_per_value", 0.0),
    )


_HEAD_SHAPE = re.compile(r"^[1-9]\d*x[1-9]\d*$")


def _shares(shares: dict, key: str, allowed: tuple[str, ...], where: str) -> dict[str, float]:
    """A profile's mapping of names (from `allowed`) to shares in (0, 1], checked."""
    for name, share in shares.items():
        if name not in allowed or isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise UserError(f"device profile {where}: {key} maps {allowed} to shares in (0, 1], got {name}: {share!r}")
    return {str(name): float(share) for name, share in shares.items()}


def _positive_rates(rates: dict, key: str, allowed: tuple[str, ...] | re.Pattern, where: str,
                    zero: bool = False) -> dict[str, float]:
    """A profile's mapping of names (from `allowed`, or matching it) to positive (or, with `zero`, non-negative)
    numbers, checked."""
    names = "head shapes VOCABxWIDTH (such as 49152x576)" if isinstance(allowed, re.Pattern) else allowed
    for name, rate in rates.items():
        known = allowed.match(str(name)) if isinstance(allowed, re.Pattern) else name in allowed
        if not known or isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0 or \
                (rate == 0 and not zero):
            kind = "non-negative" if zero else "positive"
            raise UserError(f"device profile {where}: {key} maps {names} to {kind} numbers, got {name}: {rate!r}")
    return {str(name): float(rate) for name, rate in rates.items()}
