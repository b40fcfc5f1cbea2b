"""Students: smaller models of the teacher's family that distillation trains.

Two ways to make one. From the plan's ``student`` (blocks, heads, MLP width kept): the
structured cut of ``compression.structure``, which starts from the teacher's own weights
(Minitron's recipe). From a smaller config of the same family (fewer or narrower
blocks): a fresh model whose tensors are copied from the teacher wherever the shapes
allow (``from_config``): the student's blocks take evenly spaced teacher blocks, and a
tensor no larger than the teacher's in every dimension takes the teacher's leading slice
(the first heads, channels and hidden dimensions); the rest keep their random start.
A student that cannot be made (more blocks than the teacher, heads that break the KV
grouping, no blocks, another family or vocabulary) is a one-line PlanError before any
training.
"""

from __future__ import annotations

from typing import Any

import torch

from llmtailor.plan import PlanError


def check_config(teacher_config: Any, config: Any) -> None:
    """Raise PlanError unless `config` is a student the teacher can distill into."""
    if config.model_type != teacher_config.model_type:
        raise PlanError(f"a student must be of the teacher's family ({teacher_config.model_type}), "
                        f"got {config.model_type}")
    if config.vocab_size != teacher_config.vocab_size:
        raise PlanError(f"a student must share the teacher's vocabulary ({teacher_config.vocab_size} tokens), "
                        f"got {config.vocab_size}")
    if not 0 < config.num_hidden_layers <= teacher_config.num_hidden_layers:
        raise PlanError(f"a student keeps between 1 and {teacher_config.num_hidden_layers} blocks, "
                        f"got {config.num_hidden_layers}")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads < 1 or config.num_attention_heads % kv:
        raise PlanError(f"student query heads ({config.num_attention_heads}) must be a positive multiple of its KV "
                        f"heads ({kv})")
    for name in ("hidden_size", "intermediate_size"):
        if getattr(config, name, 1) < 1:
            raise PlanError(f"student {name} must be positive, got {getattr(config, name)}")


def teacher_block(index: int, student_blocks: int, teacher_blocks: int) -> int:
    """The teacher block a student block starts from: evenly spaced, first and last kept."""
    if student_blocks == 1:
        return 0
    return int(index * (teacher_blocks - 1) / (student_blocks - 1) + 0.5)  # halves round up


@torch.no_grad()
def from_config(teacher: Any, config: Any) -> tuple[Any, int]:
    """A student built from `config`, initialized from the teacher where shapes allow; and how many of its
    tensors came from the teacher."""
    from transformers import AutoModelForCausalLM

    check_config(teacher.config, config)
    student = AutoModelForCausalLM.from_config(config).to(next(teacher.parameters()).dtype)
    source = dict(teacher.named_parameters())
    copied = 0
    blocks = config.num_hidden_layers
    for name, tensor in student.named_parameters():
        teacher_name = _teacher_name(name, blocks, teacher.config.num_hidden_layers)
        original = source.get(teacher_name)
        if original is None or original.dim() != tensor.dim() or any(
                s > t for s, t in zip(tensor.shape, original.shape, strict=True)):
            continue
        tensor.copy_(original[tuple(slice(0, s) for s in tensor.shape)])
        copied += 1
    return student.eval().requires_grad_(False), copied


def _teacher_name(name: str, student_blocks: int, teacher_blocks: int) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            parts[i + 1] = str(teacher_block(int(parts[i + 1]), student_blocks, teacher_blocks))
            break
    return ".".join(parts)
