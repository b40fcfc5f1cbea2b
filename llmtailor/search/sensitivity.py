"""Per-layer sensitivity: the damage of compressing one layer alone, for every option the search offers.

Measuring KL for every (layer, option) pair costs a forward pass each (hundreds of
layers times several options), so the damage is measured at one *anchor* option per
layer and carried to the others by a proxy: the layer's own output error under its
calibration statistics, E = trace((W − Q) H (W − Q)ᵀ), which needs no forward pass:

    damage(layer, option) = KL(layer at anchor) · E(layer, option) / E(layer, anchor)

The measured KL carries what E cannot see (how much the rest of the network amplifies
or absorbs this layer's error); E carries how the options of one layer compare.
``validate`` measures KL on further pairs and reports Kendall's τ between predicted
and measured damage. Built once per (model, calibration, options, evaluation text) and
kept as JSON in the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmtailor import compression, files, text
from llmtailor.arch import Architecture
from llmtailor.compression.calibration import CalibrationSpec, CalibrationStats, calibration_windows, output_error
from llmtailor.compression.layer_cache import LayerCache
from llmtailor.evaluators import quality
from llmtailor.evaluators.cost import stored_layers
from llmtailor.plan import CompressionPlan, LayerPrecision

SENSITIVITY_WINDOWS = (4, 256)  # (windows, tokens) of calibration-split text the single-layer KL is measured on

def option_name(precision: LayerPrecision) -> str:
    """A short stable name of an option, such as 'gptq-4b-g128'."""
    group = f"g{precision.group_size}" if precision.group_size else "channel"
    return f"{precision.method}-{precision.bits}b-{group}" + ("-ao" if precision.act_order else "")


@dataclass
class Sensitivity:
    """Measured anchor damage and proxy errors; predicted damage of every (layer, option)."""

    anchor: str  # option name of the anchor
    anchor_kl: dict[str, float]  # layer -> KL with that layer alone at the anchor option
    errors: dict[str, dict[str, float]]  # layer -> option name -> output error E

    def damage(self, layer: str, option: str) -> float:
        """Predicted KL of compressing only this layer with this option."""
        anchor_error = self.errors[layer][self.anchor]
        if anchor_error <= 0:
            return 0.0
        return max(self.anchor_kl[layer], 0.0) * self.errors[layer][option] / anchor_error

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        return cls(**json.loads(text))


def _parameter(model: Any, arch: Architecture, layer: str) -> torch.nn.Parameter:
    """The layer's weight parameter (a tied embedding's is the head's: one parameter in two places)."""
    name = arch.lm_head_name if layer == arch.embedding.name and arch.tie_embeddings else layer
    return model.get_submodule(name).weight


def _weight(model: Any, arch: Architecture, layer: str) -> torch.Tensor:
    return _parameter(model, arch, layer).data


def _compressed(teacher: Any, arch: Architecture, layer: str, precision: LayerPrecision, stats: CalibrationStats,
                cache: LayerCache | None) -> torch.Tensor:
    plan = CompressionPlan(precision={layer: precision})
    plan.validate(arch)
    compression.check_supported(plan, True, arch)
    dense, _, _ = compression.compress_cached(_weight(teacher, arch, layer), layer, precision, plan.sparsity_of(layer),
                                              stats, cache)
    return dense


@torch.no_grad()
def single_layer_kl(teacher: Any, arch: Architecture, layer: str, precision: LayerPrecision, stats: CalibrationStats,
                    reference: quality.Reference, cache: LayerCache | None = None) -> float:
    """KL to the teacher with only this layer compressed (its tensor swapped into the teacher's parameter, then the
    original swapped back: no copy of the original is made, which for a tied embedding/head is 113 MB)."""
    parameter = _parameter(teacher, arch, layer)
    original = parameter.data
    compressed = _compressed(teacher, arch, layer, precision, stats, cache)
    try:
        parameter.data = compressed.to(original.dtype)
        return quality.measure(teacher, reference).kl
    finally:
        parameter.data = original


def build(teacher: Any, arch: Architecture, options: list[LayerPrecision], anchor: LayerPrecision,
          stats: CalibrationStats, reference: quality.Reference, cache: LayerCache | None = None,
          layers: list[str] | None = None, progress: bool = False) -> Sensitivity:
    """Measure the anchor KL and the proxy error of every option, for every layer (or the given ones)."""
    from tqdm.auto import tqdm

    if anchor not in options:
        options = [anchor, *options]
    names = layers or [lin.name for lin in stored_layers(arch)]
    anchor_kl, errors = {}, {}
    for layer in tqdm(names, desc="layer sensitivity", unit="layer", disable=not progress):
        weight, hessian = _weight(teacher, arch, layer), stats.hessian(layer)
        errors[layer] = {}
        for precision in options:
            approx = _compressed(teacher, arch, layer, precision, stats, cache)
            errors[layer][option_name(precision)] = output_error(weight, approx, hessian)
            del approx  # (before the next option's is made: two of a head's are 226 MB)
        anchor_kl[layer] = single_layer_kl(teacher, arch, layer, anchor, stats, reference, cache)
    return Sensitivity(option_name(anchor), anchor_kl, errors)


def load_or_build(path: Path, make: Callable[[], Sensitivity]) -> Sensitivity:
    """The sensitivities stored at path, or made and stored there (atomically) when missing or unreadable."""
    return files.load_or_make(path, lambda p: Sensitivity.from_json(p.read_text()), make,
                              lambda made, p: files.write_text(p, made.to_json()))


def for_space(space: Any, teacher: Any, tokenizer: Any, arch: Architecture, stats: CalibrationStats,
              spec: CalibrationSpec, calibration_key: str, cache: LayerCache | None, folder: Path,
              progress: bool = False) -> Sensitivity:
    """The sensitivities a guided space allocates by, built once per (model, calibration, options) and cached.

    The single-layer KL is measured on windows of the calibration split that the
    statistics did not use (another seed), never on the evaluation text: choosing
    layers by the text a search then scores on would flatter its plans.
    """
    layers = space.layers(arch)
    options = {lin.name: space.options(lin, arch) for lin in layers}
    anchors = {space.anchor(lin, arch) for lin in layers}
    if len(anchors) != 1:
        raise ValueError("a guided space must measure every layer at one anchor option")
    anchor = anchors.pop()
    described = json.dumps({"calibration": calibration_key, "anchor": asdict(anchor), "windows": SENSITIVITY_WINDOWS,
                            "top_k": quality.SEARCH_TOP_K,
                            "options": {k: [asdict(p) for p in v] for k, v in options.items()}}, sort_keys=True)
    path = folder / f"{hashlib.sha256(described.encode()).hexdigest()[:20]}.json"

    def make() -> Sensitivity:
        windows, tokens = SENSITIVITY_WINDOWS
        documents = text.split(spec.source).calibration
        ids = calibration_windows(tokenizer, documents, windows, tokens, seed=spec.seed + 1)
        # The teacher's top-k log-probabilities, as a search keeps them: whole ones would be 201 MB held through
        # the build (4 x 256 positions x 49152 tokens in float32), most of a cold sweep's peak beyond 3x the teacher.
        reference = quality.Reference.of_windows(teacher, ids, top_k=quality.SEARCH_TOP_K)
        every = list({option_name(p): p for v in options.values() for p in v}.values())
        return build(teacher, arch, every, anchor, stats, reference, cache, [lin.name for lin in layers], progress)

    return load_or_build(path, make)


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's τ-b between two paired lists."""
    from scipy.stats import kendalltau

    tau = kendalltau(xs, ys).statistic
    return float(tau) if not math.isnan(tau) else 0.0
