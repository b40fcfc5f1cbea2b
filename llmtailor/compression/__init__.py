"""Applying a CompressionPlan to a model: structure, then distillation, then sparsity, then precision.

``apply`` returns a copy of the teacher whose weights are what the compressed model
computes with (dequantized, pruned weights in float32), for measuring quality.
``pack`` returns the stored form of every compressed layer (bit-packed codes, scales,
zero points, sparse indices), whose bytes are what the cost model predicts.
Weights of 16 bits are left as loaded; their stored form is float16.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from llmtailor.arch import Architecture
from llmtailor.compression.packing import PackedWeight, pack_layer
from llmtailor.compression.quantize import QUANTIZERS, QuantizedWeight
from llmtailor.compression.sparsify import PRUNERS
from llmtailor.evaluators.cost import stored_layers
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, PlanError

__all__ = ["PackedWeight", "apply", "check_supported", "compress_layer", "pack"]


def check_supported(plan: CompressionPlan) -> None:
    """Raise PlanError for what the plan asks that this version cannot apply yet, or method names it does not know."""
    if not plan.student.is_identity:
        raise PlanError("student cuts and distillation are not supported yet: use a plan without a student")
    if plan.kv_cache_bits != 16:
        raise PlanError("KV-cache quantization is priced by the cost model but not applied yet: use kv_cache_bits=16")
    for name, precision in plan.precision.items():
        if precision.act_bits not in (None, 16):
            raise PlanError(f"{name}: activation quantization is not supported yet")
        if precision.bits < 16 and precision.method not in QUANTIZERS:
            raise PlanError(f"{name}: unknown quantization method {precision.method!r}; known: {sorted(QUANTIZERS)}")
    for name, sparsity in plan.sparsity.items():
        if not sparsity.is_identity and sparsity.method not in PRUNERS:
            raise PlanError(f"{name}: unknown pruning method {sparsity.method!r}; known: {sorted(PRUNERS)}")


def compress_layer(
    weight: torch.Tensor, precision: LayerPrecision, sparsity: LayerSparsity
) -> tuple[torch.Tensor, QuantizedWeight | None, torch.Tensor | None]:
    """One layer's weights as the compressed model computes with them, its codes, and its keep-mask."""
    mask = None if sparsity.is_identity else PRUNERS[sparsity.method](weight, sparsity)
    weight = weight if mask is None else weight * mask
    if precision.bits == 16:
        return weight, None, mask
    quantized = QUANTIZERS[precision.method](weight, precision)
    return quantized.dequantize(), quantized, mask


def _touched(plan: CompressionPlan, arch: Architecture) -> list[str]:
    return [
        lin.name
        for lin in stored_layers(arch)
        if not (plan.precision_of(lin.name).is_identity and plan.sparsity_of(lin.name).is_identity)
    ]


def apply(plan: CompressionPlan, teacher: Any, arch: Architecture) -> Any:
    """A compressed copy of the teacher (the teacher is left unchanged)."""
    plan.validate(arch)
    check_supported(plan)
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for name in _touched(plan, arch):
            weight = model.get_submodule(name).weight
            compressed, _, _ = compress_layer(weight.data, plan.precision_of(name), plan.sparsity_of(name))
            weight.data.copy_(compressed.to(weight.dtype))
    return model


def pack(plan: CompressionPlan, teacher: Any, arch: Architecture) -> dict[str, PackedWeight]:
    """The stored form of every weight matrix of the model under the plan, by layer name."""
    plan.validate(arch)
    check_supported(plan)
    packed = {}
    with torch.no_grad():
        for lin in stored_layers(arch):
            weight = teacher.get_submodule(lin.name).weight.data
            precision, sparsity = plan.precision_of(lin.name), plan.sparsity_of(lin.name)
            compressed, quantized, mask = compress_layer(weight, precision, sparsity)
            packed[lin.name] = pack_layer(compressed, quantized, mask, precision, sparsity)
    return packed
