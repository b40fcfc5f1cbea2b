"""Architecture: the shapes of a causal LM, read from its config without loading weights.

The cost model, plan validation and the search space work from this alone, so a plan
can be priced in milliseconds and a finished study can be reported without the model.
It is stored on every study as plain JSON. (DESIGN.md puts "a description of the
architecture" in models.py; it lives in its own torch-free module so that plan.py,
the cost model and the report can use it without importing torch or transformers.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Linear:
    """One weight matrix: its module name, input and output width, and decoder block."""

    name: str
    in_features: int
    out_features: int
    block: int | None  # decoder block index; None for embeddings and the head
    kind: str  # last part of the module name: q_proj, up_proj, lm_head, ...

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Architecture:
    """What the cost model and the plan validator need to know about a model."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    linears: tuple[Linear, ...]  # every nn.Linear in the decoder blocks, plus an untied head
    embedding: Linear  # the token embedding, as a (vocab -> hidden) matrix
    lm_head_name: str
    other_params: int  # norms, biases and anything that is neither a linear nor the embedding
    max_positions: int

    def linear(self, name: str) -> Linear:
        """The linear layer of that module name."""
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(name)

    @property
    def total_params(self) -> int:
        return sum(lin.params for lin in self.linears) + self.embedding.params + self.other_params

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        """The inverse of to_dict."""
        data = dict(data)
        data["linears"] = tuple(Linear(**lin) for lin in data["linears"])
        data["embedding"] = Linear(**data["embedding"])
        return cls(**data)


def cut(arch: Architecture, layers: tuple[int, ...] | None, heads: int | None, mlp_width: int | None) -> Architecture:
    """The architecture of a structured cut of `arch`: the blocks `layers` kept (None: all), `heads` query heads
    per block (whole KV groups), `mlp_width` MLP channels per block. Layers keep the teacher's names, so a plan's
    per-layer settings still find them. Per-block parameters other than linears (the two norms of a LLaMA block)
    go with their block; the rest of ``other_params`` (the final norm) stays."""
    kept = tuple(range(arch.num_layers)) if layers is None else tuple(layers)
    heads = arch.num_heads if heads is None else heads
    kv_heads = heads * arch.num_kv_heads // arch.num_heads
    width = arch.intermediate_size if mlp_width is None else mlp_width
    attention, kv = heads * arch.head_dim, kv_heads * arch.head_dim
    shapes = {"q_proj": (None, attention), "k_proj": (None, kv), "v_proj": (None, kv), "o_proj": (attention, None),
              "gate_proj": (None, width), "up_proj": (None, width), "down_proj": (width, None)}
    linears = []
    for lin in arch.linears:
        if lin.block is not None and lin.block not in kept:
            continue
        new_in, new_out = shapes.get(lin.kind, (None, None)) if lin.block is not None else (None, None)
        linears.append(Linear(lin.name, new_in or lin.in_features, new_out or lin.out_features, lin.block, lin.kind))
    per_block_other = (arch.other_params - arch.hidden_size) // arch.num_layers
    return replace(arch, num_layers=len(kept), num_heads=heads, num_kv_heads=kv_heads, intermediate_size=width,
                   linears=tuple(linears), other_params=arch.other_params - per_block_other * (arch.num_layers - len(kept)))


def from_config(config: Any) -> Architecture:
    """Read the architecture of a transformers config by building the model on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return from_model(model)


def from_model(model: Any) -> Architecture:
    """Read the architecture of a built model (weights are not touched)."""
    import torch

    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_name = _module_name(model, embed)
    head_name = _module_name(model, head) if head is not None else "lm_head"
    tied = head is not None and head.weight is embed.weight

    linears, counted = [], {id(embed.weight)}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head and tied:
            continue
        block = _block_index(name)
        linears.append(Linear(name, module.in_features, module.out_features, block, name.rsplit(".", 1)[-1]))
        counted.add(id(module.weight))
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)

    num_heads = text_config.num_attention_heads
    hidden = text_config.hidden_size
    return Architecture(
        model_type=text_config.model_type,
        num_layers=text_config.num_hidden_layers,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text_config, "head_dim", None) or hidden // num_heads,
        intermediate_size=getattr(text_config, "intermediate_size", 4 * hidden),
        vocab_size=embed.num_embeddings,
        tie_embeddings=tied,
        linears=tuple(linears),
        embedding=Linear(embed_name, embed.embedding_dim, embed.num_embeddings, None, "embed_tokens"),
        lm_head_name=head_name,
        other_params=other,
        max_positions=getattr(text_config, "max_position_embeddings", 2048),
    )


def _module_name(model: Any, target: Any) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")


def _block_index(name: str) -> int | None:
    """The decoder block a module belongs to: the first all-digit part of its name."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None
