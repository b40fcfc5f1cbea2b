"""Compressed layers packed into GGUF blocks, and a GGUF export of a whole study's plan read back and measured."""

import json

import numpy as np
import pytest
import torch

from llmtailor import cli, compression, models
from llmtailor.errors import UserError
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity
from llmtailor.report import export, gguf_file


@pytest.mark.parametrize("precision, kind", [
    (LayerPrecision(4, 64), "Q4_1"), (LayerPrecision(3, 0), "Q4_1"), (LayerPrecision(2, 32), "Q4_1"),
    (LayerPrecision(4, 32, symmetric=True), "Q4_0"), (LayerPrecision(3, 128, symmetric=True), "Q4_0"),
    (LayerPrecision(8, 32, symmetric=True), "Q8_0"), (LayerPrecision(8, 0, symmetric=True), "Q8_0")])
def test_codes_become_the_gguf_blocks_that_hold_them(precision, kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    torch.manual_seed(0)
    weight = torch.randn(16, 256) * 0.05
    dense, quantized, _ = compression.compress_layer(weight, precision, LayerSparsity(0.5))  # pruned ones: zeros
    rows = gguf_file._rows_for_gguf(16, 4)
    data, made = gguf_file.encode(quantized, rows)
    assert made.name == kind and data.dtype == np.uint8
    read = torch.from_numpy(dequantize(data, GGMLQuantizationType[kind]))
    # Q4_1 stores the minimum (-scale x zero point) in float16: the one rounding; the other types are exact.
    tolerance = 1e-3 * dense.abs().max().item() if kind == "Q4_1" else 0
    torch.testing.assert_close(read, dense[rows], rtol=0, atol=tolerance)
    assert (read[dense[rows] == 0].abs() <= tolerance).all()


def test_codes_no_gguf_type_holds_are_left_to_the_caller():
    weight = torch.randn(8, 96)
    for precision in (LayerPrecision(8, 32), LayerPrecision(4, 48)):  # asymmetric 8 bits; groups across blocks
        assert gguf_file.encode(compression.compress_layer(weight, precision, LayerSparsity())[1]) is None
    assert gguf_file.encode(compression.compress_layer(torch.randn(8, 100), LayerPrecision(4, 0),
                                                       LayerSparsity())[1]) is None  # rows of no whole block


def test_the_rows_llamacpp_keeps_are_the_ones_transformers_puts_back():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor()
    weights = np.arange(24 * 3).reshape(24, 3)
    for heads in (6, 2, 1):  # query heads, or key heads under grouped-query attention
        stored = weights[gguf_file._rows_for_gguf(24, heads)]
        assert not np.array_equal(stored, weights) or heads == 24 // 2
        assert np.array_equal(processor._reverse_permute_weights(stored, heads, heads), weights)


def test_a_study_of_a_model_folder_is_written_as_gguf_with_its_own_tokenizer(tiny_model_dir, tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    args = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 3, "--results", tmp_path, "--study", "f",
            "--tasks", "none", "--context", 256, "--prompt", 64, "--eval-windows", 1, "--window-tokens", 64,
            "--no-progress"]
    assert cli.main([str(a) for a in args]) == 0
    import optuna

    study = optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path / 'f' / 'study.db'}")
    with pytest.raises(UserError, match="unknown export format 'onnx': choose one of hf, gguf"):
        export.export(study, 0, tmp_path / "out", format="onnx")
    trial = next(t for t in study.trials if t.user_attrs.get("status") == "evaluated"
                 and any(p["bits"] < 16 for p in json.loads(t.user_attrs["plan"])["precision"].values()))
    record = export.export(study, trial.number, tmp_path / "out", format="gguf", log=lambda line: None)
    assert record["export"]["kl"] == pytest.approx(trial.user_attrs["kl"], rel=0.05, abs=1e-4)
    from gguf import GGUFReader

    fields = GGUFReader(tmp_path / "out" / "model.gguf").fields
    assert (fields["tokenizer.ggml.model"].contents(), fields["tokenizer.ggml.pre"].contents()) == ("gpt2", "gpt-2")
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [3, 3, 3]  # <unk> <s> </s>: control tokens
    # transformers rebuilds the tokenizer from the file alone: it splits text as the model's own does
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    read = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    for key in sorted(topics)[40:46]:  # text the tiny tokenizer was not trained on
        assert read(topics[key]).input_ids == original(topics[key]).input_ids
    assert (read.bos_token, read.eos_token) == ("<s>", "</s>")


