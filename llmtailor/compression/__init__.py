"""Applying a CompressionPlan to a model: structure, then distillation, then sparsity, then precision.

``apply`` returns a copy of the teacher whose weights are what the compressed model
computes with (dequantized, pruned weights in float32), for measuring quality. With
``share=True`` (the search) the copy holds new tensors only for the layers the plan
changes and shares every other tensor with the teacher, so a trial does not copy the
whole teacher (its memory and seconds): such a model is for reading only.
Calibrated methods (GPTQ) take each layer's input statistics from a
``CalibrationStats`` (``compression.calibration``), collected on the teacher.
``pack`` returns the stored form of every compressed layer (bit-packed codes, scales,
zero points, sparse indices), whose bytes are what the cost model predicts.
Weights of 16 bits are left as loaded; their stored form is float16.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from llmtailor.arch import Architecture
from llmtailor.compression.calibration import CalibrationStats
from llmtailor.compression.layer_cache import LayerCache
from llmtailor.compression.packing import PackedWeight, pack_layer
from llmtailor.compression.quantize import CALIBRATED, QUANTIZERS, QuantizedWeight
from llmtailor.compression.sparsify import CALIBRATED_PRUNERS, PRUNERS, joint, sparsegpt_quantized
from llmtailor.evaluators.cost import stored_layers, structured
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, PlanError

__all__ = ["CalibrationStats", "LayerCache", "PackedWeight", "apply", "check_supported", "compress_cached", "compress_layer", "pack"]


def calibrated(precision: LayerPrecision, sparsity: LayerSparsity) -> bool:
    """Whether compressing a layer with these settings needs its calibration statistics."""
    return (precision.bits < 16 and precision.method in CALIBRATED) or (
        not sparsity.is_identity and sparsity.method in CALIBRATED_PRUNERS)


def needs_calibration(plan: CompressionPlan) -> bool:
    """Whether applying the plan needs calibration statistics."""
    return any(calibrated(plan.precision_of(name), plan.sparsity_of(name)) for name in {*plan.precision, *plan.sparsity})


def cuts(plan: CompressionPlan) -> bool:
    """Whether the plan's student removes blocks, heads or MLP channels."""
    student = plan.student
    return student.layers is not None or bool(student.heads) or bool(student.mlp_width)


def check_supported(plan: CompressionPlan, has_calibration: bool = False, arch: Architecture | None = None,
                    has_importance: bool = False) -> None:
    """Raise PlanError for what the plan asks that this version cannot apply yet, or method names it does not know."""
    student = plan.student
    if student.hidden_size is not None:
        raise PlanError("cutting the hidden size is not supported: cut blocks, heads or MLP width instead")
    if cuts(plan) and not has_importance:
        raise PlanError("structured cuts choose what goes by importance measured on calibration data, and none was "
                        "given: compute it with compression.structure.importance")
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
                    calibration: CalibrationStats | None, cache: LayerCache | None, inputs: torch.Tensor | None = None,
                    kept: str | None = None, into: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, QuantizedWeight | None, torch.Tensor | None]:
    """compress_layer, through the per-layer cache for the solves (GPTQ, SparseGPT), which are the dear part.

    ``inputs``: the input columns of the teacher's layer that a structured cut kept (H is cut to them);
    ``kept``: what the cut kept of the layer (``structure.Cut.kept``), part of its cache key; ``into``: a tensor
    the result may be written into (the one it replaces): a cached layer is dequantized straight into it, which
    spares a search trial a float32 temporary and a copy per layer (the result is then `into` itself)."""
    def hessian() -> torch.Tensor | None:  # read only for a layer computed here: a cached one needs none
        found = _hessian(calibration, name, precision, sparsity)
        if found is not None and inputs is not None:
            index = inputs.to(found.device)
            found = found.index_select(0, index).index_select(1, index)
        return found

    solved = (precision.bits < 16 and precision.method in CALIBRATED) or (
        not sparsity.is_identity and sparsity.method == "sparsegpt")
    if cache is None or not solved:
        return compress_layer(weight, precision, sparsity, hessian())
    key = cache.key(name, precision, sparsity, kept)
    stored = cache.get(key)
    if stored is not None:
        dense, quantized, mask = stored
        mask = None if mask is None else mask.to(weight.device)
        if into is not None and into.shape == weight.shape:
            if quantized is None:
                return into.copy_(dense), None, mask
            if into.dtype == torch.float32 and into.device == quantized.codes.device:
                return quantized.dequantize(out=into), quantized, mask
        dense = quantized.dequantize() if quantized is not None else dense
        return dense.to(weight.device, weight.dtype), quantized, mask
    dense, quantized, mask = compress_layer(weight, precision, sparsity, hessian())
    cache.put(key, quantized if quantized is not None else dense, mask)
    return dense, quantized, mask


