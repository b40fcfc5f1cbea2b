"""Sequential mode: compress the decoder blocks in order, each calibrated on what the compressed blocks before it output.

This is the procedure of the GPTQ paper: the inputs of block 0 are captured once;
then for each block, the statistics of its layers' inputs are collected by running
that block on the current inputs, its layers are compressed, and the compressed
block's outputs become the next block's inputs. All layers of a block are calibrated
on the block's input at once (the paper's procedure, not the reference code's
optional "true sequential" order within a block).

Compared with teacher-input mode (``compression.apply`` with statistics from
``calibration.collect``) a layer here depends on every block before it, so nothing
can be cached per layer: this mode is for a final or exported model, not for the
search. Linear layers outside the blocks, and a tied embedding/head, are compressed
last, calibrated on the compressed model's own final hidden states; the blocks are
calibrated with the teacher's embedding lookups (the embedding is one matrix with the
head, and its statistics exist only once the blocks are done).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from llmtailor.arch import Architecture
from llmtailor.compression import check_supported, compress_cached
from llmtailor.compression.calibration import CalibrationStats, InputStatistics
from llmtailor.evaluators.cost import stored_layers
from llmtailor.plan import CompressionPlan


class _Captured(Exception):
    """Raised by the hook on block 0 once it has its inputs: nothing after it needs to run."""


def decoder_blocks(model: Any, arch: Architecture) -> torch.nn.ModuleList:
    """The list of decoder blocks (the ModuleList that holds block 0's layers)."""
    first = next(lin.name for lin in arch.linears if lin.block == 0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == arch.num_layers and first.startswith(f"{name}.0."):
            return module
    raise ValueError(f"cannot find the {arch.num_layers} decoder blocks of this model")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def _block_inputs(model: Any, block: torch.nn.Module, windows: torch.Tensor, device: torch.device) -> list:
    """The (args, kwargs) block 0 is called with, one per window."""
    captured = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(input_ids=window[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _compress(model: Any, names: list[str], plan: CompressionPlan, statistics: CalibrationStats) -> None:
    for name in names:
        precision, sparsity = plan.precision_of(name), plan.sparsity_of(name)
        if precision.is_identity and sparsity.is_identity:
            continue
        weight = model.get_submodule(name).weight
        compressed, _, _ = compress_cached(weight.data, name, precision, sparsity, statistics, cache=None)
        weight.data.copy_(compressed.to(weight.dtype))


@torch.no_grad()
def compress_sequential(plan: CompressionPlan, teacher: Any, arch: Architecture, windows: torch.Tensor,
                        device: str | torch.device = "cpu", progress: bool = False) -> Any:
    """A compressed copy of the teacher, its blocks compressed in order on the calibration windows."""
    from tqdm.auto import tqdm

    plan.validate(arch)
    check_supported(plan, has_calibration=True, arch=arch)
    device = torch.device(device)
    model = copy.deepcopy(teacher).to(device)
    blocks = decoder_blocks(model, arch)
    inputs = _block_inputs(model, blocks[0], windows, device)
    for index in tqdm(range(len(blocks)), desc="sequential compression", unit="block", disable=not progress):
        names = [lin.name for lin in arch.linears if lin.block == index]
        statistics = InputStatistics({name: model.get_submodule(name) for name in names})
        for args, kwargs in inputs:
            statistics.new_pass(_hidden(args, kwargs).shape[:-1].numel())
            blocks[index](*args, **kwargs)
        _compress(model, names, plan, statistics.finish())
        outputs = [blocks[index](*args, **kwargs) for args, kwargs in inputs]
        inputs = [_with_hidden(args, kwargs, out[0] if isinstance(out, tuple) else out)
                  for (args, kwargs), out in zip(inputs, outputs, strict=True)]
    rest = [lin.name for lin in stored_layers(arch) if lin.block is None]
    modules = {name: model.get_submodule(arch.lm_head_name if name == arch.embedding.name else name) for name in rest
               if name != arch.embedding.name or arch.tie_embeddings}
    statistics = InputStatistics(modules)
    for window in windows:
        statistics.new_pass(window.numel())
        model(input_ids=window[None].to(device), use_cache=False)
    _compress(model, rest, plan, statistics.finish())
    return model.to(next(teacher.parameters()).device)
