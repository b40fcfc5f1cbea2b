"""The per-user cache: what llmtailor keeps between runs, how big it is, and clearing it.

Each kind of entry lives in a folder of its own under the cache root
(``LLMTAILOR_CACHE``, default ``~/.cache/llmtailor``): ``gguf/`` holds GGUF files
converted once into plain float32 model folders, ``tasks/`` the items of built-in
lm-eval tasks, and the others what calibrated searches make once and reuse (``KINDS``).
Everything here can be deleted at any time; it is remade when needed (the host
profile by measuring again).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmtailor.errors import UserError

KINDS = {"gguf": "GGUF files converted to float32 model folders", "tasks": "items of built-in lm-eval tasks",
         "calibration": "calibration statistics (layer input second moments) per model and calibration",
         "layers": "compressed layers (the per-layer cache of calibrated searches)",
         "sensitivity": "layer sensitivities of guided searches", "importance": "importance for structured cuts",
         "teacher": "the teacher's top-k next-token log-probabilities that distillation trains students on",
         "students": "distilled students of searches, kept so a plan's student trains once",
         "teacher_weights": "a copy of a teacher's weights that searches restore it from, where its own files cannot",
         "host": "this machine's measured device profile (`llmtailor devices --calibrate`)"}


SHARDED = {"layers"}  # kinds whose entries sit in folders named by their key's first two characters
# Bookkeeping beside a kind's entries, not an entry itself: not listed, removed with the kind's entries.
BOOKKEEPING = {"gguf": ".digests"}  # each GGUF file's content digest by path, size and mtime (models.py)


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
    """Bytes under `path`; a file a running sweep renames or removes meanwhile counts 0, not an error, and a link
    (an entry moved to another name, ``models._converted_gguf_dir``) counts 0: what it points to is counted there."""
    def size_of(file: Path) -> int:
        try:
            return file.stat().st_size if file.is_file() else 0
        except OSError:
            return 0

    if path.is_symlink():
        return 0
    return size_of(path) if not path.is_dir() else sum(size_of(p) for p in path.rglob("*"))


def entries(kinds: list[str] | None = None) -> list[Entry]:
    """Everything in the cache (or of `kinds` only), by kind and name (half-written staging folders included, so
    clear removes them)."""
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise UserError(f"no cache kind {', '.join(map(repr, unknown))}: the kinds are {', '.join(KINDS)}")
    found = []
    for kind in kinds or KINDS:
        folder = cache_dir() / kind
        if folder.is_dir():
            items = sorted(p for p in folder.iterdir() if p.name != BOOKKEEPING.get(kind))
            if kind in SHARDED:
                items = [p for shard in items for p in (sorted(shard.iterdir()) if shard.is_dir() else [shard])]
            found += [Entry(kind, p, _size(p)) for p in items]
    return found


def _gone_is_fine(function, path, exc_info) -> None:
    """rmtree's error handler: a file a running sweep renamed or removed meanwhile is no error; anything else is."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def clear(kinds: list[str] | None = None) -> list[Entry]:
    """Delete every cache entry (or those of `kinds`); return what was deleted."""
    removed = entries(kinds)
    for entry in removed:
        if entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path, onerror=_gone_is_fine)
        else:
            entry.path.unlink(missing_ok=True)
    for kind, name in BOOKKEEPING.items():
        if kind in (kinds or KINDS):
            shutil.rmtree(cache_dir() / kind / name, ignore_errors=True)
    for kind in SHARDED & set(kinds or KINDS):
        for shard in (cache_dir() / kind).glob("*/"):
            with contextlib.suppress(OSError):  # a worker may be writing into it
                shard.rmdir()
    return removed
