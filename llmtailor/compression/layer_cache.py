"""The per-layer cache: a layer compressed with given settings is computed once and reused by every trial.

In teacher-input mode a layer's compressed form depends only on the teacher's weights
for that layer, its settings and the calibration statistics, so it is stored on disk
under a key of exactly those (``layer_key``) and every later trial, in any process,
assembles its model from the stored codes instead of re-running the solver.

Each entry is one safetensors file holding the codes, scales and zero points of a
quantized layer, or the float16 weights of a 16-bit one that a solver changed
(SparseGPT), and the keep-mask of a pruned layer, with the SHA-256 of those bytes in its metadata, checked
on a process's first read of the entry: a damaged entry is deleted and rebuilt. A later read of the same file
(same inode, size and change times) skips the check: hashing every layer's codes again cost a search trial about
0.1 s of a 2.5 s trial on the default model, against damage that would have to strike between two reads. Entries are written to a
temporary file and renamed into place, so processes writing the same entry at once
each leave a whole file (they hold the same bytes). Only the solvers (GPTQ, SparseGPT)
are cached: round-to-nearest, magnitude and Wanda masks take milliseconds to
recompute, about what reading them back would take.

The folder is bounded (``LLMTAILOR_LAYER_CACHE_MAX``, default ``DEFAULT_MAX``; ``none``: no bound): every
plan a sweep solves adds its layers (one byte per weight at 8 bits and below, two at 16), which on this
project's benchmark VM reached 45 GB for a 135M model and would fill a disk in one night for a 7B one. A
read sets the entry's access time; when a process's writes may have taken the folder past the bound it
lists the folder and deletes the least recently read entries until it holds ``LOW_WATER`` of the bound.
Eviction is safe while other workers run: a deleted entry is a miss, solved again. Each process counts only
its own writes between listings, so N workers may overshoot the bound by about N x ``RECOUNT`` of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llmtailor import files
from llmtailor.compression.quantize import QuantizedWeight
from llmtailor.plan import LayerPrecision, LayerSparsity

DEFAULT_MAX = "20GB"
LOW_WATER = 0.8  # eviction stops at this share of the bound, so the next listing is a share of the bound away
RECOUNT = 0.05  # a process lists the folder again after writing this share of the bound


def max_bytes_from_env() -> int | None:
    """The folder's bound in bytes from ``LLMTAILOR_LAYER_CACHE_MAX`` ('20GB', '500MB'; 'none': unbounded)."""
    from llmtailor.hw_profiles import parse_size

    text = os.environ.get("LLMTAILOR_LAYER_CACHE_MAX", "").strip() or DEFAULT_MAX
    if text.lower() == "none":
        return None
    return parse_size(text, "LLMTAILOR_LAYER_CACHE_MAX")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of every parameter's bytes: equal for the same weights, whatever path they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def layer_key(model: str, calibration: str | None, layer: str, precision: LayerPrecision, sparsity: LayerSparsity,
              kept: str | None = None) -> str:
    """The cache key of one compressed layer: the model, the calibration, the layer and its settings, and for a
    layer a structured cut reshaped, which of its rows and columns the cut kept (``structure.Cut.kept``)."""
    described = {"model": model, "calibration": calibration, "layer": layer, "precision": asdict(precision),
                 "sparsity": asdict(sparsity)}
    if kept is not None:
        described["kept"] = kept
    text = json.dumps(described, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(memoryview(tensors[name].contiguous().view(torch.uint8).numpy()))  # (no copy: read per trial)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is rewritten or replaced (an atomic rename makes a new inode), or None: absent.
    Not the change time: marking an entry read (its access time) changes that."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class LayerCache:
    """Compressed layers of one model under one calibration, on disk; counts its hits and misses."""

    def __init__(self, root: Path, model: str, calibration: str | None, max_bytes: int | None = None) -> None:
        """``max_bytes``: the folder's bound (None: unbounded); it holds every model's entries, so bound them all."""
        self.root = Path(root)
        self.model, self.calibration, self.max_bytes = model, calibration, max_bytes
        self.hits = self.misses = self.rebuilt = self.evicted = 0
        self._listed: int | None = None  # the folder's bytes at this process's last listing, after eviction
        self._unlisted = 0  # bytes this process wrote since
        self._verified: dict[Path, tuple[int, ...]] = {}  # entry -> its file's stamp when its checksum matched

    def key(self, layer: str, precision: LayerPrecision, sparsity: LayerSparsity, kept: str | None = None) -> str:
        """The key of one layer compressed with these settings (``kept``: what a cut kept of it, if it cut it)."""
        return layer_key(self.model, self.calibration, layer, precision, sparsity, kept)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor | None, QuantizedWeight | None, torch.Tensor | None] | None:
        """(float16 weights or None, codes or None, keep-mask or None) of a stored layer; None when absent or
        damaged (then it is deleted)."""
        from safetensors import safe_open

        path = self._path(key)
        stamp = _stamp(path)
        if stamp is None:
            self.misses += 1
            return None
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            if self._verified.get(path) != stamp:
                if _checksum(tensors) != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                self._verified[path] = stamp
        except Exception:  # truncated, corrupt or tampered: recompute
            self._verified.pop(path, None)
            path.unlink(missing_ok=True)
            self.misses += 1
            self.rebuilt += 1
            return None
        self.hits += 1
        if self.max_bytes is not None:  # recency for eviction; the modification time (in the stamp) is kept
            with contextlib.suppress(OSError):  # evicted by another worker meanwhile: this read still holds it
                os.utime(path, ns=(time.time_ns(), stamp[2]))
        quantized = None
        if "codes" in tensors:
            quantized = QuantizedWeight(tensors["codes"], tensors["scales"], tensors["zeros"], int(meta["bits"]),
                                        int(meta["group_size"]), meta["symmetric"] == "1")
        return tensors.get("weight"), quantized, tensors.get("mask")

    def put(self, key: str, stored: QuantizedWeight | torch.Tensor, mask: torch.Tensor | None) -> None:
        """Store a layer's codes, or its 16-bit weights (kept as float16), and its keep-mask, atomically."""
        from safetensors.torch import save_file

        meta = {}
        if isinstance(stored, QuantizedWeight):
            tensors = {"codes": stored.codes, "scales": stored.scales, "zeros": stored.zeros}
            meta = {"bits": str(stored.bits), "group_size": str(stored.group_size),
                    "symmetric": "1" if stored.symmetric else "0"}
        else:
            tensors = {"weight": stored.half()}
        if mask is not None:
            tensors["mask"] = mask.to(torch.bool)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta["sha256"] = _checksum(tensors)
        files.write_with(self._path(key), lambda staging: save_file(tensors, staging, metadata=meta))
        if self.max_bytes is not None:
            self._unlisted += sum(t.numel() * t.element_size() for t in tensors.values())
            if (self._listed is None or self._listed + self._unlisted > self.max_bytes
                    or self._unlisted > RECOUNT * self.max_bytes):
                self.bound()

    def bound(self) -> None:
        """List the folder; when it holds more than the bound, delete the least recently read entries until it
        holds ``LOW_WATER`` of it."""
        found = self._listing()
        total = sum(size for _, size, _ in found)
        if self.max_bytes is not None and total > self.max_bytes:
            for _, size, path in sorted(found):
                if total <= LOW_WATER * self.max_bytes:
                    break
                with contextlib.suppress(OSError):
                    path.unlink()
                    self.evicted += 1
                self._verified.pop(path, None)
                total -= size
        self._listed, self._unlisted = total, 0

    def _listing(self) -> list[tuple[int, int, Path]]:
        """(access time, bytes, path) of every entry on disk; one another worker evicts meanwhile is left out."""
        found = []
        for path in self.root.glob("*/*.safetensors"):
            with contextlib.suppress(OSError):
                stat = path.stat()
                found.append((stat.st_atime_ns, stat.st_size, path))
        return found

    def size_bytes(self) -> int:
        """Bytes of every entry on disk."""
        return sum(size for _, size, _ in self._listing())

    @property
    def hit_rate(self) -> float:
        """Share of lookups served from disk."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0
