"""CompressionPlan: what to do to which layer, as pure data that round-trips through JSON.

A plan carries no tensors. Layers are named by their module path in the model
(``model.layers.3.mlp.up_proj``, ``model.embed_tokens``, ``lm_head``); a layer the
plan does not name is left as it is (16-bit storage, dense). This module depends on
nothing else in llmtailor: validation against a model only reads the attributes of
an ``Architecture`` (see ``llmtailor.arch``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from llmtailor.errors import UserError

WEIGHT_BITS = (16, 8, 4, 3, 2)
KV_CACHE_BITS = (16, 8, 4)
ACTIVATION_BITS = (16, 8)
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def nm_pair(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an 'N:M' pattern, or None when the text is not N:M with 0 < N < M (for instance 'unstructured')."""
    match = _NM_PATTERN.match(pattern)
    if not match or not 0 < int(match[1]) < int(match[2]):
        return None
    return int(match[1]), int(match[2])


def nm_ratio(pattern: str) -> float | None:
    """The share of weights an 'N:M' pattern prunes (1 − N/M), or None when the text is not N:M with 0 < N < M."""
    pair = nm_pair(pattern)
    return None if pair is None else 1 - pair[0] / pair[1]


class PlanError(UserError):
    """A plan that is malformed or does not fit the model it is applied to."""


def _frozen_map(value: Mapping | None, key_type: type, value_type: type) -> Mapping:
    """An immutable copy of a mapping, with JSON's string keys turned back into key_type."""
    items = {}
    for k, v in dict(value or {}).items():
        if isinstance(v, dict) and value_type not in (int, float):
            v = value_type(**v)
        items[key_type(k)] = v
    return MappingProxyType(dict(sorted(items.items())))


@dataclass(frozen=True)
class LayerPrecision:
    """Weight (and optionally activation) precision of one layer."""

    bits: int = 16
    group_size: int = 0  # input weights sharing a scale; 0 = one group per output row
    symmetric: bool = False
    method: str = "rtn"
    act_bits: int | None = None
    act_order: bool = False  # calibrated methods: quantize inputs in order of decreasing activation energy
    damp: float = 0.01  # calibrated methods: share of mean(diag H) added to H's diagonal
    shrink: float = 0.0  # calibrated methods: H <- (1 - shrink) H + shrink diag(H), shrinkage toward the diagonal

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise PlanError(f"weight bits must be one of {WEIGHT_BITS}, got {self.bits}")
        if self.group_size < 0:
            raise PlanError(f"group_size must be 0 (per row) or positive, got {self.group_size}")
        if self.act_bits is not None and self.act_bits not in ACTIVATION_BITS:
            raise PlanError(f"act_bits must be one of {ACTIVATION_BITS}, got {self.act_bits}")
        if not 0 <= self.damp <= 1:
            raise PlanError(f"damp must be in [0, 1], got {self.damp}")
        if not 0 <= self.shrink <= 1:
            raise PlanError(f"shrink must be in [0, 1], got {self.shrink}")
        if (self.act_order or self.shrink) and self.method == "rtn":
            raise PlanError("act_order and shrink apply to calibrated methods (gptq), not to rtn")

    @property
    def is_identity(self) -> bool:
        return self.bits == 16 and self.act_bits in (None, 16)


