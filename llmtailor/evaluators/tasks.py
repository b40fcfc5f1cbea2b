"""Accuracy through lm-eval: the built-in offline tasks, and any lm-eval task by name.

Built-in tasks are made from installed text, held out from calibration, so they run
offline. ``pydoc_cloze``: a passage's opening, and four continuations of equal word
count, one true and three taken from other passages of the same corpus. Any other
name is looked up in lm-eval's own registry and passed straight through.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtailor import files
from llmtailor.errors import UserError

CONTEXT_WORDS = 32
CONTINUATION_WORDS = 8
CHOICES = 4


def _passages(documents: tuple[str, ...] | list[str]) -> list[list[str]]:
    """Paragraphs of prose long enough for a context and a continuation, as word lists."""
    out = []
    for doc in documents:
        for paragraph in re.split(r"\n\s*\n", doc):
            if paragraph.lstrip().startswith((">>>", "*", "=", "-")):
                continue  # code examples and headings are not prose
            words = paragraph.split()
            if len(words) >= CONTEXT_WORDS + CONTINUATION_WORDS:
                out.append(words)
    return out


def pydoc_cloze_items(documents: tuple[str, ...] | list[str], limit: int, seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice continuation items built from the given documents."""
    passages = _passages(documents)
    if len(passages) < CHOICES:
        raise UserError(f"the task text has {len(passages)} usable passages; pydoc_cloze needs at least {CHOICES}")
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    items = []
    for i in order[:limit]:
        words = passages[i]
        context = " ".join(words[:CONTEXT_WORDS])
        truth = " ".join(words[CONTEXT_WORDS : CONTEXT_WORDS + CONTINUATION_WORDS])
        others = rng.sample([j for j in range(len(passages)) if j != i], CHOICES - 1)
        distractors = []
        for j in others:
            start = rng.randrange(0, len(passages[j]) - CONTINUATION_WORDS + 1)
            distractors.append(" ".join(passages[j][start : start + CONTINUATION_WORDS]))
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [truth] + distractors[label:]
        items.append({"context": context, "choices": choices, "label": label})
    return items


def multiple_choice_task(name: str, items: list[dict[str, Any]], cache: Path) -> dict[str, Any]:
    """The lm-eval config of a multiple-choice task whose items are written as JSONL in the cache."""
    text = "".join(json.dumps(item) + "\n" for item in items)
    path = cache / "tasks" / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        files.write_text(path, text)
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


# Built-in tasks by name: each makes its multiple-choice items from the task documents.
BUILTIN_TASKS: dict[str, Callable[..., list[dict[str, Any]]]] = {"pydoc_cloze": pydoc_cloze_items}
_task_manager = None


def task_manager() -> Any:
    """lm-eval's task registry, built once per process (building it takes seconds)."""
    global _task_manager
    if _task_manager is None:
        from lm_eval.tasks import TaskManager

        _task_manager = TaskManager(verbosity="ERROR")
    return _task_manager


def check_task_names(names: list[str]) -> None:
    """Raise UserError for any task that is neither built in nor known to lm-eval."""
    unknown = [n for n in names if n not in BUILTIN_TASKS]
    if not unknown:
        return
    known = set(task_manager().all_tasks)
    missing = [n for n in unknown if n not in known]
    if missing:
        raise UserError(
            f"unknown lm-eval task(s) {missing}: use a built-in task ({', '.join(BUILTIN_TASKS)}) "
            "or a name from `lm_eval ls tasks`"
        )


def check_tasks(names: list[str], documents: tuple[str, ...] | list[str], limit: int) -> None:
    """Raise UserError unless every task is known and every built-in one can be made from the documents."""
    check_task_names(names)
    for name in names:
        if name in BUILTIN_TASKS:
            BUILTIN_TASKS[name](documents, limit)


def resolve_tasks(names: list[str], documents: tuple[str, ...] | list[str], limit: int, cache: Path) -> list[Any]:
    """lm-eval task entries: built-in configs made from the documents, other names as they are."""
    check_task_names(names)
    return [multiple_choice_task(n, BUILTIN_TASKS[n](documents, limit), cache) if n in BUILTIN_TASKS else n for n in names]


