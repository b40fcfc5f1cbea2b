"""Knowledge distillation: a student trained to give the teacher's next-token distributions.

The teacher's targets are computed once per (teacher, windows, temperature, k) and kept
compactly: per token, the teacher's k most likely tokens and their log-probabilities at
the temperature, normalized over the whole vocabulary, plus the probability left to all
other tokens. A full 49,152-way distribution per token of 128 windows of 512 tokens
would be 12 GB in float32; top-64 is 32 MB. The loss is then the exact KL divergence
between the two distributions coarsened to those k tokens and one bucket for the rest:
a lower bound of the full KL, equal to it when the teacher's rest mass is spread as the
student's is (what top-k costs in quality is measured in the distillation benchmark).

Loss: KL(teacher_T ‖ student_T) · T² (Hinton et al.: the T² keeps gradients comparable
across temperatures), plus ``ce_weight`` times the next-token cross-entropy on the text
itself, plus ``hidden_weight`` times the mean squared distance between the student's and
the teacher's final hidden states (after the final norm; the hidden width is never cut, so
they align), divided by the teacher's mean square so the term is scale-free. The final
hidden states are kept in float16 with the targets (576 values a token for the default
model: 75 MB for 512 windows of 128 tokens); per-block states would be 30 times that.
Given the ``teacher`` itself, ``distill`` computes its full distribution and hidden states
for every batch instead (online: exact, and the teacher's forward pass on every step);
the benchmark uses it to measure what top-k costs. AdamW, linear warm-up over the first ``WARMUP_SHARE`` of the steps then cosine
decay to zero, gradients clipped to ``CLIP_NORM``, windows drawn in a seeded order.

Quantization-aware training (``recipe.qat``): the named linear layers compute with their
weights as the real round-to-nearest quantizer rounds them (the very same grid, float16
scales included), and the gradient passes straight through the rounding to the float
weights (the straight-through estimator). At the end the float weights stay, for the
plan's quantizer (RTN or GPTQ) to quantize: they have learned to sit well on its grid.

LoRA recovery (``recipe.lora_rank`` r > 0): every linear layer of the decoder blocks keeps
its weight frozen and learns W + B·A·(LORA_ALPHA / r) with A (r × inputs, small random) and
B (outputs × r, zeros, so training starts from the cut model); the adapters add x·Aᵀ·Bᵀ to
the layer's output (W + B·A is never formed during training), and at the end each layer's
adapter is merged, so the student is again a plain model of the same shapes. W is only read
while training, so it may be the teacher's own tensor (the search's students share them);
the merge makes a new tensor unless the caller allows writing into W (a search trial, which
restores the teacher's tensors afterwards). The run returns the adapters (``Trained.adapters``),
so a student can be kept as its factors and rebuilt with ``merge_adapters`` from the cut it
started from: rank r of an n × m layer is r·(n + m) numbers where the merged weight is n·m.

Memory of a step: each decoder block's activations are recomputed in the backward pass
(``recomputed_activations``), and the logits are formed ``LOSS_TOKENS`` tokens at a time
and recomputed too (``_loss_by_pieces``), where the model's logits are its head applied to
its final hidden states (checked once per run; otherwise the whole logits, as with the
teacher online). ``windows_per_pass`` splits a step's batch into passes whose gradients
add up. ``training_bytes`` predicts what a run adds at its peak, which
``compression.trained`` checks against the memory available before it trains.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmtailor import files
from llmtailor.compression.quantize import QUANTIZERS
from llmtailor.plan import Distillation, LayerPrecision, PlanError

WARMUP_SHARE = 0.05
LOSS_TOKENS = 128  # tokens whose logits one piece of the loss forms (`_loss_by_pieces`)
CLIP_NORM = 1.0
LORA_ALPHA = 16.0


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's top-k next-token log-probabilities at a temperature, for every position of the windows."""

    windows: torch.Tensor  # (n, T) token ids
    top_ids: torch.Tensor  # (n, T, k) int32
    top_logprobs: torch.Tensor  # (n, T, k) float32, log p_T over the whole vocabulary
    temperature: float
    hidden: torch.Tensor | None = None  # (n, T, d) float16: the teacher's final hidden states, when kept

    @property
    def rest_logprob(self) -> torch.Tensor:
        """log of the probability the teacher leaves to every token outside its top k."""
        return torch.log1p(-self.top_logprobs.exp().sum(-1).clamp(max=1 - 1e-6))


