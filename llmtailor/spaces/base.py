"""The one small base class every search space implements, and the precision a space asks of a layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from llmtailor.arch import Architecture, Linear
from llmtailor.compression.calibration import GPTQ_ACT_ORDER, GPTQ_DAMP, GPTQ_SHRINK
from llmtailor.plan import CompressionPlan, LayerPrecision


class SearchSpace(ABC):
    """How an Optuna trial becomes a plan."""

    name: str = ""
    calibrated: bool = False  # its plans use GPTQ: the search collects calibration statistics first
    needs_sensitivity: bool = False  # it allocates bits by measured layer sensitivity (see with_sensitivity)
    needs_blocks: bool = False  # it cuts and prunes by measured block scores (see with_blocks)
    distills: bool = False  # its plans may distill their students: the search trains them (compression.trained)

    @abstractmethod
    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        """The plan of this trial."""

    @abstractmethod
    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        """The plan that a set of trial parameters stands for."""

    @abstractmethod
    def smallest(self, arch: Architecture) -> CompressionPlan:
        """The plan of fewest weight bytes this space can reach."""

    @abstractmethod
    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """Trial parameters of the uniform baselines, enqueued first in a new study."""

    def with_sensitivity(self, sensitivity: Any) -> SearchSpace:
        """This space with the layer sensitivities it allocates by; spaces that need none return themselves."""
        return self

    def with_blocks(self, scores: BlockScores) -> SearchSpace:
        """This space with the block scores it cuts and prunes by; spaces that need none return themselves."""
        return self


@dataclass(frozen=True)
class BlockScores:
    """What a space that cuts and prunes knows of the model, measured once per (model, calibration):
    each block's influence (which blocks a depth cut keeps, ``structure.block_influence``) and its share of
    outlier weights (how OWL spreads one pruning ratio over the blocks, ``outliers.outlier_shares``)."""

    influence: tuple[float, ...]
    outlier_shares: tuple[float, ...]


def layer_precision(bits: int, group_size: int, method: str, lin: Linear, arch: Architecture) -> LayerPrecision:
    """The precision a space gives one layer: GPTQ with the project's recipe (``calibration.GPTQ_*``), or RTN.

    An untied embedding is a lookup with no inputs to weigh its error by, so it is
    quantized with RTN even in a GPTQ space (a tied one uses its head's inputs).
    """
    if bits == 16:
        return LayerPrecision()
    if method == "gptq" and not (lin.name == arch.embedding.name and not arch.tie_embeddings):
        return LayerPrecision(bits, group_size, method="gptq", act_order=GPTQ_ACT_ORDER, damp=GPTQ_DAMP,
                              shrink=GPTQ_SHRINK)
    return LayerPrecision(bits, group_size)
