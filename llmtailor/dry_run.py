"""The dry run: whether a plan fits a device and how fast it runs, from the model's config alone.

No weight is read: a model folder needs only its ``config.json`` (weight files may be
absent), a hub id's config comes from the hub or, offline, from the local cache, and
a GGUF file's config from its header (the tensor data is never touched). The
architecture is built on PyTorch's meta device, so a 70B config costs seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llmtailor import arch as arch_mod
from llmtailor import models
from llmtailor.errors import UserError
from llmtailor.evaluators import cost
from llmtailor.hw_profiles import DeviceProfile, format_size, validation
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, PlanError, nm_ratio


def load_architecture(spec: str | None, *, trust_remote_code: bool = False) -> tuple[arch_mod.Architecture, str]:
    """The architecture and display name of a model, from its config only."""
    from transformers import AutoConfig

    kind, where = models.resolve(spec)
    with models._clear_errors(spec, kind):
        if kind == "gguf":  # the header's metadata, not the tensors
            config = AutoConfig.from_pretrained(str(Path(where).parent), gguf_file=Path(where).name)
        else:
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code,
                                                local_files_only=kind == "dir")
    return arch_mod.from_config(config), models._display_name(spec, where)


def read_plan(path: str) -> CompressionPlan:
    """A plan file, such as a study's plans/N.json."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read plan file {path}: {exc.strerror or exc}") from None
    try:
        return CompressionPlan.from_json(text)
    except (PlanError, TypeError, ValueError) as exc:  # from_json turns bad JSON into a PlanError
        raise UserError(f"plan file {path} is not a valid plan: {exc}") from None


def uniform_plan(arch: arch_mod.Architecture, bits: int = 16, group_size: int = 128, sparsity: float = 0.0,
                 pattern: str = "unstructured", embedding_bits: int | None = None) -> CompressionPlan:
    """The same precision and sparsity on every linear layer (N:M without a ratio prunes its 1 − N/M); the
    embedding at ``embedding_bits`` (default: 16 below 8 bits, as llama.cpp's Q4 formats keep it wider, else
    ``bits``)."""
    precision = LayerPrecision(bits, group_size if bits < 16 else 128)  # PlanError is a one-line UserError
    embedding = LayerPrecision(embedding_bits or (bits if bits >= 8 else 16), group_size)
    if pattern != "unstructured" and not sparsity:  # N:M implies its ratio (not N:M: LayerSparsity says so)
        sparsity = nm_ratio(pattern) or sparsity
    pruned = LayerSparsity(sparsity, pattern) if sparsity or pattern != "unstructured" else LayerSparsity()
    plan = CompressionPlan(precision={lin.name: precision for lin in arch.linears} | {arch.embedding.name: embedding},
                           sparsity={lin.name: pruned for lin in arch.linears if lin.block is not None})
    plan.validate(arch)
    return plan


def estimate(plan: CompressionPlan, arch: arch_mod.Architecture, profile: DeviceProfile,
             workload: cost.Workload) -> dict[str, Any]:
    """The memory plan by component, the predicted latency and energy, and whether it fits: plain data."""
    found = cost.estimate(plan, arch, profile, workload)
    small_plan, small = cost.structured(plan, arch)
    parts = [cost.layer_bytes(small_plan, lin) for lin in small.linears]
    m, lat = found.memory, found.latency
    return {
        "device": profile.name, "parameters": small.total_params,
        "bits_per_weight": cost.bits_per_weight(plan, arch), "workload": dataclasses.asdict(workload),
        "memory_bytes": {
            "weights": sum(p.values for p in parts), "scales": sum(p.scales for p in parts),
            "zero_points": sum(p.zeros for p in parts), "sparse_index": sum(p.index for p in parts),
            "embedding": m.embedding, "norms_and_biases": m.other, "kv_cache": m.kv_cache,
            "activations": m.activations, "runtime": m.overhead, "total": m.total,
        },
        "budget_bytes": found.budget_bytes, "fits": found.fits,
        "time_to_first_token_s": lat.prefill_s, "decode_ms_per_token": lat.decode_s_per_token * 1e3,
        "decode_tokens_per_s": lat.decode_tokens_per_s, "energy_j_per_token": lat.energy_j_per_token,
        "latency_check": validation.note(profile),
    }


def render(result: dict[str, Any], model_name: str) -> str:
    """The estimate as a table for people."""
    memory, w = result["memory_bytes"], result["workload"]
    lines = [f"{model_name} on {result['device']}: {result['parameters'] / 1e6:,.1f}M parameters, "
             f"{result['bits_per_weight']:.2f} bits/weight (context {w['context_length']}, prompt "
             f"{w['prompt_length']}, batch {w['batch_size']})", ""]
    lines += [f"  {name.replace('_', ' '):<18} {format_size(value):>10}" for name, value in memory.items()
              if name != "total"]
    verdict = "fits" if result["fits"] else f"does NOT fit: {format_size(memory['total'] - result['budget_bytes'])} over"
    lines += [f"  {'total':<18} {format_size(memory['total']):>10}  of {format_size(result['budget_bytes'])} usable: "
              f"{verdict}", "",
              f"  time to first token {result['time_to_first_token_s']:.3g} s; decode "
              f"{result['decode_ms_per_token']:.3g} ms/token ({result['decode_tokens_per_s']:.3g} tokens/s); "
              f"{result['energy_j_per_token']:.3g} J/token (predicted)", f"  ({result['latency_check']})"]
    return "\n".join(lines)