@torch.no_grad()
def teacher_targets(teacher: Any, windows: torch.Tensor, temperature: float, top_k: int,
                    device: str | torch.device = "cpu", batch_size: int = 4, hidden: bool = False) -> TeacherTargets:
    """Run the teacher once over the windows and keep its top-k log-probabilities at the temperature (and with
    ``hidden`` its final hidden states)."""
    if top_k < 1:
        raise PlanError(f"distillation keeps the teacher's top k tokens, k at least 1, got {top_k}")
    ids, logprobs, states = [], [], []
    for start in range(0, len(windows), batch_size):
        out = teacher(windows[start:start + batch_size].to(device), output_hidden_states=hidden)
        logits = out.logits.float() / temperature
        top = torch.log_softmax(logits, dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        logprobs.append(top.values.cpu())
        if hidden:
            states.append(out.hidden_states[-1].to(torch.float16).cpu())
    return TeacherTargets(windows.cpu(), torch.cat(ids), torch.cat(logprobs), temperature,
                          torch.cat(states) if hidden else None)


def load_or_compute_targets(teacher: Any, windows: torch.Tensor, temperature: float, top_k: int, key: str,
                            cache: Path, device: str | torch.device = "cpu", hidden: bool = False) -> TeacherTargets:
    """The targets for (`key`: teacher and windows, temperature, k) from the cache, computed and stored first if
    missing or unreadable (written atomically, so a killed writer leaves no half file)."""
    from safetensors.torch import load_file, save_file

    def read(path: Path) -> TeacherTargets:
        stored = load_file(path)
        return TeacherTargets(stored["windows"], stored["top_ids"], stored["top_logprobs"], temperature,
                              stored.get("hidden"))

    def write(targets: TeacherTargets, path: Path) -> None:
        tensors = {"windows": targets.windows, "top_ids": targets.top_ids, "top_logprobs": targets.top_logprobs}
        if hidden:
            tensors["hidden"] = targets.hidden
        files.write_with(path, lambda staging: save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging)))

    return files.load_or_make(cache / "teacher" / f"{key}-t{temperature:g}-k{top_k}{'-h' if hidden else ''}.safetensors",
                              read, lambda: teacher_targets(teacher, windows, temperature, top_k, device, hidden=hidden),
                              write)


def kd_loss(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) on the teacher's top k plus a rest bucket, at the temperature, × T²."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_top = log_q.gather(-1, top_ids.long())
    p_top = top_logprobs.exp()
    p_rest = (1 - p_top.sum(-1)).clamp(min=0)
    q_rest = (1 - log_q_top.exp().sum(-1)).clamp(min=1e-12)
    kl = (p_top * (top_logprobs - log_q_top)).sum(-1)
    kl = kl + torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp(min=1e-12)) - torch.log(q_rest)),
                          torch.zeros_like(p_rest))
    return kl.mean() * temperature**2


def full_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) over the whole vocabulary, at the temperature, × T²."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the final hidden states, divided by the teacher's mean square (scale-free)."""
    teacher_hidden = teacher_hidden.float()
    return (student_hidden.float() - teacher_hidden).pow(2).mean() / teacher_hidden.pow(2).mean().clamp(min=1e-12)


