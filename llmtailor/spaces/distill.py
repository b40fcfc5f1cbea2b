"""The distillation space: a structured cut of the teacher and how long its student is distilled, with the
``direct`` precision groups (GPTQ) on top.

A trial samples the bits of each group of layers, the cut of the ``prune`` space
(share of blocks, KV groups and MLP channels removed; chosen by the measured block
scores) and, when the cut removes anything, the distillation budget: ``DISTILL_STEPS``
steps of KD to the teacher's top-64 at temperature 2 (``plan.Distillation``'s defaults)
at peak learning rate ``LEARNING_RATE``, the rate measured in ``bench_distill.py``. An
uncut model is not distilled: the teacher is its own best copy. The trained student is
cached by (structure, recipe, training text) (``compression.trained``), so every trial
that shares a cut and a budget trains once, whatever its precisions.

Budgets are small because this machine trains on 2 CPU cores (about 2.5 s a step for
the default model); the search's fidelity levels (``search.study``) first train a
quarter of the budget and give the full budget only to students not already far behind
the front. Pruning is not sampled here (the ``prune`` space has it); QAT is not sampled
yet (its measurement against GPTQ of the same student is in BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmtailor.arch import Architecture
from llmtailor.evaluators.cost import weight_bytes
from llmtailor.plan import CompressionPlan, Distillation
from llmtailor.spaces.pruning import BLOCK_CUTS, HEAD_CUTS, MLP_CUTS, PruningSpace

DISTILL_STEPS = (0, 40, 160)
LEARNING_RATE = 2e-4
DENSE = {"prune_pattern": "dense"}


class DistillSpace(PruningSpace):
    """Precision per group of layers (GPTQ), a structured cut, and the distillation budget of its student."""

    name = "distill"
    distills = True

    def with_blocks(self, scores: Any) -> DistillSpace:
        return DistillSpace(scores)

    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        params = self.precision.sample_precision(trial, arch)
        params["cut_blocks"] = trial.suggest_categorical("cut_blocks", BLOCK_CUTS)
        params["cut_heads"] = trial.suggest_categorical("cut_heads", HEAD_CUTS)
        params["cut_mlp"] = trial.suggest_categorical("cut_mlp", MLP_CUTS)
        if params["cut_blocks"] or params["cut_heads"] or params["cut_mlp"]:
            params["distill_steps"] = trial.suggest_categorical("distill_steps", DISTILL_STEPS)
        return self.plan(params, arch)

    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        plan = super().plan({**params, **DENSE}, arch)
        steps = params.get("distill_steps", 0)
        student = plan.student
        if not steps or (student.layers is None and not student.heads and not student.mlp_width):
            return plan  # a share too small to remove a block, head group or channel of this model cuts nothing
        recipe = Distillation(steps=steps, learning_rate=LEARNING_RATE)
        return dataclasses.replace(plan, student=dataclasses.replace(plan.student, distillation=recipe))

    def smallest(self, arch: Architecture) -> CompressionPlan:
        params = {"cut_blocks": max(BLOCK_CUTS), "cut_heads": max(HEAD_CUTS), "cut_mlp": max(MLP_CUTS)}
        return min((self.plan({**self.precision.uniform_precision(arch, 4, group), **params}, arch)
                    for group in (128, 32, 0)), key=lambda p: weight_bytes(p, arch))

    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """Dense; uniform 8-bit and 4-bit g128 GPTQ; a 20% depth cut, undistilled and distilled at the full budget."""
        uncut = {"cut_blocks": 0.0, "cut_heads": 0.0, "cut_mlp": 0.0}
        p = self.precision.uniform_precision
        depth = {**p(arch, 16, 128), "cut_blocks": 0.2, "cut_heads": 0.0, "cut_mlp": 0.0}
        return [{**p(arch, 16, 128), **uncut}, {**p(arch, 8, 0), **uncut}, {**p(arch, 4, 128, 8), **uncut},
                {**depth, "distill_steps": 0}, {**depth, "distill_steps": max(DISTILL_STEPS)}]

