"""GGUF files written from model folders, run by llama.cpp: the same tokens and logits as the model in transformers?

`export --format gguf` makes the header and tokenizer of a folder's model itself (`report.gguf_file`); transformers'
reading of the file cannot check what only llama.cpp reads (the pre-tokenizer's name, the rope_freqs divisors).
This runs the files in llama.cpp (the optional llama-cpp-python) for these models:

- ``tiny``: the tests' random 4-block llama with its byte-level BPE tokenizer (pre-tokenizer "gpt-2");
- ``default folder``: the default model's float folder with SmolLM2's own pre-tokenizer (single digits first:
  "smollm"), on text with numbers;
- ``tiny, llama3 rope``: the tiny llama with Llama 3.1's rope scaling and its query/key weights x6 (so the logits
  depend on the rotary frequencies), also written without its rope_freqs tensor to show what the tensor changes;
- ``tiny qwen2``, ``tiny qwen3``, ``tiny llama, attention bias``: random 2-block models of those architectures with
  the tiny tokenizer (Qwen's tokenizer class splits by Qwen's regex: "qwen2"), query/key weights x6 and random
  query/key biases, so that a wrong row order shows; qwen3 with heads wider than hidden / heads.

Each is written with every linear layer at 16 bits (F16: the format's own rounding only) and at 4 bits g32 (Q4_1:
llama.cpp then multiplies on 8-bit quantized activations). Figures: do the token ids equal transformers', and the
largest |logit| difference over the first 64 positions against the largest |logit|, for llama.cpp and for
transformers' reading of the file (what `export` measures).

    PYTHONPATH=/path/to/llama_cpp_site python benchmarks/bench_gguf_llamacpp.py

Writes benchmarks/results/bench_gguf_llamacpp.json and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmtailor import compression, models  # noqa: E402
from llmtailor.plan import CompressionPlan, LayerPrecision  # noqa: E402
from llmtailor.report import gguf_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_model import save_tiny_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "bench_gguf_llamacpp.json"
POSITIONS = 64
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def folders(work: Path) -> dict[str, Path]:
    """The three model folders (the default one's weights linked, not copied)."""
    from transformers import AutoModelForCausalLM

    tiny = save_tiny_model(work / "tiny")
    smol = work / "smol"
    smol.mkdir()
    converted = Path(models.load_config(None)[0]._name_or_path)
    for item in converted.iterdir():
        if item.name != "tokenizer.json":
            (smol / item.name).symlink_to(item)
    spec = json.loads((converted / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                    spec["pre_tokenizer"]]}
    (smol / "tokenizer.json").write_text(json.dumps(spec))
    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    model.config.rope_parameters = LLAMA3_ROPE
    model.save_pretrained(work / "tiny-llama3")
    models.load_tokenizer(str(tiny)).save_pretrained(work / "tiny-llama3")
    made = {"tiny": tiny, "default folder": smol, "tiny, llama3 rope": work / "tiny-llama3"}
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = models.load_tokenizer(str(tiny))
    for name, config_class, model_class, extra in (
            ("tiny qwen2", Qwen2Config, Qwen2ForCausalLM, {}),
            ("tiny qwen3", Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),
            ("tiny llama, attention bias", LlamaConfig, LlamaForCausalLM, dict(attention_bias=True))):
        torch.manual_seed(0)
        model = model_class(config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **extra))
        with torch.no_grad():
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    projection.weight.mul_(6)
                    if projection.bias is not None:
                        projection.bias.normal_()
        made[name] = work / name.replace(" ", "-").replace(",", "")
        model.save_pretrained(made[name])
        tokenizer.save_pretrained(made[name])
    return made


def without_rope_freqs(path: Path, target: Path) -> None:
    from gguf import GGUFReader, GGUFWriter

    writer = GGUFWriter(target, "llama")
    for key, (value, kind, item_kind) in gguf_file._copied_header(path).items():
        writer.add_key_value(key, value, kind, item_kind)
    for tensor in GGUFReader(path).tensors:
        if tensor.name != "rope_freqs.weight":
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llamacpp_logits(path: Path, ids: list[int]) -> tuple[list[int], np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, n_threads=2, verbose=False)
    tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    llm.eval(ids[:POSITIONS])
    return tokens, np.array(llm.scores[:POSITIONS])


def text() -> str:
    from pydoc_data.topics import topics

    return topics[sorted(topics)[50]][:600] + " In 2026, 3.1415926 of 100000 items were 42nd."


TEXT = text()


def main() -> None:
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: build it (MACHINE.md) and put it on PYTHONPATH")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name, folder in folders(work).items():
            loaded = models.load(str(folder))
            ids = loaded.tokenizer(TEXT).input_ids
            for label, bits in (("F16", 16), ("Q4_1 (4 bits g32)", 4)):
                precision = {} if bits == 16 else {lin.name: LayerPrecision(4, 32) for lin in loaded.arch.linears}
                forms: dict = {}
                model = compression.apply(CompressionPlan(precision=precision), loaded.model, loaded.arch,
                                          quantized_forms=forms)
                path = work / f"{len(rows)}.gguf"
                gguf_file.write(model, forms, None, path, loaded.tokenizer, name)
                with torch.no_grad():
                    ours = model(torch.tensor([ids[:POSITIONS]])).logits[0].numpy()
                tokens, theirs = llamacpp_logits(path, ids)
                read = gguf_file.load(path, gguf_file.reader_overrides(model.config))
                with torch.no_grad():
                    read_back = read(torch.tensor([ids[:POSITIONS]])).logits[0].numpy()
                row = {"model": name, "weights": label, "pre_tokenizer": gguf_file._tokenizer_fields(
                    loaded.tokenizer, model.config.vocab_size)["tokenizer.ggml.pre"][0], "tokens": len(ids),
                    "tokens_equal": tokens == ids, "max_abs_logit": float(np.abs(ours).max()),
                    "max_abs_logit_difference": float(np.abs(ours - theirs).max()),
                    "max_abs_logit_difference_transformers_reading": float(np.abs(ours - read_back).max())}
                if gguf_file.rope_divisors(model.config) is not None:
                    without_rope_freqs(path, work / "no-rope.gguf")
                    row["max_abs_logit_difference_without_rope_freqs"] = float(
                        np.abs(ours - llamacpp_logits(work / "no-rope.gguf", ids)[1]).max())
                rows.append(row)
                print(row, flush=True)
    record = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "llama_cpp_python": llama_cpp.__version__, "positions": POSITIONS, "rows": rows}
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print("\n| model | weights | pre-tokenizer | tokens equal | llama.cpp: max abs logit difference | transformers' "
          "reading: max abs logit difference | max abs logit | llama.cpp without rope_freqs |\n"
          "|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['pre_tokenizer']} | {r['tokens_equal']} ({r['tokens']}) | "
              f"{r['max_abs_logit_difference']:.4f} | {r['max_abs_logit_difference_transformers_reading']:.4f} | "
              f"{r['max_abs_logit']:.2f} | "
              f"{r.get('max_abs_logit_difference_without_rope_freqs', float('nan')):.4f} |".replace("nan", ""))


if __name__ == "__main__":
    main()