@dataclass(frozen=True)
class LayerSparsity:
    """Share of one layer's weights set to zero, in which pattern, chosen by which method."""

    ratio: float = 0.0
    pattern: str = "unstructured"  # or "N:M": at most N of every M consecutive inputs kept
    method: str = "magnitude"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PlanError(f"sparsity ratio must be in [0, 1), got {self.ratio}")
        if self.pattern != "unstructured":
            implied = nm_ratio(self.pattern)
            if implied is None:
                raise PlanError(
                    f"sparsity pattern must be 'unstructured' or 'N:M' with 0 < N < M, "
                    f"got {self.pattern!r}"
                )
            if abs(self.ratio - implied) > 1e-9:
                raise PlanError(f"pattern {self.pattern} prunes {implied:g} of weights; set ratio={implied:g}")

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0 and self.pattern == "unstructured"

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern; None for unstructured."""
        return nm_pair(self.pattern)


@dataclass(frozen=True)
class Distillation:
    """How a student is trained to mimic the teacher (``compression.distill``)."""

    steps: int = 0
    temperature: float = 2.0
    loss: str = "kl"  # kl: the teacher's distributions; ce: the text's next tokens; kl+ce: both
    learning_rate: float = 1e-4
    qat: bool = False  # fake-quantize in the forward pass so the student learns its precision
    top_k: int = 64  # teacher tokens kept per position (the rest is one bucket)
    ce_weight: float = 1.0  # weight of the cross-entropy term in kl+ce
    lora_rank: int = 0  # > 0: train only low-rank adapters of the block linears, merged at the end
    hidden_weight: float = 0.0  # weight of matching the teacher's final hidden states (normalized MSE)

    LOSSES = ("kl", "ce", "kl+ce")
    LATER_FIELDS = ("top_k", "ce_weight", "lora_rank", "hidden_weight")  # written only when not default: older plans keep their JSON

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise PlanError(f"distillation steps must be a whole number >= 0, got {self.steps!r}")
        if not self.temperature > 0:
            raise PlanError(f"distillation temperature must be positive, got {self.temperature}")
        if self.loss not in self.LOSSES:
            raise PlanError(f"distillation loss must be one of {self.LOSSES}, got {self.loss!r}")
        if not self.learning_rate > 0:
            raise PlanError(f"distillation learning rate must be positive, got {self.learning_rate}")
        if self.top_k < 1:
            raise PlanError(f"distillation top_k must be at least 1, got {self.top_k}")
        if self.ce_weight < 0:
            raise PlanError(f"distillation ce_weight must be >= 0, got {self.ce_weight}")
        if not self.hidden_weight >= 0:
            raise PlanError(f"distillation hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.lora_rank < 0:
            raise PlanError(f"distillation lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and self.qat:
            raise PlanError("LoRA recovery with quantization-aware training is not supported yet: choose one")

    def to_dict(self) -> dict[str, Any]:
        defaults = {f.name: f.default for f in fields(self) if f.name in self.LATER_FIELDS}
        return {k: v for k, v in asdict(self).items() if k not in defaults or defaults[k] != v}


@dataclass(frozen=True)
class Student:
    """The student's size, as cuts of the teacher, and its distillation recipe."""

    layers: tuple[int, ...] | None = None  # decoder blocks kept; None keeps all
    heads: Mapping[int, int] = field(default_factory=dict)  # attention heads kept per block
    mlp_width: Mapping[int, int] = field(default_factory=dict)  # MLP channels kept per block
    hidden_size: int | None = None
    distillation: Distillation = field(default_factory=Distillation)

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "heads", _frozen_map(self.heads, int, int))
        object.__setattr__(self, "mlp_width", _frozen_map(self.mlp_width, int, int))
        if isinstance(self.distillation, dict):
            object.__setattr__(self, "distillation", Distillation(**self.distillation))

    def uniform_cut(self, num_layers: int) -> tuple[tuple[int, ...] | None, int | None, int | None]:
        """(blocks kept, query heads per block, MLP width per block) of a cut that is the same in every kept block.

        A transformers config holds one head count and one MLP width for all blocks, so a cut saved as a
        standard model must be uniform; which heads and channels go may still differ per block."""
        kept = tuple(range(num_layers)) if self.layers is None else self.layers
        sizes = {}
        for label, per_block in (("heads", self.heads), ("MLP width", self.mlp_width)):
            values = {per_block[b] for b in kept if b in per_block}
            if len(values) > 1 or (values and set(kept) - set(per_block)):
                raise PlanError(f"student {label} must be the same in every kept block (a standard config holds one "
                                f"value for all blocks), got {dict(per_block)}")
            sizes[label] = values.pop() if values else None
        return self.layers, sizes["heads"], sizes["MLP width"]

    @property
    def is_identity(self) -> bool:
        return (
            self.layers is None
            and not self.heads
            and not self.mlp_width
            and self.hidden_size is None
            and self.distillation.steps == 0
        )


