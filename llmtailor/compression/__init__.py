"""Applying a CompressionPlan to a model: structure, then distillation, then sparsity, then precision.

``apply`` returns a copy of the teacher whose weights are what the compressed model
computes with (dequantized, pruned weights in float32), for measuring quality.
Calibrated methods (GPTQ) take each layer's input statistics from a
``CalibrationStats`` (``compression.calibration``), collected on the teacher.
``pack`` returns the stored form of every compressed layer (bit-packed codes, scales,
zero points, sparse indices), whose bytes are what the cost model predicts.
Weights of 16 bits are left as loaded; their stored form is float16.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from llmtailor.arch import Architecture
from llmtailor.compression.calibration import CalibrationStats
from llmtailor.compression.layer_cache import LayerCache
from llmtailor.compression.packing import PackedWeight, pack_layer
from llmtailor.compression.quantize import CALIBRATED, QUANTIZERS, QuantizedWeight
from llmtailor.compression.sparsify import CALIBRATED_PRUNERS, PRUNERS, joint, sparsegpt_quantized
from llmtailor.evaluators.cost import stored_layers
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, PlanError

__all__ = ["CalibrationStats", "LayerCache", "PackedWeight", "apply", "check_supported", "compress_cached", "compress_layer", "pack"]


def calibrated(precision: LayerPrecision, sparsity: LayerSparsity) -> bool:
    """Whether compressing a layer with these settings needs its calibration statistics."""
    return (precision.bits < 16 and precision.method in CALIBRATED) or (
        not sparsity.is_identity and sparsity.method in CALIBRATED_PRUNERS)


def needs_calibration(plan: CompressionPlan) -> bool:
    """Whether applying the plan needs calibration statistics."""
    return any(calibrated(plan.precision_of(name), plan.sparsity_of(name)) for name in {*plan.precision, *plan.sparsity})


def check_supported(plan: CompressionPlan, has_calibration: bool = False, arch: Architecture | None = None) -> None:
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
    if arch is not None and not arch.tie_embeddings:
        embedding = plan.precision_of(arch.embedding.name)
        if embedding.bits < 16 and embedding.method in CALIBRATED:
            raise PlanError(f"{arch.embedding.name}: {embedding.method} weighs a layer by its inputs, and an untied "
                            "embedding (a lookup) has none: use rtn for it")
    for name, sparsity in plan.sparsity.items():
        if not sparsity.is_identity and sparsity.method not in PRUNERS:
            raise PlanError(f"{name}: unknown pruning method {sparsity.method!r}; known: {sorted(PRUNERS)}")
        if joint(plan.precision_of(name), sparsity) and plan.precision_of(name).act_order:
            raise PlanError(f"{name}: sparsegpt with gptq prunes and quantizes in one sweep in input order; "
                            "set act_order=False for it")
    if not has_calibration and needs_calibration(plan):
        methods = sorted({p.method for p in plan.precision.values() if p.bits < 16 and p.method in CALIBRATED}
                         | {s.method for s in plan.sparsity.values() if not s.is_identity and s.method in CALIBRATED_PRUNERS})
        raise PlanError(f"{', '.join(methods)} needs calibration statistics of the layer inputs, and none were given: "
                        "collect them on calibration text (compression.calibration), or use rtn and magnitude")


def compress_layer(
    weight: torch.Tensor, precision: LayerPrecision, sparsity: LayerSparsity, hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, QuantizedWeight | None, torch.Tensor | None]:
    """One layer's weights as the compressed model computes with them, its codes, and its keep-mask.

    ``hessian`` is the layer's input statistic H = XᵀX/n, which calibrated methods need. Pruning comes
    first, then quantization of what is kept; SparseGPT with GPTQ does both in one solve.
    """
    if joint(precision, sparsity):
        quantized, mask = sparsegpt_quantized(weight, sparsity, precision, hessian)
        return quantized.dequantize().to(weight.device), quantized, mask
    mask = None
    if not sparsity.is_identity:
        weight, mask = PRUNERS[sparsity.method](weight, sparsity, hessian)
    if precision.bits == 16:
        return weight, None, mask
    quantized = QUANTIZERS[precision.method](weight, precision, hessian=hessian, mask=mask)
    return quantized.dequantize().to(weight.device), quantized, mask


def _hessian(calibration: CalibrationStats | None, name: str, precision: LayerPrecision,
             sparsity: LayerSparsity) -> torch.Tensor | None:
    return calibration.hessian(name) if calibration is not None and calibrated(precision, sparsity) else None


def compress_cached(weight: torch.Tensor, name: str, precision: LayerPrecision, sparsity: LayerSparsity,
                    calibration: CalibrationStats | None, cache: LayerCache | None
                    ) -> tuple[torch.Tensor, QuantizedWeight | None, torch.Tensor | None]:
    """compress_layer, through the per-layer cache for the solves (GPTQ, SparseGPT), which are the dear part."""
    hessian = _hessian(calibration, name, precision, sparsity)
    solved = (precision.bits < 16 and precision.method in CALIBRATED) or (
        not sparsity.is_identity and sparsity.method == "sparsegpt")
    if cache is None or not solved:
        return compress_layer(weight, precision, sparsity, hessian)
    key = cache.key(name, precision, sparsity)
    stored = cache.get(key)
    if stored is not None:
        dense, quantized, mask = stored
        dense = quantized.dequantize() if quantized is not None else dense
        return dense.to(weight.device, weight.dtype), quantized, None if mask is None else mask.to(weight.device)
    dense, quantized, mask = compress_layer(weight, precision, sparsity, hessian)
    cache.put(key, quantized if quantized is not None else dense, mask)
    return dense, quantized, mask


def _touched(plan: CompressionPlan, arch: Architecture) -> list[str]:
    return [
        lin.name
        for lin in stored_layers(arch)
        if not (plan.precision_of(lin.name).is_identity and plan.sparsity_of(lin.name).is_identity)
    ]


def apply(plan: CompressionPlan, teacher: Any, arch: Architecture, calibration: CalibrationStats | None = None,
          cache: LayerCache | None = None) -> Any:
    """A compressed copy of the teacher (the teacher is left unchanged); calibrated layers come from the cache
    when it holds them."""
    plan.validate(arch)
    check_supported(plan, calibration is not None, arch)
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for name in _touched(plan, arch):
            weight = model.get_submodule(name).weight
            precision = plan.precision_of(name)
            compressed, _, _ = compress_cached(weight.data, name, precision, plan.sparsity_of(name), calibration, cache)
            weight.data.copy_(compressed.to(weight.dtype))
    return model


def pack(plan: CompressionPlan, teacher: Any, arch: Architecture,
         calibration: CalibrationStats | None = None) -> dict[str, PackedWeight]:
    """The stored form of every weight matrix of the model under the plan, by layer name."""
    plan.validate(arch)
    check_supported(plan, calibration is not None, arch)
    packed = {}
    with torch.no_grad():
        for lin in stored_layers(arch):
            weight = teacher.get_submodule(lin.name).weight.data
            precision, sparsity = plan.precision_of(lin.name), plan.sparsity_of(lin.name)
            hessian = _hessian(calibration, lin.name, precision, sparsity)
            compressed, quantized, mask = compress_layer(weight, precision, sparsity, hessian)
            packed[lin.name] = pack_layer(compressed, quantized, mask, precision, sparsity)
    return packed