def learning_rate_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up to `peak` over the first WARMUP_SHARE of the steps, then cosine decay to zero."""
    warmup = max(1, math.ceil(WARMUP_SHARE * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


class FakeQuantize(torch.nn.Module):
    """A weight parametrization: forward, the weight as the real quantizer rounds it; backward, the identity."""

    def __init__(self, precision: LayerPrecision) -> None:
        super().__init__()
        self.precision = precision

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rounded = QUANTIZERS["rtn"](weight.detach(), self.precision).dequantize().to(weight)
        return weight + (rounded - weight).detach()


@contextlib.contextmanager
def fake_quantized(model: Any, precision: Mapping[str, LayerPrecision]) -> Iterator[None]:
    """Within the block, the named linear layers (module names of `model`) compute with fake-quantized weights."""
    from torch.nn.utils import parametrize

    modules = dict(model.named_modules())
    missing = sorted(set(precision) - set(modules))
    if missing:
        raise PlanError(f"quantization-aware training names layers the student does not have: {missing[:3]}")
    chosen = {name: p for name, p in precision.items() if p.bits < 16}
    for name, p in chosen.items():
        parametrize.register_parametrization(modules[name], "weight", FakeQuantize(p))
    try:
        yield
    finally:
        for name in chosen:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)


class LowRankAdapter(torch.nn.Module):
    """The trained part of a LoRA linear layer: x ↦ (x·Aᵀ)·Bᵀ·scale, added to the frozen layer's output."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        out, width = weight.shape
        self.a = torch.nn.Parameter(torch.randn(rank, width, generator=generator).to(weight) / math.sqrt(width))
        self.b = torch.nn.Parameter(torch.zeros(out, rank, dtype=weight.dtype, device=weight.device))
        self.scale = LORA_ALPHA / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b) * self.scale


def named_block_linears(model: Any) -> dict[str, torch.nn.Linear]:
    """The linear layers of the model's decoder blocks by module name: those LoRA adapts (and `training_bytes`
    counts)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def block_linears(model: Any) -> list[torch.nn.Linear]:
    """The linear layers of the model's decoder blocks (`named_block_linears` without the names)."""
    return list(named_block_linears(model).values())


@torch.no_grad()
def merge_adapters(model: Any, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   merge_into: Callable[[torch.nn.Parameter], bool] | None = None) -> None:
    """Add each adapter (A, B of the module it names: r x inputs, outputs x r) to its layer's weight as
    B·A·(LORA_ALPHA / r): in place where ``merge_into`` accepts the weight, else into a new tensor (the frozen
    weight may be the teacher's). Training's own merge is this call, so a student rebuilt from kept adapters on
    the cut it started from has the same weights."""
    modules = named_block_linears(model)
    for name, (a, b) in adapters.items():
        module = modules[name]
        weight = module.weight
        delta = (b.to(weight.device) @ a.to(weight.device)).to(weight) * (LORA_ALPHA / a.shape[0])
        if merge_into is not None and merge_into(weight):
            weight.add_(delta)
        else:
            module.weight = torch.nn.Parameter(weight + delta, requires_grad=False)