def test_what_a_gguf_file_cannot_hold_is_a_clear_error(tiny):
    import copy

    from tokenizers import decoders, pre_tokenizers

    def refused(match, config=None, tokenizer=None):
        with pytest.raises(UserError, match=match):
            gguf_file.check_source(None, config or tiny.model.config, tokenizer or tiny.tokenizer)

    gguf_file.check_source(None, tiny.model.config, tiny.tokenizer)  # the tiny model can be written
    for change, match in [(dict(model_type="mistral"), r"writes llama, qwen2, qwen3 models; this one is 'mistral'"),
                          (dict(mlp_bias=True), "does not write MLP bias terms yet"),
                          (dict(sliding_window=256), "does not write sliding-window attention yet"),
                          (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}),
                           r"does not write rope scaling 'dynamic' yet")]:
        config = copy.deepcopy(tiny.model.config)
        for key, value in change.items():
            setattr(config, key, value)
        refused(match, config)
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    refused(r"cannot name this tokenizer's pre-tokenizer to llama.cpp .*Whitespace", tokenizer=tokenizer)
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert gguf_file._tokenizer_fields(tokenizer, 512)["tokenizer.ggml.pre"][0] == "smollm"
    tokenizer.backend_tokenizer.decoder = decoders.Metaspace()
    refused("writes byte-level BPE tokenizers .* for now; this model's is a BPE tokenizer", tokenizer=tokenizer)
    config = copy.deepcopy(tiny.model.config)
    config.vocab_size = 100
    refused("the tokenizer has token ids up to 511 but the model only 100 rows", config)
    assert gguf_file._tokenizer_fields(tiny.tokenizer, 520)["tokenizer.ggml.tokens"][0][-8:] == [
        f"[PAD{i}]" for i in range(512, 520)]  # rows past the vocabulary: unused tokens, as llama.cpp expects


@pytest.fixture
def small_gguf(tmp_path):
    """A random llama of 2 small blocks with the default model's tokenizer, as a GGUF file."""
    from llmtailor.hw_profiles import llamacpp

    return llamacpp.write(models.default_model_path(), tmp_path / "small.gguf",
                          shapes=dict(hidden=128, intermediate=256, heads=4, kv_heads=2, blocks=2))


@pytest.mark.slow  # the default model's GGUF file: its tokenizer on a small random llama
def test_a_cut_student_written_as_gguf_reads_back_with_its_own_shapes(small_gguf, tmp_path, monkeypatch):
    from llmtailor import text
    from llmtailor.compression import calibration, structure
    from llmtailor.plan import CompressionPlan, Student

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    teacher = models.load(str(small_gguf))
    ids = calibration.calibration_windows(teacher.tokenizer, text.split("pydoc").calibration, count=2, tokens=128)
    stats = calibration.collect(teacher.model, teacher.arch, ids)
    scores = structure.importance(teacher.model, teacher.arch, stats, ids)
    student = Student(layers=(1,), heads={1: 2}, mlp_width={1: 128})  # one block, one KV group, half the MLP
    precision = {lin.name: LayerPrecision(4, 32) for lin in teacher.arch.linears if lin.block == 1}
    forms = {}
    model = compression.apply(CompressionPlan(precision=precision, student=student), teacher.model, teacher.arch,
                              calibration=stats, importance=scores, quantized_forms=forms)
    made = gguf_file.write(model, forms, small_gguf, tmp_path / "cut.gguf")
    assert made == {"types": {"F16": 1, "F32": 3, "Q4_1": 7}, "requantized": []}  # embedding F16: not quantized
    read = gguf_file.load(tmp_path / "cut.gguf")
    assert (read.config.num_hidden_layers, read.config.num_attention_heads, read.config.num_key_value_heads,
            read.config.intermediate_size) == (1, 2, 1, 128)
    with torch.no_grad():  # the embedding went through float16; the rest are the codes as they were
        ours, theirs = model(ids[:1, :32]).logits, read(ids[:1, :32]).logits
    assert (ours - theirs).abs().max() < 1e-3 * ours.abs().max()


