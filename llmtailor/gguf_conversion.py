"""A GGUF file dequantized into a plain model folder, one tensor at a time.

transformers converts a GGUF file by dequantizing every tensor into one dictionary and
loading a whole model from it, then `save_pretrained` writes the model: the child that
converts the default model peaked at 1,167 MB for a 538 MB float32 model. Here each tensor is read, dequantized, renamed
and reshaped with transformers' own name map and tensor processor, and written to a
safetensors shard of at most `SHARD_BYTES` before the next is read, so the child holds one
shard and one tensor beside the libraries. The folder is what `save_pretrained` would have
written (config, generation config, sharded weights with their index, tokenizer), and it
loads into the same weights, bit for bit (tests/test_gguf_conversion.py). The child's peak
fell to about 600 MB, some 250 MB of it the libraries (BENCHMARKS.md, "A sweep's first run
on a new machine").

Only architectures whose tensor processor maps one GGUF tensor to one model tensor are
converted this way (`BY_TENSOR`); others (mixture-of-experts processors that assemble one
tensor from many) and any file whose tensors do not cover the model's parameters go
through transformers' whole-model conversion, which needs more memory but no assumptions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtailor.files import write_text

SHARD_BYTES = 64 << 20  # a shard is written once it holds this much: the child's working set beside one tensor
DEQUANTIZE_ROWS = 4096  # rows dequantized at once: bounds the temporaries to a slice of the largest tensor
BY_TENSOR = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor")  # one GGUF tensor -> one tensor


_READ = object()  # `write`'s rope not given: read from the file


def write(path: Path, folder: Path, rope: Any = _READ) -> None:
    """Dequantize the GGUF file at `path` into the (existing, empty) model folder `folder`. `rope`: the file's
    `rope_parameters` where the caller has read them already (`models._convert_gguf` does, from the reader it
    checks the file with): reading the header again here would leave some 200 MB of it in this process's heap
    beside the weights (measured: the child's peak 568 -> 796 MB)."""
    from transformers import AutoTokenizer

    if not _write_by_tensor(path, folder):
        _write_whole(path, folder)
    if rope is _READ:
        from gguf import GGUFReader

        rope = rope_parameters(GGUFReader(path))
    restore_rope(folder, rope)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)


ROPE_CHECKED = "rope-checked"  # in a conversion folder: its config holds the file's rope scaling


def restore_rope(folder: Path, rope: dict[str, Any] | None) -> None:
    """Put the file's rope parameters (`rope_parameters`; None: unscaled) into the converted folder's config, and
    mark the folder as holding them (`models._mend_rope` checks older folders once)."""
    if rope is not None:
        config = json.loads((folder / "config.json").read_text())
        write_text(folder / "config.json", json.dumps({**config, "rope_parameters": rope}, indent=2) + "\n")
    write_text(folder / ROPE_CHECKED, "")


def rope_parameters(reader: Any) -> dict[str, Any] | None:
    """The rope scaling of a llama.cpp file, which transformers' GGUF reader drops (it keeps the base frequency
    only, so the model would run unscaled): a ``rope_freqs`` tensor of per-frequency divisors (how llama.cpp's
    converter writes Llama 3.1's scaling) or linear scaling fields, as transformers rope parameters; None for an
    unscaled rope (and for gpt-oss, whose scaling transformers reads itself). UserError for scalings transformers
    cannot be given from the file (yarn and others), before anything is converted."""
    import numpy as np

    from llmtailor.errors import UserError
    from llmtailor.report.gguf_file import rope_from_divisors

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    arch = field("general.architecture")
    if arch == "gpt-oss":
        return None
    theta = float(field(f"{arch}.rope.freq_base") or 10000.0)
    divisors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    kind = field(f"{arch}.rope.scaling.type")
    if divisors is not None:
        return rope_from_divisors(np.asarray(divisors.data, dtype=np.float64), theta)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(field(f"{arch}.rope.scaling.factor"))}
    raise UserError(f"this GGUF file's rope scaling {kind!r} is not one this tool can hand to transformers (linear, "
                    "or Llama 3's as rope_freqs): load the model's Hugging Face folder instead")


