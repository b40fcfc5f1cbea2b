"""Named text sources, split once into calibration, evaluation and task text that never overlap.

Methods that fit weights to calibration text overfit it (DESIGN.md), so quality is
always measured on documents held out from calibration. Sources:
- ``pydoc``: the Python documentation topics that ship with every CPython;
- a path to a ``.txt``/``.md`` file (split into paragraphs) or a ``.jsonl`` file with a
  ``text`` field per line, or a folder of text files (each split into paragraphs; a
  file reached by two names is read once), such as Debian's licence texts in
  ``/usr/share/common-licenses``;
- ``hf:NAME[:CONFIG]:SPLIT[:COLUMN]``: a dataset from the hub or its local cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llmtailor.errors import UserError

DEFAULT_SOURCE = "pydoc"


@dataclass(frozen=True)
class TextSplits:
    """Documents of one source, split by a hash of each document so the split never drifts."""

    source: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    task: tuple[str, ...]


def load_documents(source: str = DEFAULT_SOURCE) -> list[str]:
    """The documents of a named text source."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    if source.startswith("hf:"):
        return _hub_documents(source)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted({p.resolve() for p in path.iterdir() if p.is_file()})
        raw = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    elif not path.is_file():
        raise UserError(f"text source {source!r} is neither 'pydoc', 'hf:NAME:SPLIT', nor an existing file or folder")
    else:
        raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        try:
            docs = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{source}: every line must be a JSON object with a 'text' field ({exc})") from None
    else:
        docs = [p.strip() for p in raw.split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if len(docs) < 4:
        raise UserError(f"text source {source} has {len(docs)} documents; at least 4 are needed to hold some out")
    return docs


def split(source: str = DEFAULT_SOURCE) -> TextSplits:
    """Split a source's documents: half for calibration, a quarter each for evaluation and the task."""
    buckets: dict[int, list[str]] = {0: [], 1: [], 2: [], 3: []}
    for doc in load_documents(source):
        buckets[hashlib.sha256(doc.encode()).digest()[0] % 4].append(doc)
    return TextSplits(source, tuple(buckets[0] + buckets[1]), tuple(buckets[2]), tuple(buckets[3]))


def check_disjoint(calibration: tuple[str, ...] | list[str], calibration_source: str,
                   evaluation: dict[str, tuple[str, ...]]) -> None:
    """Raise UserError when a calibration document is also an evaluation document of some source (two sources
    that share text: a method fitted on it would be scored on what it fitted)."""
    seen = {_digest(d) for d in calibration}
    for source, documents in evaluation.items():
        shared = sum(1 for d in documents if _digest(d) in seen)
        if shared:
            raise UserError(f"the calibration text ({calibration_source}) and the evaluation text {source} share "
                            f"{shared} documents: calibrate on another source, or evaluate on another")


def _digest(document: str) -> str:
    return hashlib.sha256(" ".join(document.split()).encode()).hexdigest()


def _hub_documents(source: str) -> list[str]:
    parts = source[3:].split(":")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"hub text source must look like hf:NAME[:CONFIG]:SPLIT[:COLUMN], got {source!r}")
    name, rest = parts[0], parts[1:]
    config = rest.pop(0) if len(rest) >= 2 else None
    split_name = rest.pop(0)
    column = rest[0] if rest else "text"
    try:
        import datasets

        data = datasets.load_dataset(name, config, split=split_name)
        return [str(row) for row in data[column] if str(row).strip()]
    except Exception as exc:  # datasets raises many types for offline/missing data
        raise UserError(f"could not load text {source!r}: {str(exc).splitlines()[0]}") from None
