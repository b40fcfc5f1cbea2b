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
from dataclasses import dataclass
from typing import Any

import torch

from llmtailor.arch import Architecture
from llmtailor.compression.calibration import CalibrationStats
from llmtailor.compression.sequential import decoder_blocks
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
        for window in windows:
            model(input_ids=window[None].to(device), use_cache=False)
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


def blocks_to_keep(influence: list[float], count: int) -> tuple[int, ...]:
    """The `count` blocks of most influence, in order."""
    if not 0 < count <= len(influence):
        raise PlanError(f"a student keeps between 1 and {len(influence)} blocks, got {count}")
    ranked = sorted(range(len(influence)), key=lambda b: influence[b], reverse=True)
    return tuple(sorted(ranked[:count]))


def _rows(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return weight.index_select(0, index.to(weight.device)).clone()


def _columns(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return weight.index_select(1, index.to(weight.device)).clone()


@torch.no_grad()
def cut(model: Any, arch: Architecture, student: Student, scores: Importance) -> Any:
    """A smaller copy of `model`: the student's blocks, heads and MLP width, the least important parts removed."""
    layers, heads, width = student.uniform_cut(arch.num_layers)
    kept = tuple(range(arch.num_layers)) if layers is None else layers
    heads, width = heads or arch.num_heads, width or arch.intermediate_size
    per_group = arch.num_heads // arch.num_kv_heads
    if heads % per_group or not 0 < heads <= arch.num_heads:
        raise PlanError(f"student heads must be a positive multiple of {per_group} up to {arch.num_heads}, got {heads}")
    groups = heads // per_group
    small = copy.deepcopy(model)
    blocks = decoder_blocks(small, arch)
    for index in kept:
        block = blocks[index]
        attention, mlp = block.self_attn, block.mlp
        if groups < arch.num_kv_heads:
            chosen = torch.sort(scores.groups[index].topk(groups).indices).values
            kv = (chosen[:, None] * arch.head_dim + torch.arange(arch.head_dim)).reshape(-1)
            query_heads = (chosen[:, None] * per_group + torch.arange(per_group)).reshape(-1)
            q = (query_heads[:, None] * arch.head_dim + torch.arange(arch.head_dim)).reshape(-1)
            _shrink(attention.q_proj, rows=q)
            _shrink(attention.k_proj, rows=kv)
            _shrink(attention.v_proj, rows=kv)
            _shrink(attention.o_proj, columns=q)  # query heads per KV head are unchanged: repeat_kv still fits
        if width < arch.intermediate_size:
            channels = torch.sort(scores.channels[index].topk(width).indices).values
            _shrink(mlp.gate_proj, rows=channels)
            _shrink(mlp.up_proj, rows=channels)
            _shrink(mlp.down_proj, columns=channels)
    remaining = torch.nn.ModuleList([blocks[i] for i in kept])
    for position, block in enumerate(remaining):
        block.self_attn.layer_idx = position  # the KV cache is indexed by a block's position
    _replace_blocks(small, blocks, remaining)
    config = small.config
    config.num_hidden_layers = len(kept)
    config.num_attention_heads, config.num_key_value_heads = heads, groups
    config.head_dim, config.intermediate_size = arch.head_dim, width
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    return small


def _shrink(linear: torch.nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
    """Keep only the given output rows or input columns of a linear layer (and its bias)."""
    if rows is not None:
        linear.weight = torch.nn.Parameter(_rows(linear.weight.data, rows))
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data.index_select(0, rows.to(linear.bias.device)).clone())
        linear.out_features = len(rows)
    if columns is not None:
        linear.weight = torch.nn.Parameter(_columns(linear.weight.data, columns))
        linear.in_features = len(columns)


def _replace_blocks(model: Any, old: torch.nn.ModuleList, new: torch.nn.ModuleList) -> None:
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError(f"cannot replace the decoder blocks of {type(model).__name__}")


def masked(model: Any, arch: Architecture, student: Student, scores: Importance) -> Any:
    """The teacher with the same parts zeroed instead of removed (o_proj and down_proj columns; a removed block's
    o_proj and down_proj entirely, which makes it the identity on the residual stream): what ``cut`` must equal."""
    layers, heads, width = student.uniform_cut(arch.num_layers)
    kept = set(range(arch.num_layers) if layers is None else layers)
    heads, width = heads or arch.num_heads, width or arch.intermediate_size
    per_group = arch.num_heads // arch.num_kv_heads
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for index, block in enumerate(decoder_blocks(twin, arch)):
            o, down = block.self_attn.o_proj.weight, block.mlp.down_proj.weight
            if index not in kept:
                o.zero_()
                down.zero_()
                continue
            gone = torch.ones(arch.num_kv_heads, dtype=torch.bool)
            gone[scores.groups[index].topk(heads // per_group).indices] = False
            o.view(o.shape[0], arch.num_kv_heads, -1)[:, gone.to(o.device)] = 0
            dropped = torch.ones(arch.intermediate_size, dtype=torch.bool)
            dropped[scores.channels[index].topk(width).indices] = False
            down[:, dropped.to(down.device)] = 0
    return twin
