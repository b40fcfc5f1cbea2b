"""Fidelity and perplexity of a compressed model on held-out text, against its teacher.

Fidelity is the mean over tokens of KL(teacher || compressed) between next-token
distributions: 0 for a perfect copy, and far more sensitive than accuracy, so it is
the search's quality objective. The teacher's log-probabilities are computed once per
process, on the device the teacher runs on; a compressed model is measured on the
device it is on.

Kept whole, the teacher's distributions are as large as a small model (float32: 50 MB
per 256-token window at a 49k vocabulary, 268 MB at 262k). ``Reference(top_k=K)``
keeps, per position, the teacher's K most likely tokens and S = K tokens drawn from
the rest in proportion to the teacher's probabilities (a fixed seed, so every plan is
measured against the same draws). KL(p || q) = Σ_top p (log p − log q) + Σ_rest p
(log p − log q): the first sum is exact, the second is P_rest times the mean of
log p − log q over the draws, an unbiased estimate. (Coarsening the rest into one
"other" bin instead underestimated the KL of a 4-bit plan by 3% at K = 1024.) The
search uses ``SEARCH_TOP_K``; its error against the exact KL is measured in
benchmarks/bench_reference.py. ``top_k=None`` keeps the exact distributions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from llmtailor.compression.quantize import row_blocks
from llmtailor.errors import UserError


@dataclass(frozen=True)
class Quality:
    """Fidelity and perplexity measured on the evaluation windows."""

    kl: float  # mean KL(teacher || model) per token, in nats
    perplexity: float
    tokens: int
    # mean entropy of the model's next-token distribution, in nats (how spread its guesses are); None: not measured
    entropy: float | None = None
    window_nll: tuple[float, ...] = ()  # mean negative log-likelihood of each window, for paired comparisons


def evaluation_ids(tokenizer: Any, documents: tuple[str, ...] | list[str], window_tokens: int) -> torch.Tensor:
    """The token ids of the evaluation documents; UserError if they do not fill one window."""
    ids = tokenizer("\n\n".join(documents), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < window_tokens:
        raise UserError(f"the evaluation text has {ids.numel()} tokens; one window needs {window_tokens}: "
                        "give more text (--text) or fewer --window-tokens")
    return ids


SEARCH_TOP_K = 1024


@dataclass(frozen=True)
class TopK:
    """Per position of a window: the teacher's K most likely next tokens, S draws from the others, and the log of
    the others' mass."""

    logprobs: torch.Tensor  # [tokens, K] float32
    indices: torch.Tensor  # [tokens, K] int32
    rest: torch.Tensor  # [tokens] float32: log(1 - sum of the K probabilities); -inf when they hold all of it
    tail_logprobs: torch.Tensor  # [tokens, S] float32: the teacher's log-probabilities of the draws
    tail_indices: torch.Tensor  # [tokens, S] int32: tokens outside the top K, drawn by the teacher's probabilities

    @classmethod
    def of(cls, logprobs: torch.Tensor, k: int, tail_samples: int | None = None, seed: int = 0) -> TopK:
        """The top `k` of [tokens, vocab] log-probabilities and `tail_samples` (default k) draws from the rest
        (a block of positions at a time, which bounds the temporaries of a large vocabulary)."""
        generator = torch.Generator(device=logprobs.device).manual_seed(seed)
        parts = [cls._of(logprobs[rows], k, tail_samples, generator)
                 for rows in row_blocks(logprobs.shape[0], logprobs.shape[1])]
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))

    @classmethod
    def _of(cls, logprobs: torch.Tensor, k: int, tail_samples: int | None, generator: torch.Generator) -> TopK:
        values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        samples = k if tail_samples is None else tail_samples
        empty = torch.zeros(values.shape[0], 0)
        if k >= logprobs.shape[-1]:  # nothing is left out (what _log_rest would give is rounding noise)
            return cls(values, indices.int(), torch.full(values.shape[:-1], -math.inf), empty, empty.int())
        rest = _log_rest(values)
        if samples == 0:
            return cls(values, indices.int(), rest, empty, empty.int())
        weights = logprobs.exp().scatter(1, indices, 0.0)  # the teacher's probabilities outside its top k
        empty_rest = ~torch.isfinite(rest) | (weights.sum(dim=1) == 0)  # (float32 can round the rest to nothing)
        rest = rest.masked_fill(empty_rest, -math.inf)
        weights[empty_rest] = 1.0  # any draw: its weight P_rest is 0
        drawn = torch.multinomial(weights, samples, replacement=True, generator=generator)
        return cls(values, indices.int(), rest, logprobs.gather(1, drawn), drawn.int())

    def kl(self, student: torch.Tensor) -> float:
        """Summed KL(teacher || student) over positions: exact over the top K, estimated from the draws over the
        rest (with no draws: the rest as one "other" bin, which can only underestimate)."""
        device = student.device
        teacher = self.logprobs.to(device)
        ours = student.gather(1, self.indices.to(device).long())
        kept = (teacher.exp() * (teacher - ours)).sum()
        rest_t = self.rest.to(device)
        if self.tail_indices.shape[1]:
            drawn = student.gather(1, self.tail_indices.to(device).long())
            gap = (self.tail_logprobs.to(device) - drawn).mean(dim=1)
        else:
            # The student's "other" mass is floored at e^-80: float32 can round it to 0 where the term is finite.
            gap = rest_t - _log_rest(ours).clamp(min=-80.0)
        # 0 · log(0/q) = 0 where the teacher's K tokens hold all of its mass.
        other = torch.where(torch.isfinite(rest_t), rest_t.exp() * gap, torch.zeros_like(rest_t)).sum()
        return float(kept + other)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logprobs, self.indices, self.rest, self.tail_logprobs,
                                                           self.tail_indices))


