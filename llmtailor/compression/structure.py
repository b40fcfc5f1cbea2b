"""Structured cuts: a really smaller model (fewer blocks, fewer attention heads, a narrower MLP), not a masked one.

What goes is chosen by importance measured on calibration data:
- **blocks**: a block's influence is 1 − the mean cosine similarity of its input and
  output hidden states (ShortGPT's block influence): a block that barely turns the
  residual stream can go. The plan names the blocks kept (``Student.layers``);
  ``blocks_to_keep`` picks them from the influences.
- **heads**: whole KV groups go (a KV head with the query heads that read it), so
  grouped-query attention stays intact and a cut never leaves a query head without its
  key and value. A group's importance is the output energy its heads put through
  o_proj, Σ over their channels c of E[x_c²]·‖W_o[:, c]‖² (the diagonal of o_proj's H).
- **MLP channels**: the same measure through down_proj, E[x_j²]·‖W_down[:, j]‖².

A transformers config holds one head count and one MLP width for every block, so a
cut that saves and reloads with ``AutoModelForCausalLM.from_pretrained`` and no
custom code is uniform in its sizes (``Student.uniform_cut``); which heads and
channels go is still chosen per block. The cut model keeps the teacher's dtype.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtailor import files
from llmtailor.arch import Architecture
from llmtailor.compression.blocks import decoder_blocks, run_until_stopped, stopping_before
from llmtailor.compression.calibration import CalibrationStats
from llmtailor.plan import PlanError, Student


@dataclass
class Importance:
    """Per block: its influence, the importance of each KV group and of each MLP channel."""

    blocks: list[float]
    groups: list[torch.Tensor]  # [num_kv_heads] per block
    channels: list[torch.Tensor]  # [intermediate_size] per block


def _prefix(arch: Architecture, block: int) -> str:
    return next(lin.name for lin in arch.linears if lin.block == block).rsplit(".", 2)[0]


@torch.no_grad()
def block_influence(model: Any, arch: Architecture, windows: torch.Tensor) -> list[float]:
    """1 − mean cosine similarity between each block's input and output hidden states, over the windows' tokens."""
    blocks = decoder_blocks(model, arch)
    sums = [0.0] * len(blocks)
    tokens = 0
    device = next(model.parameters()).device

    def hook(index: int):
        def record(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            sums[index] += float(torch.nn.functional.cosine_similarity(before, after, dim=-1).sum())
        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with stopping_before(model.get_output_embeddings()):  # the logits are not needed
            for window in windows:
                run_until_stopped(model, window, device)
                tokens += window.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [1 - s / tokens for s in sums]


def importance(model: Any, arch: Architecture, stats: CalibrationStats, windows: torch.Tensor) -> Importance:
    """Block influence (a pass over `windows`) and head-group and channel importance (from `stats`)."""
    groups, channels = [], []
    per_group = arch.num_heads // arch.num_kv_heads * arch.head_dim
    for block in range(arch.num_layers):
        prefix = _prefix(arch, block)
        energy = {}
        for kind in ("self_attn.o_proj", "mlp.down_proj"):
            name = f"{prefix}.{kind}"
            weight = model.get_submodule(name).weight.float()
            energy[kind] = torch.diagonal(stats.hessian(name)).to(weight.device) * (weight**2).sum(dim=0)
        groups.append(energy["self_attn.o_proj"].reshape(arch.num_kv_heads, per_group).sum(dim=1).cpu())
        channels.append(energy["mlp.down_proj"].cpu())
    return Importance(block_influence(model, arch, windows), groups, channels)


def load_or_measure(model: Any, arch: Architecture, stats: CalibrationStats,
                    windows: torch.Tensor | Callable[[], torch.Tensor], key: str, cache: Path) -> Importance:
    """The importance for this calibration key from the cache folder, measured and stored there first if missing
    or unreadable (a search measures it once per model and calibration; every later process reads it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def read(path: Path) -> Importance:
        with safe_open(path, "pt") as f:
            blocks, groups, channels = (f.get_tensor(k) for k in ("blocks", "groups", "channels"))
        if len(blocks) != arch.num_layers:
            raise ValueError("importance of another model")
        return Importance(blocks.tolist(), list(groups), list(channels))

    def write(found: Importance, path: Path) -> None:
        tensors = {"blocks": torch.tensor(found.blocks, dtype=torch.float64), "groups": torch.stack(found.groups),
                   "channels": torch.stack(found.channels)}
        files.write_with(path, lambda staging: save_file(tensors, staging))

    return files.load_or_make(cache / "importance" / f"{key}.safetensors", read,
                              lambda: importance(model, arch, stats, windows() if callable(windows) else windows),
                              write)


def blocks_to_keep(influence: list[float], count: int) -> tuple[int, ...]:
    """The `count` blocks of most influence, in order."""
    if not 0 < count <= len(influence):
        raise PlanError(f"a student keeps between 1 and {len(influence)} blocks, got {count}")
    ranked = sorted(range(len(influence)), key=lambda b: influence[b], reverse=True)
    return tuple(sorted(ranked[:count]))


@dataclass(frozen=True)
class Cut:
    """What a structured cut keeps: the blocks, and per kept block the KV groups and MLP channels (sorted)."""

    blocks: tuple[int, ...]
    groups: dict[int, torch.Tensor]  # KV groups kept, per block; absent: all
    channels: dict[int, torch.Tensor]  # MLP channels kept, per block; absent: all
    heads: int  # query heads per kept block
    width: int  # MLP channels per kept block

    def module_name(self, teacher_name: str, arch: Architecture) -> str | None:
        """The name a teacher layer has in the cut model (its block renumbered), or None when its block is gone."""
        lin = _block_linear(arch, teacher_name)
        block = None if lin is None else lin.block
        if block is None:
            return teacher_name
        if block not in self.blocks:
            return None
        prefix = _prefix(arch, block)
        return f"{prefix.rsplit('.', 1)[0]}.{self.blocks.index(block)}{teacher_name[len(prefix):]}"

    def reshaped(self, teacher_name: str, arch: Architecture) -> bool:
        """Whether the cut changed this layer's shape (its cached compressed forms do not apply)."""
        lin = _block_linear(arch, teacher_name)
        if lin is None or lin.block is None:
            return False
        attention = lin.kind in ("q_proj", "k_proj", "v_proj", "o_proj") and lin.block in self.groups
        return attention or (lin.kind in ("gate_proj", "up_proj", "down_proj") and lin.block in self.channels)

    def kept(self, teacher_name: str, arch: Architecture) -> str | None:
        """What the cut kept of a layer it reshaped, as text for the layer cache's key (None when not reshaped):
        the KV groups of an attention layer's block or the MLP channels of an MLP layer's."""
        if not self.reshaped(teacher_name, arch):
            return None
        lin = _block_linear(arch, teacher_name)
        if lin.block in self.groups and lin.kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
            return f"groups {self.groups[lin.block].tolist()} of {arch.num_kv_heads}"
        return f"channels {hashlib.sha256(self.channels[lin.block].numpy().tobytes()).hexdigest()[:16]} " \
               f"({len(self.channels[lin.block])} of {arch.intermediate_size})"

    def inputs(self, teacher_name: str, arch: Architecture, head_dim: int, per_group: int) -> torch.Tensor | None:
        """The teacher's input columns a cut layer still reads (o_proj and down_proj), or None when all."""
        lin = _block_linear(arch, teacher_name)
        if lin is None or lin.block is None:
            return None
        if lin.kind == "o_proj" and lin.block in self.groups:
            return _query_channels(self.groups[lin.block], head_dim, per_group)
        if lin.kind == "down_proj" and lin.block in self.channels:
            return self.channels[lin.block]
        return None


def _block_linear(arch: Architecture, name: str):
    """The linear layer of that name, or None for the embedding (which no cut changes)."""
    return None if name == arch.embedding.name else arch.linear(name)


def _query_channels(groups: torch.Tensor, head_dim: int, per_group: int) -> torch.Tensor:
    query_heads = (groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)
    return (query_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def choose(arch: Architecture, student: Student, scores: Importance) -> Cut:
    """The parts a student keeps: its blocks, and in each the most important KV groups and MLP channels."""
    layers, heads, width = student.uniform_cut(arch.num_layers)
    kept = tuple(range(arch.num_layers)) if layers is None else tuple(layers)
    heads, width = heads or arch.num_heads, width or arch.intermediate_size
    per_group = arch.num_heads // arch.num_kv_heads
    if heads % per_group or not 0 < heads <= arch.num_heads:
        raise PlanError(f"student heads must be a positive multiple of {per_group} up to {arch.num_heads}, got {heads}")
    groups = {b: torch.sort(scores.groups[b].topk(heads // per_group).indices).values
              for b in kept if heads < arch.num_heads}
    channels = {b: torch.sort(scores.channels[b].topk(width).indices).values
                for b in kept if width < arch.intermediate_size}
    return Cut(kept, groups, channels, heads, width)


def _rows(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return weight.index_select(0, index.to(weight.device))  # a new tensor


def _columns(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return weight.index_select(1, index.to(weight.device))


@torch.no_grad()
def cut(model: Any, arch: Architecture, chosen: Cut, share: bool = False,
        into: Callable[[torch.nn.Parameter], bool] | None = None) -> Any:
    """A smaller copy of `model` holding only what `chosen` keeps, with its config updated to match. ``share``: the
    tensors the cut leaves whole are `model`'s own (``compression.sharing_copy``), for reading only. ``into``: a
    cut weight is written into the front of the memory of the `model` weight it is cut from where ``into`` accepts
    that weight (a search trial, which restores the teacher afterwards: the cut then takes no new memory)."""
    per_group = arch.num_heads // arch.num_kv_heads
    if share:
        from llmtailor.compression import sharing_copy

        small = sharing_copy(model)
    else:
        small = copy.deepcopy(model)
    blocks = decoder_blocks(small, arch)
    for index in chosen.blocks:
        attention, mlp = blocks[index].self_attn, blocks[index].mlp
        if index in chosen.groups:
            groups = chosen.groups[index]
            kv = (groups[:, None] * arch.head_dim + torch.arange(arch.head_dim)).reshape(-1)
            q = _query_channels(groups, arch.head_dim, per_group)
            _shrink(attention.q_proj, rows=q, into=into)
            _shrink(attention.k_proj, rows=kv, into=into)
            _shrink(attention.v_proj, rows=kv, into=into)
            _shrink(attention.o_proj, columns=q, into=into)  # query heads per KV head are unchanged: repeat_kv still fits
        if index in chosen.channels:
            _shrink(mlp.gate_proj, rows=chosen.channels[index], into=into)
            _shrink(mlp.up_proj, rows=chosen.channels[index], into=into)
            _shrink(mlp.down_proj, columns=chosen.channels[index], into=into)
    remaining = torch.nn.ModuleList([blocks[i] for i in chosen.blocks])
    for position, block in enumerate(remaining):
        block.self_attn.layer_idx = position  # the KV cache is indexed by a block's position
    _replace_blocks(small, blocks, remaining)
    config = small.config
    config.num_hidden_layers = len(chosen.blocks)
    config.num_attention_heads, config.num_key_value_heads = chosen.heads, chosen.heads // per_group
    config.head_dim, config.intermediate_size = arch.head_dim, chosen.width
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in chosen.blocks]
    return small


def _shrink(linear: torch.nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None,
            into: Callable[[torch.nn.Parameter], bool] | None = None) -> None:
    """Keep only the given output rows or input columns of a linear layer (and its bias)."""
    if rows is not None:
        linear.weight = _placed(linear.weight, _rows(linear.weight.data, rows), into)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data.index_select(0, rows.to(linear.bias.device)).clone())
        linear.out_features = len(rows)
    if columns is not None:
        linear.weight = _placed(linear.weight, _columns(linear.weight.data, columns), into)
        linear.in_features = len(columns)


@torch.no_grad()
def _placed(old: torch.nn.Parameter, new: torch.Tensor, into: Callable[[torch.nn.Parameter], bool] | None,
            ) -> torch.nn.Parameter:
    """`new` (what a cut keeps of `old`) as a parameter: in the front of `old`'s memory where ``into`` accepts `old`
    (the bytes after it are left as they were), else a tensor of its own."""
    if into is not None and old.data.is_contiguous() and new.numel() <= old.numel() and into(old):
        front = old.data.view(-1)[: new.numel()].view(new.shape)
        front.copy_(new)
        return torch.nn.Parameter(front, old.requires_grad)
    return torch.nn.Parameter(new)


def _replace_blocks(model: Any, old: torch.nn.ModuleList, new: torch.nn.ModuleList) -> None:
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError(f"cannot replace the decoder blocks of {type(model).__name__}")


def masked(model: Any, arch: Architecture, chosen: Cut) -> Any:
    """The teacher with the same parts zeroed instead of removed (o_proj and down_proj columns; a removed block's
    o_proj and down_proj entirely, which makes it the identity on the residual stream): what ``cut`` must equal."""
    per_group = arch.num_heads // arch.num_kv_heads
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for index, block in enumerate(decoder_blocks(twin, arch)):
            o, down = block.self_attn.o_proj.weight, block.mlp.down_proj.weight
            if index not in chosen.blocks:
                o.zero_()
                down.zero_()
                continue
            if index in chosen.groups:
                keep = torch.zeros(o.shape[1], dtype=torch.bool)
                keep[_query_channels(chosen.groups[index], arch.head_dim, per_group)] = True
                o[:, ~keep.to(o.device)] = 0
            if index in chosen.channels:
                keep = torch.zeros(down.shape[1], dtype=torch.bool)
                keep[chosen.channels[index]] = True
                down[:, ~keep.to(down.device)] = 0
    return twin
