"""The pruning space: calibrated pruning and structured cuts, on top of the ``direct`` precision groups.

A trial samples, besides the bits of each group of layers (GPTQ, as in ``direct``):
- **a structured cut** (``plan.student``, applied by ``compression.structure``): the
  share of decoder blocks removed (0, 10% or 20%; which ones by block influence), of
  KV groups removed (0 or a third; whole groups, so grouped-query attention stays
  intact) and of MLP channels removed (0, 12.5% or 25%; widths stay multiples of 8,
  so 4:8 still divides them). Cuts are uniform over the kept blocks, as a standard
  config needs (``Student.uniform_cut``);
- **pruning** of every linear layer of the decoder blocks: a pattern (dense,
  unstructured, 2:4 or 4:8), for unstructured a global ratio and whether OWL spreads
  it over the blocks by their outlier shares (``compression.outliers``), and the
  method, Wanda or SparseGPT (a layer whose input width M does not divide stays dense
  under N:M). Magnitude pruning is not offered: at 50% it leaves the
  default model at perplexity 249 against Wanda's 28 (BENCHMARKS.md,
  bench_pruning.py), so a trial spent on it is a trial wasted.

Layers pruned by SparseGPT and quantized by GPTQ are solved jointly in input order, so
they get ``act_order=False`` (``compression.check_supported`` refuses the other);
Wanda's layers keep the GPTQ recipe's act-order. Which blocks a depth cut keeps and how
OWL spreads a ratio depend on the model: the space is bound to its measured
``BlockScores`` (``with_blocks``) before sampling, the way ``guided`` is bound to its
sensitivities; unbound, it keeps the first blocks and uniform ratios, which gives the
same bytes (blocks are the same size), so ``smallest`` needs no measurement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmtailor import arch as arch_mod
from llmtailor.arch import Architecture
from llmtailor.compression import outliers, structure
from llmtailor.evaluators.cost import weight_bytes
from llmtailor.plan import CompressionPlan, LayerSparsity, Student, nm_ratio
from llmtailor.spaces.base import BlockScores, SearchSpace
from llmtailor.spaces.grouped import GroupedSpace, _without_identities, by_depth_segment, by_part

PATTERNS = ("dense", "unstructured", "2:4", "4:8")
RATIOS = (0.3, 0.4, 0.5, 0.6)  # unstructured
METHODS = ("wanda", "sparsegpt")
BLOCK_CUTS = (0.0, 0.1, 0.2)  # share of decoder blocks removed
HEAD_CUTS = (0.0, 0.33)  # share of KV groups removed
MLP_CUTS = (0.0, 0.125, 0.25)  # share of MLP channels removed
WIDTH_MULTIPLE = 8


class PruningSpace(SearchSpace):
    """Precision per group of layers (GPTQ), a structured cut, and Wanda or SparseGPT pruning."""

    name = "prune"
    calibrated = True
    needs_blocks = True

    def __init__(self, scores: BlockScores | None = None) -> None:
        self.scores = scores
        self.precision = GroupedSpace("direct", by_depth_segment(3), by_part, method="gptq")

    def with_blocks(self, scores: BlockScores) -> PruningSpace:
        return PruningSpace(scores)

    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        params = self.precision.sample_precision(trial, arch)
        params["cut_blocks"] = trial.suggest_categorical("cut_blocks", BLOCK_CUTS)
        params["cut_heads"] = trial.suggest_categorical("cut_heads", HEAD_CUTS)
        params["cut_mlp"] = trial.suggest_categorical("cut_mlp", MLP_CUTS)
        params["prune_pattern"] = trial.suggest_categorical("prune_pattern", PATTERNS)
        if params["prune_pattern"] != "dense":
            params["prune_method"] = trial.suggest_categorical("prune_method", METHODS)
        if params["prune_pattern"] == "unstructured":
            params["prune_ratio"] = trial.suggest_categorical("prune_ratio", RATIOS)
            params["owl"] = trial.suggest_categorical("owl", (True, False))
        return self.plan(params, arch)

    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        student = self.student(params, arch)
        small = arch_mod.cut(arch, *student.uniform_cut(arch.num_layers))  # teacher names, the cut's widths
        precision = self.precision.precision(params, arch)
        precision = {lin.name: precision[lin.name] for lin in (*small.linears, arch.embedding)}  # cut blocks' go
        pattern, sparsity = params["prune_pattern"], {}
        ratios = self.block_ratios(params, list(range(arch.num_layers) if student.layers is None else student.layers))
        for lin in small.linears:
            if lin.block is None or not ratios:
                continue
            if pattern == "unstructured" or lin.in_features % int(pattern.split(":")[1]) == 0:
                sparsity[lin.name] = LayerSparsity(ratios[lin.block], pattern, params["prune_method"])
                if sparsity[lin.name].method == "sparsegpt" and precision[lin.name].method == "gptq":
                    precision[lin.name] = dataclasses.replace(precision[lin.name], act_order=False)
        plan = _without_identities(precision, sparsity)
        return dataclasses.replace(plan, student=student)

    def student(self, params: dict[str, Any], arch: Architecture) -> Student:
        """The structured cut: blocks kept (by influence, once bound), query heads and MLP width per kept block."""
        removed = min(round(params["cut_blocks"] * arch.num_layers), arch.num_layers - 1)
        layers = None
        if removed:
            influence = self.scores.influence if self.scores else [float(-b) for b in range(arch.num_layers)]
            layers = structure.blocks_to_keep(list(influence), arch.num_layers - removed)
        kept = range(arch.num_layers) if layers is None else layers
        per_group = arch.num_heads // arch.num_kv_heads
        groups = arch.num_kv_heads - min(round(params["cut_heads"] * arch.num_kv_heads), arch.num_kv_heads - 1)
        width = arch.intermediate_size
        if params["cut_mlp"]:
            width = max(WIDTH_MULTIPLE, int(width * (1 - params["cut_mlp"])) // WIDTH_MULTIPLE * WIDTH_MULTIPLE)
        heads = {b: groups * per_group for b in kept} if groups < arch.num_kv_heads else {}
        mlp_width = {b: width for b in kept} if width < arch.intermediate_size else {}
        return Student(layers=layers, heads=heads, mlp_width=mlp_width)

    def block_ratios(self, params: dict[str, Any], kept: list[int]) -> dict[int, float]:
        """Each kept block's pruning ratio (empty when dense): the pattern's, or the global ratio, spread by OWL
        over the kept blocks (so their mean is the asked ratio)."""
        pattern = params["prune_pattern"]
        if pattern == "dense":
            return {}
        if pattern != "unstructured":
            return dict.fromkeys(kept, nm_ratio(pattern))
        ratio = params["prune_ratio"]
        if not params["owl"] or self.scores is None:
            return dict.fromkeys(kept, ratio)
        spread = outliers.layer_ratios({b: self.scores.outlier_shares[b] for b in kept}, ratio)
        return {b: round(r, 4) for b, r in spread.items()}

    def smallest(self, arch: Architecture) -> CompressionPlan:
        params = {"cut_blocks": max(BLOCK_CUTS), "cut_heads": max(HEAD_CUTS), "cut_mlp": max(MLP_CUTS),
                  "prune_pattern": "unstructured", "prune_ratio": max(RATIOS), "owl": False, "prune_method": "wanda"}
        candidates = [self.plan({**self.precision.uniform_precision(arch, 4, group), **params}, arch)
                      for group in (128, 32, 0)]
        return min(candidates, key=lambda p: weight_bytes(p, arch))

    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """Dense; uniform 8-bit and 4-bit g128 GPTQ; 50% and 2:4 SparseGPT; a 20% depth cut; 4-bit with 50%."""
        uncut = {"cut_blocks": 0.0, "cut_heads": 0.0, "cut_mlp": 0.0}
        dense = {**uncut, "prune_pattern": "dense"}
        half = {**uncut, "prune_pattern": "unstructured", "prune_ratio": 0.5, "owl": False, "prune_method": "sparsegpt"}
        two_four = {**uncut, "prune_pattern": "2:4", "prune_method": "sparsegpt"}
        p = self.precision.uniform_precision
        return [{**p(arch, 16, 128), **dense}, {**p(arch, 8, 0), **dense}, {**p(arch, 4, 128, 8), **dense},
                {**p(arch, 16, 128), **half}, {**p(arch, 16, 128), **two_four},
                {**p(arch, 16, 128), **dense, "cut_blocks": 0.2}, {**p(arch, 4, 128, 8), **half}]

