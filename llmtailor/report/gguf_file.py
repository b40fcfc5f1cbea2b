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

The architectures written are llama (with or without attention biases), qwen2 and qwen3 (`ARCHITECTURES`). For a
model loaded from a GGUF file the tokenizer and every other header field are copied from that file; for a model
folder or hub id they are made from its config and its fast tokenizer (`header_from_transformers`): byte-level BPE
vocabularies only (GPT-2, SmolLM, Llama 3, Qwen style), whose pre-tokenizer is one llama.cpp names
(`PRE_TOKENIZERS`), since llama.cpp splits text by that name and not by the regular expression a tokenizer.json
holds. A rope scaling that divides each rotary frequency by a fixed factor (Llama 3.1's ``llama3``, ``linear``) is
written as llama.cpp's ``rope_freqs`` tensor of divisors, taken from transformers' own scaled frequencies (and read
back from a GGUF source by `rope_from_divisors`, since transformers' GGUF reader drops them); other
scalings, MLP biases, sliding windows and SentencePiece vocabularies (Llama 2, Mistral) are an error for now. In
both cases the block count, head counts and MLP width are the exported (possibly cut) model's. llama.cpp runs what
this writes with transformers' tokens and logits (benchmarks/bench_gguf_llamacpp.py).
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
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm"}  # (the last two: Qwen3's per-head norms)
# transformers model type -> (llama.cpp's architecture, whether it keeps query/key rows in its interleaved rotary
# order). llama.cpp runs llama with the rotary halves interleaved, so convert_hf_to_gguf reorders those rows; Qwen's
# architectures rotate the halves as transformers does (NeoX style), so their rows stay as they are.
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}


def _architecture(model_type: str) -> tuple[str, bool]:
    if model_type not in ARCHITECTURES:
        raise UserError(f"--format gguf writes {', '.join(ARCHITECTURES)} models; this one is {model_type!r}: "
                        "export it with --format hf")
    return ARCHITECTURES[model_type]


def check_source(source: Path | None, config: Any, tokenizer: Any) -> None:
    """UserError unless the model can be written as GGUF: a GGUF file of an architecture in ARCHITECTURES
    (`source`, whose tokenizer and header are copied), or such a model with a byte-level BPE tokenizer llama.cpp
    can name (`source` None)."""
    from gguf import GGUFReader

    if source is not None:
        architecture = GGUFReader(source).fields["general.architecture"].contents()
        if architecture not in {name for name, _ in ARCHITECTURES.values()}:
            raise UserError(f"--format gguf writes {', '.join(ARCHITECTURES)} files; {source.name} is "
                            f"{architecture!r}: export it with --format hf")
        return
    header_from_transformers(config, tokenizer, "check")


def header_from_transformers(config: Any, tokenizer: Any, name: str) -> dict[str, tuple[Any, Any, Any]]:
    """The GGUF header fields {key: (value, type, array item type)} of a transformers model and its fast tokenizer;
    UserError for what llama.cpp's architecture or this writer does not hold."""
    from gguf import GGUFValueType as Kind

    arch, _ = _architecture(config.model_type)
    if getattr(config, "mlp_bias", False):
        raise UserError("--format gguf does not write MLP bias terms yet: export it with --format hf")
    if getattr(config, "use_sliding_window", False) or (config.model_type == "llama"
                                                        and getattr(config, "sliding_window", None)):
        raise UserError("--format gguf does not write sliding-window attention yet: export it with --format hf")
    rope = _rope(config)
    if _rope_type(config) not in ("default", *FREQUENCY_SCALINGS):
        raise UserError(f"--format gguf does not write rope scaling {rope['rope_type']!r} yet (only "
                        f"{', '.join(FREQUENCY_SCALINGS)}): export it with --format hf")
    head_dim = _head_dim(config)
    u32, f32 = Kind.UINT32, Kind.FLOAT32
    fields = {"general.name": (name, Kind.STRING, None),
              f"{arch}.context_length": (config.max_position_embeddings, u32, None),
              f"{arch}.embedding_length": (config.hidden_size, u32, None),
              f"{arch}.block_count": (config.num_hidden_layers, u32, None),
              f"{arch}.feed_forward_length": (config.intermediate_size, u32, None),
              f"{arch}.attention.head_count": (config.num_attention_heads, u32, None),
              f"{arch}.attention.head_count_kv": (config.num_key_value_heads, u32, None),
              f"{arch}.rope.freq_base": (float(rope["rope_theta"]), f32, None),
              f"{arch}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), f32, None),
              f"{arch}.rope.dimension_count": (head_dim, u32, None),
              f"{arch}.vocab_size": (config.vocab_size, u32, None)}
    if head_dim * config.num_attention_heads != config.hidden_size:
        fields[f"{arch}.attention.key_length"] = fields[f"{arch}.attention.value_length"] = (head_dim, u32, None)
    return {**fields, **_tokenizer_fields(tokenizer, config.vocab_size)}


# Rope scalings that only stretch each rotary frequency by a fixed factor (no attention factor, nothing that
# depends on the sequence length): llama.cpp takes them as the ``rope_freqs`` tensor of per-frequency divisors.
FREQUENCY_SCALINGS = ("llama3", "linear")


def _rope(config: Any) -> dict[str, Any]:
    return getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}


