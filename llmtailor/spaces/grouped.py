"""Per-layer precision and sparsity, sampled once per group of layers.

The layers of a group share one choice of weight bits and one sparsity ratio; all
layers share one group size; the embedding (with a tied head) has bits of its own.
With one group per layer this is the full per-layer space (hundreds of parameters);
with a few groups (attention and MLP in each third of the depth) a search of a few
dozen trials can cover it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from llmtailor.arch import Architecture, Linear
from llmtailor.evaluators.cost import tensor_bytes, weight_bytes
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity
from llmtailor.spaces.base import SearchSpace

BITS = (16, 8, 4)
SPARSITY = (0.0, 0.25, 0.5)
GROUP_SIZES = (128, 32, 0)  # 0: one group per output row
ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "out_proj", "query_key_value")


def by_depth_segment(segments: int) -> Callable[[Linear, Architecture], str]:
    """Group layers by part (attention or MLP) and by which of `segments` depth slices holds them."""

    def group(lin: Linear, arch: Architecture) -> str:
        part = "attn" if lin.kind in ATTENTION_KINDS else "mlp"
        block = lin.block if lin.block is not None else arch.num_layers - 1
        return f"{part}_{block * segments // arch.num_layers}"

    return group


def by_layer(lin: Linear, arch: Architecture) -> str:
    """One group per layer."""
    return lin.name


class GroupedSpace(SearchSpace):
    """Bits and sparsity per group of layers, one group size, and the embedding's bits."""

    def __init__(self, name: str, grouping: Callable[[Linear, Architecture], str]) -> None:
        self.name = name
        self.grouping = grouping

    def groups(self, arch: Architecture) -> dict[str, list[Linear]]:
        """Layers by group key, in model order."""
        out: dict[str, list[Linear]] = {}
        for lin in arch.linears:
            out.setdefault(self.grouping(lin, arch), []).append(lin)
        return out

    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        params = {"group_size": trial.suggest_categorical("group_size", GROUP_SIZES),
                  "embed_bits": trial.suggest_categorical("embed_bits", BITS)}
        for key in self.groups(arch):
            params[f"bits_{key}"] = trial.suggest_categorical(f"bits_{key}", BITS)
            params[f"sparsity_{key}"] = trial.suggest_categorical(f"sparsity_{key}", SPARSITY)
        return self.plan(params, arch)

    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        group_size = params["group_size"]
        precision = {arch.embedding.name: LayerPrecision(params["embed_bits"], group_size)}
        sparsity = {}
        for key, layers in self.groups(arch).items():
            for lin in layers:
                precision[lin.name] = LayerPrecision(params[f"bits_{key}"], group_size)
                sparsity[lin.name] = LayerSparsity(params[f"sparsity_{key}"])
        return _without_identities(precision, sparsity)

    def smallest(self, arch: Architecture) -> CompressionPlan:
        candidates = []
        for group_size in GROUP_SIZES:
            params: dict[str, Any] = {"group_size": group_size, "embed_bits": min(BITS)}
            for key, layers in self.groups(arch).items():
                bits, ratio = min(
                    itertools.product(BITS, SPARSITY),
                    key=lambda c: sum(tensor_bytes(x.out_features, x.in_features,
                                                   LayerPrecision(c[0], group_size), LayerSparsity(c[1])).total
                                      for x in layers),
                )
                params[f"bits_{key}"], params[f"sparsity_{key}"] = bits, ratio
            candidates.append(self.plan(params, arch))
        return min(candidates, key=lambda p: weight_bytes(p, arch))

    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """Dense, uniform 8-bit and 4-bit at each group size, and 4-bit with an 8-bit embedding.

        Plans over budget among them are rejected by the cost model in milliseconds;
        the rest anchor the front across the budget's range from the first trials.
        """
        keys = list(self.groups(arch))

        def uniform(bits: int, group: int, embed_bits: int | None = None) -> dict[str, Any]:
            return {"group_size": group, "embed_bits": embed_bits or bits,
                    **{f"bits_{k}": bits for k in keys}, **{f"sparsity_{k}": 0.0 for k in keys}}

        return [uniform(16, 128), uniform(8, 0), uniform(4, 128, embed_bits=8), uniform(4, 32), uniform(4, 128),
                uniform(4, 0)]


def _without_identities(precision: dict[str, LayerPrecision], sparsity: dict[str, LayerSparsity]) -> CompressionPlan:
    """A plan naming only the layers it changes (16-bit and dense are the defaults)."""
    return CompressionPlan(
        precision={k: v for k, v in precision.items() if not v.is_identity},
        sparsity={k: v for k, v in sparsity.items() if not v.is_identity},
    )