@contextlib.contextmanager
def low_rank_adapters(model: Any, rank: int, seed: int,
                      merge_into: Callable[[torch.nn.Parameter], bool] | None = None,
                      ) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, only low-rank adapters of the decoder blocks' linear layers train; on exit each is merged
    (``merge_adapters``: into the layer's weight where ``merge_into`` accepts it, else into a new tensor, since a
    frozen weight may be the teacher's), and the dict yielded is filled with the trained (A, B) by module name.
    The adapters add their output to the frozen layer's (a forward hook), so no full-size weight is formed per
    step; the frozen weights are only read, so they may be shared."""
    generator = torch.Generator().manual_seed(seed)
    chosen = named_block_linears(model)
    if not chosen:
        raise PlanError("LoRA recovery found no linear layers in the student's decoder blocks")
    model.requires_grad_(False)
    hooks, trained = [], {}
    for module in chosen.values():
        module.add_module("lora_adapter", LowRankAdapter(module.weight, rank, generator))
        hooks.append(module.register_forward_hook(lambda m, args, out: out + m.lora_adapter(args[0])))
    try:
        yield trained
    finally:
        for hook in hooks:
            hook.remove()
        adapters = {name: (m.lora_adapter.a.detach(), m.lora_adapter.b.detach()) for name, m in chosen.items()}
        for module in chosen.values():
            del module.lora_adapter
        merge_adapters(model, adapters, merge_into)
        trained.update(adapters)
        model.requires_grad_(False)


# What a training step holds beyond its trained state, activations and logits: glibc's heap keeps freed activation
# blocks between live ones. Measured on the default model (bench_distill_memory.py): 240-320 MB over the rest.
HEAP_ALLOWANCE_BYTES = 256 << 20


def training_bytes(student: Any, recipe: Distillation, tokens_per_pass: int, shared: set[int] = frozenset()) -> int:
    """What training `student` under `recipe` adds at its peak to the memory the student already takes, predicted
    (bytes, float32): the trained state (for full-weight training each weight's gradient and AdamW's two moments;
    with LoRA the adapters' weights, gradients and moments), the merged weights LoRA makes new where the student
    shares a layer's weight (`shared`: the data pointers of tensors that stay, such as the teacher's), a pass's
    activations (each block's input kept, recomputed once in the backward pass) and its logits in pieces, and
    ``HEAP_ALLOWANCE_BYTES``. An upper bound on the measured rise of every variant of bench_distill_memory.py."""
    config = student.config
    blocks = block_linears(student)
    if recipe.lora_rank:
        adapters = sum(recipe.lora_rank * sum(m.weight.shape) for m in blocks)
        merged = sum(m.weight.numel() for m in blocks if m.weight.data_ptr() in shared)
        state = 4 * adapters + merged
    else:
        state = 3 * sum(p.numel() for p in student.parameters())
    activations = tokens_per_pass * config.hidden_size * 2 * (config.num_hidden_layers + 8)
    logits = 4 * min(tokens_per_pass, LOSS_TOKENS) * config.vocab_size
    return 4 * (state + activations + logits) + HEAP_ALLOWANCE_BYTES


class NotEnoughMemory(PlanError):
    """Training a student would take more memory than the machine has available: refused before it starts."""


@dataclass
class Trained:
    """What a distillation run did: its loss after each step, steps taken and seconds spent, and with LoRA the
    trained adapters (A, B) by module name, already merged into the student."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def distill(student: Any, targets: TeacherTargets, recipe: Distillation, *, device: str | torch.device = "cpu",
            seed: int = 0, batch_size: int = 4, progress: Callable[[int, float], None] | None = None,
            qat_precision: Mapping[str, LayerPrecision] | None = None, teacher: Any = None,
            windows_per_pass: int | None = None, merge_into: Callable[[torch.nn.Parameter], bool] | None = None,
            ) -> Trained:
    """Train `student` in place for `recipe.steps` steps on the targets; it ends in eval mode where it started.

    `progress(step, loss)` is called after every step (a progress bar, a log). With `recipe.lora_rank`, only
    low-rank adapters train and are merged at the end. With `recipe.qat`, `qat_precision` names the student's
    linear layers (module names) and the precision each is trained for. Given the `teacher` (on `device`), the
    loss uses its full distribution and hidden states, computed for every batch, instead of the kept top k.
    ``windows_per_pass``: a step's windows go through the student that many at a time, their gradients summed
    (less memory, same step; the hidden-state term is then normalized per pass), None: all at once.
    ``merge_into``: which frozen weights LoRA's adapters are merged into in place (see `low_rank_adapters`)."""
    if recipe.steps < 1:
        raise PlanError(f"a distillation run needs at least 1 step, got {recipe.steps}")
    if recipe.qat and not qat_precision:
        raise PlanError("quantization-aware training needs the precision of the student's layers (qat_precision)")
    if recipe.hidden_weight and teacher is None and targets.hidden is None:
        raise PlanError("hidden-state matching needs the teacher's hidden states: compute the targets with hidden=True")
    if recipe.lora_rank:
        with low_rank_adapters(student, recipe.lora_rank, seed, merge_into) as adapters:
            run = _train(student, targets, recipe, device, seed, batch_size, progress, teacher, windows_per_pass)
        run.adapters = adapters
        return run
    student.requires_grad_(True)
    with fake_quantized(student, qat_precision or {}) if recipe.qat else contextlib.nullcontext():
        return _train(student, targets, recipe, device, seed, batch_size, progress, teacher, windows_per_pass)


def _loss(student: Any, windows: torch.Tensor, index: torch.Tensor, targets: TeacherTargets, recipe: Distillation,
          teacher: Any) -> torch.Tensor:
    """The loss over whole logits: with the teacher online (its full distributions), or a student whose output head
    is not a plain map of its final hidden states (see `_head_is_separable`)."""
    device = windows.device
    out = student(windows, output_hidden_states=bool(recipe.hidden_weight))
    logits, loss = out.logits, torch.zeros((), device=device)
    if teacher is not None:
        with torch.no_grad():
            taught = teacher(windows, output_hidden_states=bool(recipe.hidden_weight))
        teacher_hidden = taught.hidden_states[-1] if recipe.hidden_weight else None
    else:
        teacher_hidden = targets.hidden[index].to(device) if recipe.hidden_weight else None
    if recipe.loss in ("kl", "kl+ce"):
        if teacher is not None:
            loss = loss + full_kd_loss(logits, taught.logits, targets.temperature)
        else:
            loss = loss + kd_loss(logits, targets.top_ids[index].to(device), targets.top_logprobs[index].to(device),
                                  targets.temperature)
    if recipe.loss in ("ce", "kl+ce"):
        loss = loss + recipe.ce_weight * F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten())
    if recipe.hidden_weight:
        loss = loss + recipe.hidden_weight * hidden_loss(out.hidden_states[-1], teacher_hidden)
    return loss


