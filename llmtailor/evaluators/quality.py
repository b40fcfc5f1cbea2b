"""Fidelity and perplexity of a compressed model on held-out text, against its teacher.

Fidelity is the mean over tokens of KL(teacher || compressed) between next-token
distributions: 0 for a perfect copy, and far more sensitive than accuracy, so it is
the search's quality objective. The teacher's log-probabilities are computed once per
process and kept in float32 (8 windows of 256 tokens of a 49k vocabulary is 400 MB) on
the device the teacher runs on; a compressed model is measured on the device it is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llmtailor.errors import UserError


@dataclass(frozen=True)
class Quality:
    """Fidelity and perplexity measured on the evaluation windows."""

    kl: float  # mean KL(teacher || model) per token, in nats
    perplexity: float
    tokens: int
    entropy: float = 0.0  # mean entropy of the model's next-token distribution, in nats (how spread its guesses are)
    window_nll: tuple[float, ...] = ()  # mean negative log-likelihood of each window, for paired comparisons


def evaluation_ids(tokenizer: Any, documents: tuple[str, ...] | list[str], window_tokens: int) -> torch.Tensor:
    """The token ids of the evaluation documents; UserError if they do not fill one window."""
    ids = tokenizer("\n\n".join(documents), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < window_tokens:
        raise UserError(f"the evaluation text has {ids.numel()} tokens; one window needs {window_tokens}: "
                        "give more text (--text) or fewer --window-tokens")
    return ids


class Reference:
    """The evaluation windows and the teacher's next-token log-probabilities on them."""

    def __init__(self, teacher: Any, tokenizer: Any, documents: tuple[str, ...] | list[str],
                 windows: int = 8, window_tokens: int = 256) -> None:
        ids = evaluation_ids(tokenizer, documents, window_tokens)
        available = ids.numel() // window_tokens
        count = min(windows, available)
        # Windows spread over the whole text, not just its start.
        starts = torch.linspace(0, (available - 1) * window_tokens, count).long()
        self._measure_teacher(teacher, torch.stack([ids[s : s + window_tokens] for s in starts]))

    @classmethod
    def of_windows(cls, teacher: Any, input_ids: torch.Tensor) -> Reference:
        """A reference on given token windows, [windows, tokens]."""
        reference = cls.__new__(cls)
        reference._measure_teacher(teacher, input_ids)
        return reference

    def _measure_teacher(self, teacher: Any, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.teacher_logprobs = [log_probs(teacher, window[None])[0] for window in input_ids]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def model_device(model: Any) -> torch.device:
    """The device a model's weights are on."""
    return next(model.parameters()).device


@torch.no_grad()
def log_probs(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities in float32, [batch, tokens, vocab], on the model's device."""
    logits = model(input_ids=input_ids.to(model_device(model)), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def measure(model: Any, reference: Reference, windows: slice = slice(None)) -> Quality:
    """KL to the teacher and perplexity of the model on the reference windows (or a slice of them, a cheap first
    look; ``combined`` joins the parts of one pass)."""
    kl_total, entropy_total, window_nll = 0.0, 0.0, []
    input_ids = reference.input_ids[windows]
    for window, teacher in zip(input_ids, reference.teacher_logprobs[windows], strict=True):
        student = log_probs(model, window[None])[0]
        teacher = teacher.to(student.device)
        kl_total += (teacher.exp() * (teacher - student)).sum().item()
        entropy_total -= (student.exp() * student).sum().item()
        window_nll.append(-student[:-1].gather(1, window[1:, None].to(student.device)).mean().item())
    nll = sum(window_nll) / len(window_nll)  # every window predicts the same number of tokens
    if not math.isfinite(kl_total) or not math.isfinite(nll):
        raise FloatingPointError("the compressed model's outputs are not finite (NaN or inf)")
    tokens = input_ids.numel()
    return Quality(kl=kl_total / tokens, perplexity=math.exp(nll), tokens=tokens, entropy=entropy_total / tokens,
                   window_nll=tuple(window_nll))


def combined(parts: list[Quality]) -> Quality:
    """One Quality from measurements of disjoint window slices of one reference (as if measured at once)."""
    tokens = sum(p.tokens for p in parts)
    window_nll = tuple(n for p in parts for n in p.window_nll)
    return Quality(kl=sum(p.kl * p.tokens for p in parts) / tokens, perplexity=math.exp(sum(window_nll) / len(window_nll)),
                   tokens=tokens, entropy=sum(p.entropy * p.tokens for p in parts) / tokens, window_nll=window_nll)