def _touched(plan: CompressionPlan, arch: Architecture) -> list[str]:
    return [
        lin.name
        for lin in stored_layers(arch)
        if not (plan.precision_of(lin.name).is_identity and plan.sparsity_of(lin.name).is_identity)
    ]


def sharing_copy(model: Any) -> Any:
    """A copy of the model's modules that shares its parameter and buffer tensors (no weight bytes copied).
    Replacing a parameter of the copy leaves the original alone; changing one in place changes both."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _structured(plan: CompressionPlan, teacher: Any, arch: Architecture, importance: Any, share: bool = False,
                into: Callable[[torch.nn.Parameter], bool] | None = None):
    """A copy of the teacher with the plan's structured cut made, and the cut (None when the plan makes none).
    ``share``: the copy shares the tensors the cut leaves whole with the teacher; ``into``: see ``structure.cut``."""
    if not cuts(plan):
        return (sharing_copy(teacher) if share else copy.deepcopy(teacher)), None
    from llmtailor.compression import structure  # structure imports sequential, which imports this module

    chosen = structure.choose(arch, plan.student, importance)
    return structure.cut(teacher, arch, chosen, share=share, into=into), chosen


class Writes:
    """Which weights applying a plan may write in place: the model's own (a cut's slice, a student's weight)
    always; the teacher's only under ``in_place`` = (is_teachers, written), each one appended to written before it
    is written (``compression.originals.applied`` restores them). A search trial thus holds its cut, its student
    and its compressed layers inside the teacher's own memory."""

    def __init__(self, teacher: Any, in_place: tuple[Callable[[Any], bool], list] | None) -> None:
        self.teachers = {id(p) for p in teacher.parameters()}
        self.in_place = in_place

    def teachers_own(self, parameter: torch.nn.Parameter) -> bool:
        """Whether `parameter` is the teacher's and may be written (then recorded for restoring)."""
        if id(parameter) not in self.teachers or self.in_place is None or not self.in_place[0](parameter):
            return False
        self.in_place[1].append(parameter)
        return True

    def __call__(self, parameter: torch.nn.Parameter) -> bool:
        """Whether `parameter` may be written in place."""
        return id(parameter) not in self.teachers or self.teachers_own(parameter)


def _check_students(plan: CompressionPlan, students: Any) -> None:
    if plan.student.distillation.steps and students is None:
        raise PlanError("the plan distills its student, and no teacher targets were given: pass "
                        "compression.trained.TrainedStudents, or use distillation steps 0")


def _compressed(plan: CompressionPlan, teacher: Any, arch: Architecture, calibration: CalibrationStats | None,
                cache: LayerCache | None, importance: Any, students: Any = None, share: bool = False,
                writes: Writes | None = None):
    """The cut (and trained) model, the cut (or None), and for each layer the plan compresses: (teacher name,
    module, result, whether its weight may be written in place, asked of `writes` once). A trained student's layers
    are cached under its training key: their weights are its own.
    ``share``: untouched tensors are the teacher's (for a student that trains every weight, none: training changes
    them in place; LoRA training only reads them and merges its adapters into new tensors). ``writes``: the cut,
    a kept student's weights and LoRA's merge go into the tensors it allows (see `Writes`)."""
    plan.validate(arch)
    check_supported(plan, calibration is not None, arch, importance is not None)
    _check_students(plan, students)
    recipe = plan.student.distillation
    share = share and (not recipe.steps or recipe.lora_rank > 0)
    into = writes.teachers_own if writes is not None and share else None
    if recipe.steps and into is not None and not students.has(plan, arch):
        students.targets(recipe)  # from the teacher, before its tensors hold the cut: training will need them
    model, chosen = _structured(plan, teacher, arch, importance, share, into)
    trained = None
    if recipe.steps:  # the cut student trained (``compression.trained``)
        model = students.trained(plan, model, arch, chosen, writes, teacher_intact=into is None)
        trained = f"student {students.key(plan, arch)}"
    per_group = arch.num_heads // arch.num_kv_heads

    def layers():
        for name in _touched(plan, arch):
            target = name if chosen is None else chosen.module_name(name, arch)
            if target is None:  # its block was cut
                continue
            module = model.get_submodule(target)
            inputs = None if chosen is None else chosen.inputs(name, arch, arch.head_dim, per_group)
            kept = None if chosen is None else chosen.kept(name, arch)
            kept = kept if trained is None else f"{kept} {trained}"
            writable = writes is not None and writes(module.weight)
            result = compress_cached(module.weight.data, name, plan.precision_of(name), plan.sparsity_of(name),
                                     calibration, cache, inputs, kept, module.weight.data if writable else None)
            yield name, module, result, writable

    return model, chosen, layers()


