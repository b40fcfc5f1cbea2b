"""Running a causal LM one decoder block at a time over many windows.

Two passes need this: the statistics pass (``calibration.collect``), which keeps only
one block's XᵀX sums in memory at a time, and the sequential GPTQ driver
(``compression.sequential``), which compresses a block before computing what the next
one sees. Both capture what block 0 is called with for every window, run a block over
all windows, and hand its outputs on as the next block's inputs, so the memory they
hold is the hidden states of the windows (128 x 512 tokens of a 576-wide model:
151 MB in float32), not a whole forward pass's worth of anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from llmtailor.arch import Architecture


class _Captured(Exception):
    """Raised by a hook once it has what it came for: nothing after it in the forward pass needs to run."""


def decoder_blocks(model: Any, arch: Architecture) -> torch.nn.ModuleList:
    """The list of decoder blocks (the ModuleList that holds block 0's layers)."""
    first = next(lin.name for lin in arch.linears if lin.block == 0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == arch.num_layers and first.startswith(f"{name}.0."):
            return module
    raise ValueError(f"cannot find the {arch.num_layers} decoder blocks of this model")


def hidden_of(call: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden states a block call carries."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same block call carrying other hidden states."""
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def output_hidden(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple in older transformers)."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def block_inputs(model: Any, block: torch.nn.Module, windows: torch.Tensor, device: torch.device | str) -> list:
    """The (args, kwargs) block 0 is called with, one per window (the model stops there)."""
    captured = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            with contextlib.suppress(_Captured):
                model(input_ids=window[None].to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: torch.nn.Module, calls: list, before: Callable[[tuple], None] | None = None) -> Any:
    """Run the block on every call, replacing each call's hidden states by the block's output as it goes (so
    the old and new hidden states of only one window coexist); ``before(call)`` runs before each. Returns the
    last raw output (its form)."""
    output = None
    for index, call in enumerate(calls):
        if before is not None:
            before(call)
        output = block(*call[0], **call[1])
        calls[index] = with_hidden(call, output_hidden(output))
    return output


@contextlib.contextmanager
def replayed(blocks: torch.nn.ModuleList, finals: list[torch.Tensor], form: Any) -> Iterator[None]:
    """While open, a forward pass of the model skips its blocks: the first block returns the next window's final
    hidden states (from ``finals``, in order) and the others pass theirs on, each in the form (``form``: a raw
    block output) the model's loop expects. What runs outside the blocks (final norm, head) runs as usual."""
    remaining = iter(finals)

    def returning(hidden: torch.Tensor) -> Any:
        return (hidden, *form[1:]) if isinstance(form, tuple) else hidden

    def first(*args: Any, **kwargs: Any) -> Any:
        return returning(next(remaining))

    def passing(*args: Any, **kwargs: Any) -> Any:
        return returning(hidden_of((args, kwargs)))

    for index, block in enumerate(blocks):
        block.forward = first if index == 0 else passing
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute goes; the class's forward is seen again


@contextlib.contextmanager
def stopping_before(module: torch.nn.Module) -> Iterator[None]:
    """While open, a forward pass ends (silently) when it reaches `module`, after that module's other pre-hooks
    ran: a pass that wants the head's input need not compute the logits (vocabulary x tokens floats)."""

    def stop(module: torch.nn.Module, args: tuple) -> None:
        raise _Captured

    handle = module.register_forward_pre_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def run_until_stopped(model: Any, window: torch.Tensor, device: torch.device | str) -> None:
    """One forward pass of a window, which a ``stopping_before`` hook may end early."""
    with contextlib.suppress(_Captured):
        model(input_ids=window[None].to(device), use_cache=False)


@torch.no_grad()
def run_to_head(model: Any, arch: Architecture, blocks: torch.nn.ModuleList, calls: list, form: Any,
                windows: torch.Tensor, device: torch.device | str, before: Callable[[torch.Tensor], None]) -> None:
    """Once every block has run (``calls`` hold the last block's outputs), one pass per window of what the model
    runs outside its blocks, the blocks replayed and the pass stopped before the head (``before(window)`` runs
    first): how the head's input statistics are collected without running the blocks again or the logits."""
    finals = [hidden_of(call) for call in calls]
    with replayed(blocks, finals, form), stopping_before(model.get_submodule(arch.lm_head_name)):
        for window in windows:
            before(window)
            run_until_stopped(model, window, device)