@pytest.mark.slow  # the default model's GGUF file: its tokenizer on a small random llama
def test_a_gguf_export_reads_back_as_the_model_the_search_measured(small_gguf, tmp_path, monkeypatch):
    import optuna

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    small = small_gguf
    args = ["fit", small, "--memory", "30MB", "--trials", 4, "--results", tmp_path, "--study", "g", "--space", "guided",
            "--calibration-windows", 2, "--tasks", "none", "--context", 256, "--prompt", 64, "--eval-windows", 2,
            "--window-tokens", 64, "--no-progress"]
    assert cli.main([str(a) for a in args]) == 0
    study = optuna.load_study(study_name="g", storage=f"sqlite:///{tmp_path / 'g' / 'study.db'}")
    trial = next(t for t in study.trials if t.user_attrs.get("status") == "evaluated"
                 and any(p["bits"] < 16 for p in json.loads(t.user_attrs["plan"])["precision"].values()))
    record = export.export(study, trial.number, tmp_path / "out", format="gguf", log=lambda line: None)
    assert record["export"]["kl"] == pytest.approx(trial.user_attrs["kl"], rel=0.05, abs=1e-4)
    assert set(record["gguf"]["types"]) <= {"Q4_1", "Q4_0", "Q8_0", "F16", "F32"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "model.gguf", "plan.json",
                                                                     "scores.json"]
    assert "llama-cli -m model.gguf" in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "model.gguf").stat().st_size < small.stat().st_size / 2  # packed, not float32


def test_apply_hands_over_each_quantized_layers_codes(tiny):
    from llmtailor.plan import CompressionPlan

    precision = {lin.name: LayerPrecision(4, 32) for lin in tiny.arch.linears if lin.block in (0, 2)}
    forms = {}
    model = compression.apply(CompressionPlan(precision=precision), tiny.model, tiny.arch, quantized_forms=forms)
    assert {name for name, module in model.named_modules() if module in forms} == set(precision)
    assert all(torch.equal(q.dequantize(), module.weight.data) for module, q in forms.items())


def test_a_scaled_rope_is_written_as_llamacpps_frequency_divisors(tiny, tmp_path):
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters=llama3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention, so that the logits depend on the rotary frequencies
        model.model.layers[0].self_attn.q_proj.weight.mul_(6)
        model.model.layers[0].self_attn.k_proj.weight.mul_(6)
    divisors = gguf_file.rope_divisors(config)
    # wavelengths 2 pi 500000^(2i/16): the shortest are under 64/4 tokens (kept), the longest over 64 (divided by 32)
    assert divisors.shape == (8,) and divisors[0] == 1 and divisors[-1] == pytest.approx(32)
    assert 1 < divisors[1] < 32 and np.allclose(divisors[2:], 32)  # one between: smoothed
    made = gguf_file.write(model, {}, None, tmp_path / "m.gguf", tiny.tokenizer, "rope")
    assert made["types"]["F32"] == 1 + 3  # rope_freqs, the two norms, the final norm
    stored = next(t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "rope_freqs.weight")
    assert np.array_equal(np.asarray(stored.data), divisors)
    read = gguf_file.load(tmp_path / "m.gguf", gguf_file.reader_overrides(config))
    ids = torch.arange(200)[None] % len(tiny.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(read(ids).logits, model(ids).logits, atol=2e-3, rtol=0)  # float16 weights
    linear = LlamaConfig(**{**config.to_dict(), "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4,
                                                                    "factor": 4.0}})
    assert np.allclose(gguf_file.rope_divisors(linear), 4.0) and gguf_file.rope_divisors(tiny.model.config) is None
    yarn = LlamaConfig(**{**config.to_dict(), "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                                                                  "factor": 4.0}})
    with pytest.raises(UserError, match=r"does not write rope scaling 'yarn' yet \(only llama3, linear\)"):
        gguf_file.check_source(None, yarn, tiny.tokenizer)


def test_a_gguf_files_scaled_rope_survives_its_conversion_and_its_export(tiny, tmp_path):
    # transformers' GGUF reader keeps only the base frequency; a Llama 3.1 file would run unscaled without the fit
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from llmtailor import gguf_conversion

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(0)  # head width 64: 32 frequencies, three of them in the smoothed band
    config = LlamaConfig(vocab_size=len(tiny.tokenizer), hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters=llama3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(6)
        model.model.layers[0].self_attn.k_proj.weight.mul_(6)
    gguf_file.write(model, {}, None, tmp_path / "source.gguf", tiny.tokenizer, "rope")
    folder = tmp_path / "converted"
    folder.mkdir()
    gguf_conversion.write(tmp_path / "source.gguf", folder)
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert converted.config.rope_parameters == llama3
    ids = torch.arange(200)[None] % len(tiny.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, atol=2e-3, rtol=0)
        unscaled = AutoModelForCausalLM.from_pretrained(folder, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 500000.0}).eval()
        assert (unscaled(ids).logits - model(ids).logits).abs().max() > 0.05  # what the conversion gave before
    gguf_file.write(converted, {}, tmp_path / "source.gguf", tmp_path / "export.gguf")  # the file as its source
    stored = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "export.gguf").tensors}
    np.testing.assert_allclose(stored["rope_freqs.weight"], gguf_file.rope_divisors(config), rtol=1e-6)
    # A folder an earlier version converted (no rope scaling, no marker) is mended when it is next looked up
    kept = models._convert_gguf(tmp_path / "source.gguf", log=lambda line: None)
    assert (kept / models.ROPE_CHECKED).exists()
    (kept / models.ROPE_CHECKED).unlink()
    older = json.loads((kept / "config.json").read_text())
    (kept / "config.json").write_text(json.dumps({**older, "rope_parameters": {"rope_type": "default",
                                                                                "rope_theta": 500000.0}}))
    assert models._convert_gguf(tmp_path / "source.gguf") == kept and (kept / models.ROPE_CHECKED).exists()
    assert AutoModelForCausalLM.from_pretrained(kept).config.rope_parameters == llama3