def apply(plan: CompressionPlan, teacher: Any, arch: Architecture, calibration: CalibrationStats | None = None,
          cache: LayerCache | None = None, importance: Any = None, students: Any = None, share: bool = False,
          in_place: tuple[Callable[[Any], bool], list] | None = None,
          quantized_forms: dict[Any, QuantizedWeight] | None = None) -> Any:
    """A compressed copy of the teacher (the teacher is left unchanged): structured cut (by ``importance``,
    from ``structure.importance``), distillation of the cut student (by ``students``, a
    ``compression.trained.TrainedStudents``; how it was made is then in ``students.last``), then sparsity and
    precision; solved layers come from the cache when it holds them (a layer whose shape a cut changed is cached
    under what the cut kept of it). GPTQ's statistics stay the teacher's inputs for a trained student too.
    ``share=True``: the model shares the tensors the plan leaves unchanged with the teacher (see the module doc).
    ``in_place`` = (is_teachers, written): the cut, a student's weights and the compressed layers are written into
    the teacher's parameters that is_teachers accepts, each appended to written (``compression.originals.applied``
    restores them); see `Writes`. ``quantized_forms``: a dict filled with module -> its quantized weight's codes,
    scales and zero points, for every quantized layer (what an export packs into a runtime's format)."""
    writes = Writes(teacher, in_place)
    model, _, layers = _compressed(plan, teacher, arch, calibration, cache, importance, students, share, writes)
    # old parameter's id -> (old, new); the old one is held so that its id is not reused while this runs
    replaced: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    with torch.no_grad():
        for _, module, (compressed, quantized, _), writable in layers:
            if quantized_forms is not None and quantized is not None:
                quantized_forms[module] = quantized
            old = module.weight
            if writable:  # the model's own (a cut's slice, a student's weight), or the teacher's under in_place
                if compressed.data_ptr() != old.data_ptr():  # (a cached layer is already written there)
                    old.data.copy_(compressed.to(old.dtype))
                continue
            # A new tensor, never a write into the old one: it may be the teacher's.
            module.weight = torch.nn.Parameter(compressed.to(old.dtype), old.requires_grad)
            replaced[id(old)] = (old, module.weight)
    repoint_parameters(model, lambda old: replaced.get(id(old), (old, old))[1])  # (`replaced` holds the old ones: ids stay unique)
    return model


def repoint_parameters(model: Any, new_for: Callable[[torch.nn.Parameter], torch.nn.Parameter]) -> None:
    """Put ``new_for(p)`` in every place of the model that holds parameter ``p``, calling it once per parameter: a
    tied weight (the embedding and the output head) is one parameter in two places and stays one."""
    chosen: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}  # (the old one held: its id stays unique)
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                if id(parameter) not in chosen:
                    chosen[id(parameter)] = (parameter, new_for(parameter))
                module._parameters[name] = chosen[id(parameter)][1]


def pack(plan: CompressionPlan, teacher: Any, arch: Architecture, calibration: CalibrationStats | None = None,
         importance: Any = None, students: Any = None) -> dict[str, PackedWeight]:
    """The stored form of every weight matrix of the (cut, trained) model under the plan, by the teacher's layer
    name."""
    model, chosen, layers = _compressed(plan, teacher, arch, calibration, None, importance, students)
    _, small = structured(plan, arch)
    packed = {}
    with torch.no_grad():
        done = {name: (module, result) for name, module, result, _ in layers}
        for lin in stored_layers(small):
            module, (compressed, quantized, mask) = done.get(lin.name, (None, (None, None, None)))
            if module is None:
                module = model.get_submodule(lin.name if chosen is None else chosen.module_name(lin.name, arch))
                compressed = module.weight.data
            packed[lin.name] = pack_layer(compressed, quantized, mask, plan.precision_of(lin.name), plan.sparsity_of(lin.name))
    return packed