def _rope_type(config: Any) -> str:
    return _rope(config).get("rope_type", "default")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def reader_overrides(config: Any) -> dict[str, Any]:
    """The config values transformers' GGUF reader does not restore from the file, for `load` to hand back: a
    scaled rope's parameters (llama.cpp reads ``rope_freqs``; transformers ignores it) and a head width other than
    hidden / heads (the ``key_length`` field)."""
    overrides: dict[str, Any] = {}
    if _rope_type(config) != "default":
        overrides["rope_parameters"] = dict(_rope(config))
    if getattr(config, "attention_bias", False) and config.model_type == "llama":
        overrides["attention_bias"] = True
    if _head_dim(config) * config.num_attention_heads != config.hidden_size:
        overrides["head_dim"] = _head_dim(config)
    return overrides


def rope_divisors(config: Any) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs``: by how much the model's rope scaling divides each rotary frequency (float32,
    head_dim / 2), taken from transformers' own scaled frequencies; None for unscaled rope."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if _rope_type(config) == "default":
        return None
    rope, head_dim = _rope(config), _head_dim(config)
    plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaled, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    if attention_factor != 1.0:
        raise UserError(f"rope scaling {rope['rope_type']!r} scales attention by {attention_factor}, which GGUF's "
                        "llama does not hold: export it with --format hf")
    return (plain / scaled.double()).float().numpy()


def rope_from_divisors(divisors: np.ndarray, rope_theta: float) -> dict[str, Any]:
    """The inverse of `rope_divisors`, for reading a GGUF file's ``rope_freqs``: transformers rope parameters whose
    scaled frequencies are the file's. Equal divisors are linear scaling. Otherwise Llama 3's scaling is fitted:
    frequencies left as they are (divisor 1), divided by the factor (the largest divisor), and between them a band
    where 1/divisor = 1/factor + s (1 - 1/factor) with s linear in 1/wavelength. Its three parameters (original
    context, low and high frequency factors) scale together without changing any frequency, so the low one is set
    to 1 and the line gives the others. UserError where the result does not reproduce the file's divisors."""
    from transformers import LlamaConfig

    divisors = np.asarray(divisors, dtype=np.float64)
    factor = float(divisors.max())
    if np.allclose(divisors, factor, rtol=1e-6):
        params = {"rope_type": "linear", "rope_theta": float(rope_theta), "factor": _snap(factor)}
    else:
        head_dim = 2 * len(divisors)
        wavelength = 2 * np.pi * float(rope_theta) ** (np.arange(0, head_dim, 2) / head_dim)
        between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
        if between.sum() < 2:
            raise UserError(f"this GGUF file's rope_freqs ({len(divisors)} frequency divisors, {between.sum()} "
                            "between 1 and the largest) do not determine a Llama 3 rope scaling: load the model's "
                            "Hugging Face folder instead")
        smooth = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelength[between], smooth, 1)
        low_wavelength, high_wavelength = -slope / intercept, slope / (1 - intercept)  # where s is 0 and 1
        if not 0 < high_wavelength < low_wavelength:
            raise UserError(_NOT_A_SCALING)
        context = int(round(low_wavelength))  # an integer, as transformers wants; the factors keep the bands exact
        params = {"rope_type": "llama3", "rope_theta": float(rope_theta), "factor": _snap(factor),
                  "low_freq_factor": _snap(context / low_wavelength),
                  "high_freq_factor": _snap(context / high_wavelength), "original_max_position_embeddings": context}
    config = LlamaConfig(hidden_size=len(divisors) * 2, num_attention_heads=1, rope_parameters=params,
                         max_position_embeddings=2 * params.get("original_max_position_embeddings", 1))
    if not np.allclose(rope_divisors(config), divisors, rtol=1e-4):
        raise UserError(_NOT_A_SCALING)
    return params


