"""The samplers a search can name (``--sampler``), and the one repair Optuna's GP sampler needs to stay in bounds.

Optuna 5's ``GPSampler`` with several objectives scores its 2,048 preliminary
candidates with LogEHVI in one tensor of candidates x
128 QMC samples x the non-dominated boxes of the front so far x objectives, in
float64. The boxes multiply as the front grows, so with three objectives its
transient memory climbed with every trial: a sweep of the default model peaked at
4.9x the float32 teacher (issue 18's bound is 3x), and a pure-Optuna study of 90
trials with an 87-point front peaked at 3.4 GB (benchmarks/BENCHMARKS.md). Each
candidate's acquisition value depends on that candidate alone, so
``score_candidates_in_blocks`` makes the sampler score them ``ACQUISITION_ROWS`` at a
time: the same values, a peak bounded by the block instead of by all 2,048 (the same
study: 603 MB). It patches one private Optuna method once, checks that the method is
still there (a newer Optuna without it is left alone, with a warning), and
``tests/test_spaces.py`` holds that blocks give the values of one evaluation.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import optuna

ACQUISITION_ROWS = 32  # candidates scored at once: a 128 x boxes x objectives float64 block each


def score_candidates_in_blocks() -> bool:
    """Make GPSampler's no-gradient acquisition scoring work a block of candidates at a time (idempotent). False
    when this Optuna has no such method to patch."""
    try:
        from optuna._gp import acqf
    except ImportError:
        acqf = None
    base = getattr(acqf, "BaseAcquisitionFunc", None)
    whole = getattr(base, "eval_acqf_no_grad", None)
    if whole is None:
        warnings.warn("this Optuna has no GP acquisition function to score in blocks: GPSampler's memory grows with "
                      "the front", stacklevel=2)
        return False
    if getattr(whole, "in_blocks", False):
        return True

    def in_blocks(self: Any, x: np.ndarray) -> np.ndarray:
        if x.ndim < 2 or len(x) <= ACQUISITION_ROWS:
            return whole(self, x)
        return np.concatenate([whole(self, x[i:i + ACQUISITION_ROWS]) for i in range(0, len(x), ACQUISITION_ROWS)])

    in_blocks.in_blocks = True  # type: ignore[attr-defined]
    in_blocks.whole = whole  # type: ignore[attr-defined]
    base.eval_acqf_no_grad = in_blocks
    return True


def _gp(seed: int | None) -> optuna.samplers.BaseSampler:
    score_candidates_in_blocks()
    # Gaussian-process Bayesian optimization; reads the trials' set_constraint values (constrained EHVI).
    return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)


# Samplers that breed each generation from the last one's COMPLETE trials. A duplicate draw completed with a copy of
# its twin's values enters the population as a clone: in the twelfth session's guided grid 18-44 of NSGA-II's
# 119-158 draws were duplicates, so a generation of 20 held far fewer than 20 plans. For these samplers the search
# prunes a duplicate instead (Optuna counts only COMPLETE trials toward a generation), so a generation is 20
# distinct plans; the model-based samplers (TPE, GP) keep the copy, which tells them where the good plans are.
BREEDS_A_POPULATION = frozenset({"nsga2"})

SAMPLERS = {
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=20),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "gp": _gp,
}
