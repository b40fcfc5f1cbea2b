"""The guided precision space: a weight budget is sampled, the allocator spends it.

A trial samples one number, the share of the way from the smallest to the largest
model this space can make; the budget allocator (``spaces.allocator``) then gives
every layer the option of least summed predicted damage whose bytes fit
(``search.sensitivity``). A search over one dimension finds the front of memory
against quality far faster than one over hundreds of per-layer choices, and each
point of it is the best per-layer mix the sensitivities know of.

Every layer, the tied embedding/head included (it stays tied: one layer), is offered
16 bits or GPTQ at 8 bits per row, 4 bits in groups of 128 or per row, 3 or 2 bits
in groups of 128. An untied embedding has no inputs to weigh its error by, so this
space leaves it at 16 bits. Sparsity is not in this space yet.
"""

from __future__ import annotations

import functools
from typing import Any

from llmtailor.arch import Architecture, Linear
from llmtailor.evaluators.cost import stored_layers, tensor_bytes
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity
from llmtailor.spaces.allocator import Option, allocate
from llmtailor.spaces.base import SearchSpace, layer_precision

OPTIONS = ((8, 0), (4, 128), (4, 0), (3, 128), (2, 128))  # (bits, group size); 16 bits is always offered
ANCHOR = (4, 128)  # the option whose single-layer KL is measured for every layer (search.sensitivity)
# Uniform plans whose bytes become budgets tried first: (bits, group size, embedding bits).
BASELINES = ((8, 0, 8), (4, 128, 16), (4, 128, 4), (3, 128, 8))


class GuidedSpace(SearchSpace):
    """A sampled weight budget, spent per layer by the allocator on the measured sensitivities."""

    name = "guided"
    calibrated = True
    needs_sensitivity = True

    def __init__(self, sensitivity: Any = None) -> None:
        self.sensitivity = sensitivity
        self._choices: dict[Architecture, dict[str, list[Option]]] = {}

    def with_sensitivity(self, sensitivity: Any) -> GuidedSpace:
        return GuidedSpace(sensitivity)

    @staticmethod
    def layers(arch: Architecture) -> list[Linear]:
        """The layers the allocator chooses for: every linear, and the embedding when tied to the head."""
        return [lin for lin in stored_layers(arch) if lin.name != arch.embedding.name or arch.tie_embeddings]

    @classmethod
    def options(cls, lin: Linear, arch: Architecture) -> list[LayerPrecision]:
        """The compressed options of one layer (16 bits is offered besides)."""
        return [layer_precision(bits, group, "gptq", lin, arch) for bits, group in OPTIONS]

    @classmethod
    def anchor(cls, lin: Linear, arch: Architecture) -> LayerPrecision:
        return layer_precision(*ANCHOR, "gptq", lin, arch)

    def budget_share(self, arch: Architecture, weight_bytes: int) -> float:
        """The ``weight_budget`` parameter that stands for this many weight bytes of the allocator's layers."""
        low, high = _byte_range(arch)
        return min(max((weight_bytes - low) / (high - low), 0.0), 1.0)

    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        return self.plan({"weight_budget": trial.suggest_float("weight_budget", 0.0, 1.0)}, arch)

    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        low, high = _byte_range(arch)
        budget = low + round(min(max(params["weight_budget"], 0.0), 1.0) * (high - low))
        chosen = allocate(self.choices(arch), budget)
        return CompressionPlan(precision={name: o.precision for name, o in chosen.items() if not o.precision.is_identity})

    def choices(self, arch: Architecture) -> dict[str, list[Option]]:
        """Every layer's options with their bytes and predicted damage, as the allocator takes them (made once per
        architecture: a trial only changes the budget)."""
        if self.sensitivity is None:
            raise RuntimeError("the guided space allocates by layer sensitivities: call with_sensitivity first")
        from llmtailor.search.sensitivity import option_name

        made = self._choices.get(arch)
        if made is None:
            made = self._choices[arch] = {
                lin.name: [Option(LayerPrecision(), _bytes(lin, LayerPrecision()), 0.0)]
                + [Option(p, _bytes(lin, p), self.sensitivity.damage(lin.name, option_name(p)))
                   for p in self.options(lin, arch)]
                for lin in self.layers(arch)
            }
        return made

    def smallest(self, arch: Architecture) -> CompressionPlan:
        return CompressionPlan(precision={lin.name: min(self.options(lin, arch), key=lambda p: _bytes(lin, p))
                                          for lin in self.layers(arch)})

    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """Budgets at the bytes of uniform plans, so the front is anchored where users compare."""
        return [{"weight_budget": self.budget_share(arch, self.uniform_bytes(arch, *b))} for b in BASELINES]

    def uniform(self, arch: Architecture, bits: int, group: int, embed_bits: int) -> CompressionPlan:
        """A uniform GPTQ plan over the allocator's layers (8 bits are per row, as among the options)."""
        precision = {}
        for lin in self.layers(arch):
            layer_bits = embed_bits if lin.name == arch.embedding.name else bits
            if layer_bits < 16:
                precision[lin.name] = layer_precision(layer_bits, 0 if layer_bits == 8 else group, "gptq", lin, arch)
        return CompressionPlan(precision=precision)

    def uniform_bytes(self, arch: Architecture, bits: int, group: int, embed_bits: int) -> int:
        """Weight bytes of the allocator's layers in one uniform plan (for comparing at equal bytes)."""
        plan = self.uniform(arch, bits, group, embed_bits)
        return sum(_bytes(lin, plan.precision_of(lin.name)) for lin in self.layers(arch))


@functools.lru_cache(maxsize=8)
def _byte_range(arch: Architecture) -> tuple[int, int]:
    """Weight bytes of the allocator's layers at their smallest and at 16 bits (once per architecture)."""
    layers = GuidedSpace.layers(arch)
    low = sum(min(_bytes(lin, p) for p in GuidedSpace.options(lin, arch)) for lin in layers)
    return low, sum(_bytes(lin, LayerPrecision()) for lin in layers)


def _bytes(lin: Linear, precision: LayerPrecision) -> int:
    return tensor_bytes(lin.out_features, lin.in_features, precision, LayerSparsity()).total