_NOT_A_SCALING = ("this GGUF file's rope_freqs are not a rope scaling transformers runs (linear or Llama 3's): load "
                  "the model's Hugging Face folder instead")


def _snap(value: float) -> float:
    """A fitted value to three decimals where it is that within float32's noise (32.0000038 -> 32.0)."""
    value = float(value)
    return round(value, 3) if abs(value - round(value, 3)) < 1e-5 * abs(value) else value


# A tokenizer.json pre-tokenizer (as `_pre_tokenizer_shape` describes it) -> the name llama.cpp splits text by.
# GPT-2's byte-level regex alone is llama.cpp's "gpt-2"; single digits first, then it, is "smollm" (checked against
# llama.cpp 0.3.36 on the default model's file); a Split by a regular expression is named from transformers' own
# table of llama.cpp's names and their expressions (`_split_names`).
PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits:individual", "ByteLevel"): "smollm"}


def _pre_tokenizer_shape(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """A tokenizer.json pre-tokenizer as the sequence of steps it takes ("ByteLevel" with its own regex, "Digits:
    individual", "Split:<regex>" with the byte-level step after it not splitting again), or () if it has another
    form."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    shape = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space", False):
            shape.append("ByteLevel" if step.get("use_regex", True) else "ByteLevel:bytes")
        elif kind == "Digits" and step.get("individual_digits"):
            shape.append("Digits:individual")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") \
                and "Regex" in step.get("pattern", {}):
            shape.append(f"Split:{step['pattern']['Regex']}")
        else:
            return ()
    return tuple(shape)


def _split_names() -> dict[tuple[str, ...], str]:
    """{("Split:<regex>", "ByteLevel:bytes"): llama.cpp's name}, the first name transformers lists per regex."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
    except ImportError:  # an older transformers: only the shapes named in PRE_TOKENIZERS
        return {}
    names: dict[tuple[str, ...], str] = {}
    for name, regex in splits.items():
        names.setdefault((f"Split:{regex}", "ByteLevel:bytes"), name)
    return names


def _tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, tuple[Any, Any, Any]]:
    """The tokenizer.ggml.* fields of a byte-level BPE fast tokenizer, its vocabulary padded to the model's rows."""
    import json

    from gguf import GGUFValueType as Kind
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--format gguf needs the model's fast tokenizer (tokenizer.json): export it with --format hf")
    spec = json.loads(backend.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    # Qwen's tokenizers normalize to NFC first, which llama.cpp does not: text already in NFC (nearly all text)
    # splits the same, so that normalizer is let through; any other one changes what the merges see.
    normalizer = spec.get("normalizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel" \
            or normalizer.get("type", "NFC") != "NFC":
        raise UserError("--format gguf writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen style) for now; this "
                        f"model's is a {model.get('type')} tokenizer"
                        f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}: "
                        "export it with --format hf")
    shape = _pre_tokenizer_shape(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(shape) or _split_names().get(shape)
    if pre is None:
        raise UserError("--format gguf cannot name this tokenizer's pre-tokenizer to llama.cpp (it splits text by a "
                        f"name, not by tokenizer.json's rules: {json.dumps(spec.get('pre_tokenizer'))[:120]}): "
                        "export it with --format hf")
    tokens: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    types = dict.fromkeys(tokens, int(TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise UserError(f"the tokenizer has token ids up to {max(tokens)} but the model only {vocab_size} rows: "
                        "export it with --format hf")
    for index in range(vocab_size):  # rows no token names (vocabularies padded to a round size)
        if index not in tokens:
            tokens[index], types[index] = f"[PAD{index}]", int(TokenType.UNUSED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    probe = tokenizer("a").input_ids
    fields = {"tokenizer.ggml.model": ("gpt2", Kind.STRING, None), "tokenizer.ggml.pre": (pre, Kind.STRING, None),
              "tokenizer.ggml.tokens": ([tokens[i] for i in range(vocab_size)], Kind.ARRAY, Kind.STRING),
              "tokenizer.ggml.token_type": ([types[i] for i in range(vocab_size)], Kind.ARRAY, Kind.INT32),
              "tokenizer.ggml.merges": (merges, Kind.ARRAY, Kind.STRING),
              "tokenizer.ggml.add_bos_token": (bool(probe) and probe[0] == tokenizer.bos_token_id, Kind.BOOL, None),
              "tokenizer.ggml.add_space_prefix": (False, Kind.BOOL, None)}
    for key in ("bos", "eos", "unk", "pad"):
        if (index := getattr(tokenizer, f"{key}_token_id", None)) is not None:
            fields[f"tokenizer.ggml.{'unknown' if key == 'unk' else 'padding' if key == 'pad' else key}_token_id"] = (
                index, Kind.UINT32, None)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        fields["tokenizer.chat_template"] = (tokenizer.chat_template, Kind.STRING, None)
    return fields


def _copied_header(source: Path) -> dict[str, tuple[Any, Any, Any]]:
    """Every header field of the GGUF file `source` but the ones the writer writes itself and the file type (one per
    file; an export mixes types)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    return {field.name: (field.contents(), field.types[0],
                         field.types[1] if field.types[0] == GGUFValueType.ARRAY else None)
            for field in reader.fields.values()
            if not field.name.startswith("GGUF.") and field.name not in ("general.architecture", "general.file_type")}


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
    return None if kind is None else f"blk.{parts[2]}.{kind}.{parts[-1]}"  # weight or bias


def write(model: Any, quantized_forms: dict[Any, QuantizedWeight], source: Path | None, target: Path,
          tokenizer: Any = None, name: str = "") -> dict[str, Any]:
    """Write the model into the GGUF file `target`, its header and tokenizer copied from the GGUF file `source` or
    (None) made from the model's config and `tokenizer` under `name`; return what each tensor became:
    {"types": {type: count}, "requantized": [names of layers quantized again]}."""
    from gguf import GGMLQuantizationType as Type
    from gguf import GGUFWriter
    from gguf.quants import quantize

    config = model.config
    header = _copied_header(source) if source is not None else header_from_transformers(config, tokenizer, name)
    arch, interleaved = _architecture(config.model_type)
    shapes = {f"{arch}.block_count": config.num_hidden_layers, f"{arch}.attention.head_count": config.num_attention_heads,
              f"{arch}.attention.head_count_kv": config.num_key_value_heads,
              f"{arch}.feed_forward_length": config.intermediate_size}
    writer = GGUFWriter(target, arch)
    for key, (value, kind, item_kind) in header.items():
        writer.add_key_value(key, shapes.get(key, value), kind, item_kind)
    forms = {f"{name}.weight": quantized_forms[module] for name, module in model.named_modules()
             if module in quantized_forms}
    if config.tie_word_embeddings and "lm_head.weight" in forms:  # the tied matrix is quantized once, as the head
        forms["model.embed_tokens.weight"] = forms["lm_head.weight"]
    made: dict[str, Any] = {"types": {}, "requantized": []}
    # A scaled rope as llama.cpp's divisors, unless the copied header scales it already (linear scaling fields)
    if (divisors := rope_divisors(config)) is not None and f"{arch}.rope.scaling.type" not in header:
        writer.add_tensor("rope_freqs.weight", divisors, raw_dtype=Type.F32)
        made["types"]["F32"] = 1
    for name, tensor in model.state_dict().items():
        gguf_name = _gguf_name(name)
        if gguf_name is None or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        weight = tensor.detach().float().cpu().numpy()
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name.split(".")[-2])
        rows = None if heads is None or not interleaved else _rows_for_gguf(weight.shape[0], heads)
        if weight.ndim == 1:  # norms, and biases (a query/key bias in its weight's row order)
            data, kind = (weight if rows is None else weight[rows]), Type.F32
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


def load(path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """The GGUF file as transformers loads it (dequantized to float32), with the config values its reader does not
    restore handed over (`reader_overrides` of the model written; the file holds them for llama.cpp, and tests hold
    the rope divisors to transformers' own scaling)."""
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' bare tqdm bar over the tensors
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                    **(overrides or {})).eval()