def _write_whole(path: Path, folder: Path) -> None:
    """transformers' own conversion: the whole float model in memory, then saved."""
    from transformers import AutoModelForCausalLM

    from llmtailor import models

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    models._strip_quantization_marker(model)
    model.save_pretrained(folder)


def _write_by_tensor(path: Path, folder: Path) -> bool:
    """The weights, config and generation config written tensor by tensor; False (nothing written) where this
    file's architecture or tensors do not allow it."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    # transformers' config for the file first: its parse of the file's fields (some 60 MB of Python lists for a
    # 49k-token vocabulary) is freed before the reader below makes its own.
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    reader = GGUFReader(path)
    processor_class = gguf_utils.TENSOR_PROCESSORS.get(gguf_utils.read_field(reader, "general.architecture")[0],
                                                       gguf_utils.TensorProcessor)
    reader.fields.clear()  # the tokenizer's fields (read apart, after the weights); the tensors keep their own
    if processor_class.__name__ not in BY_TENSOR:
        return False
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):  # names and shapes only: no weights are made
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = processor_class(config=config.to_dict())  # the head counts that undo llama's query/key order
    parsed = {"config": processor.config, "tensors": {}}
    names = gguf_utils.get_gguf_hf_weights_map(skeleton, processor)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    # Every parameter the model owns must come from the file (a tied output head is the embedding's, not owned);
    # anything missing would be initialised at random on load, so such a file takes the whole-model path.
    owned = {name for name, _ in skeleton.named_parameters()}
    present = {names[t.name] for t in reader.tensors if t.name in names}
    if not owned <= present:
        return False

    shard: dict[str, Any] = {}
    files: dict[str, str] = {}
    total = shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(set(files.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for tensor in reader.tensors:
        result = processor.process(weights=_dequantized(tensor), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name not in names:
            continue  # tensors the model does not hold (as transformers skips them)
        name = names[result.name]
        weights = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))
        if tuple(weights.shape) != shapes[name]:
            return _discard(folder)
        if shard and shard_bytes + weights.numel() * 4 > SHARD_BYTES:
            flush()  # before the tensor joins: a shard never holds more than SHARD_BYTES beside a bigger tensor
        shard[name] = weights
        shard_bytes += weights.numel() * 4
        total += weights.numel() * 4
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(files.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype = torch.float32
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(folder)
    if skeleton.can_generate():
        GenerationConfig.from_model_config(config).save_pretrained(folder)
    return True


def _dequantized(tensor) -> Any:
    """One GGUF tensor as float32, DEQUANTIZE_ROWS rows at a time: gguf's dequantization makes temporaries twice
    the output's size, which for a large vocabulary's embedding would be the conversion's peak."""
    import numpy as np
    from gguf import dequantize

    rows = tensor.data.reshape(-1, tensor.data.shape[-1]) if tensor.data.ndim > 1 else tensor.data[None]
    first = dequantize(rows[:DEQUANTIZE_ROWS], tensor.tensor_type)
    out = np.empty((rows.shape[0], first.shape[-1]), dtype=np.float32)
    out[:DEQUANTIZE_ROWS] = first
    for start in range(DEQUANTIZE_ROWS, rows.shape[0], DEQUANTIZE_ROWS):
        out[start:start + DEQUANTIZE_ROWS] = dequantize(rows[start:start + DEQUANTIZE_ROWS], tensor.tensor_type)
    return out.reshape(*tensor.data.shape[:-1], first.shape[-1]) if tensor.data.ndim > 1 else out[0]


def _discard(folder: Path) -> bool:
    """Remove what a by-tensor write left, so the whole-model path starts from an empty folder."""
    for written in folder.iterdir():
        written.unlink()
    return False
