"""Calibration statistics: what calibrated methods need to know about each layer's inputs.

Calibrated methods (GPTQ here; Wanda and SparseGPT in the pruning issue) follow one
shape: collect statistics of a layer's inputs X, then solve. The statistic is the
second-moment matrix H = XᵀX / n over every calibration token, kept per *distinct*
input: layers fed the same tensor (q/k/v after the attention norm, gate/up after the
MLP norm) share one. Its diagonal is what Wanda needs.

Teacher-input mode (``collect``): every layer sees the uncompressed teacher's
activations, so a layer's compressed form depends on that layer and its settings
alone, and can be cached once for every trial. The statistics are computed once per
(model, calibration) and kept in the cache folder (``load_or_collect``), written
atomically, reused by every later process.

For a tied embedding/head, the head's input statistic is kept under the embedding's
name: quantizing the tied matrix with it minimizes the head's output error (the
lookup role has no inputs to weigh).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmtailor import files, models
from llmtailor.arch import Architecture
from llmtailor.errors import UserError

# The GPTQ recipe the search spaces use, chosen by benchmarks/bench_calibration.py on the pydoc evaluation split
# and on a domain no calibration text came from (Debian's licence texts). Shrinking H halfway toward its diagonal
# is what makes GPTQ generalize here: a few input channels of this model's layers carry far more energy than the
# rest (massive activations), so the paper's damping (a share of mean(diag H), which those channels set) swamps
# every ordinary channel while the cross-correlations GPTQ fits stay those of one corpus; shrinking weighs each
# channel by its own energy and trusts the correlations half as much.
GPTQ_ACT_ORDER = True
GPTQ_DAMP = 0.01
GPTQ_SHRINK = 0.5


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration text: windows cut from a text source's calibration split at seeded offsets, a share of
    them sampled from the teacher itself instead."""

    source: str = "pydoc"
    windows: int = 128
    window_tokens: int = 512
    seed: int = 0
    generated: float = 0.0  # share of the windows sampled from the teacher (generated_windows)

    def key(self, model_fingerprint: str) -> str:
        """An id of these statistics for this model: the cache key."""
        text = json.dumps({"model": model_fingerprint, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def describe(self) -> str:
        """How reports name this calibration."""
        sampled = round(self.windows * self.generated)
        what = f"{self.source} calibration split" if sampled < self.windows else "text sampled from the teacher"
        if 0 < sampled < self.windows:
            what += f" ({sampled} of the windows sampled from the teacher)"
        return f"{what}, {self.windows} x {self.window_tokens} tokens"

    def make_windows(self, model: Any, tokenizer: Any, device: str | torch.device = "cpu",
                     progress: bool = False) -> torch.Tensor:
        """The calibration windows, [windows, window_tokens] token ids."""
        from llmtailor import text

        sampled = round(self.windows * self.generated)
        parts = []
        if sampled < self.windows:
            documents = text.split(self.source).calibration
            parts.append(calibration_windows(tokenizer, documents, self.windows - sampled, self.window_tokens, self.seed))
        if sampled:
            parts.append(generated_windows(model, tokenizer, sampled, self.window_tokens, self.seed, device=device,
                                           progress=progress))
        return torch.cat(parts)


def calibration_windows(tokenizer: Any, documents: tuple[str, ...] | list[str], count: int, tokens: int,
                        seed: int = 0) -> torch.Tensor:
    """`count` windows of `tokens` token ids drawn at seeded random offsets of the calibration text."""
    if not documents:
        raise UserError("there is no calibration text: calibrated methods (GPTQ) need some; give --text with more documents")
    ids = tokenizer("\n\n".join(documents), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < tokens:
        raise UserError(f"the calibration text has {ids.numel()} tokens; one calibration window needs {tokens}: "
                        "give more text, or shorter windows")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - tokens + 1, (count,), generator=generator)
    return torch.stack([ids[s : s + tokens] for s in starts])


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor, rows: int = 4096) -> float:
    """‖WX − QX‖² per calibration token, from the statistics alone: trace((W − Q) H (W − Q)ᵀ).

    Summed over blocks of `rows` output rows in float64: a whole float64 difference of a 49152 x 576 head and
    its product with H would be 450 MB at once."""
    hessian = hessian.to(weight.device).double()
    total = 0.0
    for start in range(0, weight.shape[0], rows):
        delta = (weight[start:start + rows] - approx[start:start + rows].to(weight.device)).double()
        total += float(((delta @ hessian) * delta).sum())
    return total


class StoredHessians(Mapping):
    """The H matrices of a statistics file, each read from it when asked and not kept: a search with a warm
    per-layer cache never reads them, and SmolLM2-135M's take 404 MB of memory that a sweep would otherwise hold."""

    def __init__(self, path: Path, keys: list[str]) -> None:
        self.path, self._keys = path, keys

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._keys:
            raise KeyError(key)
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class CalibrationStats:
    """H = XᵀX / n per distinct layer input, and which layer reads which input."""

    def __init__(self, hessians: Mapping[str, torch.Tensor], input_of: dict[str, str], tokens: int) -> None:
        self.hessians = hessians  # input key -> [in, in] float32 (in memory, or StoredHessians)
        self.input_of = input_of  # layer name -> input key
        self.tokens = tokens
        self._diagonals: dict[str, torch.Tensor] = {}  # small, and read by every trial that prunes with Wanda

    def hessian(self, layer: str) -> torch.Tensor:
        """The second-moment matrix of the layer's inputs."""
        if layer not in self.input_of:
            raise KeyError(f"no calibration statistics for layer {layer!r}")
        return self.hessians[self.input_of[layer]]

    def diagonal(self, layer: str) -> torch.Tensor:
        """Mean squared value of each input feature (the diagonal of H): what Wanda weighs by."""
        key = self.input_of.get(layer)
        if key not in self._diagonals:
            self._diagonals[key] = torch.diagonal(self.hessian(layer)).clone()
        return self._diagonals[key]

    def save(self, path: Path) -> None:
        """Write atomically as safetensors, with the layer map and token count in its metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self.hessians.items()}
        metadata = {"input_of": json.dumps(self.input_of), "tokens": str(self.tokens)}
        files.write_with(path, lambda staging: save_file(tensors, staging, metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        """Statistics written by save, whose matrices stay in the file until asked for (``StoredHessians``)."""
        from safetensors import safe_open

        with safe_open(path, "pt") as f:  # (opening checks the header against the file's size)
            meta = f.metadata()
            keys = list(f.keys())
        return cls(StoredHessians(Path(path), keys), json.loads(meta["input_of"]), int(meta["tokens"]))


def _layers(model: Any, arch: Architecture) -> dict[str, torch.nn.Module]:
    """The modules whose inputs are collected, by the layer name a plan uses."""
    layers = {lin.name: model.get_submodule(lin.name) for lin in arch.linears}
    if arch.tie_embeddings:
        layers[arch.embedding.name] = model.get_submodule(arch.lm_head_name)
    return layers


class InputStatistics:
    """Accumulates XᵀX over forward passes for a set of layers, once per distinct input tensor."""

    def __init__(self, layers: dict[str, torch.nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.input_of: dict[str, str] = {}
        self.tokens = 0
        # id of an input tensor in this forward pass -> (the first layer that read it, the tensor). The tensor is
        # held until the pass ends, so its id cannot be reused by a later tensor of the same pass.
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name: str):
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            key = self._seen.setdefault(id(x), (name, x))[0]
            self.input_of.setdefault(name, key)
            if key != name:
                return  # an input another layer already counted
            x = x.reshape(-1, x.shape[-1]).float()
            if key not in self.sums:
                self.sums[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.sums[key].addmm_(x.T, x)

        return record

    def new_pass(self, tokens: int) -> None:
        """Call before each forward pass of `tokens` tokens."""
        self._seen.clear()
        self.tokens += tokens

    def close(self) -> None:
        """Remove the hooks (also when a pass failed: they must not stay on the caller's model)."""
        for handle in self._handles:
            handle.remove()
        self._seen.clear()

    def finish(self) -> CalibrationStats:
        """Remove the hooks; H = XᵀX / n per distinct input."""
        self.close()
        return CalibrationStats({k: (v / self.tokens).cpu() for k, v in self.sums.items()}, self.input_of, self.tokens)


class _StatsFile:
    """Writes H matrices into a safetensors file one at a time, so that all of them are never in memory at once:
    each matrix's bytes go to a data file beside it as it comes, and the file (header, then those bytes) is
    assembled at the end (the header must come first and names every tensor)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data_path = self.path.with_name(self.path.name + ".data")
        self.data = open(self.data_path, "w+b")  # noqa: SIM115 (closed by close, also on failure)
        self.header: dict[str, dict] = {}
        self.size = 0

    def __setitem__(self, key: str, matrix: torch.Tensor) -> None:
        raw = matrix.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        self.header[key] = {"dtype": "F32", "shape": list(matrix.shape), "data_offsets": [self.size, self.size + len(raw)]}
        self.data.write(raw)
        self.size += len(raw)

    def close(self, metadata: dict[str, str] | None) -> None:
        """Write the file (unless metadata is None: a failed pass) and delete the data file."""
        import shutil
        import struct

        try:
            if metadata is not None:
                header = json.dumps({"__metadata__": metadata, **self.header}).encode()
                header += b" " * (-len(header) % 8)  # the tensors' bytes start 8-byte aligned, as safetensors writes
                with open(self.path, "wb") as out:
                    out.write(struct.pack("<Q", len(header)) + header)
                    self.data.seek(0)
                    shutil.copyfileobj(self.data, out, 1 << 24)
        finally:
            self.data.close()
            self.data_path.unlink(missing_ok=True)


@torch.no_grad()
def collect(model: Any, arch: Architecture, windows: torch.Tensor, device: str | torch.device = "cpu",
            progress: bool = False, into: Path | None = None) -> CalibrationStats:
    """Run the teacher on the windows and accumulate H for every distinct linear-layer input (teacher-input mode).

    Block by block (``compression.blocks``): the hidden states of every window pass
    from one block to the next, and a block's sums are finished before the next
    block's begin, so memory holds the windows' hidden states and one block's sums,
    not the sums of every block (403 MB for SmolLM2-135M) and a whole pass's
    activations. The head's input is collected last, in a pass that skips the blocks
    (their outputs are known) and stops before the logits. With ``into``, each
    block's matrices are written to that safetensors file as soon as the block is
    done (the returned statistics read them from there); without, they stay in memory.
    """
    from tqdm.auto import tqdm

    from llmtailor.compression import blocks as block_runs

    layers = _layers(model, arch)
    model_device = next(model.parameters()).device
    hessians: dict[str, torch.Tensor] | _StatsFile = _StatsFile(into) if into is not None else {}
    input_of: dict[str, str] = {}
    metadata, statistics = None, None

    def keep(found: CalibrationStats) -> None:  # a block's (or the head's) statistics, into the whole
        for key, matrix in found.hessians.items():
            hessians[key] = matrix
        input_of.update(found.input_of)

    model.to(device)
    try:
        blocks = block_runs.decoder_blocks(model, arch)
        calls = block_runs.block_inputs(model, blocks[0], windows, device)
        form = None
        for index in tqdm(range(len(blocks)), desc="calibration statistics", unit="block", disable=not progress):
            names = [lin.name for lin in arch.linears if lin.block == index]
            statistics = InputStatistics({name: layers[name] for name in names})
            form = block_runs.run_block(blocks[index], calls, before=lambda call, s=statistics: s.new_pass(
                block_runs.hidden_of(call).shape[:-1].numel()))
            keep(statistics.finish())
        statistics = InputStatistics({name: module for name, module in layers.items() if name not in input_of})
        block_runs.run_to_head(model, arch, blocks, calls, form, windows, device,
                               lambda window, s=statistics: s.new_pass(window.numel()))
        found = statistics.finish()
        keep(found)
        metadata = {"input_of": json.dumps(input_of), "tokens": str(found.tokens)}
    finally:
        if statistics is not None:
            statistics.close()
        model.to(model_device)
        if isinstance(hessians, _StatsFile):
            hessians.close(metadata)
    if isinstance(hessians, _StatsFile):
        return CalibrationStats.load(into)
    return CalibrationStats(hessians, input_of, found.tokens)


def load_or_collect(model: Any, arch: Architecture, windows: torch.Tensor | Callable[[], torch.Tensor], key: str,
                    cache: Path, device: str | torch.device = "cpu", progress: bool = False) -> CalibrationStats:
    """The statistics for this key from the cache, computed and stored there first if missing or unreadable.

    ``windows`` may be a function making them, called only when the statistics must be computed. The matrices are
    written to the file block by block as they are collected (atomically: a staging file renamed into place) and
    stay there until asked for.
    """
    path = cache / "calibration" / f"{key}.safetensors"

    def make() -> None:
        made = windows() if callable(windows) else windows
        files.write_with(path, lambda staging: collect(model, arch, made, device, progress, into=staging))

    return files.load_or_make(path, CalibrationStats.load, make, lambda made, p: None, reread=True)


@torch.no_grad()
def generated_windows(model: Any, tokenizer: Any, count: int, tokens: int, seed: int = 0, batch: int = 16,
                      device: str | torch.device = "cpu", greedy_tokens: int = 4, temperature: float = 1.0,
                      top_p: float = 1.0, progress: bool = False) -> torch.Tensor:
    """Calibration windows sampled from the model itself (data-free calibration, as in LLM-QAT).

    Each window starts from one token drawn uniformly from the vocabulary; its first
    ``greedy_tokens`` continuations are the most likely ones (so a window leaves the
    random start for text the model finds plausible), the rest are sampled at
    ``temperature`` from the smallest set of tokens holding ``top_p`` of the
    probability (nucleus sampling; 1.0 keeps every token). Generation is batched with the KV cache, so it takes minutes, not
    hours, on two cores. The windows hold no text of any corpus, so they calibrate
    no domain in particular.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    model_device = next(model.parameters()).device
    model.to(device)
    out = []
    try:
        for start in tqdm(range(0, count, batch), desc="sampling calibration text", unit="batch", disable=not progress):
            size = min(batch, count - start)
            ids = allowed[torch.randint(len(allowed), (size, 1), generator=generator)].to(device)
            cache = None
            step_input = ids
            for position in range(tokens - 1):
                result, cache = models.with_cache(model, step_input, cache)
                logits = result.logits[:, -1].float()
                if position < greedy_tokens:
                    following = logits.argmax(dim=-1, keepdim=True)
                else:
                    probabilities = _nucleus(torch.softmax(logits / temperature, dim=-1), top_p).cpu()
                    following = torch.multinomial(probabilities, 1, generator=generator).to(device)
                ids = torch.cat([ids, following], dim=1)
                step_input = following
            out.append(ids.cpu())
    finally:
        model.to(model_device)
    return torch.cat(out)


def _nucleus(probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    """The probabilities with every token outside the top-p nucleus of each row set to zero."""
    if top_p >= 1.0:
        return probabilities
    ordered, order = probabilities.sort(dim=-1, descending=True)
    outside = ordered.cumsum(dim=-1) - ordered > top_p  # the mass before a token already reaches top_p
    return probabilities.scatter(-1, order, ordered.masked_fill(outside, 0.0))
