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
from llmtailor.compression import blocks as block_runs
from llmtailor.compression import check_supported, compress_cached
from llmtailor.compression.calibration import CalibrationStats, InputStatistics
from llmtailor.evaluators.cost import stored_layers
from llmtailor.plan import CompressionPlan


def _compress(model: Any, names: list[str], plan: CompressionPlan, statistics: CalibrationStats,
              modules: dict[str, Any], quantized_forms: dict[Any, Any] | None) -> None:
    for name in names:
        precision, sparsity = plan.precision_of(name), plan.sparsity_of(name)
        if precision.is_identity and sparsity.is_identity:
            continue
        # (an untied embedding is not among the calibrated modules: compressed without statistics)
        module = modules[name] if name in modules else model.get_submodule(name)
        compressed, quantized, _ = compress_cached(module.weight.data, name, precision, sparsity, statistics, cache=None)
        module.weight.data.copy_(compressed.to(module.weight.dtype))
        if quantized_forms is not None and quantized is not None:
            quantized_forms[module] = quantized


@torch.no_grad()
def compress_sequential(plan: CompressionPlan, teacher: Any, arch: Architecture, windows: torch.Tensor,
                        device: str | torch.device = "cpu", progress: bool = False,
                        quantized_forms: dict[Any, Any] | None = None) -> Any:
    """A compressed copy of the teacher, its blocks compressed in order on the calibration windows.
    ``quantized_forms``: filled with module -> its quantized weight, as ``compression.apply`` fills it."""
    from tqdm.auto import tqdm

    plan.validate(arch)
    check_supported(plan, has_calibration=True, arch=arch)
    device = torch.device(device)
    model = copy.deepcopy(teacher).to(device)
    blocks = block_runs.decoder_blocks(model, arch)
    calls = block_runs.block_inputs(model, blocks[0], windows, device)
    form = None
    for index in tqdm(range(len(blocks)), desc="sequential compression", unit="block", disable=not progress):
        names = [lin.name for lin in arch.linears if lin.block == index]
        block_modules = {name: model.get_submodule(name) for name in names}
        statistics = InputStatistics(block_modules)
        for call in calls:
            statistics.new_pass(block_runs.hidden_of(call).shape[:-1].numel())
            blocks[index](*call[0], **call[1])
        _compress(model, names, plan, statistics.finish(), block_modules, quantized_forms)
        form = block_runs.run_block(blocks[index], calls)  # the compressed block's outputs feed the next block
    rest = [lin.name for lin in stored_layers(arch) if lin.block is None]
    modules = {name: model.get_submodule(arch.lm_head_name if name == arch.embedding.name else name) for name in rest
               if name != arch.embedding.name or arch.tie_embeddings}
    statistics = InputStatistics(modules)
    # The blocks' outputs are known: the last pass replays them and stops before the logits.
    block_runs.run_to_head(model, arch, blocks, calls, form, windows, device,
                           lambda window: statistics.new_pass(window.numel()))
    _compress(model, rest, plan, statistics.finish(), modules, quantized_forms)
    return model.to(next(teacher.parameters()).device)
