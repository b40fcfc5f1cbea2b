"""The per-user cache: what llmtailor keeps between runs, how big it is, and clearing it.

Each kind of entry lives in a folder of its own under the cache root
(``LLMTAILOR_CACHE``, default ``~/.cache/llmtailor``): ``gguf/`` holds GGUF files
converted once into plain float32 model folders, ``tasks/`` the items of built-in
lm-eval tasks, and the others what calibrated searches make once and reuse (``KINDS``).
Everything here can be deleted at any time; it is remade when needed (the host
profile by measuring again).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

KINDS = {"gguf": "GGUF files converted to float32 model folders", "tasks": "items of built-in lm-eval tasks",
         "calibration": "calibration statistics (layer input second moments) per model and calibration",
         "layers": "compressed layers (the per-layer cache of calibrated searches)",
         "sensitivity": "layer sensitivities of guided searches", "importance": "importance for structured cuts",
         "teacher": "the teacher's top-k next-token log-probabilities that distillation trains students on",
         "host": "this machine's measured device profile (`llmtailor devices --calibrate`)"}


def cache_dir() -> Path:
    """Where llmtailor keeps converted models and other per-user caches."""
    root = os.environ.get("LLMTAILOR_CACHE") or Path.home() / ".cache" / "llmtailor"
    return Path(root)


@dataclass(frozen=True)
class Entry:
    """One cached item: its kind, path and size on disk."""

    kind: str
    path: Path
    bytes: int


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def entries() -> list[Entry]:
    """Everything in the cache, by kind and name (half-written staging folders included, so clear removes them)."""
    found = []
    for kind in KINDS:
        folder = cache_dir() / kind
        if folder.is_dir():
            found += [Entry(kind, p, _size(p)) for p in sorted(folder.iterdir())]
    return found


def clear() -> list[Entry]:
    """Delete every cache entry; return what was deleted."""
    removed = entries()
    for entry in removed:
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink()
    return removed
