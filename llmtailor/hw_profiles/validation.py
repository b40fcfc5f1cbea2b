"""How far a profile's predictions are from measurements: published decode speeds, and this machine's own validation.

Shipped profiles are checked against published decode speeds of 7B-8B models at about
4 bits (``published/decode.yaml``, each with its source): the cost model predicts the same
model at 4 bits in groups of 32 with float16 scales (llama.cpp's Q4_0 layout, 4.5 bits per
weight) at a 128-token context, and the check is computed now, from the current code and
profile, never stored. The host profile is checked by ``benchmarks/bench_cost_validation.py``
on real variants of the default model, which writes its errors next to the profile
(``host/validation.json``). Reports and the dry run print the result next to predicted
latencies, so a reader knows how far to trust them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from llmtailor.hw_profiles import HOST_LLAMA_CPP, DeviceProfile

PUBLISHED = Path(__file__).parent / "published" / "decode.yaml"
MODELS = {  # published shapes (LLaMA-2-7B; Llama-3.1-8B), enough for the cost model
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class PublishedCheck:
    """One published decode speed beside the profile's prediction for the same model at 4 bits."""

    device: str
    model: str
    quant: str
    runtime: str
    source: str
    published_tokens_per_s: float
    predicted_tokens_per_s: float

    @property
    def error_percent(self) -> float:
        """Signed: positive when the profile predicts faster than published."""
        return 100 * (self.predicted_tokens_per_s / self.published_tokens_per_s - 1)


def published() -> list[dict[str, Any]]:
    """The published decode speeds shipped with llmtailor."""
    return yaml.safe_load(PUBLISHED.read_text())


@cache
def _architecture(model: str):
    from transformers import LlamaConfig

    from llmtailor import arch

    return arch.from_config(LlamaConfig(**MODELS[model]))


def check(profile: DeviceProfile) -> list[PublishedCheck]:
    """The profile's predictions beside every published figure for its device (none for other devices)."""
    from llmtailor.evaluators import cost
    from llmtailor.plan import CompressionPlan, LayerPrecision

    checks = []
    for entry in published():
        if profile.name != entry["device"] and not profile.name.startswith(f"{entry['device']}-"):
            continue  # a profile limited to a budget (`--device D --memory SIZE`) is named D-SIZE
        arch = _architecture(entry["model"])
        q4_0 = LayerPrecision(4, 32, symmetric=True)
        plan = CompressionPlan(precision={lin.name: q4_0 for lin in [*arch.linears, arch.embedding]})
        latency = cost.latency(plan, arch, profile, cost.Workload(context_length=128, prompt_length=1))
        checks.append(PublishedCheck(profile.name, entry["model"], entry["quant"], entry["runtime"], entry["source"],
                                     float(entry["decode_tokens_per_s"]), latency.decode_tokens_per_s))
    return checks


def host_validation_path() -> Path:
    from llmtailor.hw_profiles import host

    return host.profile_path().parent / "validation.json"


def llama_cpp_validation_path() -> Path:
    """Where benchmarks/bench_llamacpp.py writes its errors, beside the llama.cpp profile it checked."""
    from llmtailor.hw_profiles import host

    return host.profile_path().parent / "llama.cpp-validation.json"


def note(profile: DeviceProfile) -> str:
    """One sentence on how far this profile's latencies are from measurement, for reports and the dry run."""
    if profile.name.startswith("memory-"):  # `--memory SIZE` alone: the host's speeds, or a stand-in laptop's
        if "measured" not in profile.description:
            return "latencies use a typical laptop CPU's speeds: comparable with each other, not predictions"
        profile = replace(profile, name="host")
    if profile.name == HOST_LLAMA_CPP:
        path = llama_cpp_validation_path()
        if not path.is_file():
            return "llama.cpp latencies not yet checked against measurement on this machine (benchmarks/bench_llamacpp.py)"
        v = json.loads(path.read_text())
        return (f"llama.cpp profile checked on this machine ({v['date']}, {v['variants']} GGUF variants of the default "
                f"model, fitted on random models): mean absolute error prefill {v['prefill_mape_percent']:.0f}%, decode "
                f"{v['decode_mape_percent']:.0f}%; rank agreement (Kendall tau) prefill {v['prefill_kendall_tau']:.2f}, "
                f"decode {v['decode_kendall_tau']:.2f}")
    if profile.name == "host":
        path = host_validation_path()
        if not path.is_file():
            return ("host latencies not yet checked against measurement on this machine "
                    "(benchmarks/bench_cost_validation.py)")
        v = json.loads(path.read_text())
        return (f"host profile checked on this machine ({v['date']}, {v['variants']} variants of the default model): "
                f"mean absolute error prefill {v['prefill_mape_percent']:.0f}%, decode {v['decode_mape_percent']:.0f}%, "
                f"memory {v['memory_mape_percent']:.0f}%; rank agreement (Kendall tau) prefill "
                f"{v['prefill_kendall_tau']:.2f}, decode {v['decode_kendall_tau']:.2f}")
    checks = check(profile)
    if not checks:
        return f"{profile.name} latencies not checked against a published measurement"
    c = checks[0]
    return (f"{profile.name} decode checked against a published figure: {c.model} ({c.quant}, {c.runtime}) "
            f"{c.published_tokens_per_s:g} tokens/s measured, {c.predicted_tokens_per_s:.3g} predicted "
            f"({c.error_percent:+.0f}%; {c.source})")