@dataclass(frozen=True)
class CompressionPlan:
    """What to do to which layer: student size, then sparsity, then precision."""

    precision: Mapping[str, LayerPrecision] = field(default_factory=dict)
    sparsity: Mapping[str, LayerSparsity] = field(default_factory=dict)
    student: Student = field(default_factory=Student)
    kv_cache_bits: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _frozen_map(self.precision, str, LayerPrecision))
        object.__setattr__(self, "sparsity", _frozen_map(self.sparsity, str, LayerSparsity))
        if isinstance(self.student, dict):
            object.__setattr__(self, "student", Student(**self.student))
        if self.kv_cache_bits not in KV_CACHE_BITS:
            raise PlanError(f"kv_cache_bits must be one of {KV_CACHE_BITS}, got {self.kv_cache_bits}")

    def precision_of(self, layer: str) -> LayerPrecision:
        """The precision of a layer (16-bit when the plan does not name it)."""
        return self.precision.get(layer, _DENSE_PRECISION)

    def sparsity_of(self, layer: str) -> LayerSparsity:
        """The sparsity of a layer (dense when the plan does not name it)."""
        return self.sparsity.get(layer, _NO_SPARSITY)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-ready data."""
        student = self.student
        return {
            "precision": {k: asdict(v) for k, v in self.precision.items()},
            "sparsity": {k: asdict(v) for k, v in self.sparsity.items()},
            "student": {
                "layers": None if student.layers is None else list(student.layers),
                "heads": {str(k): v for k, v in student.heads.items()},
                "mlp_width": {str(k): v for k, v in student.mlp_width.items()},
                "hidden_size": student.hidden_size,
                "distillation": student.distillation.to_dict(),
            },
            "kv_cache_bits": self.kv_cache_bits,
        }

    def to_json(self) -> str:
        """The plan as a JSON string (stable key order)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        """A plan from plain data, as written by to_dict."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PlanError(f"unknown plan fields {sorted(unknown)}; known are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise PlanError(f"malformed plan: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        """A plan from a JSON string."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlanError("plan JSON must be an object")
        return cls.from_dict(data)

    def validate(self, arch: Any) -> None:
        """Raise PlanError unless every layer and size named here exists in the architecture."""
        layers = {lin.name for lin in arch.linears} | {arch.embedding.name}
        for section in (self.precision, self.sparsity):
            for name in section:
                if name not in layers:
                    hint = ""
                    if arch.tie_embeddings and name == arch.lm_head_name:
                        hint = f" (lm_head is tied to {arch.embedding.name}: name that instead)"
                    raise PlanError(f"plan names layer {name!r}, which the model does not have{hint}")
        if arch.embedding.name in self.sparsity:
            raise PlanError(f"sparsity applies to linear layers, not to {arch.embedding.name}")
        for name, sparsity in self.sparsity.items():
            match = _NM_PATTERN.match(sparsity.pattern)
            if match and arch.linear(name).in_features % int(match[2]):
                raise PlanError(f"{name}: input width is not a multiple of M in {sparsity.pattern}")
        student = self.student
        if student.layers is not None:
            bad = [i for i in student.layers if not 0 <= i < arch.num_layers]
            if bad or not student.layers or len(set(student.layers)) != len(student.layers):
                raise PlanError(
                    f"student layers must be distinct indices in [0, {arch.num_layers}), "
                    f"got {list(student.layers)}"
                )
        group = arch.num_heads // arch.num_kv_heads
        for layer, heads in student.heads.items():
            if not 0 < heads <= arch.num_heads or heads % group:
                raise PlanError(
                    f"student heads in block {layer} must be a positive multiple of {group} "
                    f"(query heads per KV head) up to {arch.num_heads}, got {heads}"
                )
        for layer, width in student.mlp_width.items():
            if not 0 < width <= arch.intermediate_size:
                raise PlanError(
                    f"student MLP width in block {layer} must be in (0, {arch.intermediate_size}], "
                    f"got {width}"
                )
        if student.hidden_size is not None and not 0 < student.hidden_size <= arch.hidden_size:
            raise PlanError(f"student hidden size must be in (0, {arch.hidden_size}]")


_DENSE_PRECISION = LayerPrecision()
_NO_SPARSITY = LayerSparsity()