@torch.no_grad()
def _head_is_separable(student: Any, window: torch.Tensor) -> bool:
    """Whether the student's logits are its output head's weight (and bias) applied to its decoder's final hidden
    states, as `_loss_by_pieces` forms them (true of the Llama-like families; a model that scales or caps its
    logits after the head is not), checked on a few tokens."""
    try:
        whole = student(window).logits
        head = student.get_output_embeddings()
        split = F.linear(student.get_decoder()(input_ids=window).last_hidden_state, head.weight, head.bias)
    except (AttributeError, NotImplementedError, TypeError):
        return False
    return whole.shape == split.shape and torch.allclose(whole, split, rtol=1e-4, atol=1e-4)


def _piece_loss(hidden: torch.Tensor, head: torch.Tensor, head_bias: torch.Tensor | None, top_ids: torch.Tensor,
                top_logprobs: torch.Tensor, next_ids: torch.Tensor, recipe: Distillation, temperature: float,
                tokens: int, predicted: int) -> torch.Tensor:
    """One piece of the loss: its tokens' logits, then their share of the mean KD and cross-entropy terms."""
    logits = F.linear(hidden, head, head_bias)
    loss = torch.zeros((), device=hidden.device)
    if recipe.loss in ("kl", "kl+ce"):
        loss = loss + kd_loss(logits, top_ids, top_logprobs, temperature) * (len(hidden) / tokens)
    if recipe.loss in ("ce", "kl+ce"):
        loss = loss + recipe.ce_weight * F.cross_entropy(logits.float(), next_ids, ignore_index=-100,
                                                         reduction="sum") / predicted
    return loss


