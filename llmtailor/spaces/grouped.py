"""Per-layer precision and sparsity, sampled once per group of layers.

The layers of a bits group share one choice of weight bits, the layers of a sparsity
group one sparsity ratio; all layers share one group size; the embedding (with a tied
head) has bits of its own. With one group per layer this is the full per-layer space
(hundreds of parameters). The coarse space groups bits by part (attention or MLP) and
third of the depth, and sparsity by part alone: with sparsity per segment too, a
uniform draw would prune some group in 99.9% of trials, and magnitude pruning is
costly enough on small models that nearly every such plan is dominated. A space's
``method`` quantizes every layer with RTN or with GPTQ (``base.layer_precision``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmtailor.arch import Architecture, Linear
from llmtailor.evaluators.cost import weight_bytes
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity
from llmtailor.spaces.base import SearchSpace, layer_precision

BITS = (16, 8, 4)
SPARSITY = (0.0, 0.25, 0.5)
GROUP_SIZES = (128, 32, 0)  # 0: one group per output row
ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "out_proj", "query_key_value")


def by_depth_segment(segments: int) -> Callable[[Linear, Architecture], str]:
    """Group layers by part (attention or MLP) and by which of `segments` depth slices holds them."""

    def group(lin: Linear, arch: Architecture) -> str:
        block = lin.block if lin.block is not None else arch.num_layers - 1
        return f"{by_part(lin, arch)}_{block * segments // arch.num_layers}"

    return group


def by_part(lin: Linear, arch: Architecture) -> str:
    """Group layers by part: attention or MLP."""
    return "attn" if lin.kind in ATTENTION_KINDS else "mlp"


def by_layer(lin: Linear, arch: Architecture) -> str:
    """One group per layer."""
    return lin.name


Grouping = Callable[[Linear, Architecture], str]


class GroupedSpace(SearchSpace):
    """Bits and sparsity per group of layers, one group size, and the embedding's bits."""

    def __init__(self, name: str, bits_grouping: Grouping, sparsity_grouping: Grouping, method: str = "rtn",
                 bits: tuple[int, ...] = BITS, group_sizes: tuple[int, ...] = GROUP_SIZES) -> None:
        self.name = name
        self.bits, self.group_sizes = bits, group_sizes
        self.bits_grouping = bits_grouping
        self.sparsity_grouping = sparsity_grouping
        self.method = method
        self.calibrated = method == "gptq"

    @staticmethod
    def keys(grouping: Grouping, arch: Architecture) -> list[str]:
        """The group keys of a grouping, in model order."""
        return list(dict.fromkeys(grouping(lin, arch) for lin in arch.linears))

    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        params = self.sample_precision(trial, arch)
        for key in self.keys(self.sparsity_grouping, arch):
            params[f"sparsity_{key}"] = trial.suggest_categorical(f"sparsity_{key}", SPARSITY)
        return self.plan(params, arch)

    def sample_precision(self, trial: Any, arch: Architecture) -> dict[str, Any]:
        """The trial's precision parameters: the group size, the embedding's bits and each bits group's."""
        params = {"group_size": trial.suggest_categorical("group_size", self.group_sizes),
                  "embed_bits": trial.suggest_categorical("embed_bits", self.bits)}
        for key in self.keys(self.bits_grouping, arch):
            params[f"bits_{key}"] = trial.suggest_categorical(f"bits_{key}", self.bits)
        return params

    def precision(self, params: dict[str, Any], arch: Architecture) -> dict[str, LayerPrecision]:
        """Every layer's precision (the embedding's included) under the precision parameters."""
        group_size = params["group_size"]
        precision = {arch.embedding.name: layer_precision(params["embed_bits"], group_size, self.method, arch.embedding, arch)}
        for lin in arch.linears:
            bits = params[f"bits_{self.bits_grouping(lin, arch)}"]
            precision[lin.name] = layer_precision(bits, group_size, self.method, lin, arch)
        return precision

    def uniform_precision(self, arch: Architecture, bits: int, group: int, embed_bits: int | None = None
                          ) -> dict[str, Any]:
        """Precision parameters of the same bits in every group."""
        return {"group_size": group, "embed_bits": embed_bits or bits,
                **{f"bits_{k}": bits for k in self.keys(self.bits_grouping, arch)}}

    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        sparsity = {lin.name: LayerSparsity(params[f"sparsity_{self.sparsity_grouping(lin, arch)}"])
                    for lin in arch.linears}
        return _without_identities(self.precision(params, arch), sparsity)

    def smallest(self, arch: Architecture) -> CompressionPlan:
        # Fewest bits and the highest sparsity are the smallest per layer at every shape and group size.
        params: dict[str, Any] = {"embed_bits": min(self.bits)}
        params.update({f"bits_{k}": min(self.bits) for k in self.keys(self.bits_grouping, arch)})
        params.update({f"sparsity_{k}": max(SPARSITY) for k in self.keys(self.sparsity_grouping, arch)})
        candidates = [self.plan({**params, "group_size": g}, arch) for g in self.group_sizes]
        return min(candidates, key=lambda p: weight_bytes(p, arch))

    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """Dense, uniform 8-bit and 4-bit at each group size, and 4-bit with an 8-bit embedding.

        Plans over budget among them are rejected by the cost model in milliseconds;
        the rest anchor the front across the budget's range from the first trials.
        """
        dense = {f"sparsity_{k}": 0.0 for k in self.keys(self.sparsity_grouping, arch)}

        def uniform(bits: int, group: int, embed_bits: int | None = None) -> dict[str, Any]:
            return {**self.uniform_precision(arch, bits, group, embed_bits), **dense}

        return [uniform(16, 128), uniform(8, 0), uniform(4, 128, embed_bits=8), uniform(4, 32), uniform(4, 128),
                uniform(4, 0)]


def _without_identities(precision: dict[str, LayerPrecision], sparsity: dict[str, LayerSparsity]) -> CompressionPlan:
    """A plan naming only the layers it changes (16-bit and dense are the defaults)."""
    return CompressionPlan(
        precision={k: v for k, v in precision.items() if not v.is_identity},
        sparsity={k: v for k, v in sparsity.items() if not v.is_identity},
    )