def _log_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logprobs))) along the last axis, computed where it is accurate (log1p of -mass)."""
    mass = torch.logsumexp(logprobs, dim=-1)
    return torch.log(-torch.expm1(mass.clamp(max=0.0)))


class Reference:
    """The evaluation windows and the teacher's next-token log-probabilities on them: whole, or each position's
    top ``top_k`` (``TopK``)."""

    def __init__(self, teacher: Any, tokenizer: Any, documents: tuple[str, ...] | list[str],
                 windows: int = 8, window_tokens: int = 256, top_k: int | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k must be at least 1 (or None for whole distributions), got {top_k}")
        self.top_k = top_k
        ids = evaluation_ids(tokenizer, documents, window_tokens)
        available = ids.numel() // window_tokens
        count = min(windows, available)
        # Windows spread over the whole text, not just its start.
        starts = torch.linspace(0, (available - 1) * window_tokens, count).long()
        self._measure_teacher(teacher, torch.stack([ids[s : s + window_tokens] for s in starts]))

    @classmethod
    def of_windows(cls, teacher: Any, input_ids: torch.Tensor, top_k: int | None = None) -> Reference:
        """A reference on given token windows, [windows, tokens]."""
        reference = cls.__new__(cls)
        reference.top_k = top_k
        reference._measure_teacher(teacher, input_ids)
        return reference

    def _measure_teacher(self, teacher: Any, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.teacher_logprobs: list[torch.Tensor | TopK] = []
        for window in input_ids:
            whole = log_probs(teacher, window[None])[0]
            self.teacher_logprobs.append(whole if self.top_k is None else TopK.of(whole, self.top_k))
            del whole  # (a top-k reference never holds two whole windows at once)

    @property
    def bytes(self) -> int:
        """What the teacher's kept distributions take in memory."""
        return sum(t.bytes if isinstance(t, TopK) else t.numel() * t.element_size() for t in self.teacher_logprobs)

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def model_device(model: Any) -> torch.device:
    """The device a model's weights are on."""
    return next(model.parameters()).device


@torch.no_grad()
def log_probs(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities in float32, [batch, tokens, vocab], on the model's device."""
    logits = model(input_ids=input_ids.to(model_device(model)), use_cache=False).logits.float()
    # Normalized in place, a block of positions at a time: at a 262k vocabulary one 256-token window's logits are
    # 268 MB. (log_softmax per row, not logits - logsumexp: that rounds differently enough to drown a KL of 1e-8.)
    flat = logits.view(-1, logits.shape[-1])
    for rows in row_blocks(*flat.shape):
        flat[rows] = torch.log_softmax(flat[rows], dim=-1)
    return logits


@torch.no_grad()
def measure(model: Any, reference: Reference, windows: slice = slice(None), entropy: bool = False) -> Quality:
    """KL to the teacher and perplexity of the model on the reference windows (or a slice of them, a cheap first
    look; ``combined`` joins the parts of one pass); with ``entropy``, the entropy of its predictions too (one
    more pass over every position's whole distribution: a search trial does not need it)."""
    kl_total, entropy_total, window_nll = 0.0, 0.0, []
    input_ids = reference.input_ids[windows]
    for window, teacher in zip(input_ids, reference.teacher_logprobs[windows], strict=True):
        student = log_probs(model, window[None])[0]
        if isinstance(teacher, TopK):
            kl_total += teacher.kl(student)
        else:
            teacher = teacher.to(student.device)
            kl_total += (teacher.exp() * (teacher - student)).sum().item()
        for rows in row_blocks(*student.shape) if entropy else ():  # (no whole-window temporaries: see log_probs)
            entropy_total -= float((student[rows].exp() * student[rows]).sum())
        window_nll.append(-student[:-1].gather(1, window[1:, None].to(student.device)).mean().item())
    nll = sum(window_nll) / len(window_nll)  # every window predicts the same number of tokens
    if not math.isfinite(kl_total) or not math.isfinite(nll):
        raise FloatingPointError("the compressed model's outputs are not finite (NaN or inf)")
    tokens = input_ids.numel()
    return Quality(kl=kl_total / tokens, perplexity=math.exp(nll), tokens=tokens,
                   entropy=entropy_total / tokens if entropy else None, window_nll=tuple(window_nll))


def combined(parts: list[Quality]) -> Quality:
    """One Quality from measurements of disjoint window slices of one reference (as if measured at once)."""
    tokens = sum(p.tokens for p in parts)
    window_nll = tuple(n for p in parts for n in p.window_nll)
    return Quality(kl=sum(p.kl * p.tokens for p in parts) / tokens, perplexity=math.exp(sum(window_nll) / len(window_nll)),
                   tokens=tokens, window_nll=window_nll,
                   entropy=None if any(p.entropy is None for p in parts) else sum(p.entropy * p.tokens for p in parts) / tokens)