def _loss_by_pieces(student: Any, windows: torch.Tensor, index: torch.Tensor, targets: TeacherTargets,
                    recipe: Distillation) -> torch.Tensor:
    """The same loss as `_loss`, with the logits formed ``LOSS_TOKENS`` tokens at a time and recomputed in the
    backward pass: a step never holds the whole (batch × tokens × vocabulary) logits, their softmax and gradient,
    which for the default model's 49,152 tokens are 100 MB each at 4 windows of 128 tokens (a piece: 25 MB)."""
    from torch.utils.checkpoint import checkpoint

    device = windows.device
    hidden = student.get_decoder()(input_ids=windows).last_hidden_state
    loss = torch.zeros((), device=device)
    if recipe.hidden_weight:
        loss = loss + recipe.hidden_weight * hidden_loss(hidden, targets.hidden[index].to(device))
    flat = hidden.flatten(0, 1)
    top_ids = targets.top_ids[index].flatten(0, 1).to(device)
    top_logprobs = targets.top_logprobs[index].flatten(0, 1).to(device)
    ignored = torch.full_like(windows[:, :1], -100)
    next_ids = torch.cat([windows[:, 1:], ignored], dim=1).flatten()  # the last token of a window predicts nothing
    head = student.get_output_embeddings()
    tokens, predicted = len(flat), windows.shape[0] * (windows.shape[1] - 1)
    for start in range(0, tokens, LOSS_TOKENS):
        piece = slice(start, start + LOSS_TOKENS)
        loss = loss + checkpoint(_piece_loss, flat[piece], head.weight, head.bias, top_ids[piece], top_logprobs[piece],
                                 next_ids[piece], recipe, targets.temperature, tokens, predicted,
                                 use_reentrant=False)
    return loss


def _train(student: Any, targets: TeacherTargets, recipe: Distillation, device: str | torch.device, seed: int,
           batch_size: int, progress: Callable[[int, float], None] | None, teacher: Any,
           windows_per_pass: int | None) -> Trained:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    home = next(student.parameters()).device
    student.to(device)
    by_pieces = teacher is None and _head_is_separable(student.eval(), targets.windows[:1, :8].to(device))
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.0)
    result, started = Trained(), time.perf_counter()
    order = torch.empty(0, dtype=torch.long)
    with recomputed_activations(student):
        student.train()
        for step in range(recipe.steps):
            if len(order) < batch_size:  # a fresh seeded pass over the windows
                order = torch.cat([order, torch.randperm(len(targets.windows), generator=generator)])
            index, order = order[:batch_size], order[batch_size:]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, recipe.steps, recipe.learning_rate)
            optimizer.zero_grad(set_to_none=True)
            value = 0.0
            for part in index.split(windows_per_pass or batch_size):  # gradients add up over the passes
                windows = targets.windows[part].to(device)
                if by_pieces:
                    loss = _loss_by_pieces(student, windows, part, targets, recipe)
                else:
                    loss = _loss(student, windows, part, targets, recipe, teacher)
                loss = loss * (len(part) / len(index))
                loss.backward()
                value += loss.item()
                del loss  # held into the next pass, its graph (with recomputed activations) would stay resident
            torch.nn.utils.clip_grad_norm_(parameters, CLIP_NORM)
            optimizer.step()
            result.losses.append(value)
            result.steps = step + 1
            if progress is not None:
                progress(step + 1, result.losses[-1])
    result.seconds = time.perf_counter() - started
    student.eval().requires_grad_(False).to(home)
    return result


@contextlib.contextmanager
def recomputed_activations(model: Any) -> Iterator[None]:
    """Within the block, each decoder block's activations are recomputed in the backward pass instead of kept
    (Hugging Face's gradient checkpointing, where the model supports it): a step holds one block's activations
    and the blocks' inputs, not every block's. Measured on the default model: 850 MB less at a peak
    (bench_distill_memory.py), 12-31% more seconds per step (that bench; bench_distill.py's 24-block student).
    The model's ``use_cache`` is off meanwhile (a cache is useless to training and refused with checkpointing)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        yield
        return
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()
        model.config.use_cache = use_cache
