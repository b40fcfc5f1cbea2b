"""What a calibrated search space needs before its first trial, made once per (model, calibration) and cached.

Calibration statistics (``compression.calibration``), the per-layer cache of
compressed layers (``compression.layer_cache``), for a space that allocates by
sensitivity the layer sensitivities (``search.sensitivity``), and for a space that
cuts and prunes the structured-cut importance (``compression.structure``, a pass over
the calibration windows) and each block's outlier share (``compression.outliers``,
from the statistics: cheap, not stored). Each comes from the cache folder when an
earlier process made it; otherwise it is computed here, timed, and stored for every
later process and worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmtailor import models
from llmtailor.compression import calibration, layer_cache
from llmtailor.search import sensitivity
from llmtailor.spaces import SearchSpace


@dataclass
class Calibrated:
    """The statistics, their cache key, the layer cache, and the space bound to its sensitivities."""

    stats: calibration.CalibrationStats
    key: str
    cache: layer_cache.LayerCache
    space: SearchSpace
    importance: Any = None  # structure.Importance, for spaces that cut (needs_blocks)
    seconds: dict[str, float] = field(default_factory=dict)  # time spent making each part here (cached parts: fast)


def statistics_and_cache(teacher: Any, tokenizer: Any, arch: Any, spec: calibration.CalibrationSpec,
                         device: Any = "cpu", progress: bool = False
                         ) -> tuple[calibration.CalibrationStats, str, layer_cache.LayerCache, Callable[[], Any]]:
    """The parts every calibrated plan needs, whatever its space: the statistics (loaded, or collected and stored),
    their cache key, the layer cache under that key, and the function that makes the calibration windows (for
    the parts made later from them: importance, students). `prepare` and `report.export` both start here, so an
    export finds what the search stored."""
    fingerprint = layer_cache.model_fingerprint(teacher)
    key = spec.key(fingerprint)

    def windows() -> Any:
        return spec.make_windows(teacher, tokenizer, device, progress)

    stats = calibration.load_or_collect(teacher, arch, windows, key, models.cache_dir(), device, progress)
    cache = layer_cache.LayerCache(models.cache_dir() / "layers", fingerprint, key, layer_cache.max_bytes_from_env())
    return stats, key, cache, windows


def prepare(space: SearchSpace, teacher: Any, tokenizer: Any, arch: Any, spec: calibration.CalibrationSpec,
            device: Any = "cpu", progress: bool = False, log: Any = print) -> Calibrated:
    """Load or make the calibration statistics, the layer cache and (guided spaces) the sensitivities."""
    seconds = {}
    log(f"calibration: {spec.describe()}")
    started = time.perf_counter()
    stats, key, cache, windows = statistics_and_cache(teacher, tokenizer, arch, spec, device, progress)
    seconds["statistics"] = time.perf_counter() - started
    if space.needs_sensitivity:
        started = time.perf_counter()
        found = sensitivity.for_space(space, teacher, tokenizer, arch, stats, spec, key, cache,
                                      models.cache_dir() / "sensitivity", progress)
        seconds["sensitivity"] = time.perf_counter() - started
        space = space.with_sensitivity(found)
    importance = None
    if space.needs_blocks:
        from llmtailor.compression import outliers, structure
        from llmtailor.spaces.base import BlockScores

        started = time.perf_counter()
        importance = structure.load_or_measure(teacher, arch, stats, windows, key, models.cache_dir())
        shares = outliers.outlier_shares(teacher, arch, stats)
        space = space.with_blocks(BlockScores(tuple(importance.blocks), tuple(shares[b] for b in range(arch.num_layers))))
        seconds["importance"] = time.perf_counter() - started
    return Calibrated(stats, key, cache, space, importance, seconds)