def item_scores(model: Any, tokenizer: Any, tasks: list[Any], limit: int | None = None, batch_size: int = 32,
                shared_context: bool = True) -> dict[str, list[float]]:
    """Each item's accuracy (1.0 right, 0.0 wrong) of an in-memory model on lm-eval tasks, in item order, run on the
    model's device: {task: [score, ...]}. Two models' lists pair item by item (``paired_difference``) when both were
    scored the same way (``SCORER`` names it; a cache of such lists keys on it). ``batch_size``: choices per forward
    pass. ``shared_context=False``: lm-eval's own HF model scores every choice with its context (benchmarks compare
    the two)."""
    samples = evaluated_samples(model, tokenizer, tasks, limit, batch_size, shared_context)
    return {name: [float(s["acc"]) for s in done] for name, done in samples.items() if done and "acc" in done[0]}


def evaluated_samples(model: Any, tokenizer: Any, tasks: list[Any], limit: int | None = None, batch_size: int = 32,
                      shared_context: bool = True) -> dict[str, list[dict[str, Any]]]:
    """lm-eval's per-item records of each task (metrics, and the choices' log-likelihoods in ``filtered_resps``),
    sorted by item."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    device = str(next(model.parameters()).device)  # the device the model is on
    lm_class = _shared_context_lm_class() if shared_context else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's own progress bars, one per task and phase
        samples = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=task_manager(), limit=limit, verbosity="ERROR",
            log_samples=True, bootstrap_iters=0,
        )["samples"]
    return {name: sorted(done, key=lambda s: s["doc_id"]) for name, done in samples.items()}


# How ``item_scores`` computes log-likelihoods: each context once, its choices after it from the KV cache. Cached
# per-item scores key on this, so scores paired against each other come from one way of computing them.
SCORER = "shared-context-2"


def choice_log_likelihoods(model: Any, items: list[tuple[list[int], list[list[int]]]],
                           device: Any) -> list[list[tuple[float, bool]]]:
    """For each (context, continuations) item: each continuation's (log-likelihood, whether greedy decoding
    reproduces it) after the item's context, all items in two forward passes.

    lm-eval's HF model runs context and continuation together for every choice; a multiple-choice item's context is
    most of its tokens (pydoc_cloze: 45 of 56), so here the contexts run once, left-padded into one batch (positions
    counted from each context's first token, pads masked), and every continuation then runs from its context's KV
    cache, right-padded (under causal attention a pad after a token cannot change it). Equal to lm-eval's scores up
    to float rounding (tested)."""
    import torch

    from llmtailor import models

    contexts = [context for context, _ in items]
    width = max(len(c) for c in contexts)
    ids = torch.tensor([[c[0]] * (width - len(c)) + c for c in contexts], device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
    owners = [i for i, (_, continuations) in enumerate(items) for _ in continuations]
    flat = [c for _, continuations in items for c in continuations]
    longest = max(len(c) for c in flat)
    with torch.no_grad():
        # The head on the last position alone, where the forward can do that.
        last_only = {"logits_to_keep": 1} if models.forward_takes(type(model), "logits_to_keep") else {}
        out, cache = models.with_cache(model, ids, attention_mask=mask,
                                       position_ids=(mask.cumsum(1) - 1).clamp(min=0), **last_only)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
        rest = None
        if longest > 1:
            index = torch.tensor(owners, device=device)
            cache.batch_select_indices(index)  # each context's cache once per continuation
            inputs = torch.tensor([c[:-1] + [c[-1]] * (longest - len(c)) for c in flat], device=device)
            steps = torch.arange(longest - 1, device=device)
            rest = torch.log_softmax(models.with_cache(
                model, inputs, cache, attention_mask=torch.cat([mask[index], torch.ones_like(inputs)], dim=1),
                position_ids=mask.sum(1)[index, None] + steps)[0].logits.float(), dim=-1)
    scores: list[list[tuple[float, bool]]] = [[] for _ in items]
    for row, (owner, continuation) in enumerate(zip(owners, flat, strict=True)):
        log_probs = first[owner, None] if rest is None else torch.cat([first[owner, None], rest[row]])
        log_probs = log_probs[: len(continuation)]
        target = torch.tensor(continuation, device=log_probs.device)
        scores[owner].append((float(log_probs.gather(1, target[:, None]).sum()),
                              bool((log_probs.argmax(dim=-1) == target).all())))
    return scores


@functools.cache
def _shared_context_lm_class() -> type:
    """lm-eval's HF model with its log-likelihoods computed by ``choice_log_likelihoods``, as many items per batch
    as fit ``batch_size`` choices (made on first use: importing lm-eval takes seconds). Requests it cannot share a
    context for (a sequence longer than the model's window, a seq2seq model) go to lm-eval's own code."""
    from lm_eval.models.huggingface import HFLM

    class SharedContextLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):  # noqa: ANN001, ANN202
            results: list[Any] = [None] * len(requests)
            by_context: dict[tuple[int, ...], list[int]] = {}
            other = []
            for i, (_, context, continuation) in enumerate(requests):
                if self.backend == "causal" and 0 < len(context) and len(context) + len(continuation) <= self.max_length:
                    by_context.setdefault(tuple(context), []).append(i)
                else:
                    other.append(i)
            per_batch = self.batch_size if isinstance(self.batch_size, int) else 32  # "auto" searches lm-eval's batches
            groups = list(by_context.items())
            start = 0
            while start < len(groups):  # as many contexts as fit per_batch choices, at least one
                end, rows = start + 1, len(groups[start][1])
                while end < len(groups) and rows + len(groups[end][1]) <= per_batch:
                    rows, end = rows + len(groups[end][1]), end + 1
                batch, start = groups[start:end], end
                scores = choice_log_likelihoods(self.model, [(list(c), [requests[i][2] for i in members])
                                                             for c, members in batch], self.device)
                for (_, members), item in zip(batch, scores, strict=True):
                    for i, score in zip(members, item, strict=True):
                        results[i] = score
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
            if other:
                theirs = super()._loglikelihood_tokens([requests[i] for i in other], disable_tqdm, override_bs)
                for i, score in zip(other, theirs, strict=True):
                    results[i] = score
            return results

    return SharedContextLM


def accuracy(model: Any, tokenizer: Any, tasks: list[Any], limit: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """Accuracy of an in-memory model on lm-eval tasks, run on the model's device: {task: acc}."""
    return {name: sum(scores) / len(scores) for name, scores in item_scores(model, tokenizer, tasks, limit,
                                                                              batch_size).items()}


def accuracy_summary(scores: dict[str, list[float]]) -> dict[str, float]:
    """From ``item_scores``: the mean accuracy over tasks, its 95% half-width (binomial, over all items) and each
    task's accuracy (``accuracy_<task>``)."""
    accuracy = {name: sum(s) / len(s) for name, s in scores.items()}
    mean, items = sum(accuracy.values()) / len(accuracy), sum(len(s) for s in scores.values())
    return {"accuracy": mean, "accuracy_ci95": 1.96 * math.sqrt(max(mean * (1 - mean), 0.0) / items),
            **{f"accuracy_{k}": v for k, v in accuracy.items()}}


def paired_difference(scores: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean per-item difference of two models' scores on the same items (scores - reference) and its 95% half-width.

    Pairing is what makes a few hundred items enough: a compressed model answers most items
    as its teacher does, and only the items where they differ carry variance, so the
    interval of the difference is much narrower than that of either accuracy (normal
    approximation over the per-item differences; infinite below two items)."""
    if len(scores) != len(reference):
        raise ValueError(f"paired scores need the same items: {len(scores)} against {len(reference)}")
    n = len(scores)
    differences = [a - b for a, b in zip(scores, reference, strict=True)]
    mean = sum(differences) / n if n else 0.0
    if n < 2:
        return mean, math.inf
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return mean, 1.96 * math.sqrt(variance / n)
