"""An exported model as one GGUF file, the format llama.cpp runs on the devices this tool fits models to.

Each quantized weight is written in the GGUF block type that holds its codes as they are, where one exists:
GGUF blocks are 32 weights of one row sharing one scale, so a layer whose groups are whole 32-blocks (group size a
multiple of 32, or one group per row, and a row width that is a multiple of 32) becomes
- symmetric, 2 to 4 bits: ``Q4_0`` (value = d (q - 8)), its codes shifted to centre on 8;
- asymmetric, 2 to 4 bits: ``Q4_1`` (value = d q + m), d the group's scale and m = -scale x zero point in float16
  (the one rounding here: m's; a 3- or 2-bit layer spends 4 bits a weight in it);
- symmetric 8 bits: ``Q8_0`` (value = d q, q signed).
An asymmetric 8-bit layer has no such type (its codes minus the zero point span 9 bits): it is quantized again into
``Q8_0`` from its weights, and the export says so. Layers left at 16 bits (pruned or not: GGUF has no sparse
format) are ``F16``, the norms ``F32``. The file is read back by the caller (transformers dequantizes it) and
measured again, so what it holds is scored, not assumed.

Only llama-architecture models loaded from a GGUF file are written: the tokenizer and every other header field are
copied from that file, with the block count, head counts and MLP width of the exported (possibly cut) model.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtailor.compression.quantize import QuantizedWeight
from llmtailor.errors import UserError
from llmtailor.hw_profiles.llamacpp import LINEARS

BLOCK = 32
_LINEARS = {module: kind for kind, module in LINEARS.items()}  # transformers llama module -> GGUF tensor
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def check_source(source: Path) -> None:
    """UserError unless `source` is a llama GGUF file (the tokenizer and header come from it)."""
    from gguf import GGUFReader

    if source.suffix.lower() != ".gguf":
        raise UserError(f"--format gguf copies the tokenizer from the model's own GGUF file; the study's model "
                        f"({source}) is not one: export it with --format hf")
    architecture = GGUFReader(source).fields["general.architecture"].contents()
    if architecture != "llama":
        raise UserError(f"--format gguf writes llama-architecture files; {source.name} is {architecture!r}: "
                        "export it with --format hf")


def _rows_for_gguf(out: int, heads: int) -> np.ndarray:
    """The row order llama.cpp keeps a query or key projection in: each head's rotary halves interleaved (the
    inverse of the order transformers' GGUF loader restores)."""
    return np.arange(out).reshape(heads, 2, out // heads // 2).swapaxes(1, 2).reshape(-1)


def _blocks(values: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes [rows, width] as packed nibbles [rows, width / 32, 16] (low nibble: the block's first 16), and the
    per-block scale [rows, width / 32, 1] as float16 bytes."""
    rows, width = values.shape
    codes = values.reshape(rows, width // BLOCK, 2, BLOCK // 2).astype(np.uint8)
    nibbles = codes[:, :, 0, :] | (codes[:, :, 1, :] << np.uint8(4))
    return nibbles, scale.astype(np.float16).reshape(rows, width // BLOCK, 1).view(np.uint8)


def encode(quantized: QuantizedWeight, rows: np.ndarray | None = None) -> tuple[np.ndarray, Any] | None:
    """The layer's codes as GGUF blocks (bytes [rows, row bytes], the type), rows reordered by `rows`; None where no
    type holds them as they are."""
    from gguf import GGMLQuantizationType as Type

    codes = quantized.codes.cpu().numpy().astype(np.int16)
    out, width = codes.shape
    if width % BLOCK or quantized.group_size % BLOCK or (quantized.bits > 4 and not quantized.symmetric):
        return None
    per_block = quantized.group_size // BLOCK
    scales = quantized.scales.cpu().numpy().astype(np.float32).repeat(per_block, axis=1)[:, : width // BLOCK]
    zeros = quantized.zeros.cpu().numpy().astype(np.int16).repeat(per_block, axis=1)[:, : width // BLOCK]
    if rows is not None:
        codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
    if quantized.bits == 8:  # symmetric: value = scale (q - 128)
        signed = (codes - 128).astype(np.int8).reshape(out, width // BLOCK, BLOCK).view(np.uint8)
        d = scales.astype(np.float16).reshape(out, width // BLOCK, 1).view(np.uint8)
        return np.concatenate([d, signed], axis=-1).reshape(out, -1), Type.Q8_0
    if quantized.symmetric:  # value = scale (q - 2^(b-1)) = d (q' - 8)
        nibbles, d = _blocks(codes - 2 ** (quantized.bits - 1) + 8, scales)
        return np.concatenate([d, nibbles], axis=-1).reshape(out, -1), Type.Q4_0
    nibbles, d = _blocks(codes, scales)  # value = scale (q - zero) = d q + m
    m = (-scales * zeros).astype(np.float16).reshape(out, width // BLOCK, 1).view(np.uint8)
    return np.concatenate([d, m, nibbles], axis=-1).reshape(out, -1), Type.Q4_1


def _gguf_name(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    rest = ".".join(parts[3:-1])
    kind = _LINEARS.get(rest) or _NORMS.get(rest)
    return None if kind is None else f"blk.{parts[2]}.{kind}.weight"


def write(model: Any, quantized_forms: dict[Any, QuantizedWeight], source: Path, target: Path) -> dict[str, Any]:
    """Write the model into the GGUF file `target` with `source`'s tokenizer and header; return what each tensor
    became: {"types": {type: count}, "requantized": [names of layers quantized again]}."""
    from gguf import GGMLQuantizationType as Type
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    config = model.config
    reader = GGUFReader(source)
    overrides = {"llama.block_count": config.num_hidden_layers, "llama.attention.head_count": config.num_attention_heads,
                 "llama.attention.head_count_kv": config.num_key_value_heads,
                 "llama.feed_forward_length": config.intermediate_size}
    writer = GGUFWriter(target, "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue  # the writer writes the first ones itself; the file type is one per file, this file mixes
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, overrides.get(field.name, field.contents()), field.types[0], sub_type)
    del reader
    forms = {f"{name}.weight": quantized_forms[module] for name, module in model.named_modules()
             if module in quantized_forms}
    if config.tie_word_embeddings and "lm_head.weight" in forms:  # the tied matrix is quantized once, as the head
        forms["model.embed_tokens.weight"] = forms["lm_head.weight"]
    made: dict[str, Any] = {"types": {}, "requantized": []}
    for name, tensor in model.state_dict().items():
        gguf_name = _gguf_name(name)
        if gguf_name is None or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        weight = tensor.detach().float().cpu().numpy()
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name.split(".")[-2])
        rows = None if heads is None else _rows_for_gguf(weight.shape[0], heads)
        if weight.ndim == 1:
            data, kind = weight, Type.F32
        elif name in forms and (encoded := encode(forms[name], rows)) is not None:
            data, kind = encoded
        elif name in forms:  # asymmetric 8 bits (or blocks that do not fit): quantized again, the nearest type
            weight = weight if rows is None else weight[rows]
            data, kind = quantize(weight, Type.Q8_0), Type.Q8_0
            made["requantized"].append(name)
        else:
            data, kind = (weight if rows is None else weight[rows]).astype(np.float16), Type.F16
        writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=kind)
        made["types"][kind.name] = made["types"].get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return made


def load(path: Path) -> Any:
    """The GGUF file as transformers loads it (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' bare tqdm bar over the tensors
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