def test_a_mend_that_cannot_read_the_file_says_why_in_one_line(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a GGUF file" * 10)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"broken.gguf is truncated or not a valid GGUF file"):
        models._mend_rope(tmp_path / "broken.gguf", tmp_path / "folder")  # read in a child; its error handed up
    assert not (tmp_path / "folder" / models.ROPE_CHECKED).exists()


@pytest.mark.parametrize("fields, divisors, error", [
    ({"llama.rope.scaling.type": "yarn"}, None, r"rope scaling 'yarn' is not one this tool can hand to transformers"),
    ({}, np.r_[np.ones(2), 5.0, np.full(5, 32.0)], r"1 between 1 and the largest\) do not determine a Llama 3"),
    ({}, np.linspace(1, 3, 16), r"rope_freqs are not a rope scaling transformers runs")])
def test_a_gguf_rope_the_conversion_cannot_restore_is_refused_before_converting(fields, divisors, error):
    from types import SimpleNamespace

    from llmtailor import gguf_conversion

    fields = {"general.architecture": "llama", "llama.rope.freq_base": 500000.0, **fields}
    reader = SimpleNamespace(fields={key: SimpleNamespace(contents=lambda v=value: v) for key, value in fields.items()},
                             tensors=[] if divisors is None else [SimpleNamespace(name="rope_freqs.weight",
                                                                                  data=divisors)])
    with pytest.raises(UserError, match=error):
        models._check_convertible(models.Path("x.gguf"), reader)
    linear = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    reader.fields = {key: SimpleNamespace(contents=lambda v=value: v) for key, value in {**fields, **linear}.items()}
    reader.tensors = []
    assert gguf_conversion.rope_parameters(reader) == {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama with attention bias"])
def test_other_architectures_are_written_in_their_own_row_order_and_read_back(kind, tiny, tmp_path):
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class, extra = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # query/key/value biases, rows as transformers keeps them
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),  # per-head query/key norms, heads wider
        "llama with attention bias": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True))}[kind]
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)
    model = model_class(config).eval()
    with torch.no_grad():  # sharper attention and non-zero biases: a wrong row order shows in the logits
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(6)
                if projection.bias is not None:
                    projection.bias.normal_()
    precision = {f"model.layers.{b}.{m}": LayerPrecision(4, 32) for b in range(2)
                 for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")}
    from llmtailor import arch as arch_mod

    forms = {}
    packed = compression.apply(CompressionPlan(precision=precision), model, arch_mod.from_model(model),
                               quantized_forms=forms)
    made = gguf_file.write(packed, forms, None, tmp_path / "m.gguf", tiny.tokenizer, kind)
    assert made["types"]["Q4_1"] == 6
    names = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("blk.0.attn_q.bias" in names) == (kind != "qwen3") and ("blk.1.attn_k_norm.weight" in names) == (
        kind == "qwen3")
    read = gguf_file.load(tmp_path / "m.gguf", gguf_file.reader_overrides(config))
    ids = torch.arange(64)[None] % len(tiny.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(read(ids).logits, packed(ids).logits, atol=3e-3, rtol=0)  # float16 weights
